"""The demo's output folder (replaced only when it is an earlier demo's) and the machine it ran on."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputExistsError, UsageError
from .results import DEMO_FORMAT, RESULTS_NAME

__all__ = ["check_out", "machine_info"]


def check_out(out: Path, force: bool) -> Path:
    """`out` when the demo may write it: absent, empty, an earlier demo's output, or `force` (pure)."""
    if out.exists() and not force:
        if not out.is_dir() or not _is_demo_output(out):
            raise OutputExistsError(f"{out} exists and is not an earlier demo's output: pass --force to replace it, "
                                    "or choose another --out folder")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"the folder {parent} for --out {out} does not exist: create it first")
    return out


def _is_demo_output(folder: Path) -> bool:
    try:
        return json.loads((folder / RESULTS_NAME).read_text()).get("format") == DEMO_FORMAT
    except (OSError, ValueError, AttributeError):
        return not any(folder.iterdir())  # an empty folder is fine too


def machine_info() -> dict[str, Any]:
    """Where the numbers came from: CPU, cores, torch and onnxruntime versions (pure)."""
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort_version = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": ort_version, "python": platform.python_version(), "platform": platform.platform()}
