"""The graph passes, in pipeline order: capture → normalize → select → calibrate → duplicate
(blend) → vanish; `pipeline` runs them as `transform` / `plan` / `vanish`, and `recipe` is the
record of what a transform did (`gm.meta["vcon"]`)."""

__all__: list[str] = []
