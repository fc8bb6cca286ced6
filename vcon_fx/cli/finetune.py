"""`vcon-fx finetune`: fine-tune a blended artifact while β falls 1 → 0 (part of the CLI: it prints).

    vcon-fx finetune model.vcon --data train.npz --steps 1000 [--transition 200] [-o model.tuned]
    torchrun --nproc-per-node 2 -m vcon_fx finetune model.vcon --data train.npz --steps 1000 [--fsdp]

cli/main.py wires it in with `add_finetune_parser(subparsers)` and `cmd_finetune(args)`. Under
torchrun only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import StageError, UsageError
from ..graph.blend import mean_beta
from ..schedules.schedule import SCHEDULES
from ..training.evaluate import LOSSES
from .options import add_dtype
from .render import console, errors

__all__ = ["add_finetune_parser", "cmd_finetune", "run_finetune"]


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `finetune` sub-command to an argparse sub-parsers object; returns its parser."""
    p = subparsers.add_parser("finetune", help="fine-tune while β falls 1 → 0 (task loss or distillation)")
    p.add_argument("model", help="a blended vcon artifact folder (from `vcon-fx transform`)")
    p.add_argument("--data", required=True, help=".safetensors/.npz (inputs, labels), an image folder, a text file, "
                   "a .jsonl/.csv/.parquet table, or a datasets save_to_disk folder")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in all")
    p.add_argument("--transition", help="Q: steps over which β falls, or a share like 20%% (default 20%%; 0 = abrupt)")
    p.add_argument("--schedule", default="linear", choices=SCHEDULES, help="shape of β over the transition")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int,
                   help="examples per step and process (default 32, or the batch a model with fixed shapes runs at)")
    p.add_argument("--loss", default="auto", choices=LOSSES,
                   help="auto: cross-entropy with labels, else distillation from the model at β = 1")
    p.add_argument("--distill", type=float, default=0.0,
                   help="with labels: weight W of distillation from the dense branch, (1-W)*task + W*distill (default 0)")
    p.add_argument("--match-groups", type=float, default=0.0,
                   help="weight of matching each group's compressed output to its dense branch's (default 0)")
    p.add_argument("--teacher-after", action="store_true",
                   help="keep --distill and --match-groups on after β reaches 0 (default: they stop there)")
    p.add_argument("--eval", dest="eval_data", help="evaluation data (default: up to 1024 training examples)")
    p.add_argument("--eval-every", type=int, help="evaluate every K steps (always before and after)")
    p.add_argument("--save-every", type=int, help="checkpoint every K steps")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--seed", type=int, default=0, help="data order and dropout seed")
    p.add_argument("--log", help="JSON-lines log, one object per step")
    p.add_argument("--text-column", default="text",
                   help="a table's text column, for --data and --eval (default text, else its only text column)")
    p.add_argument("--label-column", default="label",
                   help="a table's label column: class indices or names (default label; absent: unlabelled)")
    p.add_argument("--seq-len", type=int, help="tokens per text example (default: the model's example length)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's own GPU)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model over the processes with FSDP2 instead of DDP replicas")
    add_dtype(p, default=None)
    p.add_argument("--trust-pickle", action="store_true", help="the artifact's source is a pickled module you trust")
    p.add_argument("-o", "--output", help="tuned artifact folder (default: MODEL with suffix .tuned)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return p


def _transition(value: str | None, steps: int) -> int | None:
    if value is None:
        return None
    text = value.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return round(steps * share / 100)
        return int(text)
    except ValueError:
        raise UsageError(f"--transition must be a number of steps (e.g. 200) or a share of --steps (e.g. 20%), "
                         f"got {value!r}") from None


def default_output(model: str) -> Path:
    """MODEL with the suffix .tuned, beside it (model.vcon → model.tuned)."""
    path = Path(model.rstrip("/"))
    return path.with_suffix(".tuned") if path.suffix else path.with_name(path.name + ".tuned")


def cmd_finetune(args) -> int:
    """Load the artifact, fine-tune it with a progress bar, save the tuned artifact; on Ctrl-C say how to resume."""
    try:
        return run_finetune(args)
    except KeyboardInterrupt as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            errors.print(f"[yellow]{exc or 'interrupted'}[/]; continue with the same command plus --resume")
        raise


def run_finetune(args) -> int:
    """`cmd_finetune` without the Ctrl-C line (`vcon-fx compress` words its own); returns the exit code."""
    from ..io.artifact import is_artifact, load, read_recipe, save
    from ..data import load_data_for
    from ..io.atomic import check_output
    from ..training import finetune
    from ..training.config import training_batch_size

    main_rank = int(os.environ.get("RANK", "0")) == 0
    model_path = Path(args.model)
    if model_path.exists() and not is_artifact(model_path):
        raise StageError(f"{model_path} is not a vcon artifact (no recipe.json): run `vcon-fx transform {args.model} "
                         f"-o {model_path.stem}.vcon` first, then fine-tune that folder")
    recipe = read_recipe(model_path)
    if recipe.stage != "blended":
        raise StageError(f"{model_path} is already {recipe.stage} (no β left to schedule): fine-tune the blended "
                         "artifact, before `vcon-fx vanish`")
    out = Path(args.output) if args.output else default_output(args.model)
    if main_rank:
        check_output(out, force=args.force, inputs=(args.model, args.data, args.eval_data))
    transition = _transition(args.transition, args.steps)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".ckpt")
    _config(args, transition, checkpoint_dir)  # a refused setting (--fsdp in one process, …) fails before loading
    _, batch_note = training_batch_size(recipe.inputs, args.batch_size)  # a conflict fails here, before any work
    if batch_note and main_rank:
        console.print(f"[yellow]note:[/] {batch_note}", soft_wrap=True)

    with console.status("loading the model and data…") if main_rank else contextlib.nullcontext():
        vm = load(model_path, trust_pickle=args.trust_pickle)
        columns = {"seq_len": args.seq_len, "text_column": args.text_column, "label_column": args.label_column}
        train = load_data_for(vm, args.data, **columns)
        evaluation = load_data_for(vm, args.eval_data, **columns) if args.eval_data else None

    progress = _progress() if main_rank else None
    task = progress.add_task("fine-tuning", total=args.steps, info="") if progress else None

    def on_step(info: dict) -> None:
        if progress is not None:
            progress.update(task, completed=info["step"], info=_step_text(info))

    try:
        if progress:
            progress.start()
        # Built here, inside the progress bar, where finetune() checked these settings before.
        config = _config(args, transition, checkpoint_dir)
        result = finetune(vm, train, config, eval_data=evaluation, on_step=on_step)
    finally:
        if progress:
            progress.stop()  # before any message, so the bar does not overwrite it
    if not main_rank:
        return 0
    _record_training_data(vm, args.data, columns)
    save(vm, out, force=args.force)
    console.print(_summary(result, out), soft_wrap=True)
    return 0


def _record_training_data(model, data: str, columns: dict) -> None:
    """Note in `model`'s recipe which data it was fine-tuned on (in place): export calibrates on it when asked nothing else."""
    from ..graph.recipe import recipe_of

    path = Path(data)
    where = str(path.resolve()) if path.exists() else data
    model.meta["vcon"] = recipe_of(model).replace(training={"data": where, **columns})


def _config(args, transition: int | None, checkpoint_dir: Path):
    """The FinetuneConfig the command line asks for."""
    from ..training import FinetuneConfig
    from ..training.fsdp import check_fsdp_settings

    if args.fsdp:  # compress builds the config before its first stage: this refuses --fsdp there
        check_fsdp_settings(int(os.environ.get("WORLD_SIZE", "1")), args.match_groups)
    return FinetuneConfig(steps=args.steps, transition=transition, schedule=args.schedule, lr=args.lr,
                          batch_size=args.batch_size, loss=args.loss, eval_every=args.eval_every, seed=args.seed,
                          save_every=args.save_every, checkpoint_dir=checkpoint_dir, resume=args.resume,
                          log_path=args.log, device=args.device, distill=args.distill, match_groups=args.match_groups,
                          teacher_after=args.teacher_after, fsdp=args.fsdp, dtype=getattr(args, "dtype", None))


def _step_text(info: dict) -> str:
    """The progress bar's text for one step: β, loss, gap, eval."""
    text = f"β {info['beta']:.3f}  loss {info['loss']:.4g}"
    if info.get("gap"):
        gaps = list(info["gap"].values())
        text += f"  gap {sum(gaps) / len(gaps):.3f} (max {max(gaps):.3f})"
    if info.get("eval"):
        text += "  " + "  ".join(f"{k} {v:.4f}" for k, v in info["eval"].items())
    return text


def _summary(result, out: Path) -> str:
    """The closing line: the metric before, untrained-compressed and after, and where the artifact went."""
    m = result.metrics
    where = " (on training data)" if result.eval_on == "train" else ""
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    return (f"{result.metric}{where}: original {m.get('before', float('nan')):.4f} · compressed untrained "
            f"{m.get('before_compressed', float('nan')):.4f} → after {m['after']:.4f} "
            f"({result.steps} steps, {result.loss} loss, β {mean_beta(result.betas):.3f}{resumed}); [green]wrote[/] {out}")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, transient=False)
