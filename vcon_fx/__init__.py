"""vcon-fx: Vanishing Contributions (VCON) compression as torch.fx graph passes.

    vm = vcon_fx.transform(model, vcon_fx.LowRankConfig(rank=64), example_inputs=(x,))
    sched = vcon_fx.BetaSchedule(vm, "linear", transition=Q)   # sched.step() after optimizer.step()
    small = vcon_fx.vanish(vm)                                  # once β = 0
    vcon_fx.export_onnx(small, "model.onnx", (x,))
"""

from .data import load_data
from .errors import VconError
from .export import check_onnx, export_onnx
from .graph.blend import Blend, get_betas, set_beta
from .graph.pipeline import CompressionPlan, Plan, plan, transform, vanish
from .graph.select import SelectionConfig
from .io.artifact import load, save
from .methods import ComposeConfig, LowRankConfig, MethodConfig, PruneConfig, QuantConfig, registered_methods
from .schedules import BetaSchedule, default_transition, make_schedule
from .sources import load_model, rebuild_model
from .training import FinetuneConfig, FinetuneResult, finetune

__all__ = [
    "transform",
    "plan",
    "CompressionPlan",
    "Plan",  # the old name of CompressionPlan, kept so existing code works
    "SelectionConfig",
    "vanish",
    "save",
    "load",
    "load_model",
    "rebuild_model",
    "finetune",
    "FinetuneConfig",
    "FinetuneResult",
    "load_data",
    "set_beta",
    "get_betas",
    "Blend",
    "BetaSchedule",
    "make_schedule",
    "default_transition",
    "LowRankConfig",
    "PruneConfig",
    "QuantConfig",
    "ComposeConfig",
    "MethodConfig",
    "registered_methods",
    "VconError",
    "export_onnx",
    "check_onnx",
]

__version__ = "0.1.0"
