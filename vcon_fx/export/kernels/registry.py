"""The export-kernel registry: each kernel is one file that registers itself with a decorator.

A kernel is how an exported model runs its integer weights in onnxruntime. Every kernel starts
from the same storage (on-grid float weights become INT8/INT4 initializers + DequantizeLinear,
`weight_only.py`); its registered function then rewrites the graph for its own onnxruntime ops
(in place). Besides that function a kernel declares what the rest of the package asks of it:
the widths it stores, the tolerance `--check` judges it by and the note said with it, the CLI
flag that chooses it, and the onnxruntime session options a deployment of its file needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ...errors import UsageError

__all__ = ["ExportKernel", "KERNELS", "register_kernel", "get_kernel", "ACTIVATION_ROUNDING_RTOL",
           "ACTIVATION_ROUNDING_NOTE"]

# Integer kernels quantize activations (DynamicQuantizeMatMul; MatMulNBits at onnxruntime's default
# accuracy level): outputs move by that rounding, so parity is judged at 5 % of the output range.
ACTIVATION_ROUNDING_RTOL = 0.05
ACTIVATION_ROUNDING_NOTE = ("integer kernels quantize activations at run time: parity allows 5 % of the output "
                            "range; the cosine column shows the fidelity")


@dataclass(frozen=True)
class ExportKernel:
    """What one export kernel declares; `lower` is the function it registered.

    Attributes:
        name: the `kernel=` name of `compress_onnx_weights`.
        bits: the integer widths it stores weights in.
        why_bits: the end of the error for another width ("kernel='NAME' " + why_bits).
        rtol: the tolerance `check_onnx` judges its files by (fraction of the output range).
        check_note: said next to the `--check` table.
        flag: the `vcon-fx export` flag that chooses it besides `--kernel NAME`, or None (only
            `--kernel`; the older kernels keep their own flags).
        flag_bits: the width that flag (and `--kernel NAME`) stores.
        flag_help: the flag's help text.
        conflict: why its flag cannot be given with another kernel's ("" when it has no reason
            of its own).
        session_options: path → onnxruntime session config entries a deployment of the file needs.
        lower: (onnx ModelProto, CompressReport, **options) → None: the kernel's graph rewrite, in
            place; options are the kernel's own settings (`kernel_options` of
            `compress_onnx_weights`, e.g. MatMulNBits' `block_size`).
    """

    name: str
    bits: tuple[int, ...]
    why_bits: str
    rtol: float
    check_note: str
    flag: str | None
    flag_bits: int
    flag_help: str
    conflict: str
    session_options: Callable[[str | os.PathLike], dict[str, str]]
    lower: Callable[..., None]

    def __post_init__(self) -> None:
        if (self.flag_bits not in self.bits or (self.flag is not None and not self.flag.startswith("--"))
                or not 0 < self.rtol < 1):
            raise ValueError(f"export kernel {self.name!r} declares flag {self.flag!r} storing {self.flag_bits} bits "
                             f"of {self.bits} with rtol {self.rtol}: a flag stores a width the kernel has, rtol in (0, 1)")

    @property
    def flag_dest(self) -> str | None:
        """The argparse attribute of its flag (`--dynamic-int8` → `dynamic_int8`); None without a flag."""
        return None if self.flag is None else self.flag[2:].replace("-", "_")


KERNELS: dict[str, ExportKernel] = {}


def register_kernel(**declared) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: register the decorated graph rewrite as a kernel with the fields it declares (in place on KERNELS).

    Args:
        declared: every ExportKernel field but `lower`.

    Raises:
        ValueError: the name is registered already, or the declaration does not hold together.
    """
    def register(lower: Callable[..., None]) -> Callable[..., None]:
        kernel = ExportKernel(lower=lower, **declared)
        if kernel.name in KERNELS:
            raise ValueError(f"export kernel {kernel.name!r} is registered twice: give the new one another name")
        KERNELS[kernel.name] = kernel
        return lower
    return register


def get_kernel(name: str) -> ExportKernel:
    """The kernel registered as `name` (pure).

    Raises:
        UsageError: no kernel has that name.
    """
    try:
        return KERNELS[name]
    except (KeyError, TypeError):
        raise UsageError(f"kernel must be {' or '.join(KERNELS)}, got {name!r}") from None
