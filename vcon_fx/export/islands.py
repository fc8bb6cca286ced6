"""What onnxruntime really runs: its optimized graph, its kernels, and the float islands between integer ones.

An island is a group of ops that onnxruntime runs in float in the middle of an integer stretch:
uint8 activations are dequantized into it and quantized again after it (e.g. a HardSwish,
which has no integer kernel). Each island costs two conversions and a float op; fewer is
faster. Counted on onnxruntime's own optimized graph (ORT_ENABLE_EXTENDED: its QDQ fusions,
without the machine-specific layout rewrites), so what it fused is not counted.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Island", "optimized_graph", "kernel_counts", "find_islands"]

_QUANTIZE = ("QuantizeLinear",)
_DEQUANTIZE = ("DequantizeLinear",)
# Ops whose output is integer when their input is (onnxruntime runs them on uint8 directly).
_KEEP_TYPE = ("MaxPool", "NhwcMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
              "Slice", "Gather", "Split", "Resize")
# Ops that read integers and write float.
_INTEGER_TO_FLOAT = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "ConvInteger", "MatMulInteger",
                     "DynamicQuantizeLinear", "MatMulNBits")


@dataclass(frozen=True)
class Island:
    """One float island: its ops in graph order, and their node names."""

    ops: tuple[str, ...]
    nodes: tuple[str, ...]

    def describe(self) -> str:
        more = f", … {len(self.nodes) - 2} more" if len(self.nodes) > 2 else ""
        return f"{' → '.join(self.ops[:4])}{' …' if len(self.ops) > 4 else ''} ({', '.join(self.nodes[:2])}{more})"


def optimized_graph(path: str | os.PathLike, config: dict[str, str] | None = None):
    """The GraphProto onnxruntime runs for `path` after its (extended) graph optimizations (pure)."""
    import onnx
    import onnxruntime as ort

    from ..bench.worker import session_config

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(out)
        for key, value in (session_config(path) if config is None else config).items():
            opts.add_session_config_entry(key, value)
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(out)).graph


def kernel_counts(graph) -> dict[str, int]:
    """Op type → how many nodes of it `graph` holds (pure)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _integer_ops(op: str) -> bool:
    return op.startswith("QLinear") or op == "QGemm"


def find_islands(graph) -> list[Island]:
    """The float islands of an (optimized) graph, in graph order (pure)."""
    constants = {i.name for i in graph.initializer}
    integer, floating = set(), {i.name for i in graph.input if i.name not in constants}
    compute = []  # float nodes, in order
    for node in graph.node:
        op, first = node.op_type, node.input[0] if node.input else ""
        if op in _QUANTIZE or _integer_ops(op) or (op in _KEEP_TYPE and first in integer):
            integer.update(node.output)
        elif op in _DEQUANTIZE:
            if first not in constants:
                floating.update(node.output)
        elif op in _INTEGER_TO_FLOAT:
            floating.update(node.output)
        elif any(name in floating for name in node.input):
            compute.append(node)
            floating.update(node.output)
    return _components(graph, compute, integer, constants)


def _components(graph, compute: list, integer: set[str], constants: set[str]) -> list[Island]:
    """Group float nodes joined by a tensor; keep the groups fed by a dequantized activation and quantized after."""
    made_by = {o: i for i, node in enumerate(compute) for o in node.output}
    parent = list(range(len(compute)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, node in enumerate(compute):
        for name in node.input:
            if name in made_by:
                parent[root(i)] = root(made_by[name])
    dequantized = {n.output[0] for n in graph.node if n.op_type in _DEQUANTIZE and n.input[0] in integer}
    quantized_inputs = {n.input[0] for n in graph.node if n.op_type in _QUANTIZE}
    groups: dict[int, list] = {}
    for i, node in enumerate(compute):
        groups.setdefault(root(i), []).append(node)
    islands = []
    for nodes in groups.values():
        fed = any(name in dequantized for node in nodes for name in node.input)
        feeds = any(name in quantized_inputs for node in nodes for name in node.output)
        if fed and feeds:
            islands.append(Island(tuple(n.op_type for n in nodes), tuple(n.name or n.output[0] for n in nodes)))
    return islands
