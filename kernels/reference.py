"""Pure-jnp references: the one statement of each kernel's maths, used by the XLA path and by every test."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear_reference(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, out] (+ bias [out]) -> [..., out], accumulated in float32, returned in x.dtype."""
    y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def lora_linear_reference(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scaling: float | jax.Array,
                          bias: jax.Array | None = None) -> jax.Array:
    """PEFT's LoRA linear: x @ w + bias + scaling * (x @ a) @ b.

    x [..., in], w [in, out] frozen, a [in, r], b [r, out] (HF's lora_A.weight.T and lora_B.weight.T).
    The LoRA branch runs in x.dtype (a, b cast to it), as PEFT does under autocast.
    """
    base = linear_reference(x, w, bias)
    xa = jnp.einsum("...i,ir->...r", x, a.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    delta = jnp.einsum("...r,ro->...o", xa, b.astype(x.dtype), preferred_element_type=jnp.float32)
    return (base.astype(jnp.float32) + scaling * delta).astype(x.dtype)


def nf4_linear_reference(x: jax.Array, w, bias: jax.Array | None = None, a: jax.Array | None = None,
                         b: jax.Array | None = None, scaling: float | jax.Array = 0.0,
                         rounding: str = "dequantize_4bit") -> jax.Array:
    """QLoRA's linear: the NF4 weight w [out, in] dequantized (bitsandbytes' dequantize_4bit, or its gemv_4bit
    rounding) to x.dtype, then `linear_reference`, or `lora_linear_reference` when the LoRA factors a [in, r],
    b [r, out] are given."""
    from fastlora_jax.nf4 import dequantize_nf4

    weight = dequantize_nf4(w, x.dtype, rounding).T  # [in, out]
    if a is None:
        return linear_reference(x, weight, bias)
    return lora_linear_reference(x, weight, a, b, scaling, bias)
