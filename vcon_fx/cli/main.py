"""The command line: parse, build a config, call the same public function a Python user calls.

The only module that prints. Errors show as one red line and a non-zero exit code (see
docs/cli.md's table); VCON_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os

from rich.markup import escape

from .. import __version__
from ..errors import VconError
from . import bench, compress, demo, export, finetune, generate, inspect, transform, vanish
from .render import errors

__all__ = ["main", "build_parser", "INTERRUPTED"]

INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line, like every other vcon-fx error (exit 2)."""

    def error(self, message: str):
        errors.print(f"[red]error:[/] {escape(message)} (see `{escape(self.prog)} --help`)", soft_wrap=True)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vcon-fx", description="Vanishing Contributions compression for any PyTorch model.")
    parser.add_argument("--version", action="version", version=f"vcon-fx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect.add_parser(sub)
    compress.add_parser(sub)
    transform.add_parser(sub)
    finetune.add_finetune_parser(sub)
    demo.add_demo_parser(sub)
    vanish.add_parser(sub)
    export.add_parser(sub)
    bench.add_parser(sub)
    generate.add_parser(sub)
    return parser


COMMANDS = {
    "inspect": inspect.run,
    "compress": compress.run,
    "transform": transform.run,
    "finetune": finetune.cmd_finetune,
    "vanish": vanish.run,
    "export": export.run,
    "bench": bench.run,
    "generate": generate.run,
    "demo": demo.cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vcon-fx` and `python -m vcon_fx`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except VconError as exc:
        if os.environ.get("VCON_DEBUG"):
            raise
        # escape: messages quote paths and torch errors, and "[/x]" or "[word]" in them is not markup.
        errors.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/]")
        return INTERRUPTED
