"""What the CLI shows: the two consoles and the tables and numbers every command formats alike."""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

__all__ = ["console", "errors", "describe", "fmt_count", "fmt_bytes", "plan_table", "check_table"]

console = Console(stderr=False, highlight=False)
errors = Console(stderr=True, highlight=False)


def describe(config) -> str:
    if hasattr(config, "configs"):  # lowrank+quant: each part with its own options
        return " + ".join(describe(part) for part in config.configs)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("method", "version") and v not in (None, False) and v != defaults.get(k)}
    return config.method + "".join(f" {k}={v}" for k, v in fields.items())


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def plan_table(plans, excluded, title="plan") -> None:
    table = Table(title=title)
    allocated = any("error" in pl.detail for pl in plans.values())  # --allocate measured each layer's output error
    for col in ("layer", "type", "weight shape", "params", "FLOPs", "→ params", "→ FLOPs", "→ bytes",
                *(("output error",) if allocated else ()), "decision"):
        table.add_column(col, justify="right" if col not in ("layer", "type", "decision") else "left")
    for path, pl in plans.items():
        # nested plans (a composed method's parts, a recurrent layer's gate matrices) are in `inspect --json`
        decision = f"[yellow]skipped: {pl.skip_reason}[/]" if pl.skipped else ", ".join(
            f"{k} {v}" for k, v in pl.detail.items() if not isinstance(v, dict) and k != "error")
        error = (f"{pl.detail['error']:.3g}" if "error" in pl.detail else "",) if allocated else ()
        table.add_row(path, pl.kind, "×".join(map(str, pl.shape)), fmt_count(pl.params_before), fmt_count(pl.flops_before),
                      fmt_count(pl.params_after), fmt_count(pl.flops_after), fmt_bytes(pl.bytes_after), *error, decision)
    console.print(table)
    for path, reason in excluded.items():
        if path not in plans:
            console.print(f"  [dim]dense: {path}: {reason}[/]")


def check_table(report) -> None:
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
    sizes.add_row(str(data["onnx_path"]), fmt_bytes(data["size_bytes"]), f"{data['latency_ms']:.2f} ms",
                  f"{data['size_ratio']:.3f}" if data.get("size_ratio") else "",
                  f"{data['latency_ratio']:.3f}" if data.get("latency_ratio") else "")
    if data.get("reference_path"):
        sizes.add_row("dense (same export)", fmt_bytes(data["reference_size_bytes"]),
                      f"{data['reference_latency_ms']:.2f} ms", "1", "1")
    console.print(sizes)
