"""What a demo run is and what it makes: its sizes (FULL, FAST), one row per method, the result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DemoSettings", "DemoRow", "DemoResult", "FULL", "FAST", "DEMO_FORMAT", "RESULTS_NAME", "PLOT_NAME"]

DEMO_FORMAT = "vcon-fx-demo"
RESULTS_NAME = "results.json"
PLOT_NAME = "accuracy.png"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (FULL for `vcon-fx demo`, FAST for `--fast` and the tests)."""

    pretrain_steps: int = 600     # dense training, AdamW, one-cycle lr
    pretrain_lr: float = 3e-3
    steps: int = 300              # the fine-tuning budget of every run, abrupt and VCON alike
    transition: float = 0.2       # Q as a share of `steps` (the authors' 20%)
    lr: float = 1e-3              # Adam, constant (vcon_fx.finetune)
    batch_size: int = 64
    eval_every: int = 10          # test accuracy every this many steps, for the plot
    depth: int = 4
    dim: int = 64
    hidden: int = 128
    latency_batch: int = 64       # onnxruntime latency is measured on this many test images
    latency_runs: int = 50
    latency_threads: int = 1
    threads: int = 1              # torch threads while the demo runs (restored after): tiny models run
                                  # fastest on one, and one thread keeps the numbers repeatable

    @property
    def q(self) -> int:
        return round(self.steps * self.transition)


FULL = DemoSettings()
FAST = DemoSettings(pretrain_steps=200, steps=30, eval_every=10, latency_runs=5)


@dataclass
class DemoRow:
    """One method's results: sizes, onnxruntime check, accuracies, and the curves for the plot."""

    method: str
    setting: str
    config: dict
    params: int                   # parameters after compression (prune: non-zero weights)
    onnx: str                     # file name inside the output folder
    onnx_bytes: int
    latency_ms: float
    onnx_ok: bool
    onnx_max_abs_diff: float
    transition: int
    acc_compressed: float         # abrupt compression, before any fine-tuning
    acc_abrupt: float             # abrupt compression + fine-tuning
    acc_vcon: float               # VCON + the same fine-tuning, after vanish (PyTorch)
    acc_vcon_onnx: float          # the exported file, run by onnxruntime
    seconds: float
    history_abrupt: list = field(default_factory=list)  # [step, β, test accuracy]
    history_vcon: list = field(default_factory=list)
    beta_vcon: list = field(default_factory=list)       # VCON's mean β after every step 0..steps

    @property
    def gain(self) -> float:
        """VCON minus abrupt, in accuracy (fraction); negative when abrupt won."""
        return self.acc_vcon - self.acc_abrupt


@dataclass
class DemoResult:
    """What a demo run made: the dense baseline, one row per method, and where the files are."""

    out: str
    seed: int
    fast: bool
    settings: dict
    train_size: int
    test_size: int
    dense_params: int
    dense_accuracy: float
    dense_onnx: str
    dense_onnx_bytes: int
    dense_latency_ms: float
    rows: list[DemoRow]
    skipped: dict[str, str]       # registered methods the demo did not run, with the reason
    plot: str
    results: str
    seconds: float
    machine: dict

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["format"] = DEMO_FORMAT
        data["version"] = 1
        for row, d in zip(self.rows, data["rows"]):
            d["gain"] = row.gain
        return data
