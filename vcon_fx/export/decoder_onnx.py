"""The ONNX export of a decoder language model with its KV cache (`export_onnx` branches here).

Two kinds of model take this path:

- a Hugging Face causal LM (the dense model): its forward is given flat cache tensors
  (`decoder.py`) and exported as it is;
- a vanished vcon model whose source is one. It was captured without a cache, so its graph
  cannot take one: the source architecture is captured again with the flat cache forward, the
  recipe is re-applied to that graph (the same groups at the same layer paths, vanished), and the
  vanished model's weights are loaded into it. Every method and every twin comes along, because
  the recipe, not this module, builds them.

The file takes `input_ids`, `attention_mask` (past + new tokens), `position_ids` where the model
has them and `past_key_values.{i}.key/value` [batch, num_kv_heads, past_seq, head_dim]; it returns
`logits` and `present.{i}.key/value`. Batch, sequence and past length are dynamic (axes `batch`,
`seq`, `past_seq`, `total_seq`); an empty past (past_seq 0) is the first step. The layout and the
tokenizer folder are recorded in the file's metadata (`vcon_fx.decoder`) for `generate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
from pathlib import Path

import torch
from torch import fx, nn

from ..errors import ExportError, UsageError
from ..graph.capture_export import quiet_export
from ..graph.modes import eval_mode
from ..graph.pipeline import rebuild
from ..graph.recipe import Recipe
from ..sources.hf import TOKENIZER_FILES, build_hf, is_hf_folder
from .decoder import (METADATA_KEY, DecoderLayout, config_is_causal_lm, decoder_layout, example_with_past,
                      flat_cache_forward, is_causal_lm)
from .dynamic_dims import _check_and_name_axes
from .naming import _name_values
from .onnx import _drop_debug_metadata, _run_exporter, _save

__all__ = ["export_with_cache", "decoder_source_folder", "hf_source_config", "write_cached_onnx", "capture_with",
           "source_and_layout", "rebuild_with_weights", "flat_dynamic_shapes"]

log = logging.getLogger(__name__)

_NO_CACHE_FIX = "export without the KV cache instead (--no-kv-cache, kv_cache=False)"


def export_with_cache(model: nn.Module, out: Path, *, opset: int | None = None, required: bool = False,
                      force: bool = False) -> Path | None:
    """Write the KV-cache ONNX of a decoder LM to `out` (pure on `model`); None when `model` is no decoder LM.

    Args:
        model: a Hugging Face causal LM, or a vanished vcon model made from one.
        out: the .onnx file (already checked by the caller).
        opset: ONNX opset; None takes the exporter's default.
        required: raise instead of returning None when `model` is not a decoder LM.

    Raises:
        UsageError: `required` and `model` is no decoder LM (or a blended vcon model).
        ExportError: the exporter failed, a dim came out static, or the cache graph does not
            take the vanished model's weights.
    """
    from .seq2seq_onnx import export_seq2seq_with_cache  # an encoder-decoder LM: two files (seq2seq_onnx.py)

    if export_seq2seq_with_cache(model, out, opset=opset, force=force) is not None:
        return out
    prepared = _prepare(model, required)
    if prepared is None:
        return None
    module, layout, example = prepared
    # a dense LM gets the flat forward for the export; the rebuilt vcon graph has it already
    patched = flat_cache_forward(module, layout) if module is model else contextlib.nullcontext()
    with patched:
        write_cached_onnx(module, example, flat_dynamic_shapes(module, 3 if layout.position_ids else 2,
                                                              2 * layout.num_layers),
                          (layout.input_names, layout.output_names), _wanted_axes(layout), out,
                          metadata=(METADATA_KEY, layout.to_json()), opset=opset, name=type(model).__name__)
    log.info("exported %s with its KV cache (%d layers) to %s", type(model).__name__, layout.num_layers, out)
    return out


def write_cached_onnx(module: nn.Module, example: tuple, shapes, names: tuple[list[str], list[str]],
                      axes: list[tuple[int, int, str]], out: Path, *, metadata: tuple[str, str] | None,
                      opset: int | None, name: str) -> Path:
    """Export `module` on flat `example` inputs to `out`, values and axes named, metadata set (pure on `module`).

    Raises:
        ExportError: the exporter failed, or a dim of `axes` came out static.
    """
    with eval_mode(module):
        try:
            program = _run_exporter(module, example, {}, shapes, opset)
        except ExportError as exc:
            raise ExportError(f"{exc}; or {_NO_CACHE_FIX}") from exc
    _name_values(program.model, *names, name)
    _check_and_name_axes(program, axes, name)
    _drop_debug_metadata(program.model)
    if metadata is not None:
        program.model.metadata_props[metadata[0]] = metadata[1]
    if _save(program, out):
        log.info("the weights of %s are in %s.data", out, out.name)
    return out


def decoder_source_folder(recipe: Recipe) -> Path | None:
    """The Hugging Face folder of a recipe's source when it is a decoder LM, else None (pure)."""
    found = hf_source_config(recipe)
    return found[0] if found is not None and config_is_causal_lm(found[1]) else None


def hf_source_config(recipe: Recipe) -> tuple[Path, dict] | None:
    """(the Hugging Face folder of a recipe's source, its config.json as a dict), or None (pure)."""
    source = recipe.source or {}
    folder = source.get("path") if source.get("kind") == "hf" else source.get("arch")
    if not folder or not is_hf_folder(Path(folder)):
        return None
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (Path(folder), config) if isinstance(config, dict) else None


def _prepare(model: nn.Module, required: bool):
    """(module with the flat cache forward, its layout, example inputs), or None when not a decoder LM."""
    recipe = getattr(model, "meta", {}).get("vcon") if isinstance(model, fx.GraphModule) else None
    if isinstance(recipe, Recipe):
        folder = decoder_source_folder(recipe)
        if folder is not None and recipe.stage == "vanished":
            return _vanished_with_cache(model, recipe, folder)
        why = "its recipe is not vanished" if folder is not None else "its source is not a Hugging Face causal LM"
    elif is_causal_lm(model):
        layout = decoder_layout(model)
        return model, layout, example_with_past(layout, model.config.vocab_size)
    else:
        why = ("it is not a Hugging Face causal LM (…ForCausalLM, …LMHeadModel) nor an encoder-decoder LM "
               "(…ForConditionalGeneration)")
    if required:
        raise UsageError(f"{type(model).__name__} has no KV cache to export: {why}; {_NO_CACHE_FIX}")
    return None


def source_and_layout(folder: Path, layout_of):
    """(the recorded source folder's model, built without weights, its `layout_of` layout naming the folder's tokenizer)."""
    source = build_hf(folder, load_weights=False).module  # every weight comes from the vanished model
    layout = layout_of(source)
    if any((folder / f).is_file() for f in TOKENIZER_FILES):  # the recorded source folder's own tokenizer
        layout = dataclasses.replace(layout, tokenizer=str(folder.resolve()))
    return source, layout


def _vanished_with_cache(model: fx.GraphModule, recipe: Recipe, folder: Path):
    """The vanished model rebuilt on a capture of its source with the flat cache forward, weights loaded."""
    source, layout = source_and_layout(folder, decoder_layout)
    example = example_with_past(layout, source.config.vocab_size)
    with flat_cache_forward(source, layout):
        graph = capture_with(source, example, flat_dynamic_shapes(source, 3 if layout.position_ids else 2,
                                                                  2 * layout.num_layers))
    return rebuild_with_weights(graph, recipe, example, model, folder), layout, example


def rebuild_with_weights(graph: fx.GraphModule, recipe: Recipe, example: tuple, model: nn.Module, folder: Path, *,
                         part: bool = False) -> fx.GraphModule:
    """The recipe re-applied to `graph` (a capture of its source) and `model`'s weights loaded into it (in place).

    Args:
        part: `graph` computes part of the model (an encoder-decoder's encoder or decoder): only
            the recipe's layers it holds are compressed, and only its own weights must load.

    Raises:
        ExportError: the recipe does not fit the graph, or the graph does not take the weights.
    """
    if part:
        recipe = _recipe_within(recipe, graph)
    try:
        rebuilt = rebuild(graph, recipe, example, {}, copy_model=False)  # the capture is ours: no copy
    except Exception as exc:
        raise ExportError(f"could not re-apply the recipe of {type(model).__name__} to its source captured with a "
                          f"KV cache ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                          f"{_NO_CACHE_FIX}") from exc
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    if part:  # the other part's weights stay in the capture, unread: only the ones this part reads must load
        read = _read_weights(rebuilt)
        missing = [k for k in missing if k in read]
    if missing or (unexpected and not part):
        raise ExportError(f"the KV-cache graph of {folder.name} does not take the vanished model's weights (missing "
                          f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): {_NO_CACHE_FIX}")
    return rebuilt


def _read_weights(graph: fx.GraphModule) -> set[str]:
    """The parameters and buffers `graph` computes with (pure): a capture keeps every one of the module's."""
    return {str(n.target) for n in graph.graph.nodes if n.op == "get_attr" and n.users}


def _recipe_within(recipe: Recipe, graph: fx.GraphModule) -> Recipe:
    """The recipe restricted to the layers whose weights `graph` computes with (pure)."""
    held = {name.rpartition(".")[0] for name in _read_weights(graph)}
    groups = [dataclasses.replace(g, layers=type(g.layers)(p for p in g.layers if p in held)) for g in recipe.groups]
    groups = [g for g in groups if g.layers]
    kept = {p for g in groups for p in g.layers}
    return dataclasses.replace(recipe, groups=type(recipe.groups)(groups),
                               plans={p: plan for p, plan in recipe.plans.items() if p in kept})


def capture_with(source: nn.Module, example: tuple, shapes) -> fx.GraphModule:
    """torch.export of `source` with the forward it has now on `example`, `shapes` dynamic (pure on `source`)."""
    try:
        with quiet_export():
            program = torch.export.export(source, example, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export could not capture {type(source).__name__} with its KV cache "
                          f"({type(exc).__name__}): {_NO_CACHE_FIX}") from exc
    gm = program.module(check_guards=False)
    for name in ("train", "eval"):  # as graph/capture_export.py: the vanish pass needs eval() on the graph
        gm.__dict__.pop(name, None)
    gm.meta["vcon_exported"] = True
    return gm


def flat_dynamic_shapes(module: nn.Module, heads: int, pasts: int) -> tuple:
    """Dims 0 and 1 of the `heads` leading inputs, 0 and 2 of the `pasts` cache tensors, in the forward's structure."""
    auto = torch.export.Dim.AUTO
    head = [{0: auto, 1: auto}] * heads
    past = [{0: auto, 2: auto}] * pasts
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):  # the flat forward: (ids, mask, …, *past)
        return (*head, tuple(past))
    return (*head, *past)  # a captured graph: one placeholder per tensor


def _wanted_axes(layout: DecoderLayout) -> list[tuple[int, int, str]]:
    """(input index, axis, axis name) of every dim that must come out dynamic."""
    wanted = [(0, 0, "batch"), (0, 1, "seq"), (1, 0, "batch"), (1, 1, "total_seq")]
    if layout.position_ids:
        wanted += [(2, 0, "batch"), (2, 1, "seq")]
    first = 3 if layout.position_ids else 2
    for i in range(2 * layout.num_layers):
        wanted += [(first + i, 0, "batch"), (first + i, 2, "past_seq")]
    return wanted
