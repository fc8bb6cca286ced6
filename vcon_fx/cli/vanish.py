"""`vcon-fx vanish`: delete the dense branch once β = 0."""

from __future__ import annotations

from pathlib import Path

from .options import default_output
from .render import console, fmt_bytes

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Add the `vanish` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("vanish", help="delete the dense branch once β = 0")
    p.add_argument("model", help="a vcon artifact folder")
    p.add_argument("--trust-pickle", action="store_true", help="the artifact's source is a pickled module you trust")
    p.add_argument("-o", "--output", help="artifact folder (default: NAME.small)")
    p.add_argument("--force", action="store_true", help="vanish even if β > 0 (outputs change) and replace the output")


def run(args) -> int:
    from ..graph.pipeline import vanish
    from ..io.artifact import load, save
    from ..io.atomic import check_output
    out = check_output(args.output or default_output(args.model, ".small"), force=args.force, inputs=(args.model,))
    vm = load(args.model, trust_pickle=args.trust_pickle)
    small = vanish(vm, force=args.force, copy_model=False)  # the loaded model is ours: no second copy
    save(small, out, force=args.force)
    size = lambda p: sum(f.stat().st_size for f in Path(p).iterdir())
    console.print(f"[green]wrote[/] {out} ({fmt_bytes(size(out))}; was {fmt_bytes(size(args.model))})")
    return 0
