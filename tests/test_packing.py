"""Packed sequences and attention masks: packed rows give each example the loss and logits it has alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastlora_jax.attention import attention, attention_reference
from fastlora_jax.config import LlamaConfig
from fastlora_jax.loss import IGNORE_INDEX, causal_lm_loss
from fastlora_jax.model import Llama, segment_positions

from helpers import rel_err

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, rope_theta=10000.0)
LENGTHS = (5, 7, 3)  # three examples packed into one row of 16, one padding token at the end


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))


def _packed(seed=0):
    rng = np.random.default_rng(seed)
    examples = [rng.integers(0, CONFIG.vocab_size, n) for n in LENGTHS]
    row = np.concatenate(examples + [np.zeros(1, np.int64)])
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(LENGTHS)] + [np.zeros(1, np.int64)])
    return examples, jnp.asarray(row[None]), jnp.asarray(segments[None], jnp.int32)


def test_segment_positions_restart():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_packed_loss_per_example_equals_alone(model):
    examples, row, segments = _packed()
    labels = jnp.where(segments > 0, row, IGNORE_INDEX)
    total, n_total = causal_lm_loss(model, row, labels, segment_ids=segments, chunk_size=8)
    alone_sum, alone_n = 0.0, 0
    for i, ex in enumerate(examples):
        ids = jnp.asarray(ex[None])
        s, n = causal_lm_loss(model, ids, ids)
        # The packed row's loss restricted to example i equals the example's loss alone.
        only_i = jnp.where(segments == i + 1, labels, IGNORE_INDEX)
        s_packed, n_packed = causal_lm_loss(model, row, only_i, segment_ids=segments)
        assert int(n_packed) == int(n) == len(ex) - 1
        assert abs(float(s_packed) - float(s)) <= 1e-5 * abs(float(s))
        alone_sum, alone_n = alone_sum + float(s), alone_n + int(n)
    assert int(n_total) == alone_n
    assert abs(float(total) - alone_sum) <= 1e-5 * alone_sum


def test_packed_logits_and_gradients_equal_alone(model):
    examples, row, segments = _packed(seed=1)
    graphdef, state = nnx.split(model)

    def packed_loss(state):
        m = nnx.merge(graphdef, state)
        s, n = causal_lm_loss(m, row, jnp.where(segments > 0, row, IGNORE_INDEX), segment_ids=segments)
        return s

    def alone_loss(state):
        m = nnx.merge(graphdef, state)
        return sum(causal_lm_loss(m, jnp.asarray(ex[None]), jnp.asarray(ex[None]))[0] for ex in examples)

    g_packed = jax.grad(packed_loss)(state)
    g_alone = jax.grad(alone_loss)(state)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_alone)):
        assert rel_err(a, b) < 1e-5
    logits = model(row, segment_ids=segments)
    start = 0
    for ex in examples:
        alone = model(jnp.asarray(ex[None]))
        assert rel_err(logits[0, start:start + len(ex)], alone[0]) < 1e-5
        start += len(ex)


def test_packing_with_padding_mask(model):
    """segment_ids and attention_mask together: a left-padded packed row still equals the examples alone."""
    examples, row, segments = _packed(seed=2)
    pad = 3
    row_p = jnp.concatenate([jnp.zeros((1, pad), row.dtype), row], axis=1)
    seg_p = jnp.concatenate([jnp.full((1, pad), 9, jnp.int32), segments], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones_like(row)], axis=1)
    logits = model(row_p, mask, segment_ids=seg_p)
    alone = model(jnp.asarray(examples[1][None]))
    start = pad + LENGTHS[0]
    assert rel_err(logits[0, start:start + LENGTHS[1]], alone[0]) < 1e-5


def _qkv(B, T, N, K, H, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (B, T, N, H), dtype), jax.random.normal(k[1], (B, T, K, H), dtype),
            jax.random.normal(k[2], (B, T, K, H), dtype))


def _segment_mask(B, T):
    seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 4, (B, T)), axis=1))
    return (seg[:, None, :, None] == seg[:, None, None, :]), seg  # [B, 1, T, S]


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_matches_reference(with_mask):
    q, k, v = _qkv(2, 16, 4, 2, 8, jnp.float32)
    mask = _segment_mask(2, 16)[0] if with_mask else None
    assert rel_err(attention(q, k, v, mask), attention_reference(q, k, v, mask)) < 1e-5


def test_attention_rejects_unknown_implementation():
    q, k, v = _qkv(1, 4, 2, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="accepted: auto, cudnn, xla"):
        attention(q, k, v, implementation="flash")


def test_cudnn_takes_the_head_dims_its_support_matrix_lists_from_ampere_on():
    from types import SimpleNamespace

    from fastlora_jax.attention import cudnn_head_dim_fits
    from fastlora_jax.precision import bfloat16_supported_on, cuda_capability

    gpu = lambda capability: SimpleNamespace(platform="gpu", compute_capability=capability)  # noqa: E731
    assert cuda_capability(gpu("9.0")) == (9, 0) and cuda_capability(gpu("12.1")) == (12, 1)
    assert cuda_capability(gpu("gfx90a")) is None  # ROCm
    assert cuda_capability(SimpleNamespace(platform="cpu")) is None
    assert bfloat16_supported_on(gpu("7.5")) is False and bfloat16_supported_on(gpu("8.0")) is True
    assert bfloat16_supported_on(gpu("gfx90a")) is True
    assert not cudnn_head_dim_fits((7, 5), 64)  # T4: no flash attention in cuDNN before Ampere
    assert not cudnn_head_dim_fits((7, 0), 128)  # V100
    assert not cudnn_head_dim_fits(None, 64)  # not an NVIDIA GPU
    assert cudnn_head_dim_fits((8, 0), 128) and cudnn_head_dim_fits((8, 6), 64)
    assert not cudnn_head_dim_fits((8, 9), 256)  # Ampere / Ada train head dims up to 128
    assert cudnn_head_dim_fits((9, 0), 256) and not cudnn_head_dim_fits((9, 0), 264)
    assert not cudnn_head_dim_fits((9, 0), 100)  # not a multiple of 8


@pytest.mark.gpu
@pytest.mark.parametrize("with_mask", [False, True])
def test_cudnn_attention_bf16(with_mask):
    """cuDNN flash attention (causal, GQA, segment mask) against the float32 reference, forward and gradient."""
    q, k, v = _qkv(2, 256, 8, 2, 64, jnp.bfloat16)
    mask = _segment_mask(2, 256)[0] if with_mask else None
    out = attention(q, k, v, mask, implementation="cudnn")
    ref = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    assert rel_err(out, ref) < 1e-2
    g = jax.grad(lambda q: jnp.sum(attention(q, k, v, mask, implementation="cudnn").astype(jnp.float32) ** 2))(q)
    g_ref = jax.grad(lambda q: jnp.sum(attention_reference(q, k.astype(jnp.float32), v.astype(jnp.float32),
                                                           mask) ** 2))(q.astype(jnp.float32))
    assert rel_err(g, g_ref) < 2e-2
