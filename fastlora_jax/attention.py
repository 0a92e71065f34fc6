"""Attention: grouped-query dot-product attention through jax.nn.dot_product_attention (cuDNN on GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Grouped-query attention: q [B, T, N, H], k/v [B, S, K, H], mask [B, 1, T, S] or None (causal)."""
    on_gpu = jax.default_backend() == "gpu"
    if mask is None:
        impl = "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
