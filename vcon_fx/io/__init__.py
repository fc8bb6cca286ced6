"""What vcon-fx writes and reads back: atomic writes (`atomic`) and the artifact folder
(`artifact`: recipe.json + model.safetensors, no pickle). The recipe itself is a graph fact
(`graph/recipe.py`): transform records it on the graph, the artifact stores it."""

__all__: list[str] = []
