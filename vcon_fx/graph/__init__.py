"""The graph passes, in pipeline order: capture → normalize → select → calibrate → duplicate
(blend) → vanish; `pipeline` runs them as `transform` / `plan` / `vanish`, and `recipe` is the
record of what a transform did (`gm.meta["vcon"]`).

capture is split by idea: `capture` (the strategy), `capture_fx`, `capture_export` and
`capture_failure` (the error text). `contracts` states what each pass requires and ensures;
the passes check it when VCON_DEBUG_CONTRACTS=1 (or inside `contracts.enabled()`).
"""

__all__: list[str] = []
