"""vcon-fx: Vanishing Contributions (VCON) compression as torch.fx graph passes.

    vm = vcon_fx.transform(model, vcon_fx.LowRankConfig(rank=64), example_inputs=(x,))
    sched = vcon_fx.BetaSchedule(vm, "linear", transition=Q)   # sched.step() after optimizer.step()
    small = vcon_fx.vanish(vm)                                  # once β = 0
    vcon_fx.export_onnx(small, "model.onnx", (x,))
"""

# The submodule `vcon_fx.load` (model sources) is imported first, on purpose: the function
# `load` (artifacts) bound below then keeps the name, and later `from .load import …` finds
# the module in sys.modules without rebinding the package attribute.
from . import load as _sources  # noqa: F401  (must precede `from .artifact import load`)
from .api import Plan, plan, transform, vanish
from .artifact import load, save
from .finetune import FinetuneResult, finetune
from .data import load_data
from .load import load_model, rebuild_model
from .errors import VconError
from .export import check_onnx, export_onnx
from .methods import ComposeConfig, LowRankConfig, MethodConfig, PruneConfig, QuantConfig, registered_methods
from .passes.blend import Blend, get_betas, set_beta
from .schedule import BetaSchedule, default_transition, make_schedule

__all__ = [
    "transform",
    "plan",
    "Plan",
    "vanish",
    "save",
    "load",
    "load_model",
    "rebuild_model",
    "finetune",
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
