"""The layer types of issue 16 (Conv3d, ConvTranspose, Embedding, LSTM): what share of each model's
parameters vcon-fx compresses now, and the vanished models' ONNX latency against dense → LAYERS.md.

For each model, `vcon_fx.plan(LowRankConfig(ratio=0.25))` with default selection gives the share
of parameters in the layers it compresses; the same plan restricted to the layer types compressed
before (`--targets Linear Conv1d Conv2d`) gives the share before; embedding models are also planned
with `--include-stem --include-head` (by default the token embedding is the stem and the LM head the
head, which stay dense as in the paper). Then the dense model and the vanished ones (low-rank at
ratio 0.25 and int8 `quant`; the GPT-2-size embedding models with the stem and head included, and
at 4 bits too) are exported to ONNX and timed in onnxruntime (1 thread, sessions interleaved round
by round in one process, the machine being shared; see common.py): each latency is a ratio to the
dense model's, at β = 0 without fine-tuning.

    .venv/bin/python benchmarks/layers.py                       # → benchmarks/LAYERS.md (about 15 min on 2 cores)
    .venv/bin/python benchmarks/layers.py --models lstm_lm --out /tmp/l.md
    .venv/bin/python benchmarks/layers.py --tiny --out /tmp/l.md  # smoke test: tiny models, 2 rounds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import (command_line, fmt_ratio, interleave, machine_line, markdown_table, ort_session,  # noqa: E402
                    ratio_of, write_text_atomic)
from zoo import LSTMLanguageModel, UNet, VideoNet  # noqa: E402

OLD_TYPES = ("Linear", "Conv1d", "Conv2d")
NOTES = """## Reading the numbers

- Low-rank ONNX runs the factorized layers: r3d_18, the U-Net and the embedding models get faster
  as well as smaller. A low-rank embedding adds a matmul per token where the lookup had none; the
  GPT-2-size models gain through the vocabulary head (logits through rank r instead of d).
- The LSTM runs as one ONNX LSTM op that takes whole gate matrices: low-rank factors are
  multiplied back in front of it (onnxruntime folds that once, at load), so the file shrinks and
  the latency stays the dense model's.
- int8 (`quant`, no export kernel) stores integers and dequantizes them at every run
  (DequantizeLinear is not folded): smaller files, slower runs, the more so the larger the matrix
  (the 50257 × 768 head). `vcon-fx export --dynamic-int8` / `--int4` kernels are what make integer
  weights fast ([DEPLOY.md](DEPLOY.md)). A 4-bit table is unpacked with plain ONNX ops after the
  Gather; a tied 4-bit head unpacks the whole table, which onnxruntime folds at load (memory, not
  file size).
- The tied model's file holds the one table the embedding and the head share (150 → 38 MB at
  low-rank and int8, 19 MB at 4 bits); untied, both are compressed separately.
"""


@dataclass
class Case:
    name: str
    what: str
    model: object
    args: tuple
    kwargs: dict
    seq: tuple[str, ...] = ()
    embeddings: bool = False  # also planned with --include-stem --include-head, and run at 4 bits
    timed_with_ends: bool = False  # the latency rows compress the stem and the head too


class TokenLM:
    """Embedding(vocab, d) → Linear(d, d) + tanh → Linear(d, vocab) head, tied to the embedding or not."""

    @staticmethod
    def build(vocab: int, dim: int, tied: bool):
        import torch
        from torch import nn

        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed, self.mid, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.Linear(dim, vocab)
                if tied:
                    self.head.weight = self.embed.weight

            def forward(self, ids):
                return self.head(torch.tanh(self.mid(self.embed(ids))))

        return LM().eval()


def cases(names: list[str], tiny: bool) -> list[Case]:
    import torch
    import torchvision

    torch.manual_seed(0)
    out = []
    for name in names:
        if name == "r3d_18":
            model = VideoNet().eval() if tiny else torchvision.models.video.r3d_18(weights=None).eval()
            clip = (1, 3, 4, 16, 16) if tiny else (1, 3, 8, 112, 112)
            what = "a tiny Conv3d net (tests/zoo.py VideoNet)" if tiny else "torchvision r3d_18"
            out.append(Case(name, f"{what}, clip {'×'.join(map(str, clip[2:]))}", model, (torch.randn(*clip),), {}))
        elif name == "unet":
            width, size = (4, 16) if tiny else (32, 128)
            out.append(Case(name, f"U-Net of torchvision blocks, width {width}, {size}×{size}", UNet(width).eval(),
                            (torch.randn(1, 3, size, size),), {}))
        elif name.startswith("gpt2_embedding"):
            tied = name.endswith("tied") and not name.endswith("untied")
            vocab, dim, seq = (500, 32, 8) if tiny else (50257, 768, 32)
            out.append(Case(name, f"Embedding({vocab}, {dim}) → Linear → head, {'tied' if tied else 'untied'}, "
                            f"{seq} tokens", TokenLM.build(vocab, dim, tied), (),
                            {"ids": torch.randint(0, vocab, (1, seq))}, ("ids",), True, True))
        elif name == "lstm_lm":
            vocab, dim, hidden, seq = (120, 32, 48, 8) if tiny else (10000, 256, 512, 64)
            out.append(Case(name, f"Embedding({vocab}, {dim}) → 2-layer LSTM({hidden}) → Linear → head, {seq} tokens",
                            LSTMLanguageModel(vocab, dim, hidden).eval(), (),
                            {"ids": torch.randint(0, vocab, (1, seq))}, ("ids",), True))
    return out


def shares(case: Case) -> dict[str, str]:
    """Parameter share compressed by low-rank (ratio 0.25): before (old types), now, and with stem + head."""
    import vcon_fx

    config = vcon_fx.LowRankConfig(ratio=0.25)

    def share(**selection) -> str:
        try:
            plan = vcon_fx.plan(case.model, config, example_inputs=case.args, example_kwargs=case.kwargs,
                                seq_inputs=case.seq, **selection)
        except vcon_fx.errors.SelectionError:
            return "0 %"
        done = [p for g in plan.groups for p in g.layers if not plan.plans[p].skipped]
        covered = sum(plan.plans[p].params_before for p in done)
        return f"{100 * covered / plan.total_params:.1f} % (→ {100 * plan.params_after / plan.total_params:.0f} %)"

    row = {"before": share(targets=OLD_TYPES), "now": share()}
    if case.embeddings:
        row["now, with stem and head"] = share(include_stem=True, include_head=True)
    return row


def variants(case: Case) -> dict[str, object]:
    import vcon_fx

    out = {"low-rank ratio 0.25": vcon_fx.LowRankConfig(ratio=0.25), "int8 (quant bits=8)": vcon_fx.QuantConfig(bits=8)}
    if case.timed_with_ends:
        out["4-bit (quant bits=4)"] = vcon_fx.QuantConfig(bits=4)
    return out


def latencies(case: Case, rounds: int, workdir: Path) -> list[list]:
    """Rows: variant, selection, ONNX MB, latency ratio to dense (median, range), ms."""
    import torch

    import vcon_fx
    from vcon_fx.export.onnx import export_onnx

    paths = {"dense": export_onnx(case.model, workdir / f"{case.name}-dense.onnx", case.args,
                                  example_kwargs=case.kwargs, seq_inputs=case.seq)}
    selection = {"include_stem": True, "include_head": True} if case.timed_with_ends else {}
    for label, config in variants(case).items():
        vm = vcon_fx.transform(case.model, config, example_inputs=case.args, example_kwargs=case.kwargs,
                               seq_inputs=case.seq, **selection)
        vcon_fx.set_beta(vm, 0.0)
        small = vcon_fx.vanish(vm)
        paths[label] = export_onnx(small, workdir / f"{case.name}-{len(paths)}.onnx", case.args,
                                   example_kwargs=case.kwargs, seq_inputs=case.seq)
        del vm, small
    feeds = {}
    sessions = {label: ort_session(path, threads=1) for label, path in paths.items()}
    inputs = [t for t in (*case.args, *case.kwargs.values()) if isinstance(t, torch.Tensor)]
    for label, session in sessions.items():
        feeds[label] = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    calls = {label: (lambda s=s, f=feeds[label]: s.run(None, f)) for label, s in sessions.items()}
    times = interleave(calls, rounds=rounds, iters=3, warmup=1)
    rows = []
    for label, path in paths.items():
        r = ratio_of(times, label, "dense")
        where = "" if label == "dense" else ("stem + head included" if case.timed_with_ends else "default")
        rows.append([label, where, f"{path.stat().st_size / 2**20:.1f}", "1" if label == "dense" else fmt_ratio(r),
                     f"{r['ms']:.1f}"])
    return rows


def report(names: list[str], tiny: bool, rounds: int) -> str:
    lines = ["# Layer types: compressible share and ONNX latency", "", f"Command: `{command_line()}`", "",
             f"Machine: {machine_line()}", "", __doc__.split("\n\n")[1].replace("\n", " "), ""]
    share_rows, latency_blocks = [], []
    for case in cases(names, tiny):
        try:
            row = shares(case)
            share_rows.append([case.name, case.what, row["before"], row["now"], row.get("now, with stem and head", "")])
            with tempfile.TemporaryDirectory() as tmp:
                rows = latencies(case, rounds, Path(tmp))
            latency_blocks += [f"### {case.name}", "", markdown_table(
                ["model", "selection", "ONNX MB", "latency ÷ dense (range)", "ms"], rows), ""]
        except Exception as exc:  # one model's failure is a line of the report, not a crash
            latency_blocks += [f"### {case.name}", "", f"FAILED: {type(exc).__name__}: {exc}",
                               "```", traceback.format_exc()[-1500:], "```", ""]
    lines += ["## Parameter share in compressed layers (low-rank ratio 0.25; in brackets: parameters left)", "",
              markdown_table(["model", "what", "before (Linear / Conv1d / Conv2d only)", "now (default)",
                              "now, --include-stem --include-head"], share_rows), ""]
    lines += ["## ONNX latency against dense (onnxruntime CPU, 1 thread, batch 1)", ""] + latency_blocks
    return "\n".join(lines) + "\n" + ("" if tiny else "\n" + NOTES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="default: r3d_18 unet gpt2_embedding_untied "
                        "gpt2_embedding_tied lstm_lm (with --tiny: r3d_18 gpt2_embedding_tied lstm_lm)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 2 rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(HERE / "LAYERS.md"))
    args = parser.parse_args(argv)
    np.random.seed(0)
    models = args.models or (["r3d_18", "gpt2_embedding_tied", "lstm_lm"] if args.tiny else
                             ["r3d_18", "unet", "gpt2_embedding_untied", "gpt2_embedding_tied", "lstm_lm"])
    text = report(models, args.tiny, 2 if args.tiny else args.rounds)
    print(f"wrote {write_text_atomic(args.out, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
