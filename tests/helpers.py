"""One check helper per invariant of docs/architecture.md (Contracts), reused by every test case.

    β = 1 → output equals the original                    assert_identity_at_beta_one
    vanish at β = 0 → output equals blended at β = 0       assert_vanish_parity
    ONNX → onnxruntime equals PyTorch, at any batch       assert_onnx_parity
    after vanish: no dense parameter, promised count      assert_params_promised

Inputs travel as `(args, kwargs)`. Outputs are compared leaf by leaf after flattening with
torch.utils._pytree (Hugging Face models return a ModelOutput), each against its own scale:
max |a − b| ≤ tol · max |reference|.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

import vcon_fx
from vcon_fx.graph import contracts
from vcon_fx.graph.blend import Blend
from vcon_fx.graph.vanish import dense_nodes

__all__ = [
    "Inputs",
    "cli_output",
    "leaves",
    "max_rel_diff",
    "assert_close_outputs",
    "run",
    "assert_identity_at_beta_one",
    "assert_vanish_parity",
    "assert_onnx_parity",
    "assert_params_promised",
    "export_onnx",
    "other_batch",
    "count_params",
    "matmul_nbits_at_float_compute",
    "FourLinears",
    "unoptimized_error",
]

Inputs = tuple[tuple, dict]

IDENTITY_TOL = 1e-6
VANISH_TOL = 1e-6
ONNX_TOL = 1e-4


def leaves(out) -> list[torch.Tensor]:
    """The tensors of a (possibly nested, possibly ModelOutput) model output, in order."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_rel_diff(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |ref − got| / max |ref| (max |ref| floored at 1e-12)."""
    ref, got = torch.as_tensor(ref).double(), torch.as_tensor(got).double()
    scale = max(ref.abs().max().item(), 1e-12) if ref.numel() else 1.0
    return (ref - got).abs().max().item() / scale if ref.numel() else 0.0


def assert_close_outputs(ref, got, tol: float, what: str) -> None:
    """Every output leaf of `got` within `tol` (relative to its max |value|) of `ref`'s."""
    ref_l, got_l = leaves(ref), leaves(got)
    assert len(ref_l) == len(got_l), f"{what}: {len(got_l)} output tensors, expected {len(ref_l)}"
    bad = []
    for i, (r, g) in enumerate(zip(ref_l, got_l)):
        assert tuple(r.shape) == tuple(g.shape), (
            f"{what}: output {i} has shape {tuple(g.shape)}, expected {tuple(r.shape)}")
        d = max_rel_diff(r, g)
        if not d <= tol:
            bad.append(f"output {i}: rel diff {d:.3g} > {tol:g}")
    assert not bad, f"{what}: " + "; ".join(bad)


@torch.no_grad()
def run(model: nn.Module, inputs: Inputs):
    args, kwargs = inputs
    return model(*args, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ── invariant 1: β = 1 reproduces the original ──────────────────────────────────────────


def assert_identity_at_beta_one(model: nn.Module, vm: nn.Module, inputs: Inputs) -> None:
    """The blended model at β = 1 equals the original (≤ 1e-6 relative). Does not change β."""
    betas = vcon_fx.get_betas(vm)
    assert betas, "the blended model has no Blend groups"
    assert all(b == 1.0 for b in betas.values()), f"expected β = 1 everywhere, got {betas}"
    assert_close_outputs(run(model, inputs), run(vm, inputs), IDENTITY_TOL, "β = 1 vs original")
    contracts.after_duplicate(vm)  # the pass contracts, checked in every test whatever VCON_DEBUG_CONTRACTS says
    contracts.ensure_blend_branches_agree(vm, *inputs)


# ── invariant 2: vanish at β = 0 equals the blended model at β = 0 ────────────────────────


def assert_vanish_parity(vm: nn.Module, inputs: Inputs) -> nn.Module:
    """Set β = 0 on `vm` (in place), vanish, and compare (≤ 1e-6 relative). Returns the vanished model."""
    vcon_fx.set_beta(vm, 0.0)
    blended = run(vm, inputs)
    contracts.require_blend_groups(vm)  # vanish requires blends, all at β = 0 (set_beta ensures it)
    contracts.ensure_betas_at(vm, 0.0)
    small = vcon_fx.vanish(vm)
    contracts.after_vanish(small)
    assert_close_outputs(blended, run(small, inputs), VANISH_TOL, "vanished vs blended at β = 0")
    # vanish is pure: the blended model keeps its Blends.
    assert any(isinstance(m, Blend) for m in vm.modules()), "vanish changed its input"
    return small


# ── invariant 3: ONNX (onnxruntime) equals PyTorch, also at another batch size ───────────


def other_batch(inputs: Inputs, seq_inputs: tuple[str, ...] = ()) -> Inputs:
    """The same inputs with one more row (batch + 1), and one more position along dim 1 of the
    keyword inputs named in `seq_inputs`: shapes the export never saw."""
    def grow(t, seq: bool = False):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        t = torch.cat([t, t[:1]], dim=0)
        return torch.cat([t, t[:, :1]], dim=1) if seq and t.dim() > 1 else t
    args, kwargs = inputs
    return tuple(grow(a) for a in args), {k: grow(v, k in seq_inputs) for k, v in kwargs.items()}


def export_onnx(model: nn.Module, path: Path, inputs: Inputs, seq_inputs: tuple[str, ...] = ()) -> Path:
    """Export with dynamic batch (and sequence) axes, as the CLI does."""
    from vcon_fx.export.onnx import export_onnx as vcon_export

    args, kwargs = inputs
    return vcon_export(model, path, args, example_kwargs=kwargs, dynamic_batch=True, seq_inputs=seq_inputs)


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_run(session, inputs: Inputs) -> list[np.ndarray]:
    """Feed keyword inputs by name and positional ones to the remaining ONNX inputs, in order."""
    args, kwargs = inputs
    names = [i.name for i in session.get_inputs()]
    feed = {k: v.numpy() for k, v in kwargs.items() if k in names}
    positional = [n for n in names if n not in feed]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    assert len(positional) <= len(tensors), (
        f"ONNX inputs {names} do not fit {len(tensors)} args + kwargs {list(kwargs)}")
    feed.update({n: t.numpy() for n, t in zip(positional, tensors)})
    return session.run(None, feed)


def assert_onnx_parity(small: nn.Module, inputs: Inputs, tmp_path: Path, seq_inputs: tuple[str, ...] = ()) -> Path:
    """Export `small`, run it in onnxruntime at the export shapes and at batch + 1 (and seq + 1 for
    `seq_inputs`), each within 1e-4 (relative) of PyTorch.

    Returns the .onnx path.
    """
    path = export_onnx(small, Path(tmp_path) / "model.onnx", inputs, seq_inputs)
    assert path.is_file() and path.stat().st_size > 0
    session = _ort_session(path)
    feeds = (("export shapes", inputs), ("batch + 1 / seq + 1 (dynamic axes)", other_batch(inputs, seq_inputs)))
    for label, feed in feeds:
        ref = leaves(run(small, feed))
        got = _ort_run(session, feed)
        assert len(got) == len(ref), f"ONNX {label}: {len(got)} outputs, PyTorch {len(ref)}"
        got = [torch.from_numpy(np.asarray(g)) for g in got]
        assert_close_outputs(ref, got, ONNX_TOL, f"onnxruntime vs PyTorch, {label}")
    return path


# ── invariant 4: after vanish, no dense parameter and the promised parameter count ────────


def stored_values(model: nn.Module, *, nonzero: bool = False) -> int:
    """Values a model stores: float parameters plus integer weight buffers (quantized weights).

    With `nonzero`, only values that are not zero count (what pruning promises: its vanished
    layers keep a dense store, so their parameter count does not change).
    """
    tensors = list(model.parameters()) + [b for b in model.buffers() if not b.is_floating_point() and b.dim() > 1]
    if nonzero:
        return sum(int(torch.count_nonzero(t)) for t in tensors)
    # a uint8 weight buffer is a 4-bit table packed two values per byte (methods/embedding.py)
    return sum(t.numel() * (2 if t.dtype == torch.uint8 else 1) for t in tensors)


def _promises_nonzeros(config) -> bool:
    inner = getattr(config, "configs", None)
    # Structured pruning removes whole channels: it promises fewer stored values, not zeros.
    prunes = config.method == "prune" and not getattr(config, "structured", False)
    return prunes or bool(inner and any(_promises_nonzeros(c) for c in inner))


def assert_params_promised(small: nn.Module, original: nn.Module, recipe) -> None:
    """Stored values = original − Σ(before − after) over compressed layers; nothing dense left.

    "Stored values" are parameters plus integer weight buffers (quant keeps its integers in
    buffers); for pruning they are the non-zero values (the plan promises non-zeros).
    """
    compressed = {p: plan for p, plan in recipe.plans.items() if not plan.skipped}
    assert compressed, "the recipe compresses no layer"
    saved = sum(plan.params_before - plan.params_after for plan in compressed.values())
    nonzero = _promises_nonzeros(recipe.config)
    got, before = stored_values(small, nonzero=nonzero), stored_values(original, nonzero=nonzero)
    # A random init can hold a few exact zeros: the plan counts a layer's every value as stored, so each
    # such zero in a pruned layer shows up once more in `got` than in `before − saved`.
    slack = stored_values(original) - before if nonzero else 0
    assert before - saved <= got <= before - saved + slack, (
        f"vanished model stores {got} {'non-zero ' if nonzero else ''}values, promised {before} − {saved} = {before - saved}"
    )
    # No tensor of the vanished model is a dense weight of a compressed layer (by value).
    params = dict(small.named_parameters(remove_duplicate=False))
    for path, weight in _dense_weights(original, compressed):
        same = [n for n, p in params.items() if p.shape == weight.shape and torch.equal(p.detach(), weight.detach())]
        assert not same, f"the dense weight of {path} survived vanish as {same[0]}"
    assert dense_nodes(small) == [], f"nodes tagged dense remain: {dense_nodes(small)[:3]}"
    blends = [n for n, m in small.named_modules() if isinstance(m, Blend)]
    assert not blends, f"Blend modules remain after vanish: {blends[:3]}"
    assert vcon_fx.get_betas(small) == {}


def _dense_weights(original: nn.Module, compressed: dict):
    """(path, weight) of each compressed layer in the original model, where it is a module there."""
    for path in compressed:
        try:
            yield path, original.get_submodule(path).weight
        except AttributeError:  # a lifted functional call has no module in the original
            continue


def cli_output(*argv: str) -> tuple[int, str]:
    """(exit code, stdout) of `vcon-fx ARGV` run in this process, as a user would see it."""
    from vcon_fx.cli.main import main

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main([str(a) for a in argv])
    return code, text.getvalue()


def matmul_nbits_at_float_compute(path, out):
    """The ONNX file at `path` with every MatMulNBits at accuracy_level 0 (float activations), written to `out`.

    What must equal PyTorch to float rounding; the level-4 file differs by int8 activation rounding.
    """
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    onnx.save(model, str(out))
    return out


def unoptimized_error(path, x: torch.Tensor, want: torch.Tensor) -> float:
    """Max |onnxruntime − want| over want's range, the file at `path` run on `x` with graph optimizations off.

    Without fusion (DequantizeLinear as written, then a float MatMul) an integer file gives the
    PyTorch outputs to float rounding.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    want = want.detach().numpy()
    return float(np.abs(got - want).max() / (want.max() - want.min()))


class FourLinears(nn.Module):
    """16 → 64 → 64 → 64 → 4 with ReLUs: a stem and a head that stay dense by default, two Linears in between."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid1, self.mid2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mid2(torch.relu(self.mid1(torch.relu(self.stem(x)))))))
