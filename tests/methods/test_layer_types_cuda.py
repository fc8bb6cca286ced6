"""The new layer types on a GPU, for every registered method (skipped where CUDA is absent).

3-D and transposed convolutions, an embedding tied to its head, LSTM / GRU / RNN: transform,
a few fine-tuning steps through the transition (train mode runs the recurrent kernels, eval mode
their custom ops), vanish, with nothing falling back to the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vcon_fx

from zoo import make

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {name: ex.cuda for name, cls in vcon_fx.registered_methods().items() if (ex := cls.examples()) is not None}
MODELS = {"unet": {}, "video3d": {}, "lstm_lm": {"include_stem": True, "include_head": True},
          "recurrent_tagger": {}}


def _cuda(value):
    return value.cuda() if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_new_layer_types_on_cuda(method, name):
    case = make(name)
    model = case.model.cuda()
    args, kwargs = tuple(_cuda(a) for a in case.args), {k: _cuda(v) for k, v in case.kwargs.items()}
    vm = vcon_fx.transform(model, CONFIGS[method], example_inputs=args, example_kwargs=kwargs,
                           seq_inputs=case.seq_inputs, **MODELS[name])
    assert all(p.device.type == "cuda" for p in vm.parameters())
    with torch.no_grad():
        target = model(*args, **kwargs)
        torch.testing.assert_close(vm(*args, **kwargs), target, rtol=1e-4, atol=1e-4)
    params = [p for p in vm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    sched = vcon_fx.BetaSchedule(vm, "linear", transition=3)
    for step in range(4):
        # train mode runs the recurrent kernels; at β = 0 (the last step, dense branches idle) eval mode
        # runs the custom ops and their backward (a dense cuDNN RNN has none in eval mode)
        vm.train(step < 3)
        loss = F.mse_loss(vm(*args, **kwargs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        assert torch.isfinite(loss)
    vm.eval()
    with torch.no_grad():
        blended = vm(*args, **kwargs)
        small = vcon_fx.vanish(vm)
        torch.testing.assert_close(small(*args, **kwargs), blended, rtol=1e-5, atol=1e-5)
    assert all(t.device.type == "cuda" for t in list(small.parameters()) + list(small.buffers()))
