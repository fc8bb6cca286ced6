"""What a method declares next to itself: its CLI flags, its examples, and the hooks callers ask.

Adding a method is one file plus its tests: these checks hold every registered method to the
declarations the CLI, the test matrix, the CUDA run and the demo read from the registry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

import pytest

from vcon_fx.cli.options import add_method, method_config
from vcon_fx.errors import ConfigError
from vcon_fx.methods import (
    CliOption,
    ComposeConfig,
    LowRankConfig,
    MethodConfig,
    PruneConfig,
    QuantConfig,
    config_from_dict,
    declared_options,
    registered_methods,
)
from vcon_fx.methods import base

# The compression flags as the CLI had them before methods declared their own, plus the data-aware
# starts of issue 13 and quant's groups of issue 14: flag → (type, default, choices, help). `transform --help` must not change.
CLI_FLAGS = {
    "--rank": (int, None, None, "low-rank: singular values kept per layer"),
    "--energy": (float, None, None, "low-rank: share of singular-value energy kept (0-1]"),
    "--ratio": (float, None, None, "low-rank: parameter budget per layer (0-1)"),
    "--rank-multiple": (int, None, None, "low-rank: round ranks up to a multiple (16 suits CPU kernels)"),
    "--activation-aware": (None, None, None, "low-rank: weight the SVD by each input's RMS (on --calibration-data, "
                           "else on the example inputs)"),
    "--svd": (None, None, ("auto", "exact", "randomized"),
              "low-rank: factor initialization (auto: randomized when rank ≤ ¼ of the layer's size)"),
    "--sparsity": (float, None, None, "prune: share of weights zeroed per layer (0-1)"),
    "--pattern": (None, None, None, "prune: N:M semi-structured sparsity, e.g. 2:4"),
    "--structured": (None, None, None, "prune: remove whole neurons/channels"),
    "--fixed-mask": (None, None, None, "prune: keep the first mask (default: re-chosen every step)"),
    "--sparsegpt": (None, None, None, "prune: with calibration data, update the kept weights to make up for the "
                    "pruned ones (SparseGPT)"),
    "--bits": (None, None, None, "quant: weight bits 8, 4, 2, 1 or ternary"),
    "--act-bits": (int, None, None, "quant: fake-quantize layer inputs to 8 bits"),
    "--clip-search": (None, None, None, "quant: fixed scales by an MSE-optimal clipping search "
                      "(input-weighted with calibration data), instead of GPTQ"),
    "--group-size": (int, None, None, "quant: one scale per N input weights of a Linear (a power of 2 ≥ 16, e.g. 32) "
                     "instead of one per output channel"),
    "--asymmetric": (None, None, None, "quant: with --group-size: a zero point per group too, the grid spanning each "
                     "group's [min, max] (onnxruntime's is_symmetric=False)"),
    "--init": (None, None, ("auto", "plain", "data-aware"),
               "low-rank/prune/quant: twin start: plain, or data-aware (the default with --calibration-data)"),
    "--separate-weights": (None, None, None, "prune/quant: the twin gets its own weight copy"),
}
SWITCHES = {"--activation-aware", "--structured", "--fixed-mask", "--separate-weights", "--sparsegpt", "--clip-search", "--asymmetric"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_method(p, required=False)
    return p


def compression_actions() -> dict[str, argparse.Action]:
    group = next(g for g in parser()._action_groups if g.title == "compression")
    return {a.option_strings[0]: a for a in group._group_actions if a.option_strings[0] != "--method"}


# ── CLI flags ─────────────────────────────────────────────────────────────────────────────


def test_the_compression_flags_are_unchanged():
    actions = compression_actions()
    assert list(actions) == list(CLI_FLAGS)  # same flags, same order in --help
    for flag, (kind, default, choices, text) in CLI_FLAGS.items():
        action = actions[flag]
        assert (action.type, action.default, action.choices, action.help) == (kind, default, choices, text), flag
        assert isinstance(action, argparse._StoreTrueAction) == (flag in SWITCHES), flag


def test_every_declared_flag_fills_a_field_of_its_config():
    for name, config_type in registered_methods().items():
        fields = {f.name for f in dataclasses.fields(config_type)}
        for option in config_type.cli_options:
            assert option.field in fields, f"{name} declares {option.flag} but has no field {option.field}"


@pytest.mark.parametrize("argv,expected", [
    ("--method lowrank --rank 8", LowRankConfig(rank=8)),
    ("--method lowrank --ratio 0.5 --activation-aware --svd exact",
     LowRankConfig(ratio=0.5, activation_aware=True, svd="exact")),
    ("--method prune --sparsity 0.5 --structured", PruneConfig(sparsity=0.5, structured=True)),
    ("--method quant --bits 4 --separate-weights", QuantConfig(bits=4, separate_weights=True)),
    ("--method lowrank+quant --rank 8 --bits 4", ComposeConfig((LowRankConfig(rank=8), QuantConfig(bits=4)))),
])
def test_method_config_gathers_the_declared_flags(argv, expected):
    assert method_config(parser().parse_args(argv.split())) == expected


def test_a_flag_for_another_method_is_refused():
    with pytest.raises(ConfigError, match="do not apply"):
        method_config(parser().parse_args("--method quant --rank 8".split()))


@dataclass(frozen=True)
class _Clash(MethodConfig):
    method = "clash"
    cli_options = (CliOption("--separate-weights", "a different text", switch=True),)
    separate_weights: bool = False


def test_a_shared_flag_declared_two_ways_is_refused(monkeypatch):
    monkeypatch.setitem(base._BY_NAME, "clash", _Clash)
    with pytest.raises(ConfigError, match="--separate-weights"):
        declared_options()


@pytest.mark.parametrize("kwargs", [{"flag": "rank", "help": "x"}, {"flag": "--two words", "help": "x"},
                                    {"flag": "--on", "help": "x", "switch": True, "type": int}])
def test_a_malformed_option_is_refused(kwargs):
    with pytest.raises(ConfigError):
        CliOption(**kwargs)


# ── examples: one matrix, declared by each method ─────────────────────────────────────────


def test_every_registered_method_declares_examples():
    missing = sorted(name for name, cls in registered_methods().items() if cls.examples() is None)
    assert not missing, f"declare examples() on the config of {missing}"


def test_the_examples_keep_their_numbers():
    """The matrix's configs from before the registry: changing one changes every recorded result."""
    got = {name: cls.examples() for name, cls in registered_methods().items()}
    assert (got["lowrank"].test, got["lowrank"].cuda, got["lowrank"].demo) == (
        LowRankConfig(ratio=0.25), LowRankConfig(rank=8), LowRankConfig(rank=4))
    assert (got["prune"].test, got["prune"].cuda, got["prune"].demo) == (
        PruneConfig(sparsity=0.5), PruneConfig(sparsity=0.8), PruneConfig(sparsity=0.95))
    assert (got["quant"].test, got["quant"].cuda, got["quant"].demo) == (
        QuantConfig(bits=8), QuantConfig(bits=4), QuantConfig(bits=1))
    assert (got["compose"].test, got["compose"].cuda, got["compose"].demo) == (
        ComposeConfig((LowRankConfig(ratio=0.25), QuantConfig(bits=8))),
        ComposeConfig((LowRankConfig(rank=8), QuantConfig(bits=8))),
        ComposeConfig((LowRankConfig(rank=8), QuantConfig(bits=2))))
    assert {n: e.demo_setting for n, e in got.items()} == {
        "lowrank": "rank 4", "prune": "95% zeros", "quant": "binary (1 bit)", "compose": "rank 8, 2-bit"}


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_examples_round_trip_through_json(name):
    examples = registered_methods()[name].examples()
    for config in (examples.test, examples.cuda, examples.demo):
        assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ── hooks callers ask instead of naming a method ──────────────────────────────────────────


@pytest.mark.parametrize("config,expected", [
    (LowRankConfig(rank=4), False),
    (LowRankConfig(rank=4, activation_aware=True), True),
    (PruneConfig(sparsity=0.5), False),
    (QuantConfig(bits=8), False),
    (ComposeConfig((LowRankConfig(rank=4, activation_aware=True), QuantConfig(bits=8))), True),
    (ComposeConfig((LowRankConfig(rank=4), QuantConfig(bits=8))), False),
])
def test_uses_input_statistics(config, expected):
    assert config.uses_input_statistics is expected


@pytest.mark.parametrize("config,noted", [
    (PruneConfig(sparsity=0.5), True),
    (PruneConfig(pattern="2:4"), True),
    (PruneConfig(sparsity=0.5, structured=True), False),
    (LowRankConfig(rank=4), False),
    (QuantConfig(bits=4), False),
    (ComposeConfig((LowRankConfig(rank=4), PruneConfig(sparsity=0.5))), True),
    (ComposeConfig((LowRankConfig(rank=4), QuantConfig(bits=8))), False),
])
def test_deployment_note(config, noted):
    note = config.deployment_note()
    assert (note is not None) == noted
    if noted:
        assert "no faster" in note and "--structured" in note
