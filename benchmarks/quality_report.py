"""QUALITY.md from the runs of benchmarks/quality.py: the tables and the verdict the issue asks for (pure)."""

from __future__ import annotations

import statistics

GOAL_POINTS = 3.0  # issue 13: the best VCON column ahead of the best column without the transition by ≥ 3 points
GOAL_COSINE = 0.02  # … and by ≥ 0.02 cosine on MiniLM


def render(meta: dict, runs: list[dict], minilm: list[dict], grid, columns: dict, without: list[str],
           setting_label) -> str:
    """The whole file: how it was made, the ViT tables with their verdicts, the MiniLM one-shot table."""
    lines = ["# Quality: the compressed model, one ingredient at a time (issue 13)", "",
             "Produced by `benchmarks/quality.py` (this file is its output):", "", f"    {meta['command']}", "",
             f"Started {meta['started']}, {meta['wall_min']} min wall on a 2-core machine; torch {meta['torch']}.", ""]
    if meta.get("vit_run"):
        v = meta["vit_run"]
        lines += [f"The ViT part (b) is kept from an earlier run, `{v['command']}`, started {v['started']} "
                  f"({v['wall_min']} min wall).", ""]
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


_VIT_PAIRS = (("VCON plain", "abrupt plain"), ("VCON data-aware", "abrupt data-aware"),
              ("VCON DA + teacher + allocation", "abrupt DA + allocation"))
_MINILM_PAIRS = (("VCON plain", "abrupt plain"), ("VCON data-aware", "abrupt data-aware"),
                 ("VCON DA + allocation", "abrupt DA + allocation"))


def _verdict(table: dict, without, *, goal: float = GOAL_POINTS, pairs=_VIT_PAIRS, fmt=None,
             delta=lambda text: f"Δ {text} points") -> list[str]:
    """Best column with the transition against the best without (the goal), then VCON − abrupt per same start.

    table: column → {seed: score}; without: the columns without a transition.
    """
    fmt = fmt or (lambda values: _ms(values, signed=True))
    mean = {c: statistics.mean(v.values()) for c, v in table.items()}
    best_without = max((c for c in table if c in without), key=mean.get)
    best_with = max((c for c in table if c not in without), key=mean.get)
    deltas = [table[best_with][s] - table[best_without][s] for s in table[best_with] if s in table[best_without]]
    met = statistics.mean(deltas) >= goal
    out = [f"- Best with the transition: **{best_with}**; best without: **{best_without}**; {delta(fmt(deltas))}, "
           f"ahead in {sum(d > 0 for d in deltas)}/{len(deltas)} seeds: goal {'MET' if met else 'MISSED'}."]
    parts = []
    for vcon, abrupt in pairs:
        if vcon in table and abrupt in table:
            d = [table[vcon][s] - table[abrupt][s] for s in table[abrupt] if s in table[vcon]]
            parts.append(f"{vcon} − {abrupt} {fmt(d)} ({sum(x > 0 for x in d)}/{len(d)} seeds ahead)")
    if parts:
        out.append("- The transition alone (same start, same steps): " + "; ".join(parts) + ".")
    return out


def _minilm(rows: list[dict]) -> list[str]:
    one_shot = [r for r in rows if "seed" not in r]
    trained = [r for r in rows if "seed" in r]
    lines = ["## (a) all-MiniLM-L6-v2", "",
             "Every Linear in `encoder.layer.*` compressed; β = 0, vanished; scored in PyTorch (these models are "
             "not exported) on 471 held-out English sentences (CPython's pydoc topics, 64 tokens); data-aware and "
             "allocated columns read 128 training sentences. Cosine: to the original's mean-pooled sentence "
             "embedding; top-10: the share of each sentence's 10 nearest neighbours kept.", "",
             "### One-shot (no fine-tuning; deterministic, no seed enters)", "",
             "| setting | column | cosine | top-10 agreement | seconds |", "|---|---|---|---|---|"]
    for r in one_shot:
        if "note" in r:
            lines.append(f"| {r['setting']} | {r['column']} | – | – | {r['note']} |")
        else:
            lines.append(f"| {r['setting']} | {r['column']} | {r['cosine']:.4f} | {r['top10']:.3f} | {r['seconds']} |")
    return lines + [""] + (_minilm_trained(trained, one_shot) if trained else [])


def _minilm_trained(trained: list[dict], one_shot: list[dict]) -> list[str]:
    steps = trained[0]["steps"]
    seeds = sorted({r["seed"] for r in trained})
    lines = ["### Fine-tuned", "",
             f"Every trained column: {steps} Adam steps (lr 2e-4, batch 16) of `vcon_fx.finetune` on 1882 unlabeled "
             "training sentences, the same data order per seed; without labels the loss is distillation to the dense "
             "branch (β = 1 on the same graph), so the teacher column of part (b) would repeat the data-aware one and "
             f"is not run. VCON columns spend Q = 20 % of the steps on the transition. Seeds {', '.join(map(str, seeds))}; "
             "mean ± sample std. Verdict: the best column with the transition against the best without it (one-shot "
             f"columns included), Δ cosine per seed (goal: ≥ {GOAL_COSINE:g}).", ""]
    for setting in dict.fromkeys(r["setting"] for r in trained):
        table: dict = {}
        for r in (x for x in trained if x["setting"] == setting):
            table.setdefault(r["column"], {})[r["seed"]] = r
        base = {r["column"]: r for r in one_shot if r["setting"] == setting and "note" not in r}
        lines += [f"#### {setting}", "", "| column | cosine | top-10 agreement |", "|---|---|---|"]
        lines += [f"| {c} | {base[c]['cosine']:.4f} | {base[c]['top10']:.3f} |" for c in base]
        lines += [f"| {c} | {_ms4([r['cosine'] for r in v.values()])} | {_ms4([r['top10'] for r in v.values()], 3)} |"
                  for c, v in table.items()]
        cos = {c: {s: r["cosine"] for s, r in v.items()} for c, v in table.items()}
        cos.update({c: {s: base[c]["cosine"] for s in seeds} for c in base})
        without = [c for c in cos if not c.startswith(("VCON", "+"))]
        lines += ["", *_verdict(cos, without, goal=GOAL_COSINE, pairs=_MINILM_PAIRS,
                                fmt=lambda values: _ms4(values, signed=True), delta=lambda text: f"Δ cosine {text}"), ""]
    return lines


def _ms4(values: list[float], digits: int = 4, signed: bool = False) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.{digits}f} ± {std:.{digits}f}" if signed else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _ms(values: list[float], signed: bool = False) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"
