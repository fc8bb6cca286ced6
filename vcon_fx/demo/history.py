"""The curves a fine-tuning result gives the demo's table and plot (pure)."""

from __future__ import annotations

from ..graph.blend import mean_beta

__all__ = ["accuracy_curve", "beta_curve"]


def accuracy_curve(result) -> list[list[float]]:
    """[step, β, test accuracy] at every evaluated step; step 0 at the run's own starting β."""
    beta_used = {h["step"]: h["beta"] for h in result.history}  # β during step t (before the schedule moved)
    final_beta = mean_beta(result.betas)
    points = []
    for h in result.history:
        ev = h.get("eval") or {}
        if "accuracy" not in ev:
            continue
        acc = ev["accuracy"]
        if h["step"] == 0 and h["beta"] <= 0.0:  # abrupt: the model starts compressed
            acc = ev.get("accuracy_compressed", acc)
        # β of the weights evaluated: after step t the schedule has moved to step t
        beta = h["beta"] if h["step"] == 0 else beta_used.get(h["step"] + 1, final_beta)
        points.append([h["step"], beta, acc])
    return points


def beta_curve(result) -> list[float]:
    """Mean β of the model after each step 0..steps (the schedule moves right after each optimizer step)."""
    used = {h["step"]: h["beta"] for h in result.history}
    final = mean_beta(result.betas)
    return [round(used.get(t + 1, final) if t else used.get(0, 1.0), 6) for t in range(result.steps + 1)]
