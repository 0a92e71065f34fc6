"""Orbax checkpoints: trainable + optimizer state + step + rng + meta round-trip bit-exactly, max_to_keep, and a
checkpoint of another LoRA layout (other r, other targets, other optimizer) is refused with the mismatch named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastlora_jax import TRAINABLE, LlamaConfig
from fastlora_jax.checkpointing import STAGING_DIRNAME, Checkpointer, is_step_directory
from fastlora_jax.loading import random_model
from fastlora_jax.lora import get_peft_model
from fastlora_jax.training import TrainStep
from helpers import TINY

TX = optax.adamw(1e-3)


def train_step(seed=0, r=4, targets=("q_proj", "v_proj"), tx=TX):
    model = get_peft_model(random_model(LlamaConfig.from_hf_config(dict(TINY)), seed=seed), r=r,
                           target_modules=list(targets), use_gradient_checkpointing=False, random_state=seed)
    step = TrainStep(model, tx, seed=seed)
    # Fill the LoRA weights and the optimizer state with fresh random values (no training needed to save them).
    rng = np.random.default_rng(100 + seed)

    def fresh(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(x.shape), x.dtype)
        return jnp.asarray(np.asarray(x) + 7)

    nnx.update(model, jax.tree.map(fresh, nnx.state(model, TRAINABLE)))
    step.opt_state = jax.tree.map(fresh, step.opt_state)
    step.step, step.rng = 12, jax.random.PRNGKey(1000 + seed)
    return step


def arrays(step):
    lora = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(step.model, TRAINABLE))}
    return lora, [np.asarray(x) for x in jax.tree_util.tree_leaves(step.opt_state)], np.asarray(step.rng)


def test_round_trip_is_bit_exact_and_keeps_the_latest_steps(tmp_path):
    source = train_step(seed=0)
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as manager:
        for s in (4, 8, 12):
            source.step = s
            manager.save(source, meta={"epoch": 1, "loss_history": [[1, 2.5], [2, 2.25]]})
        manager.wait()
        assert manager.all_steps() == [8, 12] and manager.latest_step() == 12
        assert is_step_directory(tmp_path / "ckpt" / "12")
        target = train_step(seed=1)
        assert not np.array_equal(arrays(target)[0][("model", "layers", "self_attn", "q_proj", "lora_a")],
                                  arrays(source)[0][("model", "layers", "self_attn", "q_proj", "lora_a")])
        meta = manager.restore(target)
    assert meta["epoch"] == 1 and meta["loss_history"] == [[1, 2.5], [2, 2.25]] and meta["step"] == 12
    assert target.step == 12
    (lora_s, opt_s, rng_s), (lora_t, opt_t, rng_t) = arrays(source), arrays(target)
    assert lora_s.keys() == lora_t.keys()
    for path in lora_s:
        np.testing.assert_array_equal(lora_t[path], lora_s[path])
    assert len(opt_s) == len(opt_t)
    for a, b in zip(opt_s, opt_t):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rng_t, rng_s)
    # Frozen weights are not in the checkpoint: the target keeps its own base.
    assert not np.array_equal(np.asarray(target.model.model.embed_tokens.weight[...]),
                              np.asarray(source.model.model.embed_tokens.weight[...]))


@pytest.mark.parametrize("r, targets, needle", [
    (8, ("q_proj", "v_proj"), r"checkpoint: r=4 on q_proj, v_proj; model: r=8 on q_proj, v_proj\).*lora_a: "
                              r"checkpoint \(2, 64, 4\) float32, model \(2, 64, 8\)"),
    (4, ("q_proj", "k_proj", "v_proj"), r"in the model but not the checkpoint: model\.layers\.self_attn\.k_proj"),
    (4, ("q_proj",), r"in the checkpoint but not the model: model\.layers\.self_attn\.v_proj"),
])
def test_a_checkpoint_of_another_lora_layout_is_refused(tmp_path, r, targets, needle):
    with Checkpointer(tmp_path / "ckpt") as manager:
        manager.save(train_step(r=4, targets=("q_proj", "v_proj")))
        manager.wait()
        target = train_step(seed=1, r=r, targets=targets)
        before = arrays(target)
        with pytest.raises(ValueError, match=needle):
            manager.restore(target)
    after = arrays(target)  # nothing changed
    for path in before[0]:
        np.testing.assert_array_equal(after[0][path], before[0][path])
    assert target.step == 12 and np.array_equal(after[2], before[2])


def test_another_optimizer_and_missing_checkpoints_are_refused(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as manager:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            manager.restore(train_step())
        manager.save(train_step())
        manager.wait()
        with pytest.raises(ValueError, match="optimizer state .* does not match"):
            manager.restore(train_step(seed=1, tx=optax.sgd(0.1, momentum=0.9)))
        with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 .* steps there: \[12\]"):
            manager.restore(train_step(), step=3)
    with pytest.raises(ValueError, match="max_to_keep=0"):
        Checkpointer(tmp_path / "other", max_to_keep=0)


def test_a_replacement_stopped_between_its_renames_loses_no_checkpoint(tmp_path):
    """Saving a step the directory already holds writes the new one under the staging directory, moves the old one
    aside, then renames the new one into place. A crash between those renames leaves the step only in staging; the
    next Checkpointer on the directory puts it back (the new one), and a crash after them leaves nothing behind."""
    old, new = train_step(seed=0), train_step(seed=1, r=4)
    with Checkpointer(tmp_path / "whole") as manager:  # the replacement that runs to its end: the new step, no staging
        manager.save(old)
    with Checkpointer(tmp_path / "whole") as manager:
        manager.save(new)
        restored = train_step(seed=2)
        manager.restore(restored)
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["12"]
    for got, want in zip(arrays(restored), arrays(new)):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    for source, step in (("first", old), ("second", new)):
        with Checkpointer(tmp_path / source) as manager:
            manager.save(step)
    directory, staging = tmp_path / "first", tmp_path / "first" / STAGING_DIRNAME
    staging.mkdir()
    (directory / "12").rename(staging / "12.replaced")  # the state after the first rename
    (tmp_path / "second" / "12").rename(staging / "12")
    with Checkpointer(directory) as manager:
        assert manager.all_steps() == [12] and not staging.exists()
        restored = train_step(seed=2)
        manager.restore(restored)
    for got, want in zip(arrays(restored), arrays(new)):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    staging.mkdir()
    (staging / "12.replaced").mkdir()  # the state after the second rename: the old one is only waiting for deletion
    with Checkpointer(directory) as manager:
        assert manager.all_steps() == [12] and not staging.exists()
        manager.restore(restored)
    for got, want in zip(arrays(restored), arrays(new)):
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_set_aside_moves_steps_beside_the_directory_and_refuses_missing_ones(tmp_path):
    step = train_step()
    with Checkpointer(tmp_path / "ckpt") as manager:
        for s in (12, 13, 14):
            step.step = s
            manager.save(step)
        with pytest.raises(ValueError, match=r"steps \[99\] are not in .*steps there: \[12, 13, 14\]"):
            manager.set_aside([13, 99])
        assert manager.all_steps() == [12, 13, 14]  # nothing moved
        first, second = manager.set_aside([13, 14]), manager.set_aside([12])
        assert manager.all_steps() == [] and manager.latest_step() is None and first != second
    for folder, steps in ((first, [13, 14]), (second, [12])):
        assert folder.startswith(str(tmp_path / "ckpt.earlier"))
        with Checkpointer(folder) as moved:
            assert moved.all_steps() == steps
            restored = train_step(seed=1)
            moved.restore(restored, steps[-1])
        for got, want in zip(arrays(restored)[:2], arrays(step)[:2]):
            jax.tree.map(np.testing.assert_array_equal, got, want)
