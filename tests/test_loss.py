"""Chunked cross-entropy: equal to the unchunked reference (value and gradients) and to transformers' loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fastlora_jax import FastLanguageModel
from fastlora_jax.loss import (IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy, cross_entropy_reference,
                               shift_labels)

from helpers import rel_err

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")  # float32 tolerances hold on a GPU too (no TF32)


def _inputs(N=37, D=16, V=50, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (N, D))
    head = jax.random.normal(k[1], (D, V)) * 0.5
    bias = jax.random.normal(k[2], (V,))
    labels = jax.random.randint(k[3], (N,), 0, V).at[::5].set(IGNORE_INDEX)
    return hidden, head, bias, labels


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_reference_with_gradients(layout, chunk_size, with_bias):
    hidden, head, bias, labels = _inputs()
    head = head if layout == "dv" else head.T
    bias = bias if with_bias else None

    def chunked(h, w, b):
        return chunked_cross_entropy(h, w, labels, bias=b, head_layout=layout, chunk_size=chunk_size)[0]

    def reference(h, w, b):
        return cross_entropy_reference(h, w, labels, bias=b, head_layout=layout)[0]

    argnums = (0, 1, 2) if with_bias else (0, 1)
    assert rel_err(chunked(hidden, head, bias), reference(hidden, head, bias)) < 1e-6
    ours = jax.jit(jax.grad(chunked, argnums=argnums))(hidden, head, bias)
    ref = jax.grad(reference, argnums=argnums)(hidden, head, bias)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert rel_err(o, r) < 1e-5
    n = chunked_cross_entropy(hidden, head, labels, head_layout=layout, chunk_size=chunk_size)[1]
    assert int(n) == int(jnp.sum(labels != IGNORE_INDEX))


@pytest.mark.parametrize("rows, chunk_size", [(3, 8), (4, 1), (2, 100), (5, 3)])
def test_batched_rows_chunked_along_tokens(rows, chunk_size):
    """[B, T, D] input (chunks of [B, chunk_size // B] tokens, T padded; flat tokens when B > chunk_size) equals the
    reference on the flat rows."""
    hidden, head, bias, labels = _inputs(N=rows * 13, seed=2)

    def batched(h, w):
        return chunked_cross_entropy(h.reshape(rows, 13, -1), w, labels.reshape(rows, 13), bias=bias,
                                     chunk_size=chunk_size)[0]

    def reference(h, w):
        return cross_entropy_reference(h, w, labels, bias=bias)[0]

    assert rel_err(batched(hidden, head), reference(hidden, head)) < 1e-6
    for o, r in zip(jax.jit(jax.grad(batched, (0, 1)))(hidden, head), jax.grad(reference, (0, 1))(hidden, head)):
        assert o.shape == r.shape and rel_err(o, r) < 1e-5


def test_hidden_only_gradient_and_bf16():
    hidden, head, _, labels = _inputs(N=64, D=32, V=96, seed=1)
    h16, w16 = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    ours = jax.grad(lambda h: chunked_cross_entropy(h, w16, labels, chunk_size=16)[0])(h16)
    ref = jax.grad(lambda h: cross_entropy_reference(h.astype(jnp.float32), w16.astype(jnp.float32), labels)[0])(h16)
    assert ours.dtype == jnp.bfloat16
    assert rel_err(ours, ref) < 1e-2


def test_all_ignored_gives_zero():
    hidden, head, _, labels = _inputs()
    loss_sum, n = chunked_cross_entropy(hidden, head, jnp.full_like(labels, IGNORE_INDEX), chunk_size=8)
    assert float(loss_sum) == 0.0 and int(n) == 0


def test_bad_arguments_raise():
    hidden, head, _, labels = _inputs()
    with pytest.raises(ValueError, match="head_layout"):
        chunked_cross_entropy(hidden, head, labels, head_layout="vv")
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(hidden, head, labels[:-1])


def test_shift_labels_masks_segment_ends():
    labels = jnp.array([[10, 11, 12, 13, 14, 15]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(shift_labels(labels, seg), [[11, 12, -100, 14, -100, -100]])
    np.testing.assert_array_equal(shift_labels(labels), [[11, 12, 13, 14, 15, -100]])


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_loss_matches_transformers(hf_llama, tied):
    directory, torch_model = hf_llama(tie_word_embeddings=tied)
    model, _ = FastLanguageModel.from_pretrained(directory, dtype="float32")
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 256, (3, 13))
    labels = ids.copy()
    labels[0, :4] = IGNORE_INDEX  # a prompt that is not trained on
    labels[2, 9:] = IGNORE_INDEX
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
    loss_sum, n = causal_lm_loss(model, jnp.asarray(ids), jnp.asarray(labels), chunk_size=8)
    assert int(n) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert abs(float(loss_sum / n) - ref) / ref < 1e-5


def test_causal_lm_loss_gradient_matches_transformers(hf_llama):
    """The gradient w.r.t. the final norm weight reaches back through the chunked head as torch's does."""
    from flax import nnx

    directory, torch_model = hf_llama(tie_word_embeddings=False)
    model, _ = FastLanguageModel.from_pretrained(directory, dtype="float32")
    ids = np.random.default_rng(4).integers(0, 256, (2, 11))
    torch_model.zero_grad()
    torch_model(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()
    ref_norm = torch_model.model.norm.weight.grad.numpy()
    ref_head = torch_model.lm_head.weight.grad.numpy().T  # ours is [D, V]

    graphdef, state = nnx.split(model)

    def mean_loss(state):
        m = nnx.merge(graphdef, state)
        s, n = causal_lm_loss(m, jnp.asarray(ids), jnp.asarray(ids), chunk_size=4)
        return s / n

    grads = jax.grad(mean_loss)(state)
    assert rel_err(grads["model"]["norm"]["weight"][...], ref_norm) < 1e-5
    assert rel_err(grads["lm_head"]["weight"][...], ref_head) < 1e-5
