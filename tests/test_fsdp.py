"""finetune --fsdp: two gloo processes on CPU shard the model with FSDP2 (fully_shard runs there).

One torchrun (module fixture) fine-tunes with fsdp=True, once straight through and once broken at
step 3 and resumed from the sharded checkpoint, and drives VconCallback on a fully_shard-ed model
as a Trainer would; the tests compare that with a one-process run of the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.graph.blend import get_betas
from vcon_fx.schedules.schedule import linear_beta
from vcon_fx.training.checkpoint import latest_checkpoint
from vcon_fx.training.finetune import finetune
from vcon_fx.training.fsdp import check_fsdp_settings

from test_finetune import make_data, make_vm

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SETTINGS = dict(transition=4, lr=1e-2, save_every=3)

WORKER = """
import json, sys, torch
import torch.distributed as tdist
sys.path.insert(0, {tests!r})
from test_finetune import make_data, make_vm
import vcon_fx
from vcon_fx.graph.blend import get_betas
from vcon_fx.training.finetune import finetune
torch.set_num_threads(1)
# One group for the whole script (finetune keeps a group its caller made): with gloo, a second
# init_process_group in the same process can hang.
tdist.init_process_group("gloo")
rank, out = tdist.get_rank(), {out!r}

def run(name, **options):
    vm, _ = make_vm()
    result = finetune(vm, make_data(), batch_size=4, fsdp=True, checkpoint_dir=out + "/" + name, **{settings!r},
                      **options)
    return vm, result

whole, result = run("whole", steps=6)
if rank == 0:
    vcon_fx.save(whole, out + "/tuned")
run("broken", steps=3)
resumed, again = run("broken", steps=6, resume=True)

# VconCallback on a model sharded as Trainer's FSDP2 (accelerate) shards it: fully_shard in place.
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState
from vcon_fx.graph.blend import blend_modules
from vcon_fx.integrations.hf_trainer import VconCallback
model, _ = make_vm()
for blend in blend_modules(model).values():
    fully_shard(blend)
fully_shard(model)
callback, state = VconCallback(transition=4), TrainerState(max_steps=4)
callback.on_train_begin(None, state, TrainerControl(), model=model)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
seen, outputs = [], []
x = make_data()[0][0].unsqueeze(0)
for step in range(1, 5):
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    state.global_step = step
    callback.on_step_end(None, state, TrainerControl(), model=model)
    seen.append(get_betas(model))
    with torch.no_grad():
        outputs.append(model(x).tolist())
json.dump({{"losses": [h.get("loss") for h in result.history], "betas": [h["betas"] for h in result.history],
           "weights": {{k: v.tolist() for k, v in whole.state_dict().items()}},
           "resumed": {{k: v.tolist() for k, v in resumed.state_dict().items()}}, "resumed_from": again.resumed_from,
           "callback": seen, "outputs": outputs, "world": result.world_size}}, open(out + f"/rank{{rank}}.json", "w"))
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of two FSDP ranks reported, and the folder they wrote in."""
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(REPO / "tests"), out=str(out), settings=SETTINGS)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script)], capture_output=True,
                          text=True, timeout=240, env=env, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)], out


def test_fsdp_matches_one_process_and_resumes_exactly(two_ranks):
    (r0, r1), out = two_ranks
    assert r0["world"] == 2 and r0["betas"] == r1["betas"] and r0["losses"] == r1["losses"]
    assert [b["fc1"] for b in r0["betas"]] == [1.0] + [linear_beta(t - 1, 4) for t in range(1, 7)]
    assert r0["weights"] == r1["weights"]  # gathered back whole on every rank
    # one process, the same global batch (2 ranks × 4): the same run up to float rounding
    torch.set_num_threads(1)
    vm, _ = make_vm()
    alone = finetune(vm, make_data(), steps=6, batch_size=8, **{k: v for k, v in SETTINGS.items() if k != "save_every"})
    assert r0["losses"][1:] == pytest.approx([h["loss"] for h in alone.history[1:]], rel=1e-6)
    for name, value in vm.state_dict().items():
        torch.testing.assert_close(torch.tensor(r0["weights"][name]), value, atol=1e-6, rtol=0)
    # broken at step 3 and resumed from the sharded checkpoint: bit-identical to the straight run
    assert r0["resumed_from"] == 3 and r0["resumed"] == r0["weights"]


def test_sharded_checkpoint_is_safetensors_and_json_only(two_ranks):
    _, out = two_ranks
    found = latest_checkpoint(out / "whole")
    assert found.name == "step-6"
    assert json.loads((found / "state.json").read_text())["sharded"] is True
    files = sorted(p.relative_to(found).as_posix() for p in found.rglob("*") if p.is_file())
    assert files == ["shards/shard-00001-model-00001-of-00001.safetensors",
                     "shards/shard-00002-model-00001-of-00001.safetensors", "state.json"]  # no pickled .metadata
    rows = 0
    for shard in sorted((found / "shards").iterdir()):
        with safe_open(str(shard), "pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            rows += f.get_slice("model.fc1.dense.weight").get_shape()[0]
            assert set(offsets) == set(f.keys())
    assert rows == 24  # the two ranks' chunks make up the whole weight


def test_final_artifact_loads_and_vanishes(two_ranks):
    (r0, _), out = two_ranks
    tuned = vcon_fx.load(out / "tuned", model=make_vm()[1])  # made from a Python object: give it
    assert set(get_betas(tuned).values()) == {0.0}
    for name, value in tuned.state_dict().items():
        assert value.tolist() == r0["weights"][name]
    x = make_data()[0][0].unsqueeze(0)
    with torch.no_grad():
        blended = tuned(x)
        small = vcon_fx.vanish(tuned)
        torch.testing.assert_close(small(x), blended)


def test_callback_sets_beta_on_a_fully_shard_model(two_ranks):
    (r0, r1), _ = two_ranks
    assert r0["callback"] == r1["callback"] == [{"fc1": linear_beta(t, 4), "fc2": linear_beta(t, 4)}
                                                  for t in range(1, 5)]
    assert r0["outputs"] == r1["outputs"]


def test_fsdp_is_refused_in_one_process_and_with_match_groups():
    vm, _ = make_vm()
    with pytest.raises(ConfigError, match="single process.*torchrun"):
        finetune(vm, make_data(), steps=2, fsdp=True)
    assert set(get_betas(vm).values()) == {1.0}  # refused before any step
    with pytest.raises(ConfigError, match="--match-groups cannot run under --fsdp"):
        check_fsdp_settings(2, 0.5)


def test_a_checkpoint_keeps_its_layout(tmp_path):
    vm, _ = make_vm()
    finetune(vm, make_data(), steps=2, batch_size=8, checkpoint_dir=tmp_path, save_every=1)
    state_file = latest_checkpoint(tmp_path) / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(state | {"sharded": True}))  # as an --fsdp run writes it
    again, _ = make_vm()
    with pytest.raises(ConfigError, match="made with --fsdp and this run is without it"):
        finetune(again, make_data(), steps=3, batch_size=8, checkpoint_dir=tmp_path, resume=True)
