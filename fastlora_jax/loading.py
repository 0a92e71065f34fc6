"""Builds a Llama from a config and a stream of HF tensors, one tensor at a time (no second full copy)."""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastlora_jax.config import LlamaConfig
from fastlora_jax.converters import hf_llama
from fastlora_jax.model import Llama

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    """None -> bfloat16 on GPU, float32 elsewhere; a name or a jnp dtype -> that dtype."""
    if dtype is None:
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; accepted: None, {', '.join(map(repr, DTYPES))} or a jnp dtype")
        return DTYPES[dtype]
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; accepted: None, {', '.join(map(repr, DTYPES))} or a jnp dtype")
    return DTYPES[name]


def build_model(config: LlamaConfig, tensors: Iterable[tuple[str, np.ndarray]], *, dtype,
                implementation: str = "auto", mesh=None) -> Llama:
    """A Llama whose frozen weights come from `tensors` ((HF key, HF-layout array) pairs, streamed).

    With a `mesh` (fastlora_jax.sharding.make_mesh), each tensor is placed sharded by the rules as soon as it is
    complete, so no device ever holds a full copy of a sharded weight.
    """
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, implementation=implementation))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    expected = {path: (tuple(var.shape), np.dtype(var.dtype)) for path, var in flat}
    arrays = hf_llama.load_into(expected, tensors, config.num_hidden_layers,
                                tie_word_embeddings=config.tie_word_embeddings,
                                put=_placer(mesh))
    for path, var in flat:
        var.value = arrays[path]
    return nnx.merge(graphdef, state)


def _placer(mesh):
    """How a completed host buffer goes to the device(s): whole, or sharded by the mesh rules."""
    if mesh is None:
        return lambda path, array: jax.device_put(array)
    from fastlora_jax.sharding import leaf_sharding

    return lambda path, array: jax.device_put(array, leaf_sharding(path, array.shape, mesh))


def random_model(config: LlamaConfig, *, dtype=jnp.float32, seed: int = 0, implementation: str = "auto") -> Llama:
    """A randomly initialised Llama (normal(0, 0.02) weights, unit norms), for tests and benchmarks."""
    return Llama(config, dtype=dtype, rngs=nnx.Rngs(seed), implementation=implementation)
