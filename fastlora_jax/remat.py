"""Gradient checkpointing: `use_gradient_checkpointing` (False, True, "unsloth") as a `jax.checkpoint` policy.

- False: no remat; the backward pass reads everything the forward saved.
- True: keep each decoder layer's input (the scan carry), recompute the rest of the layer in the backward pass.
- "unsloth": as True, but the layer input (tagged "layer_input") is offloaded to pinned host memory and fetched
  back for the backward pass, so device memory holds one layer's activations at a time.
"""

from __future__ import annotations

from typing import Callable

import jax

MODES = (False, True, "unsloth")


def validate(mode) -> bool | str:
    """Returns `mode` if it is an accepted checkpointing mode, else raises ValueError naming the accepted ones."""
    if isinstance(mode, str) and mode.lower() in ("true", "false"):
        mode = mode.lower() == "true"
    if not any(mode is m or (isinstance(m, str) and mode == m) for m in MODES):
        raise ValueError(f"use_gradient_checkpointing={mode!r}; accepted: False, True, 'unsloth'")
    return mode


def policy(mode):
    """The jax.checkpoint policy for a mode (None for no remat)."""
    mode = validate(mode)
    if mode is False:
        return None
    if mode is True:
        return jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host")


def checkpoint_layer(body: Callable, mode) -> Callable:
    """Wraps a scan body (one decoder layer) in jax.checkpoint with the mode's policy."""
    p = policy(mode)
    if p is None:
        return body
    return jax.checkpoint(body, policy=p, prevent_cse=False)
