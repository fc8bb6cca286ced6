"""QUALITY.md from the runs of benchmarks/quality.py: the tables and the verdict the issue asks for (pure)."""

from __future__ import annotations

import statistics

GOAL_POINTS = 3.0  # issue 13: the best VCON column ahead of the best column without the transition by ≥ 3 points


def render(meta: dict, runs: list[dict], minilm: list[dict], grid, columns: dict, without: list[str],
           setting_label) -> str:
    """The whole file: how it was made, the ViT tables with their verdicts, the MiniLM one-shot table."""
    lines = ["# Quality: the compressed model, one ingredient at a time (issue 13)", "",
             "Produced by `benchmarks/quality.py` (this file is its output):", "", f"    {meta['command']}", "",
             f"Started {meta['started']}, {meta['wall_min']} min wall on a 2-core machine; torch {meta['torch']}.", ""]
    if runs:
        lines += _vit(meta, runs, grid, columns, without, setting_label)
    if minilm:
        lines += _minilm(minilm)
    return "\n".join(lines) + "\n"


def _vit(meta, runs, grid, columns, without, setting_label) -> list[str]:
    dense = [100 * a for a in meta["dense"].values()]
    lines = ["## (b) digits ViT, accuracy of the exported ONNX in onnxruntime", "",
             f"- Dense test accuracy {statistics.mean(dense):.1f} % (seeds {', '.join(map(str, grid.seeds))}); "
             "360 test images (1 image = 0.28 points); mean ± sample std over seeds.",
             f"- Every trained column: the same Adam steps (lr {grid.lr:g}, batch {grid.batch_size}) and data order "
             "per seed; VCON columns spend Q = 20 % of them on the transition; data-aware and allocated columns "
             "read 128 training images as calibration data; the teacher is `distill=0.5` while β > 0.",
             "- Verdict: the best column with the transition against the best without it, Δ per seed "
             f"(goal: ≥ {GOAL_POINTS:g} points), and the transition's own share: VCON against abrupt with the "
             "same ingredients.", ""]
    by: dict = {}
    for r in runs:
        key = (r["method"], str(r["strength"]), r["budget"])
        by.setdefault(key, {}).setdefault(r["column"], {})[r["seed"]] = 100 * r["accuracy"]
    for method, strength in grid.settings:
        for budget in grid.budgets:
            table = by.get((method, str(strength), budget), {})
            if not table:
                continue
            lines += [f"### {setting_label(method, strength)}, {budget} steps", "",
                      "| column | accuracy % |", "|---|---|"]
            lines += [f"| {c} | {_ms(list(table[c].values()))} |" for c in columns if c in table]
            lines += ["", *_verdict(table, without), ""]
    return lines


def _verdict(table: dict, without: list[str]) -> list[str]:
    mean = {c: statistics.mean(v.values()) for c, v in table.items()}
    best_without = max((c for c in table if c in without), key=mean.get)
    best_with = max((c for c in table if c not in without), key=mean.get)
    deltas = [table[best_with][s] - table[best_without][s] for s in table[best_with] if s in table[best_without]]
    met = statistics.mean(deltas) >= GOAL_POINTS
    out = [f"- Best with the transition: **{best_with}**; best without: **{best_without}**; Δ "
           f"{_ms(deltas, signed=True)} points, ahead in {sum(d > 0 for d in deltas)}/{len(deltas)} seeds: "
           f"goal {'MET' if met else 'MISSED'}."]
    pairs = (("VCON plain", "abrupt plain"), ("VCON data-aware", "abrupt data-aware"),
             ("VCON DA + teacher + allocation", "abrupt DA + allocation"))
    parts = []
    for vcon, abrupt in pairs:
        if vcon in table and abrupt in table:
            d = [table[vcon][s] - table[abrupt][s] for s in table[abrupt] if s in table[vcon]]
            parts.append(f"{vcon} − {abrupt} {_ms(d, signed=True)} ({sum(x > 0 for x in d)}/{len(d)} seeds ahead)")
    if parts:
        out.append("- The transition alone (same start, same steps): " + "; ".join(parts) + ".")
    return out


def _minilm(rows: list[dict]) -> list[str]:
    lines = ["## (a) all-MiniLM-L6-v2, one-shot (no fine-tuning)", "",
             "Every Linear in `encoder.layer.*` compressed; β = 0, vanished; 471 held-out English sentences "
             "(CPython's pydoc topics, 64 tokens); data-aware and allocated columns read 128 training sentences. "
             "Cosine: to the original's mean-pooled sentence embedding; top-10: the share of each sentence's 10 "
             "nearest neighbours kept. Deterministic (no seed enters a one-shot compression).", "",
             "| setting | column | cosine | top-10 agreement | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['setting']} | {r['column']} | – | – | {r['note']} |")
        else:
            lines.append(f"| {r['setting']} | {r['column']} | {r['cosine']:.4f} | {r['top10']:.3f} | {r['seconds']} |")
    return lines + [""]


def _ms(values: list[float], signed: bool = False) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"
