"""Loss and LoRA gradients on a (data=2, fsdp=4) mesh of 8 virtual CPU devices equal the single-device ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastlora_jax import sharding


@pytest.mark.parametrize("base", ["16bit", "4bit"])
def test_mesh_matches_single_device(hf_llama, base):
    directory, _ = hf_llama()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    worker = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
    run = subprocess.run([sys.executable, worker, directory, base], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["loss_rel_err"] < 1e-5
    assert result["grad_rel_err"] and max(result["grad_rel_err"].values()) < 1e-5, result["grad_rel_err"]
    assert result["train_step_loss_rel_err"] < 1e-5
    assert result["trainer_steps"] == 3 and result["trainer_loss_rel_err"] < 1e-5  # SFTTrainer under the mesh
    assert result["trainer_checkpoints"], "the trainer saved no checkpoint under the mesh"
    assert result["generate_equal"] and result["generated_shape"] == [8, 9]
    assert result["data_parallel_all_gathers"] == 0  # data=8: the loss chunks stay batch-sharded
    # Every large weight is split four ways over fsdp: one device holds a quarter of it.
    weights = {k: v for k, v in result["shard_fraction"].items() if "lora" not in k}
    assert len(weights) >= 7, weights
    assert all(abs(f - 0.25) < 1e-9 for f in weights.values()), weights


def test_mesh_validation():
    with pytest.raises(ValueError, match=r"data=3 x fsdp=1 x tensor=1 != 1 devices"):
        sharding.make_mesh(data=3)
    with pytest.raises(ValueError, match=r"fsdp=0; accepted: a positive int"):
        sharding.make_mesh(fsdp=0)
