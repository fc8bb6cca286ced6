"""Argument groups shared by several commands (model source, method, selection) and what they build."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_source", "add_method", "method_config", "load_source", "selection_kwargs", "default_output"]


def add_source(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model source")
    g.add_argument("--weights", help="state dict (.safetensors) for torchvision:NAME or --arch")
    g.add_argument("--arch", help="architecture for a bare state dict: torchvision:NAME or a Hugging Face folder")
    g.add_argument("--trust-pickle", action="store_true", help="allow unpickling .pt files (runs code in the file!)")
    g.add_argument("--input-shape", help="example input shape, e.g. 1x3x224x224")
    g.add_argument("--seq-len", type=int, help="example sequence length for text models")
    g.add_argument("--capture", default="auto", choices=("auto", "fx", "export"), help="graph capture path")


def add_method(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--method", required=required,
                   help="compression method: lowrank, prune, quant, or two joined by '+' (lowrank+quant)")
    g.add_argument("--rank", type=int, help="low-rank: singular values kept per layer")
    g.add_argument("--energy", type=float, help="low-rank: share of singular-value energy kept (0-1]")
    g.add_argument("--ratio", type=float, help="low-rank: parameter budget per layer (0-1)")
    g.add_argument("--rank-multiple", type=int, help="low-rank: round ranks up to a multiple (16 suits CPU kernels)")
    g.add_argument("--activation-aware", action="store_true", default=None,
                   help="low-rank: weight the SVD by each input's RMS on the example inputs (give real ones)")
    g.add_argument("--svd", choices=("auto", "exact", "randomized"),
                   help="low-rank: factor initialization (auto: randomized when rank ≤ ¼ of the layer's size)")
    g.add_argument("--sparsity", type=float, help="prune: share of weights zeroed per layer (0-1)")
    g.add_argument("--pattern", help="prune: N:M semi-structured sparsity, e.g. 2:4")
    g.add_argument("--structured", action="store_true", default=None, help="prune: remove whole neurons/channels")
    g.add_argument("--fixed-mask", action="store_true", default=None, help="prune: keep the first mask (default: re-chosen every step)")
    g.add_argument("--bits", help="quant: weight bits 8, 4, 2, 1 or ternary")
    g.add_argument("--act-bits", type=int, help="quant: fake-quantize layer inputs to 8 bits")
    g.add_argument("--separate-weights", action="store_true", default=None, help="prune/quant: the twin gets its own weight copy")
    s = p.add_argument_group("selection")
    s.add_argument("--targets", action="append", help="layer type, name glob or re:regex (repeatable)")
    s.add_argument("--ignore", action="append", default=[], help="layers to leave dense (same syntax)")
    s.add_argument("--granularity", default="layer", choices=("layer", "block"))
    s.add_argument("--blocks", action="append", default=[], help="block regions, e.g. 'layer*.*' or 'encoder.layer.*.intermediate+output'")
    s.add_argument("--include-stem", action="store_true", help="compress the first layer too")
    s.add_argument("--include-head", action="store_true", help="compress the last layer too")


_METHOD_OPTIONS = ("rank", "energy", "ratio", "rank_multiple", "svd", "activation_aware", "sparsity", "pattern", "structured", "fixed_mask", "bits", "act_bits",
                   "separate_weights")


def method_config(args):
    from ..methods.compose import compose_config

    return compose_config(args.method, {k: getattr(args, k, None) for k in _METHOD_OPTIONS})


def load_source(args, source: str):
    from ..sources.load import load_model, parse_shape

    shape = parse_shape(args.input_shape) if getattr(args, "input_shape", None) else None
    return load_model(source, weights=args.weights, arch=args.arch, trust_pickle=args.trust_pickle,
                      input_shape=shape, seq_len=args.seq_len)


def selection_kwargs(args) -> dict:
    """The selection and capture options, as `plan` / `transform` take them."""
    from ..graph.select import SelectionConfig

    return dict(selection=SelectionConfig(targets=tuple(args.targets) if args.targets else None, ignore=tuple(args.ignore),
                                          granularity=args.granularity, blocks=tuple(args.blocks),
                                          include_stem=args.include_stem, include_head=args.include_head),
                capture=args.capture)


def default_output(model: str, suffix: str) -> str:
    name = Path(model.split(":")[-1].rstrip("/")).name
    return f"{Path(name).stem}{suffix}"
