"""Several devices through jax.sharding: a named mesh, one sharding rule per parameter kind, and placement.

Axes: "data" (batch only), "fsdp" (batch and parameters: each device keeps a 1/fsdp slice of every large weight;
XLA's SPMD partitioner gathers it for the matmul and reduce-scatters gradients), "tensor" (output features of the
linear layers). Nothing is hand-written: the rules below become `NamedSharding`s and XLA inserts the collectives.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor"); `data=None` takes every device left over."""
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}={size!r}; accepted: a positive int")
    if data is None:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"fsdp={fsdp} x tensor={tensor} does not divide the {len(devices)} devices")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"data={data} x fsdp={fsdp} x tensor={tensor} != {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, AXES)


# Rules: (last path names, rank) -> logical spec over the array's axes. Stacked decoder weights have a leading [L].
# Linear weight [L, in, out]: in over fsdp, out over tensor. LoRA A [L, in, r]: in over fsdp; B [L, r, out]: out over
# tensor. NF4 codes / block absmax [L, n]: flattened blocks over fsdp. Embedding [V, D] and head [D, V]: V over fsdp.
# Norms, scales, nested absmax, offsets: replicated.
def _spec_for(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple:
    name = path[-1]
    stacked = "layers" in path
    lead = (None,) if stacked else ()
    body = shape[len(lead):]
    if name in ("weight",) and len(body) == 2:
        if path[-2] == "embed_tokens":
            return ("fsdp", None)
        if path[-2] == "lm_head":
            return (None, "fsdp")
        return lead + ("fsdp", "tensor")
    if name == "lora_a" and len(body) == 2:
        return lead + ("fsdp", None)
    if name == "lora_b" and len(body) == 2:
        return lead + (None, "tensor")
    if name in ("packed", "absmax_q") and len(body) == 1:
        return lead + ("fsdp",)
    if name == "bias" and len(body) == 1 and stacked:
        return lead + ("tensor",)
    return (None,) * len(shape)


def partition_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one leaf; an axis that does not divide its dimension is replicated instead."""
    spec = _spec_for(tuple(str(p) for p in path), tuple(shape))
    fitted = []
    for dim, axis in zip(shape, spec):
        size = 1 if axis is None else mesh.shape[axis]
        fitted.append(axis if axis is not None and size > 1 and dim % size == 0 else None)
    return P(*fitted)


def leaf_sharding(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(path, shape, mesh))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every variable of `model` by the rules (in place) and returns the model."""
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        value = var[...]
        var.set_value(jax.device_put(value, leaf_sharding(path, value.shape, mesh)))
    nnx.update(model, state)
    model.model.mesh = mesh  # the forward pins activations to batch sharding on it
    return model


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    """Sharding of a batch array [B, ...]: B over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (rank - 1))))


def chunk_sharding(mesh: Mesh, rank: int) -> NamedSharding:
    """Sharding of token chunks [n, C, ...] (a scan over n): C over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (rank - 2))))


def shard_batch(batch, mesh: Mesh):
    """Places every array of a batch pytree with its leading axis over ("data", "fsdp")."""
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if x.shape[0] % n:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by data x fsdp = {n}")
        return jax.device_put(x, batch_sharding(mesh, x.ndim))

    return jax.tree.map(put, batch)
