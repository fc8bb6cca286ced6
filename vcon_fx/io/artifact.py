"""Save and load vcon models without pickle: a folder with recipe.json and model.safetensors.

The recipe says how to rebuild the graph from its source (re-applied on load); the
safetensors file holds every weight and every β. A vanished model holds no dense weights, so
its folder is smaller on disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import fx, nn

from ..graph.pipeline import rebuild
from ..errors import ArtifactError, OutputError, VconError, first_line
from .atomic import _umask, atomic_dir, check_output
from ..graph.recipe import Recipe, inputs_from_spec, recipe_of

__all__ = ["save", "load", "read_recipe", "is_artifact", "RECIPE_FILE", "WEIGHTS_FILE"]

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"


def save(model: fx.GraphModule, path: str | Path, *, force: bool = False) -> Path:
    """Write `model` (blended or vanished) to the folder `path`, atomically (pure on `model`).

    Raises:
        StageError: `model` is not a vcon model.
        OutputExistsError: `path` exists and `force` is false.
        UsageError: the folder of `path` is missing or not writable.
        OutputError: the disk filled up or a rename failed; an existing `path` is left as it was.
    """
    recipe = recipe_of(model)
    out = check_output(path, force=force)
    text = json.dumps(recipe.to_dict(), indent=1)  # before any file exists: a recipe that fails leaves nothing
    with atomic_dir(out) as tmp:
        try:
            (tmp / RECIPE_FILE).write_text(text)
            # save_model de-duplicates tensors shared by several names (tied or latent weights).
            st_save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "vcon-fx", "stage": recipe.stage})
            (tmp / WEIGHTS_FILE).chmod(0o666 & ~_umask())  # safetensors writes 0600; an artifact is shareable
        except OSError as exc:  # disk full, quota: the old artifact (if any) stays as it was
            raise OutputError(f"cannot write {out} ({exc.strerror or exc}): free space or choose another -o path; "
                              "nothing was replaced") from None
    log.info("saved %s model to %s", recipe.stage, out)
    return out


def is_artifact(path: str | Path) -> bool:
    """True when `path` is a folder holding a vcon recipe."""
    return (Path(path) / RECIPE_FILE).is_file()


def read_recipe(path: str | Path) -> Recipe:
    """The recipe of a saved vcon model. Raises ArtifactError when missing or corrupt."""
    folder = Path(path)
    if not folder.exists():
        raise ArtifactError(f"{folder} does not exist: give the folder written by `vcon-fx transform -o`")
    if not is_artifact(folder):
        raise ArtifactError(
            f"{folder} is not a vcon artifact (no {RECIPE_FILE}); create one with `vcon-fx transform MODEL -o {folder.name}`"
        )
    try:
        data = json.loads((folder / RECIPE_FILE).read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{folder / RECIPE_FILE} is not valid JSON ({first_line(exc)}); the artifact is corrupt: "
                            "re-create it") from None
    # The recipe is untrusted input: any failure to read it is a corrupt artifact, never a traceback.
    try:
        return Recipe.from_dict(data)
    except ArtifactError as exc:
        raise ArtifactError(f"{folder}: {exc}") from None
    except Exception as exc:
        raise ArtifactError(f"{folder / RECIPE_FILE} is malformed ({first_line(exc)}); the artifact is corrupt or "
                            "from another vcon-fx version: re-create it") from None


def load(path: str | Path, *, model: nn.Module | None = None, example_inputs: tuple | None = None,
         example_kwargs: dict | None = None, trust_pickle: bool = False, dtype: str | None = None) -> fx.GraphModule:
    """Rebuild a saved vcon model: identical outputs and β values (no unpickling).

    Args:
        path: the artifact folder.
        model: the source model, needed when the artifact was made from a Python object
            rather than a file or name (the recipe then has no source).
        example_inputs / example_kwargs: default to inputs synthesized from the recipe.
        trust_pickle: allow rebuilding a source that is a pickled module (runs its code).
        dtype: rebuild the source in "fp32" / "bf16" / "fp16" instead of the dtype it was made in
            (the weights are cast as they load; export uses "fp32").

    Raises:
        ArtifactError: missing, corrupt or inconsistent artifact.
        LoadError: the recorded source cannot be found or changed since.
    """
    folder = Path(path)
    recipe = read_recipe(folder)
    if dtype is not None and recipe.source:
        recipe = recipe.replace(source={**{k: v for k, v in recipe.source.items() if k != "dtype"},
                                        **({} if dtype == "fp32" else {"dtype": dtype})})
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing; the artifact is incomplete: re-create it")
    try:
        args, kwargs = inputs_from_spec(recipe.inputs)
    except Exception as exc:  # an edited "inputs" entry (unknown dtype, bad shape)
        raise ArtifactError(f"{folder / RECIPE_FILE} has unusable example inputs ({first_line(exc)}); re-create it") from None
    if example_inputs is not None:
        args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    built_here = model is None  # a model rebuilt from its source is ours: the graph takes its weights, no copy
    if model is None:
        if not recipe.source:
            raise ArtifactError(
                f"{folder} was made from a Python model object: pass it, vcon_fx.load(path, model=MyModel())"
            )
        from ..sources.load import rebuild_model  # the sources module is only needed for this path

        try:
            model = rebuild_model(recipe.source, trust_pickle=trust_pickle).module
        except VconError:
            raise
        except Exception as exc:  # an edited "source" entry: wrong types, missing keys
            raise ArtifactError(f"{folder / RECIPE_FILE} records an unusable model source ({first_line(exc)}); "
                                "re-create the artifact") from None
    try:
        gm = rebuild(model, recipe, args, kwargs, copy_model=not built_here)
    except VconError:
        raise
    except Exception as exc:  # a hand-edited or damaged recipe: wrong shapes, ranks, capture modes
        raise ArtifactError(f"{folder / RECIPE_FILE} does not fit its source model ({first_line(exc)}); the artifact "
                            "is corrupt or the source changed: re-create it") from None
    try:
        missing, unexpected = st_load_model(gm, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{weights} is corrupt or does not fit the recipe ({first_line(exc)}); re-create it") from None
    if missing or unexpected:
        raise ArtifactError(
            f"{weights} does not match the rebuilt model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "the source model changed since the artifact was written"
        )
    return gm
