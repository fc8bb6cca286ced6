"""Issue 13's part (a): the pretrained MiniLM, one-shot and fine-tuned, column by column.

Every Linear in `encoder.layer.*` is compressed. Each setting is transformed once per start
(plain, data-aware, data-aware + allocation; transform is deterministic), measured one-shot
(β = 0, vanished), and each trained column fine-tunes a copy of its start with
`vcon_fx.finetune` on unlabeled real sentences, the library's own path for a sentence encoder:
without labels the loss is distillation to the dense branch (β = 1 on the same graph), so a
"teacher" column would repeat the data-aware one and is not run. Every trained column gets the
same steps, batch, learning rate and data order per seed; scores are measured on 471 held-out
sentences: cosine of the mean-pooled sentence embedding to the original's, and top-10
nearest-neighbour agreement.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

__all__ = ["minilm_part", "TRAINED", "top10_agreement"]

# trained column → (start: "plain" | "data-aware" | "allocated"; transition share Q; schedule)
TRAINED = {
    "abrupt plain": ("plain", 0.0, "linear"),
    "abrupt data-aware": ("data-aware", 0.0, "linear"),
    "abrupt DA + allocation": ("allocated", 0.0, "linear"),
    "VCON plain": ("plain", 0.2, "linear"),
    "VCON data-aware": ("data-aware", 0.2, "linear"),
    "VCON DA + allocation": ("allocated", 0.2, "linear"),
    "+ adaptive schedule": ("allocated", 0.2, "adaptive"),
}
ONE_SHOT = {"plain": "one-shot plain", "data-aware": "one-shot data-aware", "allocated": "one-shot DA + allocation"}
CALIBRATION_SAMPLES = 128
LR = 2e-4
BATCH = 16


class _Sentences(torch.utils.data.Dataset):
    """Tokenized sentences as dicts of keyword inputs (what `finetune` reads for a HF model)."""

    def __init__(self, encoded: dict[str, torch.Tensor]):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.encoded.items()}


def minilm_part(grid, log, method_config, setting_label) -> list[dict]:
    """One-shot rows of every setting, then every trained column for every seed (settings of grid.minilm_trained)."""
    import vcon_fx
    from benchmarks.minilm import TARGETS, embeddings, encode, sentences
    from transformers import AutoTokenizer
    from vcon_fx.sources.load import load_model, minilm_path

    torch.set_num_threads(2)
    lm = load_model(minilm_path(), seq_len=64, batch_size=2)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    train_text, held_text = sentences(0)
    train, held = encode(tokenizer, train_text, 64), encode(tokenizer, held_text, 64)
    original = lm.module.eval()
    with torch.no_grad():
        reference = embeddings(original, held)
    calibration = {k: v[:CALIBRATION_SAMPLES] for k, v in train.items()}

    def score(small) -> dict:
        with torch.no_grad():
            got = embeddings(small, held)
        return {"cosine": float(torch.nn.functional.cosine_similarity(got, reference).mean()),
                "top10": top10_agreement(got, reference)}

    rows = []
    for method, strength in grid.minilm:
        label = setting_label(method, strength)
        starts = {}
        for start, column in ONE_SHOT.items():
            if start == "allocated" and strength == "2:4":
                rows.append({"setting": label, "column": column,
                             "note": "N:M sparsity has one pattern per group of 4: nothing to allocate"})
                continue
            t0 = time.perf_counter()
            starts[start] = vcon_fx.transform(original, method_config(method, strength, start != "plain"),
                                              example_kwargs=lm.example_kwargs, seq_inputs=lm.seq_inputs,
                                              targets=TARGETS, calibration=calibration if start != "plain" else None,
                                              allocate="params" if start == "allocated" else None)
            vm = copy.deepcopy(starts[start])
            vcon_fx.set_beta(vm, 0.0)
            rows.append({"setting": label, "column": column, **score(vcon_fx.vanish(vm)),
                         "seconds": round(time.perf_counter() - t0, 1)})
            log(f"minilm {rows[-1]}")
        trained = grid.minilm_steps and (method, strength) in grid.minilm_trained
        for seed in grid.seeds if trained else ():
            for column, (start, share, schedule) in TRAINED.items():
                if start in starts:
                    rows.append(_trained(starts[start], seed, column, share, schedule, train, grid, score, label))
                    log(f"minilm {rows[-1]}")
    return rows


def _trained(start, seed: int, column: str, share: float, schedule: str, train, grid, score, label) -> dict:
    """Fine-tune a copy of `start` (distillation to the dense branch), vanish, score."""
    import vcon_fx

    t0 = time.perf_counter()
    vm = copy.deepcopy(start)
    data = _Sentences(train)
    vcon_fx.finetune(vm, data, steps=grid.minilm_steps, transition=round(share * grid.minilm_steps), lr=LR,
                     batch_size=BATCH, seed=seed, schedule=schedule,
                     eval_data=torch.utils.data.Subset(data, range(8)))  # the real score is taken below
    vcon_fx.set_beta(vm, 0.0)
    return {"setting": label, "column": column, "seed": seed, "steps": grid.minilm_steps,
            **score(vcon_fx.vanish(vm)), "seconds": round(time.perf_counter() - t0, 1)}


def top10_agreement(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean share of each sentence's 10 nearest neighbours (cosine) the compressed model keeps (pure)."""
    def neighbours(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        sims = e @ e.T
        sims.fill_diagonal_(-2.0)
        return sims.topk(10, dim=-1).indices
    a, b = neighbours(got), neighbours(reference)
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / 10 for x, y in zip(a, b)]))
