"""Linear layers of the model: the frozen 16-bit `Linear` and the `LoraLinear` wrapper around any frozen base.

Every layer may be stacked: its variables carry a leading `stack` shape (the decoder layers are stored as one
module with a leading [L] axis and scanned), and inside the scan each call sees one layer's slice.
All matmuls go through `fastlora_jax.kernels` (the one dispatch point).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fastlora_jax import kernels
from fastlora_jax.variables import Frozen, read


class Linear(nnx.Module):
    """A frozen linear layer: y = x @ weight + bias, weight [*stack, in, out] (the transpose of HF's [out, in])."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False, dtype=jnp.float32,
                 stack: tuple[int, ...] = (), rngs: nnx.Rngs | None = None, implementation: str = "auto"):
        self.in_features, self.out_features = in_features, out_features
        self.implementation = implementation
        shape = (*stack, in_features, out_features)
        if rngs is None:
            weight = jnp.zeros(shape, dtype)
        else:
            weight = (jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02).astype(dtype)
        self.weight = Frozen(weight)
        self.bias = Frozen(jnp.zeros((*stack, out_features), dtype)) if use_bias else None

    @property
    def dtype(self) -> jnp.dtype:
        return self.weight[...].dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # x [..., in] -> [..., out]
        return kernels.linear(x, read(self.weight), read(self.bias), implementation=self.implementation)

    def with_lora(self, x: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array) -> jax.Array:
        """x @ weight + bias + scaling * (x @ a) @ b, weight frozen (no weight gradient)."""
        return kernels.lora_linear(x, read(self.weight), a, b, scaling, read(self.bias),
                                   implementation=self.implementation)

    def dense_weight(self) -> jax.Array:
        """The weight as a dense [*stack, in, out] array (for merging and export)."""
        return read(self.weight)


class LoraLinear(nnx.Module):
    """PEFT's LoRA around a frozen base layer: y = base(x) + scaling * dropout(x) @ A @ B.

    lora_a [*stack, in, r] and lora_b [*stack, r, out] are float32 `nnx.LoRAParam` (HF's lora_A.weight.T and
    lora_B.weight.T); `layer_scale` [*stack] holds the scaling of each stacked layer (0 where
    `layers_to_transform` leaves a layer out, so its output is the base's).
    """

    def __init__(self, base: nnx.Module, *, r: int, scaling: float, dropout: float,
                 lora_a: jax.Array, lora_b: jax.Array, layer_scale: jax.Array):
        self.base = base
        self.r, self.dropout = r, dropout
        self.lora_a = nnx.LoRAParam(lora_a.astype(jnp.float32))
        self.lora_b = nnx.LoRAParam(lora_b.astype(jnp.float32))
        self.layer_scale = Frozen(layer_scale.astype(jnp.float32))
        self.scaling = scaling

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def __call__(self, x: jax.Array, rng: jax.Array | None = None,
                 dequantized: jax.Array | None = None) -> jax.Array:  # x [..., in] -> [..., out]
        """`dequantized`: an NF4 base's `weight_for_calls` array for x's token count (None for any other base)."""
        a, b, scale = read(self.lora_a), read(self.lora_b), read(self.layer_scale)
        base_kw = {} if dequantized is None else {"dequantized": dequantized}
        if rng is not None and self.dropout > 0.0:
            # Dropout on the LoRA branch only: x @ W + s * (drop(x) @ A) @ B = base(x) + lora(drop(x)).
            keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
            x_drop = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
            xa = jnp.einsum("...i,ir->...r", x_drop, a.astype(x.dtype))  # [..., r]
            delta = jnp.einsum("...r,ro->...o", xa, b.astype(x.dtype), preferred_element_type=jnp.float32)
            return (self.base(x, **base_kw).astype(jnp.float32) + scale * delta).astype(x.dtype)
        return self.base.with_lora(x, a, b, scale, **base_kw)

    def delta_weight(self) -> jax.Array:
        """scaling * A @ B as a float32 [*stack, in, out] array (what merging adds to the base weight)."""
        a, b, scale = read(self.lora_a), read(self.lora_b), read(self.layer_scale)
        return scale[..., None, None] * jnp.einsum("...ir,...ro->...io", a, b)
