"""Gradient checkpointing: `use_gradient_checkpointing` as a `jax.checkpoint` policy over one decoder layer.

The decoder layer tags its values with `checkpoint_name` (model.py): "layer_input" (the scan carry entering a layer),
the projection outputs "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", and "attention"
(the attention output, the o_proj input). The modes:

- False: no remat; the backward pass reads everything the forward saved (most memory).
- True: keep each decoder layer's input, recompute the rest of the layer in the backward pass.
- "unsloth": as True, but the layer input is offloaded to pinned host memory during the forward pass and fetched
  back for the backward pass (the copies overlap with compute), so device memory holds no per-layer activations.
- "dots": save the projection outputs (bf16 matmul results) and recompute only the cheap elementwise work
  (norms, RoPE, SiLU) and the attention forward: about half of False's activation memory, and the fastest mode.
"""

from __future__ import annotations

from typing import Callable

import jax

MODES = (False, True, "unsloth", "dots")
LAYER_INPUT = "layer_input"
PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def validate(mode) -> bool | str:
    """Returns `mode` if it is an accepted checkpointing mode, else raises ValueError naming the accepted ones."""
    if isinstance(mode, str) and mode.lower() in ("true", "false"):
        mode = mode.lower() == "true"
    if not any(mode is m or (isinstance(m, str) and mode == m) for m in MODES):
        raise ValueError(f"use_gradient_checkpointing={mode!r}; accepted: False, True, 'unsloth', 'dots'")
    return mode


def policy(mode):
    """The jax.checkpoint policy of a mode (None for False: no remat)."""
    mode = validate(mode)
    if mode is False:
        return None
    if mode is True:
        return jax.checkpoint_policies.nothing_saveable
    if mode == "dots":
        return jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES)
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host")


def checkpoint_layer(body: Callable, mode) -> Callable:
    """Wraps a scan body (one decoder layer) in jax.checkpoint with the mode's policy (unchanged for False)."""
    p = policy(mode)
    if p is None:
        return body
    return jax.checkpoint(body, policy=p, prevent_cse=False)
