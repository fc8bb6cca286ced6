"""VCON in your own PyTorch training loop.

A plain loop on a small MLP. The VCON-specific lines are marked `# VCON`: transform the model,
build a β schedule, call `sched.step()` after `optimizer.step()`, and vanish the dense branch
at the end. Everything else is ordinary PyTorch.

    python examples/custom_loop.py
"""

import torch
from torch import nn

import vcon_fx

STEPS = 50
Q = 30  # transition length in steps; vcon_fx.default_transition(STEPS) gives the authors' 20%

torch.manual_seed(0)

# Random data labelled by a fixed random "teacher", so there is something to learn.
inputs = torch.randn(2048, 32)
teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
with torch.no_grad():
    labels = teacher(inputs).argmax(dim=1)

model = nn.Sequential(
    nn.Linear(32, 128), nn.ReLU(),
    nn.Linear(128, 128), nn.ReLU(),
    nn.Linear(128, 128), nn.ReLU(),
    nn.Linear(128, 10),
)
x = inputs[:64]

vcon_model = vcon_fx.transform(model, vcon_fx.LowRankConfig(rank=8), example_inputs=(x,))  # VCON
sched = vcon_fx.BetaSchedule(vcon_model, "linear", transition=Q)  # VCON

optimizer = torch.optim.AdamW(vcon_model.parameters(), lr=3e-3)
loss_fn = nn.CrossEntropyLoss()

for step in range(STEPS):
    betas = sched.betas  # the β this step trains with, per blend group
    batch = torch.randint(0, len(inputs), (64,))
    loss = loss_fn(vcon_model(inputs[batch]), labels[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sched.step()  # VCON: β for the next step
    if step % 10 == 0 or step == STEPS - 1:
        beta = sum(betas.values()) / len(betas)
        print(f"step {step:3d}  loss {loss.item():.4f}  β {beta:.3f}")

small = vcon_fx.vanish(vcon_model)  # VCON: β is 0 everywhere, drop the dense branch

with torch.no_grad():
    accuracy = (small(inputs).argmax(dim=1) == labels).float().mean().item()
n_dense = sum(p.numel() for p in model.parameters())
n_small = sum(p.numel() for p in small.parameters())
print(f"parameters: {n_dense} dense → {n_small} compressed; train accuracy {accuracy:.3f}")
