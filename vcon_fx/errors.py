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
    """Base of every error vcon-fx raises on purpose."""

    exit_code = 1


class UsageError(VconError, ValueError):
    """A command-line argument is malformed (shape string, flag combination)."""

    exit_code = 2


class ConfigError(VconError, ValueError):
    """A compression config is invalid (rank ≤ 0, sparsity outside (0, 1), unknown bits)."""

    exit_code = 2


class LoadError(VconError, ValueError):
    """A model source is missing, of an unknown format, corrupt or incomplete."""

    exit_code = 3


class UnsafeFileError(LoadError):
    """A file would need unpickling (which runs code) and `--trust-pickle` was not given."""

    exit_code = 3


class CaptureError(VconError, RuntimeError):
    """Neither torch.fx nor torch.export could capture the model as a graph."""

    exit_code = 4


class SelectionError(VconError, ValueError):
    """Targets matched no layer, or a block is not a single-exit region."""

    exit_code = 5


class StageError(VconError, RuntimeError):
    """The model is at the wrong stage (vanish while β > 0, export with a dense branch)."""

    exit_code = 6


class ArtifactError(VconError, ValueError):
    """A vcon artifact (recipe JSON + safetensors) is missing, corrupt or inconsistent."""

    exit_code = 7


class OutputExistsError(VconError, FileExistsError):
    """The output path exists and `--force` was not given."""

    exit_code = 8


class OutputError(VconError, OSError):
    """An output cannot be written (folder read-only or missing, disk full); nothing was replaced.

    Exit code 2, as for an unusable `-o` path caught before the work starts.
    """

    exit_code = 2


class DataError(VconError, ValueError):
    """A data file is unreadable, has NaN/Inf, the wrong shape or labels out of range."""

    exit_code = 9


class ExportError(VconError, RuntimeError):
    """ONNX export failed."""

    exit_code = 10


class ParityError(VconError, ValueError):
    """onnxruntime and PyTorch disagree beyond tolerance; lists every mismatching output."""

    exit_code = 11


class TrainingError(VconError, RuntimeError):
    """Fine-tuning diverged (NaN/Inf loss) or could not continue."""

    exit_code = 12


class ContractError(VconError, AssertionError):
    """A graph pass broke its own contract (a bug in vcon-fx, not in the input); names the node or module."""

    exit_code = 1


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
