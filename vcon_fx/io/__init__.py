"""What vcon-fx writes and reads back: atomic writes (`atomic`), the recipe (`recipe`) and the
artifact folder (`artifact`: recipe.json + model.safetensors, no pickle)."""

__all__: list[str] = []
