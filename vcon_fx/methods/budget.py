"""Spend a budget over the layers: greedily, where the measured error grows least per unit saved.

Every layer starts at its least compressed setting. While the total is over the budget, the move
taken is the one with the smallest increase of squared relative error per unit of cost saved,
over every layer and every more compressed setting of it (not only the next one: an error curve
that is flat after a bump is still found). Squared errors, because independent errors add as
powers. Once within budget, what is left over goes back to the layers where it removes the most
error, then neighbouring layers trade steps while that lowers the error and stays within budget.
The result never exceeds the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["spread", "Infeasible"]


class _Costed(Protocol):
    cost: float
    error: float


class Infeasible(Exception):
    """Even the most compressed setting of every layer is over the budget; `least` is their total."""

    def __init__(self, least: float):
        super().__init__(least)
        self.least = least


def spread(options: Mapping[str, Sequence[_Costed]], budget: float) -> dict[str, int]:
    """The index of the chosen option of every layer (pure).

    Args:
        options: layer → its options, least compressed (highest cost) first.
        budget: the most the chosen options may cost together.

    Raises:
        Infeasible: the cheapest options together cost more than `budget`.
    """
    least = sum(min(o.cost for o in opts) for opts in options.values())
    if least > budget * (1 + 1e-9):
        raise Infeasible(least)
    chosen = {layer: 0 for layer in options}
    total = sum(opts[0].cost for opts in options.values())
    while total > budget:
        layer, to = _cheapest_saving(options, chosen)
        total += options[layer][to].cost - options[layer][chosen[layer]].cost
        chosen[layer] = to
    while True:
        moves = _best_refund(options, chosen, budget - total) or _best_exchange(options, chosen, budget - total)
        if not moves:
            return chosen
        for layer, to in moves:
            total += options[layer][to].cost - options[layer][chosen[layer]].cost
            chosen[layer] = to


def _cheapest_saving(options, chosen) -> tuple[str, int]:
    """The move to a more compressed option with the least error added per unit of cost saved."""
    best, best_score = None, None
    for layer, opts in options.items():
        now = opts[chosen[layer]]
        for to in range(chosen[layer] + 1, len(opts)):
            saved = now.cost - opts[to].cost
            if saved <= 0:
                continue
            score = (opts[to].error ** 2 - now.error ** 2) / saved
            if best_score is None or score < best_score:
                best, best_score = (layer, to), score
    if best is None:  # unreachable once feasibility is checked; kept as a clear failure
        raise Infeasible(sum(o[chosen[k]].cost for k, o in options.items()))
    return best


def _best_refund(options, chosen, slack: float) -> list[tuple[str, int]]:
    """The move to a less compressed option that fits in `slack` and removes the most error (or none)."""
    best, best_gain = [], 0.0
    for layer, opts in options.items():
        now = opts[chosen[layer]]
        for to in range(chosen[layer]):
            extra = opts[to].cost - now.cost
            gain = now.error ** 2 - opts[to].error ** 2
            if 0 < extra <= slack and gain > best_gain:
                best, best_gain = [(layer, to)], gain
    return best


def _best_exchange(options, chosen, slack: float) -> list[tuple[str, int]]:
    """One layer a step milder, another a step stronger: the pair that fits in `slack` and removes the most
    error (or none). Only neighbouring steps, so a pass costs layers² comparisons."""
    milder = [(layer, chosen[layer] - 1) for layer in options if chosen[layer] > 0]
    stronger = [(layer, chosen[layer] + 1) for layer, opts in options.items() if chosen[layer] + 1 < len(opts)]
    best, best_gain = [], 1e-12  # a gain at rounding level would let two layers trade places for ever
    for up, up_to in milder:
        for down, down_to in stronger:
            if up == down:
                continue
            was_up, was_down = options[up][chosen[up]], options[down][chosen[down]]
            new_up, new_down = options[up][up_to], options[down][down_to]
            extra = new_up.cost - was_up.cost + new_down.cost - was_down.cost
            gain = was_up.error ** 2 + was_down.error ** 2 - new_up.error ** 2 - new_down.error ** 2
            if extra <= slack and gain > best_gain:
                best, best_gain = [(up, up_to), (down, down_to)], gain
    return best
