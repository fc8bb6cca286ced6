"""Run INT4 matmuls as onnxruntime's `com.microsoft.MatMulNBits`: blocked 4-bit weights, int8 compute on CPU.

The weight-only storage (`weight_only.py`) leaves DequantizeLinear(W_q INT4 [K, N], s [N]) → MatMul;
onnxruntime runs that as a float matmul after dequantizing. This kernel packs the same integers
for the op onnxruntime's own int4 quantizer emits:

    DequantizeLinear(W_q, s) → MatMul(x, ·) [→ Add(bias)]   →   MatMulNBits(x, B, scales[, bias])

B is Wᵀ as unsigned nibbles (q + 8, the op's default zero point 8), `block_size` values of one
output channel per block, two per byte, low nibble first; K is padded to whole blocks with the
zero point. With one symmetric scale per output channel every block of a row takes that row's
scale; with one per group of inputs (`--group-size`, a blocked DequantizeLinear) each block
takes its group's scale, the block being the group or a part of it (a group of 64 is two blocks
of 32). An asymmetric layer (`QuantConfig(asymmetric=True)`: w = (q − z)·s, a zero point z per
group or row) gives the op its `zero_points` input: z + 8 per block, two per byte, low nibble
first, one row of ⌈blocks/2⌉ bytes per output channel (onnxruntime's layout, as its
MatMulNBitsQuantizer writes with is_symmetric=False); a block takes its group's zero point, and
the padding past K holds the row's last one. Either way the weights are exactly the
fake-quantized PyTorch weights. With
`accuracy_level=4` onnxruntime quantizes the activations to int8 per block and runs integer dot
products (its fast path on x86 and ARM), so the outputs move by that rounding. Gemm(x, DQ(W),
bias, transB=1) is packed from W directly. Other consumers of integer weights (convolutions,
embedding gathers) keep the weight-only path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...bench.worker import session_config
from ...errors import UsageError
from ..proto import attribute, consumers, fresh_name
from .registry import ACTIVATION_ROUNDING_NOTE, ACTIVATION_ROUNDING_RTOL, register_kernel

if TYPE_CHECKING:
    from ..quantize import CompressReport

__all__ = ["to_matmul_nbits", "lower_to_matmul_nbits", "check_block_size", "pack_int4_blocks",
           "pack_int4_zero_points", "DEFAULT_BLOCK_SIZE", "ACCURACY_LEVEL"]

_MS_DOMAIN = "com.microsoft"
DEFAULT_BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations and integer dot products: onnxruntime's fast CPU path
_ZERO_POINT = 8  # MatMulNBits' default for 4 bits: stored nibble u means u − 8


@register_kernel(
    name="matmul-nbits",
    bits=(4,),
    why_bits="packs INT4 weights: use bits=4",
    rtol=ACTIVATION_ROUNDING_RTOL,
    check_note=ACTIVATION_ROUNDING_NOTE,
    flag="--matmul-nbits",
    flag_bits=4,
    flag_help="run INT4 matmuls as onnxruntime's MatMulNBits (int4 blocks, int8 compute: the fast CPU "
              "kernel; --block-size sets the block)",
    conflict="MatMulNBits packs the INT4 weights in its own layout",
    session_options=session_config,  # convolutions keep the weight-only path
)
def lower_to_matmul_nbits(model, report: "CompressReport", *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Run the stored INT4 matmuls as MatMulNBits (in place on `model`; counted and noted in `report`).

    Raises:
        UsageError: `block_size` is not a power of 2 of at least 16 (what the op takes), or it does
            not divide the model's group of inputs per scale (`--group-size`).
    """
    done = to_matmul_nbits(model, check_block_size(block_size), report.layer_kernels)
    report.notes.append(f"{done} INT4 matmul(s) run as MatMulNBits (block {block_size}, accuracy_level "
                        f"{ACCURACY_LEVEL}: int8 activations)")


def check_block_size(block_size: int) -> int:
    """`block_size` when MatMulNBits takes it (pure).

    Raises:
        UsageError: not a power of 2 of at least 16.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise UsageError(f"--block-size must be a power of 2 of at least 16 (16, 32, 64, 128, …: what MatMulNBits "
                         f"takes), got {block_size!r}")
    return block_size


@dataclass
class _Site:
    x: str  # the float activation
    q: np.ndarray  # integers, [N, K]
    scale: np.ndarray  # per output channel [N], or per group of inputs [N, groups]
    zero: np.ndarray | None  # None (symmetric), or the zero points in the scales' shape
    bias: str | None
    out: str
    remove: list  # nodes the fused op replaces
    anchor: object  # the matmul node: the fused op takes its place


def to_matmul_nbits(model, block_size: int = DEFAULT_BLOCK_SIZE, layer_kernels: dict[str, str] | None = None) -> int:
    """Rewrite the INT4 weight-only matmuls of an onnx ModelProto in place; returns how many.

    `layer_kernels`, when given, gets each rewritten matmul's output name → "matmul-nbits" (in place),
    so the per-layer report names the kernel each layer runs.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = consumers(graph)
    sites = [s for s in (_match(dq, inits, readers) for dq in graph.node if dq.op_type == "DequantizeLinear") if s]
    taken = set(inits) | {o for node in graph.node for o in node.output} | {node.name for node in graph.node}
    for site in sites:
        n, k = site.q.shape
        weight, scales_name, zeros_name, node_name = (fresh_name(f"{site.anchor.name or site.out}_nbits{suffix}", taken)
                                                      for suffix in ("_weight", "_scales", "_zero_points", ""))
        packed, scales = pack_int4_blocks(site.q, site.scale, block_size, site.zero)
        zeros = None if site.zero is None else pack_int4_zero_points(site.zero, k, block_size)
        graph.initializer.extend([numpy_helper.from_array(packed, weight), numpy_helper.from_array(scales, scales_name)])
        if zeros is not None:
            graph.initializer.append(numpy_helper.from_array(zeros, zeros_name))
        inputs = [site.x, weight, scales_name, zeros_name if zeros is not None else "", "", site.bias or ""]
        while not inputs[-1]:  # trailing optional inputs are left out
            inputs.pop()
        node = helper.make_node("MatMulNBits", inputs, [site.out], name=node_name, domain=_MS_DOMAIN,
                                K=k, N=n, bits=4, block_size=block_size, accuracy_level=ACCURACY_LEVEL)
        graph.node.insert(list(graph.node).index(site.anchor), node)
        if layer_kernels is not None:
            layer_kernels[site.anchor.output[0]] = "matmul-nbits"
        for old in site.remove:
            graph.node.remove(old)
    if sites:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        if not any(o.domain == _MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    return len(sites)


def pack_int4_blocks(q: np.ndarray, scale: np.ndarray, block_size: int,
                     zero: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B [N, blocks, block_size/2] uint8, scales [N·blocks]) of integers q [N, K] in [−8, 7] (pure).

    Scales [N]: each row's is repeated for every block of the row. Scales [N, groups]: each
    group's for every block of the group. Padding past K holds the zero point: the op's default
    (8 stored), or with `zero` (signed zero points in the scales' shape) the row's last one.

    Raises:
        UsageError: `block_size` does not divide the group (K / groups).
    """
    n, k = q.shape
    blocks = -(-k // block_size)
    scales = _per_block(np.asarray(scale), k, block_size).reshape(-1)
    pad = np.full((n, 1), _ZERO_POINT, np.uint8) if zero is None else _stored_zero(zero, k, block_size)[:, -1:]
    nibbles = np.repeat(pad, blocks * block_size, axis=1)
    nibbles[:, :k] = (q.astype(np.int16) + _ZERO_POINT).astype(np.uint8)
    return _two_per_byte(nibbles.reshape(n, blocks, block_size)), np.ascontiguousarray(scales)


def pack_int4_zero_points(zero: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """MatMulNBits' `zero_points` [N, ⌈blocks/2⌉] uint8 of signed zero points in [−8, 7], [N] or [N, groups] (pure).

    Each block takes its row's or group's zero point, stored as z + 8, two blocks per byte, low
    nibble first, each row padded to whole bytes (onnxruntime's layout).

    Raises:
        UsageError: `block_size` does not divide the group (K / groups).
    """
    stored = _stored_zero(zero, k, block_size)
    return _two_per_byte(np.pad(stored, ((0, 0), (0, stored.shape[1] % 2)), constant_values=_ZERO_POINT))


def _stored_zero(zero: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Unsigned zero points per block [N, blocks] (z + 8) (pure)."""
    return (_per_block(np.asarray(zero, np.int16), k, block_size) + _ZERO_POINT).astype(np.uint8)


def _per_block(values: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Per-row [N] or per-group [N, groups] values repeated for each block of K: [N, blocks] (pure).

    Raises:
        UsageError: `block_size` does not divide the group (K / groups).
    """
    values = values.reshape(values.shape[0], -1)
    group = k // values.shape[1]
    if values.shape[1] > 1 and group % block_size:
        raise UsageError(f"the model has one scale per {group} inputs (--group-size {group}), which --block-size "
                         f"{block_size} does not divide: export with --block-size {group} (or a power of 2 below it)")
    return np.repeat(values, -(-k // block_size) if values.shape[1] == 1 else group // block_size, axis=1)


def _two_per_byte(nibbles: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values along the last axis (even length), low nibble first (pure)."""
    return np.ascontiguousarray(nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), np.uint8)


def _match(dq, inits: dict, readers: dict) -> _Site | None:
    """The MatMul (or Gemm) a weight-only DequantizeLinear feeds, as a MatMulNBits site; None otherwise."""
    from onnx import numpy_helper

    if len(dq.input) < 2 or dq.input[0] not in inits or dq.input[1] not in inits:
        return None
    zero = _zero_point(dq, inits)
    if zero is False:
        return None
    users = readers.get(dq.output[0], [])
    q = numpy_helper.to_array(inits[dq.input[0]])
    if q.ndim != 2 or not (q.dtype.kind in "iu" or q.dtype.name in ("int4", "uint4")) or len(users) != 1:
        return None
    q = q.astype(np.int16)
    if any(v.min() < -_ZERO_POINT or v.max() > _ZERO_POINT - 1 for v in ((q,) if zero is None else (q, zero))):
        return None  # wider than 4 bits: stays weight-only
    op, slot = users[0]
    scale = numpy_helper.to_array(inits[dq.input[1]])
    blocked = scale.ndim == 2 and attribute(dq, "block_size", 0) > 0  # per group of K: scales along the other axis
    axis = (attribute(dq, "axis", 1) % 2) ^ blocked  # the output-channel axis either way
    if op.op_type == "MatMul" and slot == 1 and (scale.ndim == 0 or axis == 1):
        q, scale, bias = q.T, scale.T if blocked else scale, None  # [K, N] → [N, K]
        zero = zero.T if blocked and zero is not None else zero
    elif (op.op_type == "Gemm" and slot == 1 and attribute(op, "transB", 0) == 1 and attribute(op, "transA", 0) == 0
          and attribute(op, "alpha", 1.0) == 1.0 and attribute(op, "beta", 1.0) == 1.0 and (scale.ndim == 0 or axis == 0)):
        bias = op.input[2] if len(op.input) > 2 and op.input[2] else None
    else:
        return None
    if not blocked:
        scale = np.broadcast_to(scale, (q.shape[0],)).astype(scale.dtype)
        zero = None if zero is None else np.broadcast_to(zero, (q.shape[0],))
    site = _Site(op.input[0], q, scale, zero, bias, op.output[0], [dq, op], op)
    if bias is None:
        _fold_bias(site, inits, readers)
    return site


def _zero_point(dq, inits: dict):
    """A DequantizeLinear's zero points as int16 (None when absent or all 0), or False when not an initializer."""
    from onnx import numpy_helper

    if len(dq.input) < 3 or not dq.input[2]:
        return None
    if dq.input[2] not in inits:
        return False
    zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int16)
    return zero if zero.any() else None


def _fold_bias(site: _Site, inits: dict, readers: dict) -> None:
    """MatMul → Add(bias [N]) becomes the op's bias input (in place on `site`)."""
    after = readers.get(site.out, [])
    if len(after) != 1 or after[0][0].op_type != "Add":
        return
    add, slot = after[0]
    other = add.input[1 - slot]
    if other in inits and list(inits[other].dims) == [site.q.shape[0]]:
        site.bias, site.out = other, add.output[0]
        site.remove.append(add)
