"""`vcon-fx bench`: time ONNX models in onnxruntime, each in a fresh process."""

from __future__ import annotations

import json

from rich.table import Table

from .render import console

__all__ = ["add_parser", "run"]


def _deployment_note(row: dict) -> str | None:
    """The session options a deployment of the row's file must use, said for the user (None: nothing special)."""
    if row.get("session_config"):
        entries = ", ".join(f"{k}={v}" for k, v in row["session_config"].items())
        return (f"{row['path']} ran with {entries} (weight-only integer convolutions are dequantized once at load: "
                "deploy with the same session option)")
    import onnx

    from ..bench.worker import is_static_int8

    if is_static_int8(onnx.load(row["path"], load_external_data=False).graph):
        return (f"{row['path']} ran with onnxruntime's default session options: graph optimizations on, which fuse its "
                "QDQ pairs into integer kernels (static int8); deploy the same way, without session.disable_quant_qdq")
    return None


def add_parser(sub) -> None:
    """Add the `bench` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("bench", help="time ONNX models in onnxruntime")
    p.add_argument("model", help=".onnx file")
    p.add_argument("--against", help="baseline .onnx file (e.g. the dense model)")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from ..bench.compare import bench_onnx

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
        note = _deployment_note(row)
        if note:
            console.print(f"[yellow]deploy:[/] {note}", soft_wrap=True)
    if data.get("ratios"):
        console.print("ratios against baseline: " + ", ".join(f"{k} {v:.3g}" for k, v in data["ratios"].items()))
    return 0
