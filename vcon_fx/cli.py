"""The command line: parse, build a config, call the same public function a Python user calls.

The only module that prints. Errors show as one red line and a non-zero exit code (see the
README's table); VCON_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .cli_finetune import add_finetune_parser, cmd_finetune
from .demo import add_demo_parser, cmd_demo
from .errors import CaptureError, UsageError, VconError

__all__ = ["main", "build_parser"]

console = Console(stderr=False, highlight=False)
errors = Console(stderr=True, highlight=False)


# ---------------------------------------------------------------- arguments

def _add_source(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model source")
    g.add_argument("--weights", help="state dict (.safetensors) for torchvision:NAME or --arch")
    g.add_argument("--arch", help="architecture for a bare state dict: torchvision:NAME or a Hugging Face folder")
    g.add_argument("--trust-pickle", action="store_true", help="allow unpickling .pt files (runs code in the file!)")
    g.add_argument("--input-shape", help="example input shape, e.g. 1x3x224x224")
    g.add_argument("--seq-len", type=int, help="example sequence length for text models")
    g.add_argument("--capture", default="auto", choices=("auto", "fx", "export"), help="graph capture path")


def _add_method(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--method", required=required,
                   help="compression method: lowrank, prune, quant, or two joined by '+' (lowrank+quant)")
    g.add_argument("--rank", type=int, help="low-rank: singular values kept per layer")
    g.add_argument("--energy", type=float, help="low-rank: share of singular-value energy kept (0-1]")
    g.add_argument("--ratio", type=float, help="low-rank: parameter budget per layer (0-1)")
    g.add_argument("--rank-multiple", type=int, help="low-rank: round ranks up to a multiple (16 suits CPU kernels)")
    g.add_argument("--activation-aware", action="store_true", default=None,
                   help="low-rank: weight the SVD by each input's RMS on the example inputs (give real ones)")
    g.add_argument("--svd", choices=("auto", "exact", "randomized"),
                   help="low-rank: factor initialization (auto: randomized when rank ≤ ¼ of the layer's size)")
    g.add_argument("--sparsity", type=float, help="prune: share of weights zeroed per layer (0-1)")
    g.add_argument("--pattern", help="prune: N:M semi-structured sparsity, e.g. 2:4")
    g.add_argument("--structured", action="store_true", default=None, help="prune: remove whole neurons/channels")
    g.add_argument("--fixed-mask", action="store_true", default=None, help="prune: keep the first mask (default: re-chosen every step)")
    g.add_argument("--bits", help="quant: weight bits 8, 4, 2, 1 or ternary")
    g.add_argument("--act-bits", type=int, help="quant: fake-quantize layer inputs to 8 bits")
    g.add_argument("--separate-weights", action="store_true", default=None, help="prune/quant: the twin gets its own weight copy")
    s = p.add_argument_group("selection")
    s.add_argument("--targets", action="append", help="layer type, name glob or re:regex (repeatable)")
    s.add_argument("--ignore", action="append", default=[], help="layers to leave dense (same syntax)")
    s.add_argument("--granularity", default="layer", choices=("layer", "block"))
    s.add_argument("--blocks", action="append", default=[], help="block regions, e.g. 'layer*.*' or 'encoder.layer.*.intermediate+output'")
    s.add_argument("--include-stem", action="store_true", help="compress the first layer too")
    s.add_argument("--include-head", action="store_true", help="compress the last layer too")


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

    p = sub.add_parser("inspect", help="matched layers, parameters, FLOPs and the plan")
    p.add_argument("model", help="model source: .pt2, torchvision:NAME, HF folder, .pt, or a vcon artifact")
    _add_source(p)
    _add_method(p, required=False)
    p.add_argument("--graph", action="store_true", help="print the captured graph")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("transform", help="add compressed twins and blends (β = 1)")
    p.add_argument("model")
    _add_source(p)
    _add_method(p, required=True)
    p.add_argument("--freeze-dense", action="store_true", help="do not train the dense branch")
    p.add_argument("-o", "--output", help="artifact folder (default: NAME.vcon)")
    p.add_argument("--force", action="store_true", help="replace an existing output")

    add_finetune_parser(sub)
    add_demo_parser(sub)

    p = sub.add_parser("vanish", help="delete the dense branch once β = 0")
    p.add_argument("model", help="a vcon artifact folder")
    p.add_argument("--trust-pickle", action="store_true", help="the artifact's source is a pickled module you trust")
    p.add_argument("-o", "--output", help="artifact folder (default: NAME.small)")
    p.add_argument("--force", action="store_true", help="vanish even if β > 0 (outputs change) and replace the output")

    p = sub.add_parser("export", help="export to ONNX, optionally checked in onnxruntime")
    p.add_argument("model", help="a vanished vcon artifact, or any model source (exported dense)")
    _add_source(p)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch, and with the dense model")
    p.add_argument("--static-shapes", action="store_true", help="export fixed shapes (no dynamic batch/sequence axes)")
    p.add_argument("--int4", action="store_true", help="store weights of ≤ 4 bits as INT4 (opset 21; 8× smaller)")
    p.add_argument("--dynamic-int8", action="store_true",
                   help="run int8 matmuls as onnxruntime's DynamicQuantizeMatMul (activations quantized at run time: "
                        "integer GEMMs, faster on CPU)")
    p.add_argument("--force", action="store_true", help="replace an existing output")

    p = sub.add_parser("bench", help="time ONNX models in onnxruntime")
    p.add_argument("model", help=".onnx file")
    p.add_argument("--against", help="baseline .onnx file (e.g. the dense model)")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--json", action="store_true")
    return parser


# ---------------------------------------------------------------- helpers

_METHOD_OPTIONS = ("rank", "energy", "ratio", "rank_multiple", "svd", "activation_aware", "sparsity", "pattern", "structured", "fixed_mask", "bits", "act_bits",
                   "separate_weights")


def _config(args):
    from .methods.compose import compose_config

    return compose_config(args.method, {k: getattr(args, k, None) for k in _METHOD_OPTIONS})


def _load_source(args, source: str):
    from .load import load_model, parse_shape

    shape = parse_shape(args.input_shape) if getattr(args, "input_shape", None) else None
    return load_model(source, weights=args.weights, arch=args.arch, trust_pickle=args.trust_pickle,
                      input_shape=shape, seq_len=args.seq_len)


def _selection_kwargs(args) -> dict:
    return dict(targets=tuple(args.targets) if args.targets else None, ignore=tuple(args.ignore),
                granularity=args.granularity, blocks=tuple(args.blocks), include_stem=args.include_stem,
                include_head=args.include_head, capture=args.capture)


def _default_output(model: str, suffix: str) -> str:
    name = Path(model.split(":")[-1].rstrip("/")).name
    return f"{Path(name).stem}{suffix}"


def _describe(config) -> str:
    if hasattr(config, "configs"):  # lowrank+quant: each part with its own options
        return " + ".join(_describe(part) for part in config.configs)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("method", "version") and v not in (None, False) and v != defaults.get(k)}
    return config.method + "".join(f" {k}={v}" for k, v in fields.items())


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------- commands

def cmd_inspect(args) -> int:
    from .api import plan
    from .artifact import is_artifact, read_recipe

    if is_artifact(args.model):
        recipe = read_recipe(args.model)
        console.print(f"[bold]{args.model}[/]: vcon artifact, stage [bold]{recipe.stage}[/], method {_describe(recipe.config)}")
        console.print(f"capture path: {recipe.capture}; {len(recipe.groups)} group(s)")
        _plan_table(recipe.plans, recipe.excluded)
        return 0
    loaded = _load_source(args, args.model)
    from .methods.lowrank import LowRankConfig

    config = _config(args) if args.method else LowRankConfig(ratio=0.25)
    try:
        the_plan = plan(loaded.module, config, example_inputs=loaded.example_args,
                        example_kwargs=loaded.example_kwargs, seq_inputs=loaded.seq_inputs, **_selection_kwargs(args))
    except CaptureError:
        _uncaptured_layers(args, loaded.module)  # what the module tree alone tells, then the error
        raise
    if args.json:
        console.print_json(json.dumps({
            "capture": the_plan.capture, "notes": the_plan.notes, "method": config.to_dict(),
            "groups": [g.to_dict() for g in the_plan.groups],
            "layers": {p: pl.to_dict() for p, pl in the_plan.plans.items()},
            "excluded": the_plan.selection.excluded,
            "params_before": the_plan.total_params, "params_after": the_plan.params_after,
        }))
        return 0
    console.print(f"[bold]{args.model}[/] ({type(loaded.module).__name__}): captured with [bold]{the_plan.capture}[/]")
    for note in the_plan.notes:
        console.print(f"  [dim]{note}[/]")
    if args.graph:
        console.print(str(the_plan.extra["gm"].graph))
    _plan_table(the_plan.plans, the_plan.selection.excluded, title=f"plan: {_describe(config)}")
    console.print(f"{len(the_plan.groups)} group(s) ({the_plan.selection.granularity}); parameters "
                  f"{_fmt(the_plan.total_params)} → {_fmt(the_plan.params_after)} "
                  f"({the_plan.params_after / max(the_plan.total_params, 1):.1%})")
    return 0


def _uncaptured_layers(args, model) -> None:
    """The compressible layers a walk of the module tree finds, for a model no tracer captured."""
    from .methods.base import COMPRESSIBLE

    layers = {name: m for name, m in model.named_modules() if isinstance(m, COMPRESSIBLE)}
    if args.json:
        console.print_json(json.dumps({"capture": None, "layers_found": {
            n: {"type": type(m).__name__, "shape": list(m.weight.shape), "params": m.weight.numel()}
            for n, m in layers.items()}}))
        return
    table = Table(title=f"{type(model).__name__}: not captured; its module tree holds {len(layers)} compressible layer(s)")
    for col in ("layer", "type", "weight shape", "params"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for name, m in layers.items():
        table.add_row(name, type(m).__name__, "×".join(map(str, m.weight.shape)), _fmt(m.weight.numel()))
    console.print(table)
    console.print("[yellow]no plan:[/] the graph could not be captured (reason below); layers inside a "
                  "submodule that does trace can be reached by keeping the failing part whole (--ignore it)")


def _plan_table(plans, excluded, title="plan") -> None:
    table = Table(title=title)
    for col in ("layer", "type", "weight shape", "params", "FLOPs", "→ params", "→ FLOPs", "→ bytes", "decision"):
        table.add_column(col, justify="right" if col not in ("layer", "type", "decision") else "left")
    for path, pl in plans.items():
        decision = f"[yellow]skipped: {pl.skip_reason}[/]" if pl.skipped else ", ".join(f"{k} {v}" for k, v in pl.detail.items())
        table.add_row(path, pl.kind, "×".join(map(str, pl.shape)), _fmt(pl.params_before), _fmt(pl.flops_before),
                      _fmt(pl.params_after), _fmt(pl.flops_after), _bytes(pl.bytes_after), decision)
    console.print(table)
    for path, reason in excluded.items():
        if path not in plans:
            console.print(f"  [dim]dense: {path}: {reason}[/]")


def cmd_transform(args) -> int:
    from .api import transform, uses_input_statistics
    from .artifact import save
    from .fileio import check_output

    config = _config(args)
    out = check_output(args.output or _default_output(args.model, ".vcon"), force=args.force, inputs=(args.model,))
    loaded = _load_source(args, args.model)
    with console.status("capturing and transforming…"):
        vm = transform(loaded.module, config, example_inputs=loaded.example_args, example_kwargs=loaded.example_kwargs,
                       seq_inputs=loaded.seq_inputs, freeze_dense=args.freeze_dense, source=loaded.source,
                       **_selection_kwargs(args))
    recipe = vm.meta["vcon"]
    console.print(f"capture path: [bold]{recipe.capture}[/]" + "".join(f"\n  [dim]{n}[/]" for n in recipe.notes))
    if uses_input_statistics(config):
        console.print("[yellow]note:[/] --activation-aware measured the input statistics on the synthetic example "
                      "inputs the CLI builds; for statistics of real data call vcon_fx.transform with a real batch")
    done = [p for p in recipe.plans.values() if not p.skipped]
    before = sum(p.params_before for p in done)
    after = sum(p.params_after for p in done)
    console.print(f"{len(recipe.groups)} group(s) blended at β = 1 with {_describe(config)}; compressed layers hold "
                  f"{_fmt(before)} → {_fmt(after)} parameters; {len(recipe.excluded)} layer(s) left dense")
    save(vm, out, force=args.force)
    console.print(f"[green]wrote[/] {out}")
    return 0


def cmd_vanish(args) -> int:
    from .api import vanish
    from .artifact import load, save
    from .fileio import check_output
    out = check_output(args.output or _default_output(args.model, ".small"), force=args.force, inputs=(args.model,))
    vm = load(args.model, trust_pickle=args.trust_pickle)
    small = vanish(vm, force=args.force)
    save(small, out, force=args.force)
    size = lambda p: sum(f.stat().st_size for f in Path(p).iterdir())
    console.print(f"[green]wrote[/] {out} ({_bytes(size(out))}; was {_bytes(size(args.model))})")
    return 0


def cmd_export(args) -> int:
    from .artifact import is_artifact, load, read_recipe
    from .errors import StageError
    from .export.check import check_onnx
    from .export.onnx import export_onnx
    from .fileio import check_output
    from .recipe import inputs_from_spec

    if args.int4 and args.dynamic_int8:
        raise UsageError("--int4 and --dynamic-int8 exclude each other: the integer GEMMs take INT8 weights")
    out = check_output(args.onnx, force=args.force, inputs=(args.model,))
    if is_artifact(args.model):
        recipe = read_recipe(args.model)
        if recipe.stage != "vanished":
            raise StageError(f"{args.model} still has its dense branch (stage {recipe.stage}); run `vcon-fx vanish {args.model}` first")
        model = load(args.model, trust_pickle=args.trust_pickle)
        inputs, kwargs = inputs_from_spec(recipe.inputs)
        seq_inputs = tuple(recipe.selection.get("seq_inputs") or ())
        dense_source = recipe.source
    else:
        loaded = _load_source(args, args.model)
        model, inputs, kwargs, seq_inputs, dense_source = (loaded.module, loaded.example_args, loaded.example_kwargs,
                                                           loaded.seq_inputs, None)
    integer = args.int4 or args.dynamic_int8
    with tempfile.TemporaryDirectory() as float_dir:
        exported = Path(float_dir) / "float.onnx" if integer else out
        with console.status("exporting to ONNX…"):
            export_onnx(model, exported, inputs, example_kwargs=kwargs, seq_inputs=seq_inputs, force=args.force,
                        dynamic_batch=not args.static_shapes)
        if integer:
            from .export.quantize import compress_onnx_weights

            with console.status("storing integer weights…"):
                compressed = compress_onnx_weights(exported, out, bits=4 if args.int4 else 8,
                                                   kernel="dynamic" if args.dynamic_int8 else "weight-only",
                                                   require_integers=True, force=args.force)
            for note in compressed.notes:
                console.print(f"[dim]{escape(note)}[/]")
    console.print(f"[green]wrote[/] {out} ({_bytes(Path(out).stat().st_size)})")
    if not args.check:
        return 0
    # Integer kernels quantize activations (DynamicQuantizeMatMul; MatMulNBits at onnxruntime's default
    # accuracy level): outputs move by that rounding, so parity is judged at 5 % of the output range.
    rtol = 0.05 if integer else 1e-4
    if integer:
        console.print("[yellow]note:[/] integer kernels quantize activations at run time: parity allows 5 % of "
                      "the output range; the cosine column shows the fidelity")
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        if dense_source:
            from .load import rebuild_model

            dense = rebuild_model(dense_source, trust_pickle=args.trust_pickle)
            reference = Path(tmp) / "dense.onnx"
            with console.status("exporting the dense model the same way…"):
                export_onnx(dense.module, reference, dense.example_args, example_kwargs=dense.example_kwargs,
                            seq_inputs=dense.seq_inputs, dynamic_batch=not args.static_shapes)
        with console.status("checking in onnxruntime…"):
            report = check_onnx(model, out, inputs, example_kwargs=kwargs, reference_onnx=reference, rtol=rtol)
        _check_table(report)
        note = _speed_note(read_recipe(args.model).config) if is_artifact(args.model) else None
        if note:
            console.print(f"[yellow]note:[/] {note}")
        report.assert_ok()
    return 0


def _speed_note(config) -> str | None:
    """What the method does not buy on onnxruntime's CPU provider, said plainly."""
    configs = getattr(config, "configs", None) or (config,)
    for c in configs:
        if c.method == "prune" and not getattr(c, "structured", False):
            return ("unstructured and N:M sparsity keep a dense weight store: onnxruntime on CPU runs it "
                    "no faster and the file is no smaller (use --structured for smaller layers)")
    return None


def _check_table(report) -> None:
    data = report.to_dict()
    parity = Table(title="onnxruntime vs PyTorch")
    for col in ("output", "shape", "max abs diff", "rel diff", "cosine", "ok"):
        parity.add_column(col, justify="left" if col == "output" else "right")
    for out in data["outputs"]:
        parity.add_row(out["name"], "×".join(map(str, out["shape"])), f"{out['max_abs_diff']:.3g}",
                       f"{out['rel_max_diff']:.3g}", f"{out['cosine']:.6f}",
                       "[green]yes[/]" if out["ok"] else f"[red]{out['problem'] or 'no'}[/]")
    console.print(parity)
    sizes = Table(title="deployment (onnxruntime CPU)")
    for col in ("model", "size", "median latency", "size ratio", "latency ratio"):
        sizes.add_column(col, justify="left" if col == "model" else "right")
    sizes.add_row(str(data["onnx_path"]), _bytes(data["size_bytes"]), f"{data['latency_ms']:.2f} ms",
                  f"{data['size_ratio']:.3f}" if data.get("size_ratio") else "",
                  f"{data['latency_ratio']:.3f}" if data.get("latency_ratio") else "")
    if data.get("reference_path"):
        sizes.add_row("dense (same export)", _bytes(data["reference_size_bytes"]),
                      f"{data['reference_latency_ms']:.2f} ms", "1", "1")
    console.print(sizes)


def cmd_bench(args) -> int:
    from .bench import bench_onnx

    with console.status("timing in onnxruntime…"):
        report = bench_onnx(args.model, against=args.against, threads=args.threads, batch=args.batch, seq=args.seq,
                            runs=args.runs)
    data = report.to_dict()
    if args.json:
        console.print_json(json.dumps(data))
        return 0
    rows = data.get("rows", [])
    table = Table(title=f"onnxruntime, batch {args.batch}")
    if rows:
        for col in (c for c in rows[0] if c != "session_config"):
            table.add_column(col, justify="left" if col in ("model", "path", "name") else "right")
        for row in rows:
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in row.items() if k != "session_config"])
    console.print(table)
    for row in rows:
        if row.get("session_config"):
            entries = ", ".join(f"{k}={v}" for k, v in row["session_config"].items())
            console.print(f"[yellow]note:[/] {row['path']} ran with {entries} (weight-only integer convolutions "
                          "are dequantized once at load: deploy with the same session option)")
    if data.get("ratios"):
        console.print("ratios against baseline: " + ", ".join(f"{k} {v:.3g}" for k, v in data["ratios"].items()))
    return 0


COMMANDS = {
    "inspect": cmd_inspect,
    "transform": cmd_transform,
    "finetune": cmd_finetune,
    "vanish": cmd_vanish,
    "export": cmd_export,
    "bench": cmd_bench,
    "demo": cmd_demo,
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
