"""The MLP's token chunks with NF4 weights: each weight dequantized once for all chunks (mlp_dequantize_once), the
same loss and gradients as dequantizing it in every chunk, and no dequantization left inside the chunk loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastlora_jax import kernels
from fastlora_jax.config import LlamaConfig
from fastlora_jax.lora import get_peft_model
from fastlora_jax.loss import causal_lm_loss
from fastlora_jax.model import Llama
from fastlora_jax.nf4 import NF4Linear, dequantize_nf4, quantize_nf4, stack_nf4
from fastlora_jax.variables import TRAINABLE

CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
B, T, CHUNK = 2, 24, 16  # 48 tokens: three chunks, the last padded
MLP = ("gate_proj", "up_proj", "down_proj")
BYTE_TABLE = (256, 2)  # the [256, 2] table dequantize_nf4 gathers each code byte's two values from


def _qlora_model(lora_mlp: bool, dropout: float = 0.0):
    """A bf16 Llama whose MLP projections are NF4 (under LoRA when `lora_mlp`), with random LoRA B factors."""
    model = Llama(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    mlp = model.model.layers.mlp
    for name in MLP:
        dense = np.asarray(getattr(mlp, name).weight[...].astype(jnp.float32))  # [L, in, out]
        nf4 = stack_nf4([quantize_nf4(np.ascontiguousarray(w.T).astype(jnp.bfloat16)) for w in dense])
        setattr(mlp, name, NF4Linear.from_nf4(nf4))
    targets = ["q_proj", "v_proj", *(MLP if lora_mlp else ())]
    get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                   use_gradient_checkpointing="unsloth")
    flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    nnx.update(model, nnx.from_flat_state(
        [(p, v.replace(jax.random.normal(jax.random.key(i), v[...].shape) * 0.1)) for i, (p, v) in enumerate(flat)]))
    model.model.mlp_chunk_size = CHUNK
    return model


def _loss_and_grads_fn(model, dequantize_once: bool, dropout_rng=None):
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, CONFIG.vocab_size)

    def mean_loss(trainable):
        m = nnx.merge(graphdef, trainable, frozen)
        m.model.mlp_dequantize_once = dequantize_once
        loss_sum, n = causal_lm_loss(m, ids, ids, chunk_size=16, dropout_rng=dropout_rng)
        return loss_sum / n

    return jax.value_and_grad(mean_loss), trainable


def _table_gathers_by_depth(jaxpr, depth: int = 0) -> list[int]:
    """The scan depth of every gather from the NF4 byte table in a jaxpr (0: outside any scan)."""
    depths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "gather" and tuple(eqn.invars[0].aval.shape) == BYTE_TABLE:
            depths.append(depth)
        inner_depth = depth + (eqn.primitive.name == "scan")
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    depths += _table_gathers_by_depth(inner, inner_depth)
    return depths


@pytest.mark.parametrize("lora_mlp, dropout", [(True, 0.0), (False, 0.0), (True, 0.1)],
                         ids=["lora_on_nf4", "frozen_nf4", "lora_dropout"])
def test_dequantize_once_gives_the_same_loss_and_gradients(lora_mlp, dropout):
    model = _qlora_model(lora_mlp, dropout)
    rng = jax.random.key(7) if dropout else None  # dropout: LoraLinear calls its NF4 base, not with_lora
    once_fn, trainable = _loss_and_grads_fn(model, True, rng)
    per_chunk_fn, _ = _loss_and_grads_fn(model, False, rng)
    (loss, grads), (ref_loss, ref_grads) = jax.jit(once_fn)(trainable), jax.jit(per_chunk_fn)(trainable)
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(ref_loss))
    leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(leaves) == len(ref_leaves) == 2 * (2 + 3 * lora_mlp)
    for g, r in zip(leaves, ref_leaves):
        assert float(jnp.linalg.norm(r.astype(jnp.float32))) > 0
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_no_dequantization_inside_the_chunk_loop():
    """With the layers scanned, the chunk loop is a scan inside the layer scan: dequantize_once leaves every
    byte-table gather at depth 1 (once per layer and pass); per chunk puts them at depth 2."""
    model = _qlora_model(lora_mlp=True)
    once_fn, trainable = _loss_and_grads_fn(model, True)
    per_chunk_fn, _ = _loss_and_grads_fn(model, False)
    once = _table_gathers_by_depth(jax.make_jaxpr(once_fn)(trainable).jaxpr)
    per_chunk = _table_gathers_by_depth(jax.make_jaxpr(per_chunk_fn)(trainable).jaxpr)
    assert once and set(once) == {1}
    assert 2 in set(per_chunk)


def test_weight_for_calls_is_the_calls_weight():
    w = quantize_nf4(np.asarray(jax.random.normal(jax.random.key(0), (96, 128)), np.float32).astype(jnp.bfloat16))
    for rounding in ("dequantize_4bit", "gemv_4bit"):
        got = kernels.nf4_weight_for_calls(w, 16, jnp.bfloat16, implementation="xla", rounding=rounding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize_nf4(w, jnp.bfloat16, rounding)))
    # bitsandbytes' per-call choice: one token rounds as gemv_4bit unless differentiated, so nothing is shared
    assert kernels.nf4_weight_for_calls(w, 1, jnp.bfloat16, implementation="xla", rounding="bitsandbytes") is None
    got = kernels.nf4_weight_for_calls(w, 16, jnp.bfloat16, implementation="xla", rounding="bitsandbytes")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize_nf4(w, jnp.bfloat16, "dequantize_4bit")))
    # the Pallas kernels read the codes themselves
    assert kernels.nf4_weight_for_calls(w, 16, jnp.bfloat16, implementation="pallas") is None


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_dequantized_input_checked(implementation):
    w = quantize_nf4(np.asarray(jax.random.normal(jax.random.key(0), (96, 128)), np.float32).astype(jnp.bfloat16))
    x = jnp.ones((16, 128), jnp.bfloat16)
    dense = dequantize_nf4(w, jnp.bfloat16)
    if implementation == "pallas":
        with pytest.raises(ValueError, match="implementation='pallas'.*'xla' and 'mosaic' only"):
            kernels.nf4_linear(x, w, implementation="pallas", dequantized=dense)
        return
    with pytest.raises(ValueError, match=r"\[out, in\] in x.dtype; got \(96, 128\) float32"):
        kernels.nf4_linear(x, w, implementation="xla", dequantized=dense.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"got \(128, 96\) bfloat16"):
        kernels.nf4_linear(x, w, implementation="xla", dequantized=dense.T)
    np.testing.assert_array_equal(np.asarray(kernels.nf4_linear(x, w, implementation="xla", dequantized=dense)),
                                  np.asarray(kernels.nf4_linear(x, w, implementation="xla")))
