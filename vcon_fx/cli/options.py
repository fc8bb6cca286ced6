"""Argument groups shared by several commands (model source, method, selection) and what they build."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..methods import CliOption, declared_options

__all__ = ["add_source", "add_dtype", "add_method", "add_calibration", "method_config", "load_source", "load_calibration",
           "calibration_samples", "selection_kwargs", "default_output"]


def add_source(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model source")
    g.add_argument("--weights", help="state dict (.safetensors) for torchvision:NAME or --arch")
    g.add_argument("--arch", help="architecture for a bare state dict: torchvision:NAME or a Hugging Face folder")
    g.add_argument("--trust-pickle", action="store_true", help="allow unpickling .pt files (runs code in the file!)")
    g.add_argument("--input-shape", help="example input shape, e.g. 1x3x224x224")
    g.add_argument("--seq-len", type=int, help="example sequence length for text models")
    g.add_argument("--capture", default="auto", choices=("auto", "fx", "export"), help="graph capture path")


def add_dtype(p: argparse.ArgumentParser, default: str | None = "fp32") -> None:
    """--dtype: the precision the model is loaded, transformed and fine-tuned in (graph/precision.py)."""
    own = "fp32" if default else "the model's own: the dtype it was transformed in"
    p.add_argument("--dtype", default=default, choices=("fp32", "bf16", "fp16"),
                   help=f"precision of the weights, gradients and Adam states; β stays fp32 (default {own})")


def add_method(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--method", required=required,
                   help="compression method: lowrank, prune, quant, or two joined by '+' (lowrank+quant)")
    for option, owners in declared_options():  # each method declares its own flags (methods/*.py)
        g.add_argument(option.flag, **_argparse_kwargs(option, owners))
    s = p.add_argument_group("selection")
    s.add_argument("--targets", action="append", help="layer type, name glob or re:regex (repeatable)")
    s.add_argument("--ignore", action="append", default=[], help="layers to leave dense (same syntax)")
    s.add_argument("--granularity", default="layer", choices=("layer", "block"))
    s.add_argument("--blocks", action="append", default=[], help="block regions, e.g. 'layer*.*' or 'encoder.layer.*.intermediate+output'")
    s.add_argument("--include-stem", action="store_true", help="compress the first layer too")
    s.add_argument("--include-head", action="store_true", help="compress the last layer too")
    s.add_argument("--allocate", nargs="?", const="params", choices=("params", "flops"),
                   help="the --ratio / --sparsity / --bits as one budget over all layers (params, the default, or "
                        "flops), each layer's setting chosen by its output error on --calibration-data")


def add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration-data", metavar="FILE",
                   help="data the layers' inputs are measured on (any --data format): twins start data-aware")
    g.add_argument("--calibration-samples", type=int, metavar="N",
                   help="samples of --calibration-data read (default 128)")


def load_calibration(args, loaded):
    """The --calibration-data Dataset, read for the loaded model (its task, tokenizer, input shapes), or None.

    Raises:
        UsageError: --calibration-samples without --calibration-data, or not positive.
        DataError: as `load_data`.
    """
    from ..data import load_data
    from ..errors import UsageError
    from ..graph.recipe import input_spec

    path, samples = getattr(args, "calibration_data", None), getattr(args, "calibration_samples", None)
    if samples is not None and samples < 1:
        raise UsageError(f"--calibration-samples must be at least 1, got {samples}")
    if path is None:
        if samples is not None:
            raise UsageError("--calibration-samples needs --calibration-data FILE")
        return None
    return load_data(path, model_task=loaded.task, tokenizer_path=loaded.tokenizer_path,
                     input_spec=input_spec(loaded.example_args, loaded.example_kwargs))


def calibration_samples(args) -> int:
    """--calibration-samples, or the library's default (128)."""
    from ..graph.statistics import DEFAULT_SAMPLES

    return getattr(args, "calibration_samples", None) or DEFAULT_SAMPLES


def _argparse_kwargs(option: CliOption, owners: tuple[str, ...]) -> dict:
    kwargs = {"help": f"{'/'.join(owners)}: {option.help}"}
    if option.switch:  # unset stays None: the config's default applies, and compose passes it to no one
        kwargs.update(action="store_true", default=None)
    if option.type is not None:
        kwargs["type"] = option.type
    if option.choices is not None:
        kwargs["choices"] = option.choices
    return kwargs


def method_config(args):
    from ..methods.compose import compose_config

    return compose_config(args.method, {o.field: getattr(args, o.field, None) for o, _ in declared_options()})


def load_source(args, source: str):
    from ..sources.load import load_model, parse_shape

    shape = parse_shape(args.input_shape) if getattr(args, "input_shape", None) else None
    return load_model(source, weights=args.weights, arch=args.arch, trust_pickle=args.trust_pickle,
                      input_shape=shape, seq_len=args.seq_len, dtype=getattr(args, "dtype", None) or "fp32")


def selection_kwargs(args) -> dict:
    """The selection and capture options, as `plan` / `transform` take them."""
    from ..graph.select import SelectionConfig

    return dict(selection=SelectionConfig(targets=tuple(args.targets) if args.targets else None, ignore=tuple(args.ignore),
                                          granularity=args.granularity, blocks=tuple(args.blocks),
                                          include_stem=args.include_stem, include_head=args.include_head,
                                          allocate=getattr(args, "allocate", None)),
                capture=args.capture)


def default_output(model: str, suffix: str) -> str:
    name = Path(model.split(":")[-1].rstrip("/")).name
    return f"{Path(name).stem}{suffix}"
