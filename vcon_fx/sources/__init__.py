"""Model sources: what a user hands over (.pt2, torchvision:NAME, a Hugging Face folder, a pickled
module, a state dict + --arch), one file per kind; `load_model` picks the kind."""

from .load import LoadedModel, load_model, parse_shape, rebuild_model

__all__ = ["LoadedModel", "load_model", "rebuild_model", "parse_shape"]
