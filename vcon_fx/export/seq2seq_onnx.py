"""The ONNX export of an encoder-decoder LM with its KV cache: two files (`export_with_cache` branches here).

`export_onnx(model, "x.onnx")` on a T5- or BART-like model writes the decoder with its cache to
`x.onnx` (the file `generate` and `export --check` are given) and the encoder beside it to
`x.encoder.onnx` (its name is recorded in the decoder's metadata). The encoder takes
`input_ids, attention_mask` and returns `last_hidden_state`; the decoder's tensors are described
in `seq2seq.py`. Batch, encoder length, decoder length and both past lengths are dynamic.

A vanished vcon model made from such a model was captured whole, without a cache: as for decoder
LMs (`decoder_onnx.py`), its source is captured again, once per file, and the recipe's layers that
each capture holds are compressed and vanished there before the model's weights are loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

from torch import fx, nn

from ..graph.recipe import Recipe
from ..io.atomic import check_output
from .decoder_onnx import (capture_with, flat_dynamic_shapes, hf_source_config, rebuild_with_weights,
                           source_and_layout, write_cached_onnx)
from .seq2seq import (ENCODER_INPUTS, ENCODER_OUTPUTS, SEQ2SEQ_METADATA_KEY, Seq2SeqLayout, config_is_seq2seq_lm,
                      encoder_example, encoder_forward, encoder_path, flat_seq2seq_forward, is_seq2seq_lm,
                      seq2seq_example, seq2seq_layout)

__all__ = ["export_seq2seq_with_cache", "rename_encoder"]

log = logging.getLogger(__name__)


def export_seq2seq_with_cache(model: nn.Module, out: Path, *, opset: int | None = None,
                              force: bool = False) -> Path | None:
    """Write the decoder-with-cache ONNX of an encoder-decoder LM to `out`, its encoder beside it (pure on `model`).

    Args:
        model: a Hugging Face encoder-decoder LM, or a vanished vcon model made from one.
        out: the decoder's .onnx file (already checked by the caller); the encoder goes to
            `encoder_path(out)`.
        opset: ONNX opset; None takes the exporter's default.
        force: replace an existing encoder file (`out` itself the caller checked).

    Returns:
        `out`, or None when `model` is no encoder-decoder LM (nothing is written then).

    Raises:
        ExportError: the exporter failed, a dim came out static, or a capture does not take
            the vanished model's weights.
        OutputExistsError: the encoder file exists and `force` is false.
    """
    parts = _parts(model)
    if parts is None:
        return None
    encoder, decoder, layout = parts
    check_output(encoder_path(out), force=force)  # before anything is written
    layout = dataclasses.replace(layout, encoder=encoder_path(out).name)
    name = type(model).__name__
    vocab = _vocab_size(model)
    dense = encoder is model
    with encoder_forward(encoder) if dense else contextlib.nullcontext():
        write_cached_onnx(encoder, encoder_example(vocab), flat_dynamic_shapes(encoder, 2, 0),
                          (list(ENCODER_INPUTS), list(ENCODER_OUTPUTS)), _ENCODER_AXES, encoder_path(out),
                          metadata=None, opset=opset, name=name)
    with flat_seq2seq_forward(decoder, layout) if dense else contextlib.nullcontext():
        write_cached_onnx(decoder, seq2seq_example(layout, vocab), flat_dynamic_shapes(decoder, 3, 4 * layout.num_layers),
                          (layout.input_names, layout.output_names), _decoder_axes(layout), out,
                          metadata=(SEQ2SEQ_METADATA_KEY, layout.to_json()), opset=opset, name=name)
    log.info("exported %s with its KV cache (%d decoder layers) to %s, its encoder to %s", name, layout.num_layers,
             out, encoder_path(out))
    return out


def rename_encoder(decoder_file: Path, encoder_name: str) -> bool:
    """Record `encoder_name` as the encoder of a decoder file (in place on the file); False if it is no seq2seq decoder.

    For a file written under a temporary name and stored under another (integer_export: the
    float export, then its integer copy at the user's path): its metadata must name the encoder
    file that goes beside the final one. External weights stay where they are.
    """
    import onnx

    model = onnx.load(str(decoder_file), load_external_data=False)
    entry = next((p for p in model.metadata_props if p.key == SEQ2SEQ_METADATA_KEY), None)
    if entry is None:
        return False
    entry.value = dataclasses.replace(Seq2SeqLayout.from_json(entry.value), encoder=encoder_name).to_json()
    onnx.save(model, str(decoder_file))
    return True


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", None) or 100)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, Seq2SeqLayout] | None:
    """(the module to export as the encoder, the one for the decoder, the layout), or None for other models."""
    recipe = model.meta.get("vcon") if isinstance(model, fx.GraphModule) else None
    if isinstance(recipe, Recipe):
        found = hf_source_config(recipe)
        if found is None or not config_is_seq2seq_lm(found[1]) or recipe.stage != "vanished":
            return None  # the decoder-only path says why it refuses, when a cache was required
        return _vanished_parts(model, recipe, found[0])
    if is_seq2seq_lm(model):
        return model, model, seq2seq_layout(model)
    return None


def _vanished_parts(model: fx.GraphModule, recipe: Recipe, folder: Path):
    """The vanished model rebuilt on two captures of its source (encoder; decoder with cache), weights loaded."""
    source, layout = source_and_layout(folder, seq2seq_layout)
    vocab = _vocab_size(source)
    with encoder_forward(source):
        example = encoder_example(vocab)
        encoder = capture_with(source, example, flat_dynamic_shapes(source, 2, 0))
    encoder = rebuild_with_weights(encoder, recipe, example, model, folder, part=True)
    with flat_seq2seq_forward(source, layout):
        example = seq2seq_example(layout, vocab)
        decoder = capture_with(source, example, flat_dynamic_shapes(source, 3, 4 * layout.num_layers))
    decoder = rebuild_with_weights(decoder, recipe, example, model, folder, part=True)
    return encoder, decoder, layout


_ENCODER_AXES = [(0, 0, "batch"), (0, 1, "encoder_seq"), (1, 0, "batch"), (1, 1, "encoder_seq")]


def _decoder_axes(layout: Seq2SeqLayout) -> list[tuple[int, int, str]]:
    """(input index, axis, axis name) of every dim of the decoder file that must come out dynamic."""
    wanted = [(0, 0, "batch"), (0, 1, "seq"), (1, 0, "batch"), (1, 1, "encoder_seq"),
              (2, 0, "batch"), (2, 1, "encoder_new_seq")]
    for i in range(4 * layout.num_layers):
        wanted += [(3 + i, 0, "batch"), (3 + i, 2, "past_seq" if i % 4 < 2 else "encoder_past_seq")]
    return wanted
