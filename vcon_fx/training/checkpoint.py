"""Fine-tuning checkpoints: `checkpoint_dir/step-N/` folders that hold no pickle.

    step-N/model/                   the model, as a vcon artifact (`vcon_fx.artifact.save`)
    step-N/optimizer.safetensors    the optimizer's tensors
    step-N/state.json               everything else: schedule, optimizer hyper-parameters,
                                    the run's settings, metrics, a compact history

A folder is written under a temporary name and renamed when complete (`io.atomic.atomic_dir`), so
a process killed mid-save leaves the previous checkpoint as the newest; only complete folders
(with state.json) count, and the newest two are kept. No RNG state is captured: data order and
dropout derive from (seed, step, rank) (`vcon_fx.batches`), so the step alone restores them.

Under FSDP (`fsdp.py`) every rank writes its own chunks, with torch.distributed.checkpoint:

    step-N/shards/shard-0000R-model-00001-of-00001.safetensors
                                    rank R−1's chunks of every weight and of Adam's state
                                    (DCP's safetensors layout: each chunk's offsets are JSON in
                                    the file's header, and there is no pickled `.metadata`)
    step-N/state.json               as above, with "sharded": true

and loading reads back whichever chunks each rank now holds (DCP re-slices them).
"""

from __future__ import annotations

import contextlib
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

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_sharded_checkpoint",
           "load_sharded_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vcon-fx-checkpoint"
_CHECKPOINT_VERSION = 1
_KEEP_CHECKPOINTS = 2          # older step-N folders are removed once a newer one is complete
_STEP_DIR = re.compile(r"^step-(\d+)$")
_COMPACT = ("step", "beta", "loss", "eval")  # the per-step fields a checkpoint keeps
_SHARDS = "shards"


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
    state = _state(t, schedule, plain, run=run, seed=seed, metrics=metrics, history=history)
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

    state = _read_state(found, run, sharded=False)
    try:
        load_model(vm, str(found / "model" / WEIGHTS_FILE), strict=True, device=str(device))
        tensors = load_file(str(found / "optimizer.safetensors"), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ArtifactError(f"checkpoint {found} does not fit this model ({str(e).splitlines()[0][:160]}): "
                            "resume the model it was made from, or use a new checkpoint_dir") from None
    optimizer.load_state_dict(_optimizer_state_dict(tensors, state["optimizer"]))
    schedule.load_state_dict(state["schedule"])
    return state


def _state(t: int, schedule: BetaSchedule, plain: dict[str, Any], *, run: dict[str, Any], seed: int,
           metrics: dict[str, float], history: list[dict[str, Any]]) -> dict[str, Any]:
    """state.json's content (pure)."""
    return {
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


def _read_state(found: Path, run: dict[str, Any], *, sharded: bool) -> dict[str, Any]:
    """state.json of `found`, checked against this run's settings (pure; see `load_checkpoint`)."""
    try:
        state = json.loads((found / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{found / 'state.json'} is unreadable ({e}): delete {found} to resume from the one "
                            "before") from None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version", 0) > _CHECKPOINT_VERSION:
        raise ArtifactError(f"{found} is not a vcon-fx checkpoint this version reads: use a fresh checkpoint_dir")
    if bool(state.get("sharded")) != sharded:
        made, now = ("with", "without") if state.get("sharded") else ("without", "with")
        raise ConfigError(f"checkpoint {found} was made {made} --fsdp and this run is {now} it: resume {made} "
                          "--fsdp, or use a new checkpoint_dir")
    saved, now = state.get("run", {}), run
    for key in ("seed", "batch_size", "loss", "schedule"):
        if saved.get(key) != now[key]:
            raise ConfigError(f"checkpoint {found} was made with {key}={saved.get(key)!r}, this run asks for "
                              f"{now[key]!r}: resume with the same settings, or use a new checkpoint_dir")
    for key in ("steps", "lr", "world_size", "distill", "match_groups", "teacher_after"):
        if saved.get(key) != now[key]:
            log.warning("resuming %s made with %s=%r; this run uses %r", found, key, saved.get(key), now[key])
    return state


def save_sharded_checkpoint(checkpoint_dir: Path, t: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            schedule: BetaSchedule, dist, *, run: dict[str, Any], seed: int,
                            metrics: dict[str, float], history: list[dict[str, Any]]) -> Path:
    """Write `checkpoint_dir/step-t` of an FSDP-sharded `model`: every rank its chunks (collective).

    Rank 0 makes the temporary folder, writes state.json and renames it once every rank's shards
    are written; `dist` is the entered `Distributed`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    from ..io.atomic import atomic_dir

    folder = checkpoint_dir / f"step-{t}"
    tensors, plain = _sharded_tensors(model, optimizer)
    state = _state(t, schedule, plain, run=run, seed=seed, metrics=metrics, history=history) | {"sharded": True}
    if dist.main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) if dist.main else contextlib.nullcontext() as made:
        if dist.main:
            (made / _SHARDS).mkdir()
        tmp = Path(dist.share(str(made)))
        # dcp.save returns on rank 0 once every rank reported its files written.
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / _SHARDS), save_distributed=True))
        if dist.main:
            (tmp / "state.json").write_text(json.dumps(state))
    dist.barrier()
    if dist.main:
        _prune(checkpoint_dir)
        log.info("checkpoint: %s", folder)
    return folder


def load_sharded_checkpoint(found: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: BetaSchedule,
                            *, run: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`load_checkpoint` for a checkpoint of `save_sharded_checkpoint` (collective; in place on every rank).

    Raises:
        ArtifactError / ConfigError: as `load_checkpoint`, and for a checkpoint made without FSDP.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    state = _read_state(found, run, sharded=True)
    reader = HuggingFaceStorageReader(str(found / _SHARDS))
    try:
        saved = reader.read_metadata().state_dict_metadata
        targets, _ = _sharded_tensors(model, optimizer)
        moments = _optimizer_targets(optimizer, state["optimizer"].get("tensor_keys", []), saved)
        dcp.load(targets | {f"optimizer.{k}": v for k, v in moments.items()}, storage_reader=reader)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ArtifactError(f"checkpoint {found} does not fit this model ({str(e).splitlines()[0][:160]}): resume "
                            "the model it was made from, or use a new checkpoint_dir") from None
    optimizer.load_state_dict(_optimizer_state_dict(moments, state["optimizer"]))
    schedule.load_state_dict(state["schedule"])
    return state


def _sharded_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights (DTensor chunks), buffers and optimizer tensors DCP saves, and the optimizer's JSON part.

    A weight shared by two names (a prune or quant twin's) is one tensor: saved once, under its first name.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            tensors[f"model.{name}"] = value.detach()
    moments, plain = _optimizer_state(optimizer, keep=True)
    return tensors | {f"optimizer.{k}": v for k, v in moments.items()}, plain


def _optimizer_targets(optimizer: torch.optim.Optimizer, keys: list[str], saved) -> dict[str, torch.Tensor]:
    """Zero tensors to load the optimizer's saved state into: chunked like their parameter, or whole (Adam's step)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    targets = {}
    for key in keys:
        _, pid, _ = key.split(".", 2)
        meta, param = saved[f"optimizer.{key}"], params[int(pid)]
        if tuple(meta.size) == tuple(param.shape):
            targets[key] = torch.zeros_like(param, dtype=meta.properties.dtype).detach()
        else:
            targets[key] = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
    return targets


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


def _optimizer_state(optimizer: torch.optim.Optimizer, *, keep: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                                       dict[str, Any]]:
    """Optimizer state split into tensors (for safetensors; `keep`: as they are, for DCP) and JSON-able values."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach() if keep else value.detach().cpu().contiguous()
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
