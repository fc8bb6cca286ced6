"""`vcon-fx demo`: run vcon_fx.demo and print its table (part of the CLI: it prints, with rich)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich import box
from rich.table import Table

from .render import console, errors

__all__ = ["add_demo_parser", "cmd_demo", "demo_table"]


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `demo` sub-command to an argparse sub-parsers object; returns its parser."""
    p = subparsers.add_parser("demo", help="the whole pipeline on real handwritten digits: abrupt vs VCON, table + plot")
    p.add_argument("--out", default="demo_out", help="output folder: plot, ONNX files, results.json (default demo_out)")
    p.add_argument("--fast", action="store_true", help="reduced sizes and only lowrank + quant unless --methods is given (a smoke test, < 30 s)")
    p.add_argument("--methods", help="comma-separated methods (default: every registered method the demo can run)")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and dropout seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace an --out folder that is not an earlier demo's")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    return p


def cmd_demo(args) -> int:
    """Run the demo with a progress bar, then print the table (or the JSON); 0 when every ONNX check passed."""
    from ..demo.run import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True)
    tasks: dict = {}

    def on_event(event: dict) -> None:
        stage = event["stage"]
        if stage == "pretrain":
            tasks["pretrain"] = progress.add_task("dense training", total=None, info=f"{event['steps']} steps")
        elif stage == "finetune":
            key = (event["method"], event["run"])
            if key not in tasks:
                for t in tasks.values():
                    progress.update(t, visible=False)
                tasks[key] = progress.add_task(f"{event['method']} {event['run']}", total=event["steps"], info="")
            acc = event.get("accuracy")
            info = f"β {event['beta']:.2f}" + (f"  test acc {acc:.3f}" if acc is not None else "")
            progress.update(tasks[key], completed=event["step"], info=info)
        elif stage == "export":
            for t in tasks.values():
                progress.update(t, visible=False)
            tasks[("export", event["method"])] = progress.add_task(f"{event['method']} → ONNX", total=None, info="")

    with progress:
        result = run_demo(args.out, methods=methods, seed=args.seed, fast=args.fast, force=args.force,
                          on_event=on_event)
    if not console.is_terminal:  # piped or captured: keep the table on one line per row
        console.width = max(console.width, 132)
    if args.json:
        console.print_json(json.dumps(result.to_dict()))
    else:
        console.print(demo_table(result))
        out = Path(result.out)
        console.print(f"wrote {out / result.plot}, {out / result.results} and the ONNX files in {out}/ "
                      f"({result.seconds:.0f} s)")
        for name, why in result.skipped.items():
            console.print(f"[yellow]not run:[/] {name}: {why}")
    bad = [r.method for r in result.rows if not r.onnx_ok]
    if bad:
        errors.print(f"[red]error:[/] onnxruntime disagrees with PyTorch for {', '.join(bad)} (see results.json)")
        return 11
    return 0


def demo_table(result) -> Table:
    """The demo's one table: method, parameters, ONNX size, latency, accuracy dense / abrupt / VCON."""
    s = result.settings
    q = round(s["steps"] * s["transition"])
    table = Table(title=f"digits test set ({result.test_size} images), tiny ViT, seed {result.seed}: "
                        f"{s['steps']} fine-tuning steps each, VCON Q = {q} (linear β)",
                  caption=f"latency: onnxruntime CPU, {s['latency_threads']} thread, batch {s['latency_batch']}, "
                          "median; untrained = abrupt compression before fine-tuning; Δ = VCON − abrupt; "
                          "ORT = the VCON model's ONNX file in onnxruntime",
                  box=box.SIMPLE_HEAD)
    for col, justify in (("method", "left"), ("setting", "left"), ("params", "right"), ("ONNX", "right"),
                         ("latency", "right"), ("dense", "right"), ("untrained", "right"), ("abrupt", "right"),
                         ("VCON", "right"), ("Δ", "right"), ("ORT", "right")):
        table.add_column(col, justify=justify)
    table.add_row("dense", "", _count(result.dense_params), _bytes(result.dense_onnx_bytes),
                  f"{result.dense_latency_ms:.2f} ms", f"{result.dense_accuracy:.3f}", "", "", "", "", "")
    for r in result.rows:
        gain = r.gain * 100
        style = "green" if gain > 0 else ("red" if gain < 0 else "")
        delta = f"[{style}]{gain:+.1f} pt[/]" if style else f"{gain:+.1f} pt"
        table.add_row(r.method, r.setting, _count(r.params), _bytes(r.onnx_bytes), f"{r.latency_ms:.2f} ms",
                      f"{result.dense_accuracy:.3f}", f"{r.acc_compressed:.3f}", f"{r.acc_abrupt:.3f}",
                      f"{r.acc_vcon:.3f}", delta,
                      f"{r.acc_vcon_onnx:.3f}" + ("" if r.onnx_ok else " [red]MISMATCH[/]"))
    return table


def _count(n: float) -> str:
    return f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def _bytes(n: float) -> str:
    return f"{n / 1e3:.0f} kB" if n >= 1e3 else f"{n:.0f} B"
