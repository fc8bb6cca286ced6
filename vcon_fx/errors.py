"""Typed errors. Each names the layer or file, what was expected and found, and the fix.

Every error also inherits the builtin it refines, so `except ValueError` keeps working, and
carries an `exit_code` the CLI returns (listed in docs/cli.md).
"""

from __future__ import annotations

__all__ = [
    "VconError",
    "UsageError",
    "ConfigError",
    "LoadError",
    "UnsafeFileError",
    "CaptureError",
    "SelectionError",
    "StageError",
    "ArtifactError",
    "OutputExistsError",
    "OutputError",
    "DataError",
    "ExportError",
    "ParityError",
    "TrainingError",
    "ContractError",
    "first_line",
    "message_line",
]


class VconError(Exception):
    """Base of every error vcon-fx raises on purpose; `exit_code` is what the CLI returns for it."""

    exit_code = 1

    def __init_subclass__(cls, exit_code: int | None = None, **kwargs):
        # `class StageError(VconError, RuntimeError, exit_code=6)`: the code sits on the class line
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code


class UsageError(VconError, ValueError, exit_code=2):
    """A command-line argument is malformed (shape string, flag combination)."""


class ConfigError(VconError, ValueError, exit_code=2):
    """A compression config is invalid (rank ≤ 0, sparsity outside (0, 1), unknown bits)."""


class LoadError(VconError, ValueError, exit_code=3):
    """A model source is missing, of an unknown format, corrupt or incomplete."""


class UnsafeFileError(LoadError, exit_code=3):
    """A file would need unpickling (which runs code) and `--trust-pickle` was not given."""


class CaptureError(VconError, RuntimeError, exit_code=4):
    """Neither torch.fx nor torch.export could capture the model as a graph."""


class SelectionError(VconError, ValueError, exit_code=5):
    """Targets matched no layer, or a block is not a single-exit region."""


class StageError(VconError, RuntimeError, exit_code=6):
    """The model is at the wrong stage (vanish while β > 0, export with a dense branch)."""


class ArtifactError(VconError, ValueError, exit_code=7):
    """A vcon artifact (recipe JSON + safetensors) is missing, corrupt or inconsistent."""


class OutputExistsError(VconError, FileExistsError, exit_code=8):
    """The output path exists and `--force` was not given."""


class OutputError(VconError, OSError, exit_code=2):
    """An output cannot be written (folder read-only or missing, disk full); nothing was replaced.

    Exit code 2, as for an unusable `-o` path caught before the work starts.
    """


class DataError(VconError, ValueError, exit_code=9):
    """A data file is unreadable, has NaN/Inf, the wrong shape or labels out of range."""


class ExportError(VconError, RuntimeError, exit_code=10):
    """ONNX export failed."""


class ParityError(VconError, ValueError, exit_code=11):
    """onnxruntime and PyTorch disagree beyond tolerance; lists every mismatching output."""


class TrainingError(VconError, RuntimeError, exit_code=12):
    """Fine-tuning diverged (NaN/Inf loss) or could not continue."""


class ContractError(VconError, AssertionError, exit_code=1):
    """A graph pass broke its own contract (a bug in vcon-fx, not in the input); names the node or module."""


def message_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type name when it has none (pure).

    What vcon-fx quotes of another library's error inside its own one-line messages.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def first_line(exc: BaseException, limit: int = 200) -> str:
    """`TypeName: first line of the message` cut to `limit` characters, or the type name alone (pure)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__
