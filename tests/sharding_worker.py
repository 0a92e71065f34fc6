"""Run by tests/test_sharding.py in a subprocess with 8 virtual CPU devices (XLA_FLAGS must precede jax's start).

Prints one JSON line: loss and LoRA-gradient relative errors of a (data=2, fsdp=4) mesh against one device, the
fraction of each sharded weight that one device holds, the train step's, SFTTrainer's and generation's agreement with
one device, and the all-gathers in a data=8 gradient.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fastlora_jax import TRAINABLE, FastLanguageModel, SFTConfig, SFTTrainer, sharding
from fastlora_jax.loss import causal_lm_loss
from fastlora_jax.training import make_train_step


def loss_and_grads(model, ids):
    graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)

    @jax.jit
    def run(trainable, rest, ids):
        def loss_fn(trainable):
            m = nnx.merge(graphdef, trainable, rest)
            total, count = causal_lm_loss(m, ids, ids)
            return total / count

        return jax.value_and_grad(loss_fn)(trainable)

    return run(trainable, rest, ids)


def make(directory, load_in_4bit, mesh):
    model, _ = FastLanguageModel.from_pretrained(directory, dtype="float32", load_in_4bit=load_in_4bit, mesh=mesh)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=1)
    state = nnx.state(model, nnx.LoRAParam)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):  # non-zero B so every gradient is non-trivial
        var.value = jax.random.normal(jax.random.key(i), var.value.shape, jnp.float32) * 0.05
    nnx.update(model, state)
    if mesh is not None:
        sharding.shard_model(model, mesh)
    return model


def main(directory, load_in_4bit):
    ids = np.random.default_rng(0).integers(0, 256, (8, 16))
    mesh = sharding.make_mesh(data=2, fsdp=4)
    loss1, g1 = loss_and_grads(make(directory, load_in_4bit, None), jnp.asarray(ids))
    sharded = make(directory, load_in_4bit, mesh)
    loss8, g8 = loss_and_grads(sharded, sharding.shard_batch(jnp.asarray(ids), mesh))
    errors = {}
    for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g8)):
        a, b = np.asarray(a[...], np.float64), np.asarray(b[...], np.float64)
        errors[".".join(map(str, path))] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    fractions = {}
    for path, var in nnx.to_flat_state(nnx.state(sharded)):
        value = var[...]
        if value.ndim and not value.sharding.is_fully_replicated:
            shard = value.addressable_shards[0].data
            fractions[".".join(map(str, path))] = shard.size / value.size
    # The train step runs unchanged under the mesh: two AdamW steps give the single-device losses.
    step_losses = []
    for model, batch in ((make(directory, load_in_4bit, None), ids),
                         (make(directory, load_in_4bit, mesh), np.asarray(ids))):  # the step shards the batch
        step = make_train_step(model, optax.adamw(1e-2))
        step_losses.append([float(step({"input_ids": batch, "labels": batch})["loss"]) for _ in range(2)])
    step_err = max(abs(a - b) / abs(a) for a, b in zip(*step_losses))
    # SFTTrainer runs unchanged under the mesh (its steps shard each batch; it saves an orbax checkpoint at the end).
    rows = [{"input_ids": row} for row in ids.tolist()]
    trainer_losses = []
    for i, m in enumerate((None, mesh)):
        config = SFTConfig(output_dir=f"{directory}/trainer_{i}", max_steps=3, per_device_train_batch_size=8,
                           learning_rate=1e-2, logging_steps=1, save_steps=3, disable_tqdm=True)
        out = SFTTrainer(make(directory, load_in_4bit, m), None, rows, args=config).train()
        trainer_losses.append([loss for _, loss in out.loss_history])
    saved = sorted(os.listdir(out.checkpoint_dir))  # the mesh run's orbax checkpoints
    trainer_err = max(abs(a - b) / abs(a) for a, b in zip(*trainer_losses))
    # Generation runs unchanged under the mesh: the same greedy tokens as on one device.
    prompts = np.asarray(ids[:, :5])
    generated = [np.asarray(make(directory, load_in_4bit, m).generate(prompts, max_new_tokens=4, eos_token_id=[]))
                 for m in (None, mesh)]
    # Pure data parallelism (data=8): nothing but the gradients needs to cross devices; the loss's token chunks
    # keep the batch sharding (no all-gather of hidden states).
    data_mesh = sharding.make_mesh(data=8)
    data_model = make(directory, load_in_4bit, data_mesh)
    graphdef, trainable, rest = nnx.split(data_model, TRAINABLE, ...)

    def data_loss(trainable, rest, ids):  # 4 chunks of 32 tokens: [8 rows, 4 tokens] each
        total, count = causal_lm_loss(nnx.merge(graphdef, trainable, rest), ids, ids, chunk_size=32)
        return total / count

    hlo = jax.jit(jax.grad(data_loss)).lower(trainable, rest, sharding.shard_batch(jnp.asarray(ids), data_mesh))
    hlo = hlo.compile().as_text()
    print(json.dumps(dict(loss_rel_err=abs(float(loss1) - float(loss8)) / abs(float(loss1)),
                          data_parallel_all_gathers=hlo.count(" all-gather("),
                          grad_rel_err=errors, shard_fraction=fractions, devices=jax.device_count(),
                          train_step_loss_rel_err=step_err, trainer_loss_rel_err=trainer_err,
                          trainer_steps=len(trainer_losses[1]), trainer_checkpoints=saved,
                          generate_equal=bool(np.array_equal(*generated)), generated_shape=generated[0].shape)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "4bit")
