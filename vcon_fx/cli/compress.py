"""`vcon-fx compress`: transform → finetune → vanish → export in one command, resumable after Ctrl-C.

    vcon-fx compress model.pt2 --method lowrank --rank 64 --data train.npz --steps 2000 --onnx model.onnx --check

Its flags are the stage commands' own: the parser copies every option of `transform`, `finetune`
and `export` but each stage's output flags, and each stage runs the stage command's own `run`
with a Namespace built from the stage's parser, so a flag added to a stage is accepted here and
forwarded with no edit to this file. The intermediate artifacts go to a work folder (default:
the ONNX's stem + `.work`, beside it) with `compress.json`, the command's settings. Running the
same command again skips every stage whose artifact is there (writes are atomic: present means
complete), and fine-tuning continues from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

from rich.markup import escape

from ..errors import ArtifactError, UsageError
from . import export, finetune, transform, vanish
from .render import console, errors

__all__ = ["add_parser", "run", "default_work", "SETTINGS_FILE"]

SETTINGS_FILE = "compress.json"  # the command's settings: a rerun with others is refused
EXPORTED_FILE = "export.json"    # written once the ONNX is written (and checked, with --check)
_FORMAT = "vcon-fx-compress"
_ARTIFACTS = {"transform": ("model.vcon", "blended"), "finetune": ("model.tuned", "blended"),
              "vanish": ("model.small", "vanished")}
_CHECKPOINTS = "model.tuned.ckpt"
# Stage flags compress sets itself: every output goes to the work folder, and --force means start over.
_OWN_FLAGS = {"-o", "--output", "--force", "--checkpoint-dir", "--resume"}
# Settings a continuation may change: they change where things go, or how often, not the result.
_NOT_SETTINGS = {"command", "verbose", "work", "force", "onnx", "check", "device", "save_every", "eval_every", "log"}
_PATH_SETTINGS = ("model", "data", "eval_data", "weights", "arch", "calibration_data")
_GROUP_TITLES = {"transform": "transform", "finetune": "fine-tuning", "export": "export", "vanish": "vanish"}


def add_parser(sub) -> None:
    """Add the `compress` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("compress", help="transform → finetune → vanish → export in one command (resumable)")
    p.add_argument("model", help="any model source: a .pt2 file, torchvision:NAME, a Hugging Face folder, …")
    for name, stage in _stage_parsers().items():
        _copy_options(stage, p, _GROUP_TITLES[name])
    g = p.add_argument_group("compress")
    g.add_argument("--work", help="folder for the intermediate artifacts (default: beside the ONNX, its stem + .work)")
    g.add_argument("--force", action="store_true", help="start over: clear the work folder and replace the ONNX")


def _stage_parsers() -> dict[str, argparse.ArgumentParser]:
    """The four stage commands' parsers, built by the stage modules themselves (pure)."""
    sub = argparse.ArgumentParser().add_subparsers()
    transform.add_parser(sub)
    finetune.add_finetune_parser(sub)
    vanish.add_parser(sub)
    export.add_parser(sub)
    return dict(sub.choices)


def _copy_options(stage: argparse.ArgumentParser, parser: argparse.ArgumentParser, title: str) -> None:
    """Add `stage`'s options to `parser` (in place) under the same group titles ("model source", …).

    An option `parser` has already (the model source flags every stage shares, `--help`) and the
    stage's output flags are left out. argparse has no public way to move an action between
    parsers; `_add_action` is what `parents=` uses, and the action objects are only read.
    """
    groups = {g.title: g for g in parser._action_groups}
    for group in [g for g in stage._action_groups if g is not stage._optionals] + [stage._optionals]:
        name = title if group is stage._optionals else group.title
        for action in group._group_actions:
            taken = _OWN_FLAGS | set(parser._option_string_actions)
            if not action.option_strings or taken & set(action.option_strings):
                continue
            if name not in groups:
                groups[name] = parser.add_argument_group(name)
            groups[name]._add_action(action)


def _stage_args(stage: argparse.ArgumentParser, args, **own) -> argparse.Namespace:
    """The Namespace `stage`'s parser would give for this command, with compress's own paths (pure)."""
    values = {a.dest: getattr(args, a.dest, a.default) for a in stage._actions if a.dest != "help"}
    values.update(own)
    return argparse.Namespace(**values)


def default_work(onnx: str | Path) -> Path:
    """The default work folder: beside the ONNX, its stem + `.work` (out.onnx → out.work) (pure)."""
    path = Path(onnx)
    return path.with_name(path.stem + ".work")


def run(args) -> int:
    """Run the four stages (or the ones not done yet), each with its own report; returns the exit code."""
    from ..io.atomic import check_output

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("compress runs in one process: under torchrun, run `vcon-fx finetune` alone "
                         "(transform, vanish and export before and after it, without torchrun)")
    parsers = _stage_parsers()
    onnx = Path(args.onnx)
    work = Path(args.work) if args.work else default_work(onnx)
    inputs = (args.model, args.data, args.eval_data, args.weights, args.calibration_data)
    if work.absolute() == onnx.absolute():
        raise UsageError(f"--work {work} is the ONNX file's own path: choose another --work")
    _check_finetune_flags(args, parsers["finetune"], work)
    settings = _settings(args)
    continuing = _continues(work, settings, parsers, force=args.force, inputs=inputs)
    check_output(onnx, force=args.force or continuing, inputs=inputs)  # before anything is written
    _start(work, settings, fresh=args.force or not continuing)
    stages = _stages(args, parsers, work, onnx)
    try:
        for number, stage in enumerate(stages, 1):
            head = f"[bold]{escape(f'[{number}/{len(stages)}]')} {stage.name}[/]"
            if stage.done():
                console.print(f"{head}: done already ({escape(str(stage.output))})", soft_wrap=True)
                continue
            console.print(f"{head} → {escape(str(stage.output))}{_continuing(stage.name, work)}", soft_wrap=True)
            code = stage.run()
            if code:
                return code
    except KeyboardInterrupt:
        errors.print(f"[yellow]{escape(_kept(work))}[/]", soft_wrap=True)
        raise
    console.print(f"[green]done:[/] {escape(str(onnx))}; the intermediate artifacts are in {escape(str(work))}/ "
                  "(delete it once you no longer need them)", soft_wrap=True)
    return 0


class _Stage(NamedTuple):
    name: str
    output: Path
    done: Callable[[], bool]   # its output is there: skip it
    run: Callable[[], int]     # the stage command's own run, on its own Namespace


def _stages(args, parsers: dict, work: Path, onnx: Path) -> list[_Stage]:
    """The four stages, in order, with their outputs in `work` (pure: nothing runs yet)."""
    vcon, tuned, small = (work / _ARTIFACTS[s][0] for s in ("transform", "finetune", "vanish"))
    save_every = args.save_every or max(1, args.steps // 20)  # a hard kill loses at most 5% of the steps

    def stage_args(name: str, **own) -> argparse.Namespace:
        return _stage_args(parsers[name], args, **own)

    def run_export() -> int:
        # An ONNX here came from an earlier run of this command: run() refused any other before writing.
        code = export.run(stage_args("export", model=str(small), force=onnx.exists()))
        _record_export(work, onnx, checked=args.check)
        return code

    return [
        _Stage("transform", vcon, lambda: _has_artifact(vcon, "transform"),
               lambda: transform.run(stage_args("transform", output=str(vcon), force=False))),
        _Stage("finetune", tuned, lambda: _has_artifact(tuned, "finetune"),
               lambda: finetune.run_finetune(stage_args("finetune", model=str(vcon), output=str(tuned), force=False,
                                                        checkpoint_dir=str(work / _CHECKPOINTS), resume=True,
                                                        save_every=save_every))),
        _Stage("vanish", small, lambda: _has_artifact(small, "vanish"),
               lambda: vanish.run(stage_args("vanish", model=str(tuned), output=str(small), force=False))),
        _Stage("export", onnx, lambda: _exported(work, onnx, check=args.check), run_export),
    ]


def _check_finetune_flags(args, parser: argparse.ArgumentParser, work: Path) -> None:
    """Refuse bad fine-tuning flags before the transform runs, not after (pure).

    Raises:
        UsageError: a --transition longer than --steps (β would not reach 0, and vanish would refuse).
        ConfigError: a setting finetune refuses (steps, lr, batch size, …).
    """
    from .finetune import _config, _transition

    transition = _transition(args.transition, args.steps)
    if transition is not None and transition > args.steps:
        raise UsageError(f"--transition {args.transition} is longer than --steps {args.steps}: β would not reach 0 "
                         "and the dense branch could not be removed; give a transition of at most --steps")
    _config(_stage_args(parser, args, resume=True), transition, work / _CHECKPOINTS)


def _settings(args) -> dict:
    """The settings a continuation must share: every flag but the operational ones, input paths made absolute (pure)."""
    values = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}
    for key in _PATH_SETTINGS:
        if values.get(key) and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    return json.loads(json.dumps(values, default=str))  # as they read back from compress.json


def _continues(work: Path, settings: dict, parsers: dict, *, force: bool, inputs: tuple) -> bool:
    """True when `work` holds an earlier run of this same command (pure: only reads).

    Raises:
        UsageError: `work` is a file, someone else's folder, holds an input, or holds a run with other settings.
    """
    if work.exists() and not work.is_dir():
        raise UsageError(f"work folder {work} is a file: choose another --work")
    record = work / SETTINGS_FILE
    if work.is_dir() and not record.is_file() and any(work.iterdir()):
        raise UsageError(f"{work} is not a `vcon-fx compress` work folder (no {SETTINGS_FILE}) and is not empty: "
                         "choose another --work")
    for path in inputs:
        if path and Path(path).exists() and work.resolve() in (Path(path).resolve(), *Path(path).resolve().parents):
            raise UsageError(f"input {path} lies in the work folder {work}: choose another --work")
    if force or not record.is_file():
        return False
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{record} is unreadable: pass --force to start over, or choose another --work") from None
    if saved != settings:
        raise UsageError(f"{work} holds a run of `vcon-fx compress` with other settings "
                         f"({_differences(saved, settings, parsers)}): pass --force to start over (clears {work}), "
                         "or choose another --work")
    return True


def _differences(saved: dict, settings: dict, parsers: dict) -> str:
    """The flags that differ, as `--rank 64 → 32`, the first three (pure)."""
    flags = {a.dest: a.option_strings[-1] if a.option_strings else a.dest.upper()
             for p in parsers.values() for a in p._actions}
    keys = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
    shown = [f"{flags.get(k, k)} {saved.get(k)} → {settings.get(k)}" for k in keys[:3]]
    return "; ".join(shown) + (f"; {len(keys) - 3} more" if len(keys) > 3 else "")


def _start(work: Path, settings: dict, *, fresh: bool) -> None:
    """Make the work folder and record the settings (in place on disk); `fresh` clears an earlier run first."""
    from ..io.atomic import check_output, write_text_atomic

    if not fresh:
        return
    if work.is_dir():
        shutil.rmtree(work)  # _continues checked it is this command's folder (or empty) and holds no input
    check_output(work)
    work.mkdir()
    record = {"format": _FORMAT, "version": 1, "settings": settings}
    write_text_atomic(work / SETTINGS_FILE, json.dumps(record, indent=1))


def _has_artifact(path: Path, stage: str) -> bool:
    """True when `path` holds the artifact `stage` writes (pure).

    Raises:
        ArtifactError: something else is there.
    """
    from ..io.artifact import read_recipe

    if not path.exists():
        return False
    expected = _ARTIFACTS[stage][1]
    try:
        found = read_recipe(path).stage
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; it is in compress's work folder: pass --force to start over") from None
    if found != expected:
        raise ArtifactError(f"{path} is a {found} artifact, not the {expected} one {stage} writes: pass --force to "
                            "start over")
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_export(work: Path, onnx: Path, *, checked: bool) -> None:
    """Note in the work folder which ONNX this run wrote (in place on disk): a rerun then skips the export."""
    from ..io.atomic import write_text_atomic

    record = {"onnx": str(onnx.resolve()), "sha256": _sha256(onnx), "checked": checked}
    write_text_atomic(work / EXPORTED_FILE, json.dumps(record, indent=1))


def _exported(work: Path, onnx: Path, *, check: bool) -> bool:
    """True when this run wrote `onnx` as it is now, and checked it if `check` asks (pure)."""
    try:
        record = json.loads((work / EXPORTED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("onnx") == str(onnx.resolve()) and onnx.is_file()
            and (record.get("checked") or not check) and record.get("sha256") == _sha256(onnx))


def _continuing(stage: str, work: Path) -> str:
    """`(continuing from step N)` for a fine-tuning stage with a checkpoint, else "" (pure)."""
    from ..training.checkpoint import latest_checkpoint

    found = latest_checkpoint(work / _CHECKPOINTS) if stage == "finetune" else None
    return f" (continuing from the checkpoint of step {found.name.split('-')[1]})" if found else ""


def _kept(work: Path) -> str:
    """The Ctrl-C line: what the work folder keeps, and how to continue (pure)."""
    from ..io.artifact import is_artifact
    from ..training.checkpoint import latest_checkpoint

    kept = [name for name, _ in _ARTIFACTS.values() if is_artifact(work / name)]
    found = latest_checkpoint(work / _CHECKPOINTS)
    if found is not None and "model.tuned" not in kept:
        kept.append(f"the fine-tuning checkpoint of step {found.name.split('-')[1]}")
    what = f"kept {', '.join(kept)} in {work}/" if kept else f"no stage had finished ({work}/ holds the settings)"
    return f"interrupted: {what}; run the same command again to continue"
