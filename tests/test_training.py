"""Training building blocks: a hand-written loop memorises a small set with only the LoRA weights changing,
gradient accumulation equals one large batch (token-weighted), global-norm clipping, the eval step, bad steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastlora_jax import TRAINABLE, LlamaConfig
from fastlora_jax.loading import random_model
from fastlora_jax.lora import get_peft_model
from fastlora_jax.training import make_eval_step, make_train_step, weight_decay_mask
from helpers import TINY, rel_err

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TX = optax.adamw(1e-2)  # one optimizer object: steps with the same settings share one compiled program


def lora_model(seed=0, r=8, **kw):
    model = random_model(LlamaConfig.from_hf_config(dict(TINY)), seed=seed)
    # A head of std 0.5 instead of 0.02: after the final norm, a 0.02 head caps the logits near uniform.
    model.lm_head.weight.value = model.lm_head.weight[...] * 25
    return get_peft_model(model, r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR, use_gradient_checkpointing=False,
                          random_state=seed, **kw)


def frozen_arrays(model):
    return {path: np.array(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Not(TRAINABLE)))}


def trainable_arrays(model):
    return {path: np.array(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, TRAINABLE))}


def memorisation_batch(rows=4, length=32, seed=0):
    ids = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (rows, length)).astype(np.int32)
    return {"input_ids": ids, "labels": ids}


def test_hand_written_loop_memorises_and_leaves_frozen_weights_bit_identical():
    model = lora_model()
    frozen_before, lora_before = frozen_arrays(model), trainable_arrays(model)
    batch = memorisation_batch()
    step = make_train_step(model, TX, max_grad_norm=1.0)
    losses = [float(step(batch)["loss"]) for _ in range(40)]
    assert losses[-1] < 0.1 * losses[0], losses
    assert step.step == 40
    frozen_after = frozen_arrays(model)
    assert frozen_after.keys() == frozen_before.keys()
    for path, value in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[path], value, err_msg=str(path))
    lora_after = trainable_arrays(model)
    assert all(not np.array_equal(lora_after[p], v) for p, v in lora_before.items())
    # The optimizer state exists for the LoRA weights only: Adam's two moments of each, plus counts.
    shapes = sorted(v.shape for v in lora_after.values())
    opt_shapes = sorted(x.shape for x in jax.tree_util.tree_leaves(step.opt_state) if x.ndim)
    assert opt_shapes == sorted(shapes * 2)
    # The eval step reads the trained weights; its mean is token-weighted over the batches.
    eval_step = make_eval_step(model)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    sums = [eval_step(h) for h in halves]
    eval_loss = eval_step.mean_loss(halves)
    assert eval_loss == sum(float(s) for s, _ in sums) / sum(int(n) for _, n in sums)
    assert eval_loss < 0.1 * losses[0]


def test_gradient_accumulation_equals_one_large_batch_and_clipping_bounds_the_gradient():
    batch = memorisation_batch(rows=4, length=32, seed=3)
    batch["labels"] = batch["labels"].copy()
    batch["labels"][:2, :20] = -100  # micro-batches with different token counts: the mean must be token-weighted
    first_moments, metrics = [], []
    for accumulation in (1, 2):
        model = lora_model(seed=4, init_lora_weights=False)  # PEFT's test init: B non-zero, so A gets a gradient
        step = make_train_step(model, TX, gradient_accumulation_steps=accumulation, max_grad_norm=1.0)
        metrics.append(jax.tree.map(float, step(batch)))
        # Adam's first moment after one step is (1 - b1) * the clipped gradient: read the gradient from it.
        mu = step.opt_state[0].mu
        first_moments.append({p: np.asarray(v[...]) / 0.1 for p, v in nnx.to_flat_state(mu)})
    assert abs(metrics[0]["loss"] - metrics[1]["loss"]) < 1e-5 * metrics[0]["loss"]
    assert metrics[0]["n_tokens"] == metrics[1]["n_tokens"] == 4 * 31 - 2 * 19
    assert abs(metrics[0]["grad_norm"] - metrics[1]["grad_norm"]) < 1e-4 * metrics[0]["grad_norm"]
    for path in first_moments[0]:
        assert rel_err(first_moments[1][path], first_moments[0][path]) < 1e-4, path
    # Clipping: the gradient norm exceeds max_grad_norm=1, so the gradient the optimizer saw has global norm 1.
    assert metrics[0]["grad_norm"] > 2.0
    clipped_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in first_moments[0].values()))
    assert abs(clipped_norm - 1.0) < 1e-4
    with pytest.raises(ValueError, match="not divisible by gradient_accumulation_steps=3"):
        make_train_step(lora_model(), TX, gradient_accumulation_steps=3)(batch)


def test_a_step_with_a_non_finite_loss_changes_nothing():
    def nan_loss(model, input_ids, labels, **kw):
        return jnp.sum(model.model.layers.self_attn.q_proj.lora_a[...]) * jnp.nan, jnp.int32(1)

    model = lora_model()
    before = trainable_arrays(model)
    step = make_train_step(model, TX, loss_fn=nan_loss)
    metrics = step(memorisation_batch())
    assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
    after = trainable_arrays(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree_util.tree_leaves(step.opt_state) if x.ndim)


def test_no_trainable_state_and_weight_decay_mask():
    model = random_model(LlamaConfig.from_hf_config(dict(TINY)))
    with pytest.raises(ValueError, match="no trainable variables"):
        make_train_step(model, TX)
    model = get_peft_model(random_model(LlamaConfig.from_hf_config({**TINY, "attention_bias": True})), r=4,
                           target_modules=["q_proj"], bias="all", use_gradient_checkpointing=False)
    mask = weight_decay_mask(nnx.state(model, TRAINABLE))
    flags = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert any(flags.values()) and any("bias" in k for k in flags)
    assert all(flag == ("bias" not in k) for k, flag in flags.items())


def test_a_step_whose_updated_weights_are_not_finite_changes_nothing():
    model = lora_model()
    before = trainable_arrays(model)
    step = make_train_step(model, optax.adam(1e-3, b1=1.0))  # step 1 divides by 1 - b1 = 0: NaN updates
    metrics = step(memorisation_batch())
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])
    after = trainable_arrays(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree_util.tree_leaves(step.opt_state) if x.ndim)


def test_host_token_ids_outside_the_vocab_are_refused_before_the_step_naming_them():
    model = lora_model()
    before = trainable_arrays(model)
    step, evaluate = make_train_step(model, TX), make_eval_step(model)
    batch = memorisation_batch()
    batch["input_ids"][1, 3] = TINY["vocab_size"]  # one past the embedding table
    for run in (step, evaluate):
        with pytest.raises(ValueError, match=f"the batch's input_ids holds token id {TINY['vocab_size']} "):
            run(batch)
    assert step.step == 0  # the refused batch changed nothing
    for path, value in trainable_arrays(model).items():
        np.testing.assert_array_equal(value, before[path])
    labels = memorisation_batch()
    labels["labels"] = labels["labels"].copy()
    labels["labels"][0, :5] = -100  # ignored labels pass; a negative id other than -100 does not
    step(labels)
    labels["labels"][0, 0] = -5
    with pytest.raises(ValueError, match="the batch's labels holds token id -5"):
        step(labels)
    assert step.step == 1
