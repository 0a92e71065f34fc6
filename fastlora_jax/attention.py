"""Attention: grouped-query dot-product attention through jax.nn.dot_product_attention.

On an NVIDIA GPU of compute capability 8.0 or newer (Ampere on), bf16/fp16 causal attention runs cuDNN flash
attention (no [T, S] score matrix in memory; the causal blocks above the diagonal are skipped). Padding masks and
packed sequences (segment ids) reach cuDNN as a [B, 1, T, S] mask (jax turns it into an additive bias, O(T * S)
memory, flash still). Everything else (CPU, older GPUs such as T4 and V100, float32, head dims cuDNN rejects,
generation against a cache) runs XLA's implementation, which accepts the same arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax import packed_attention
from fastlora_jax.precision import cuda_capability

IMPLEMENTATIONS = ("auto", "cudnn", "xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *, causal: bool = True,
              implementation: str = "auto", segments: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Grouped-query attention -> [B, T, N, H].

    q [B, T, N, H]; k, v [B, S, K, H] with N a multiple of K; mask [B, 1, T, S] bool (True: may attend) or None;
    causal: query t attends keys <= t (T == S). implementation: "auto" (cuDNN where it applies), "cudnn", "xla".
    segments: the ragged layout of packed rows (offsets, lengths; `fastlora_jax.packed_attention`), the same
    segments as `mask`: "auto" and "cudnn" run it on cuDNN where `ragged_applies`, else `mask` is used.
    """
    impl = resolve(implementation, q, k, mask, causal)
    if segments is not None and impl == "cudnn" and causal and q.shape[1] == k.shape[1]:
        if packed_attention.ragged_applies(q, *segments):
            return packed_attention.ragged_attention(q, k, v, *segments)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
        # XLA's CPU dot has no float16 x float16 -> float32 (the grouped-query einsum's): the same products in float32
        # (the probabilities are then not rounded to float16 before their product with v)
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal).astype(jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


def resolve(implementation: str, q: jax.Array, k: jax.Array, mask: jax.Array | None, causal: bool) -> str:
    """The implementation that runs: "auto" becomes "cudnn" when `cudnn_applies`, else "xla"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation={implementation!r}; accepted: {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    return "cudnn" if cudnn_applies(q, k, mask, causal) else "xla"


def cudnn_applies(q: jax.Array, k: jax.Array, mask: jax.Array | None, causal: bool) -> bool:
    """Whether cuDNN flash attention takes these inputs (an NVIDIA GPU it supports, 16-bit, `cudnn_head_dim_fits`,
    even lengths when a mask becomes a bias; self-attention only, so generation against a cache runs XLA)."""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    T, S, H = q.shape[1], k.shape[1], q.shape[-1]
    if not cudnn_head_dim_fits(cuda_capability(jax.devices()[0]), H) or not causal or T != S:
        return False
    return mask is None or (T % 2 == 0 and S % 2 == 0)


def cudnn_head_dim_fits(capability: tuple[int, int] | None, head_dim: int) -> bool:
    """Whether cuDNN flash attention trains head_dim on an NVIDIA GPU of this compute capability (None: not one):
    compute capability 8.0 or newer (none before Ampere: T4, V100 run XLA), head_dim a multiple of 8 and <= 128, or
    <= 256 from Hopper (9.0) on, as cuDNN's support matrix and JAX's checks say for the backward pass."""
    if capability is None or capability < (8, 0) or head_dim % 8:
        return False
    return head_dim <= (256 if capability >= (9, 0) else 128)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                        causal: bool = True) -> jax.Array:
    """Plain float32 softmax attention with explicit GQA head repetition (the statement of the maths, for tests)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    k = jnp.repeat(k, N // K, axis=2).astype(jnp.float32)  # [B, S, N, H]
    v = jnp.repeat(v, N // K, axis=2).astype(jnp.float32)
    scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k) / jnp.sqrt(jnp.float32(H))
    allowed = jnp.ones((B, 1, T, k.shape[1]), bool)
    if causal:
        allowed &= jnp.tril(jnp.ones((T, k.shape[1]), bool))
    if mask is not None:
        allowed &= mask
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)
    return out.astype(q.dtype)
