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


def dtype_name(dtype) -> str:
    """The name of a dtype given as a string, a numpy / jnp dtype or a torch dtype ("torch.float16" -> "float16");
    ValueError naming the value when it is none of these."""
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    if str(dtype).startswith("torch."):  # a torch.dtype, named without importing torch
        return str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype={dtype!r} is not a dtype; accepted: a name such as 'bfloat16', a jnp / numpy dtype "
                         "or a torch dtype") from None


def resolve_dtype(dtype) -> jnp.dtype:
    """None -> bfloat16 on a GPU that computes it natively, float16 on older GPUs (T4, V100: as Unsloth), float32
    elsewhere; a name, a jnp or a torch dtype -> that dtype."""
    if dtype is None:
        return default_dtype(jax.devices()[0])
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; accepted: None, {', '.join(map(repr, DTYPES))}, a jnp or a torch dtype")
    return DTYPES[name]


def default_dtype(device) -> jnp.dtype:
    """The compute dtype `dtype=None` means on `device` (a jax Device)."""
    from fastlora_jax.precision import bfloat16_supported_on

    if device.platform != "gpu":
        return jnp.float32
    return jnp.bfloat16 if bfloat16_supported_on(device) else jnp.float16


def build_model(config: LlamaConfig, tensors: Iterable[tuple[str, np.ndarray]], *, dtype,
                implementation: str = "auto", mesh=None, load_in_4bit: bool = False,
                hf_config: dict | None = None) -> Llama:
    """A Llama whose frozen weights come from `tensors` ((HF key, HF-layout array) pairs, streamed).

    load_in_4bit: every decoder linear weight is quantized to NF4 as it arrives (bitsandbytes-exact); a
      pre-quantized bitsandbytes checkpoint (`hf_config["quantization_config"]`) loads as NF4 either way.
    mesh: a `fastlora_jax.sharding.make_mesh` mesh: each tensor is placed sharded by the rules as soon as it is
      complete, so no device ever holds a full copy of a sharded weight.
    """
    from fastlora_jax.converters import bnb

    prequantized = hf_config is not None and bnb.is_bnb_checkpoint(hf_config)
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, implementation=implementation))
    collector = None
    if load_in_4bit or prequantized:
        from fastlora_jax.quantized_loading import NF4Collector

        collector = NF4Collector(config.num_hidden_layers, np.dtype(dtype), hf_config)
        tensors = collector.filter(tensors)
        for name in hf_llama.LINEAR_NAMES:  # the 16-bit layers leave the model; NF4 layers replace them below
            setattr(_parent(abstract.model.layers, name), name.split(".")[-1], None)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    expected = {path: (tuple(var.shape), np.dtype(var.dtype)) for path, var in flat}
    place = _placer(mesh)
    arrays = hf_llama.load_into(expected, tensors, config.num_hidden_layers,
                                tie_word_embeddings=config.tie_word_embeddings, put=place)
    for path, var in flat:
        var.set_value(arrays[path])
    model = nnx.merge(graphdef, state)
    model.model.mesh = mesh
    if collector is not None:
        from fastlora_jax.nf4 import NF4Array, NF4Linear

        for name in hf_llama.LINEAR_NAMES:
            path = ("model", "layers", *name.split("."))
            w = collector.stacked(name)
            w = NF4Array(*(place(path + (f,), getattr(w, f)) for f in ("packed", "absmax_q", "nested_absmax",
                                                                        "offset")), shape=w.shape, dtype=w.dtype)
            bias = collector.biases(name)
            bias = None if bias is None else place(path + ("bias",), bias)
            setattr(_parent(model.model.layers, name), name.split(".")[-1],
                    NF4Linear.from_nf4(w, bias, implementation=implementation))
    return model


def _parent(layers, dotted: str):
    """The module holding a decoder sub-layer: "self_attn.q_proj" -> layers.self_attn."""
    module = layers
    for part in dotted.split(".")[:-1]:
        module = getattr(module, part)
    return module


def _placer(mesh):
    """How a completed host buffer goes to the device(s): whole, or sharded by the mesh rules."""
    if mesh is None:
        return lambda path, array: jax.device_put(array)
    from fastlora_jax.sharding import leaf_sharding

    return lambda path, array: jax.device_put(array, leaf_sharding(path, array.shape, mesh))


def random_model(config: LlamaConfig, *, dtype=jnp.float32, seed: int = 0, implementation: str = "auto") -> Llama:
    """A randomly initialised Llama (normal(0, 0.02) weights, unit norms), for tests and benchmarks."""
    return Llama(config, dtype=dtype, rngs=nnx.Rngs(seed), implementation=implementation)
