"""Gradient checkpointing: `use_gradient_checkpointing` as a `jax.checkpoint` policy over one decoder layer.

The decoder layer tags its values with `checkpoint_name` (model.py): "layer_input" (the scan carry entering a layer),
the projection outputs "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", and "attention"
(the attention output, the o_proj input). The modes:

- False: no remat; the backward pass reads everything the forward saved (most memory).
- True: keep each decoder layer's input, recompute the rest of the layer in the backward pass.
- "unsloth": as True, but the layer input is offloaded to pinned host memory during the forward pass and fetched
  back for the backward pass (the copies overlap with compute; the fetches only when compiled with
  `fastlora_jax.compiler_options()`, which fetches one layer ahead), so device memory holds no per-layer activations
  but the small LoRA products x @ A ([tokens, r]); the MLP runs over token chunks of UNSLOTH_MLP_CHUNK, so its
  [tokens, intermediate] activations stay small.
- "dots": save the projection outputs (bf16 matmul results; not down_proj's, which only feeds the next layer's
  input), the LoRA products x @ A and, on a GPU, cuDNN attention's output and softmax statistics (so its forward
  never runs twice); recompute only the cheap elementwise work (norms, RoPE, SiLU): about half of False's
  activation memory, and the fastest mode.
- "long_context": for contexts where even one layer input per layer outgrows host memory (8B: 256 KiB per token
  for 32 layers, so 256 GiB at 1M tokens). Layers run in blocks of `layers_per_block`; only each block's input
  is offloaded to pinned host memory; the backward pass recomputes a block's forward keeping its layer inputs on
  the device, then each layer's backward with recompute (one extra forward pass). The MLP runs over token chunks
  of `mlp_chunk_size` so its [T, intermediate] activations never exist for the whole sequence.
"""

from __future__ import annotations

from typing import Callable

import jax

from fastlora_jax.kernels.lora import XA_NAME

MODES = (False, True, "unsloth", "dots", "long_context")
LAYER_INPUT = "layer_input"
BLOCK_INPUT = "block_input"
LONG_CONTEXT_BLOCK = 4  # layers per offloaded block in "long_context"
LONG_CONTEXT_MLP_CHUNK = 16384  # tokens per MLP chunk in "long_context"
UNSLOTH_MLP_CHUNK = 4096  # tokens per MLP chunk in "unsloth" (with 1024-token loss chunks: 8B QLoRA 7.9 not 8.7 GiB)
# x @ A of every LoRA layer ([tokens, r], tagged in fastlora_jax.kernels): "dots" and "unsloth" keep it on the
# device (8B, r=16: 58 MiB for the 7 projections of 32 layers at 8192 tokens), so the backward pass does not read
# each projection's input again to recompute it.
LORA_XA = XA_NAME
# "dots" saves these: down_proj's output only feeds the next layer's input, which the scan keeps anyway.
DOTS_SAVED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", LORA_XA)
# The primitive cuDNN flash attention's forward binds under jax.grad (jax._src.cudnn.fused_attention_stablehlo):
# its outputs are the attention output and the softmax statistics the backward kernel needs.
CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def _save_attention_outputs(prim, *_, **__) -> bool:
    """Policy: save what cuDNN attention's forward returns (output [B, T, N, H], statistics [B, N, T] float32)."""
    return prim.name == CUDNN_ATTENTION_FORWARD


def validate(mode) -> bool | str:
    """Returns `mode` if it is an accepted checkpointing mode, else raises ValueError naming the accepted ones."""
    if isinstance(mode, str) and mode.lower() in ("true", "false"):
        mode = mode.lower() == "true"
    if not any(mode is m or (isinstance(m, str) and mode == m) for m in MODES):
        raise ValueError(f"use_gradient_checkpointing={mode!r}; accepted: False, True, 'unsloth', 'dots', "
                         "'long_context'")
    return mode


def policy(mode):
    """The jax.checkpoint policy of a mode (None for False: no remat)."""
    mode = validate(mode)
    if mode is False:
        return None
    if mode is True or mode == "long_context":
        return jax.checkpoint_policies.nothing_saveable
    if mode == "dots":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.save_only_these_names(*DOTS_SAVED), _save_attention_outputs)
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[LORA_XA], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host")


def layers_per_block(mode, num_layers: int) -> int:
    """Layers per scanned block: 1, except "long_context" (LONG_CONTEXT_BLOCK, or the largest divisor below it)."""
    if validate(mode) != "long_context":
        return 1
    return next(k for k in range(LONG_CONTEXT_BLOCK, 0, -1) if num_layers % k == 0)


def mlp_chunk_size(mode) -> int | None:
    """Tokens per MLP chunk the mode asks for (None: the whole batch at once): the memory-lean modes chunk."""
    return {"unsloth": UNSLOTH_MLP_CHUNK, "long_context": LONG_CONTEXT_MLP_CHUNK}.get(validate(mode))


def checkpoint_block(body: Callable) -> Callable:
    """Wraps a scan body over a block of layers: its input (tagged BLOCK_INPUT) offloaded to pinned host memory."""
    p = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_INPUT],
        offload_src="device", offload_dst="pinned_host")
    return jax.checkpoint(body, policy=p, prevent_cse=False)


def _keep_all_but_slices(prim, *_, **__) -> bool:
    """Policy for False in a Python loop of layers: save everything except the weight slices (redone instead);
    `jax.lax.index_in_dim` is a slice and a squeeze."""
    return prim.name not in ("slice", "squeeze")


def checkpoint_loop_layer(layer: Callable, mode) -> Callable:
    """Wraps one layer of a Python loop of layers in jax.checkpoint: the mode's policy (False: save all but the
    weight slices). CSE is prevented, else XLA merges the backward pass's recomputation with the forward pass."""
    return jax.checkpoint(layer, policy=policy(mode) or _keep_all_but_slices, prevent_cse=True)


def checkpoint_layer(body: Callable, mode) -> Callable:
    """Wraps a scan body (one decoder layer) in jax.checkpoint with the mode's policy (unchanged for False)."""
    p = policy(mode)
    if p is None:
        return body
    return jax.checkpoint(body, policy=p, prevent_cse=False)
