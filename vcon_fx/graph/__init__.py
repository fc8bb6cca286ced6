"""The graph passes, in pipeline order: capture → normalize → select → calibrate → duplicate
(blend) → vanish; `pipeline` runs them as `transform` / `plan` / `vanish`, and `recipe` is the
record of what a transform did (`gm.meta["vcon"]`).

capture is split by idea: `capture` (the strategy), `capture_fx`, `capture_export` and
`capture_failure` (the error text). `select` holds `SelectionConfig`; `dims` (which input dims
are dynamic) and `modes` (`eval_mode`) serve capture and export alike. `contracts` states what
each pass requires and ensures; the passes check it when VCON_DEBUG_CONTRACTS=1 (or inside
`contracts.enabled()`), and the tests always (docs/architecture.md#contracts).
"""

__all__: list[str] = []
