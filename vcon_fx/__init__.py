"""vcon-fx: Vanishing Contributions (VCON) compression as torch.fx graph passes.

    vm = vcon_fx.transform(model, vcon_fx.LowRankConfig(rank=64), example_inputs=(x,))
    sched = vcon_fx.BetaSchedule(vm, "linear", transition=Q)   # sched.step() after optimizer.step()
    small = vcon_fx.vanish(vm)                                  # once β = 0
    vcon_fx.export_onnx(small, "model.onnx", (x,))
"""

from .api import Plan, plan, transform, vanish
from .artifact import load, save
from .errors import VconError
from .export import check_onnx, export_onnx
from .methods import LowRankConfig, MethodConfig, registered_methods
from .passes.blend import Blend, get_betas, set_beta
from .schedule import BetaSchedule, default_transition, make_schedule

__all__ = [
    "transform",
    "plan",
    "Plan",
    "vanish",
    "save",
    "load",
    "set_beta",
    "get_betas",
    "Blend",
    "BetaSchedule",
    "make_schedule",
    "default_transition",
    "LowRankConfig",
    "MethodConfig",
    "registered_methods",
    "VconError",
    "export_onnx",
    "check_onnx",
]

__version__ = "0.1.0"
