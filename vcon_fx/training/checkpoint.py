"""Fine-tuning checkpoints: `checkpoint_dir/step-N/` folders that hold no pickle.

    step-N/model/                   the model, as a vcon artifact (`vcon_fx.artifact.save`)
    step-N/optimizer.safetensors    the optimizer's tensors
    step-N/state.json               everything else: schedule, optimizer hyper-parameters,
                                    the run's settings, metrics, a compact history

A folder is written under a temporary name and renamed when complete (`io.atomic.atomic_dir`), so
a process killed mid-save leaves the previous checkpoint as the newest; only complete folders
(with state.json) count, and the newest two are kept. No RNG state is captured: data order and
dropout derive from (seed, step, rank) (`vcon_fx.batches`), so the step alone restores them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..schedules.schedule import BetaSchedule

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vcon-fx-checkpoint"
_CHECKPOINT_VERSION = 1
_KEEP_CHECKPOINTS = 2          # older step-N folders are removed once a newer one is complete
_STEP_DIR = re.compile(r"^step-(\d+)$")
_COMPACT = ("step", "beta", "loss", "eval")  # the per-step fields a checkpoint keeps


def save_checkpoint(checkpoint_dir: Path, t: int, vm: nn.Module, optimizer: torch.optim.Optimizer,
                    schedule: BetaSchedule, *, run: dict[str, Any], seed: int, metrics: dict[str, float],
                    history: list[dict[str, Any]]) -> Path:
    """Write `checkpoint_dir/step-t` atomically, then remove all but the newest complete ones.

    `run` is the run's settings (`load_checkpoint` compares them on resume). Call it on one
    process only: every rank holds the same weights, and two writers would race on the rename.
    """
    from ..io.artifact import save
    from ..io.atomic import atomic_dir
    from safetensors.torch import save_file

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    folder = checkpoint_dir / f"step-{t}"
    tensors, plain = _optimizer_state(optimizer)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": _CHECKPOINT_VERSION,
        "step": t,
        "schedule": schedule.state_dict(),
        "optimizer": plain,
        "run": run,
        "rng": {"kind": "per-step", "seed": seed, "note": "data order and dropout derive from (seed, step, rank)"},
        "metrics": metrics,
        # compact (the JSON log holds everything): a checkpoint stays small on long runs
        "history": [{k: h[k] for k in _COMPACT if k in h} for h in history],
    }
    with atomic_dir(folder) as tmp:
        save(vm, tmp / "model")
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
        (tmp / "state.json").write_text(json.dumps(state))
    _prune(checkpoint_dir)
    log.info("checkpoint: %s", folder)
    return folder


def load_checkpoint(found: Path, vm: nn.Module, optimizer: torch.optim.Optimizer, schedule: BetaSchedule, *,
                    run: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Load the weights, optimizer and schedule of checkpoint `found` in place; returns its state.json.

    `run` is this run's settings: a different seed, batch size, loss or schedule would make the
    resumed run differ from an unbroken one, so they are refused; other changes are warned about.

    Raises:
        ArtifactError: `found` is unreadable, of another format, or made for another model.
        ConfigError: `found` was made with other settings.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    from ..io.artifact import WEIGHTS_FILE

    try:
        state = json.loads((found / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{found / 'state.json'} is unreadable ({e}): delete {found} to resume from the one "
                            "before") from None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version", 0) > _CHECKPOINT_VERSION:
        raise ArtifactError(f"{found} is not a vcon-fx checkpoint this version reads: use a fresh checkpoint_dir")
    saved, now = state.get("run", {}), run
    for key in ("seed", "batch_size", "loss", "schedule"):
        if saved.get(key) != now[key]:
            raise ConfigError(f"checkpoint {found} was made with {key}={saved.get(key)!r}, this run asks for "
                              f"{now[key]!r}: resume with the same settings, or use a new checkpoint_dir")
    for key in ("steps", "lr", "world_size", "distill", "match_groups", "teacher_after"):
        if saved.get(key) != now[key]:
            log.warning("resuming %s made with %s=%r; this run uses %r", found, key, saved.get(key), now[key])
    try:
        load_model(vm, str(found / "model" / WEIGHTS_FILE), strict=True, device=str(device))
        tensors = load_file(str(found / "optimizer.safetensors"), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ArtifactError(f"checkpoint {found} does not fit this model ({str(e).splitlines()[0][:160]}): "
                            "resume the model it was made from, or use a new checkpoint_dir") from None
    optimizer.load_state_dict(_optimizer_state_dict(tensors, state["optimizer"]))
    schedule.load_state_dict(state["schedule"])
    return state


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete `step-N` folder in `checkpoint_dir`, or None (pure)."""
    found = _checkpoints(Path(checkpoint_dir))
    return found[-1][1] if found else None


def _prune(checkpoint_dir: Path) -> None:
    done = _checkpoints(checkpoint_dir)
    for _step, old in done[:-_KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for child in folder.iterdir() if folder.is_dir() else ():
        m = _STEP_DIR.match(child.name)
        if m and (child / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state split into tensors (for safetensors) and JSON-able values (no pickle)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(pid), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state": plain, "tensor_keys": sorted(tensors)}


def _optimizer_state_dict(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `_optimizer_state`: a state dict `Optimizer.load_state_dict` takes."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in plain.get("state", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}
