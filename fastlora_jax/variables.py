"""The NNX variable types that split a model into what trains and what stays frozen.

Frozen base weights are `Frozen` (never differentiated); LoRA A/B are `nnx.LoRAParam`; fully trained copies
(`modules_to_save`) are `TrainableCopy`; biases made trainable by `bias="all"|"lora_only"` are `TrainableBias`.
`TRAINABLE` is the one filter that selects exactly the trainable variables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Frozen(nnx.Variable):
    """A frozen base weight (16-bit or float32): never differentiated, never updated."""


class TrainableCopy(nnx.Variable):
    """A fully trained float32 master copy of a module listed in `modules_to_save`."""


class TrainableBias(nnx.Variable):
    """A bias made trainable by `bias="all"` or `bias="lora_only"` (kept in float32)."""


TRAINABLE = nnx.Any(nnx.LoRAParam, TrainableCopy, TrainableBias)
"""NNX filter selecting exactly the trainable variables: `nnx.Optimizer(model, tx, wrt=TRAINABLE)`."""


def trainable_mask(model: nnx.Module) -> nnx.State:
    """A bool pytree shaped like `nnx.state(model)`: True on trainable leaves (for `optax.masked`)."""
    state = nnx.state(model)
    trainable_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    flat = [(path, path in trainable_paths) for path, _ in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def read(variable: nnx.Variable | None, dtype: jnp.dtype | None = None) -> jax.Array | None:
    """The array of a variable (None passes through), optionally cast to the compute dtype."""
    if variable is None:
        return None
    value = variable[...]
    return value if dtype is None else value.astype(dtype)
