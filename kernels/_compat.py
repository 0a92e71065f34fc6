"""The version- and backend-specific corner of the Pallas kernels, kept in one place.

The kernels use only generic Pallas (BlockSpec grids, ref slicing and gathers, `jax.lax.dot_general`), lowered
through Pallas' Triton backend on NVIDIA GPUs (selected explicitly by its CompilerParams: JAX 0.10 and 0.11 default
to Mosaic GPU, whose generic-op coverage lacks these kernels' gathers) and run by the Pallas interpreter elsewhere.
"""

from __future__ import annotations

import jax


def on_gpu() -> bool:
    """True when JAX's default backend is an NVIDIA/AMD GPU (kernels compile); False on CPU (they interpret)."""
    return jax.default_backend() == "gpu"


def on_nvidia_gpu() -> bool:
    """True when the default backend's first device is an NVIDIA GPU (where PTX inline assembly compiles)."""
    return on_gpu() and jax.devices()[0].device_kind.upper().startswith("NVIDIA")


def default_interpret() -> bool:
    """Interpret mode is decided by the backend: compiled on GPU, interpreted everywhere else."""
    return not on_gpu()


def compiler_params(*, num_warps: int, num_stages: int):
    """Pallas compiler parameters selecting the Triton lowering (ignored by the interpreter)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
