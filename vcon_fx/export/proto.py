"""Small helpers over onnx ModelProto graphs, shared by the integer-weight passes."""

from __future__ import annotations

__all__ = ["opset_of", "consumers", "fresh_name", "attribute", "INLINE_LIMIT_BYTES"]

# Weights above this go to external data: protobuf refuses messages over 2 GiB, and the rest of
# the graph needs room too.
INLINE_LIMIT_BYTES = 1536 * 1024 * 1024


def opset_of(model) -> int:
    """The default-domain opset a ModelProto imports (0 when none) (pure)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def consumers(graph) -> dict[str, list]:
    """Value name → every (node, input slot) that reads it, in graph order (pure)."""
    found: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            found.setdefault(name, []).append((node, index))
    return found


def fresh_name(name: str, taken: set[str]) -> str:
    """`name`, or `name_1`, `name_2`, … when taken; adds the result to `taken` (in place on it)."""
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def attribute(node, name: str, default):
    """The value of a node's attribute, or `default` when it has none (pure)."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
