"""The graph passes, in pipeline order: capture → normalize → select → calibrate → duplicate
(blend) → vanish, and `pipeline`, which runs them as `transform` / `plan` / `vanish`."""

__all__: list[str] = []
