"""`modules_to_save`: fully trained copies of the embedding and the output head, as PEFT's ModulesToSaveWrapper.

Each wrapper keeps the original frozen weight (`weight`, model dtype, as PEFT keeps `original_module`) and a float32
master copy `trainable_weight` (a `TrainableCopy`) that the forward reads, cast to the model dtype.
With tied embeddings one `SavedEmbed` serves both the input embedding and the output head (PEFT's
`ensure_weight_tying=True`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fastlora_jax import kernels
from fastlora_jax.variables import TrainableCopy, read


class SavedEmbed(nnx.Module):
    """`embed_tokens` in modules_to_save: weight [V, D] frozen original, trainable_weight [V, D] float32 copy."""

    def __init__(self, original: nnx.Module):
        self.weight = original.weight  # Frozen [V, D], model dtype
        self.trainable_weight = TrainableCopy(jnp.array(original.weight[...], jnp.float32, copy=True))  # own buffer

    @property
    def dtype(self) -> jnp.dtype:
        return self.weight[...].dtype

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(read(self.trainable_weight), ids, axis=0).astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:  # tied output head: [..., D] -> [..., V]
        return jnp.einsum("...d,vd->...v", h, read(self.trainable_weight, h.dtype))

    def dense_weight(self) -> jax.Array:
        """The trained [V, D] weight in the model dtype (the tied output head's too)."""
        return read(self.trainable_weight, self.dtype)


class SavedLinear(nnx.Module):
    """An untied `lm_head` in modules_to_save: weight [D, V] frozen original, trainable_weight [D, V] float32 copy.

    Follows the linear-layer protocol (`__call__`, `dense_weight`, `in_features`, `out_features`, `dtype`)."""

    def __init__(self, original: nnx.Module):
        self.in_features, self.out_features = original.in_features, original.out_features
        self.implementation = original.implementation
        self.weight = original.weight  # Frozen [in, out], model dtype
        self.bias = original.bias  # None: Llama's lm_head has no bias
        self.trainable_weight = TrainableCopy(jnp.array(original.weight[...], jnp.float32, copy=True))  # own buffer

    @property
    def dtype(self) -> jnp.dtype:
        return self.weight[...].dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        return kernels.linear(x, read(self.trainable_weight, x.dtype), read(self.bias),
                              implementation=self.implementation)

    def dense_weight(self) -> jax.Array:
        """The trained weight [in, out] in the model dtype (what a merged export writes)."""
        return read(self.trainable_weight, self.dtype)
