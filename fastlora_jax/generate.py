"""Autoregressive generation with a KV cache under jit, and the for_inference / for_training switches.

`generate` left-aligns the prompts, pads them on the left to a length bucket, fills the cache with one prefill
pass and decodes one token per step in a `jax.lax.while_loop` that stops when every row has produced an end
token. Prompt length and the number of new tokens are rounded up to buckets, so repeated calls with other lengths
reuse the compiled program. Works with any model built from `Llama` (16-bit or NF4 base, merged or unmerged LoRA).
Axis letters: B batch, T prompt tokens (bucketed), S cache slots, N new tokens (bucketed), V vocab.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastlora_jax.data import check_token_ids
from fastlora_jax.model import KVCache

MAX_EOS_IDS = 8  # end tokens are passed to the compiled loop as a fixed-size array (padded with -1)


def bucket(n: int, minimum: int = 16, step: int = 256) -> int:
    """Rounds a length up: powers of two from `minimum` up to `step`, then multiples of `step`."""
    if n <= minimum:
        return minimum
    if n <= step:
        return 1 << (n - 1).bit_length()
    return -(-n // step) * step


def generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, attention_mask=None, seed: int = 0,
             pad_token_id: int | None = None) -> jax.Array:
    """Generates up to `max_new_tokens` tokens after each prompt; returns ids [B, T + steps] (int32).

    input_ids [B, T] ints; attention_mask [B, T] (1 = token, 0 = padding; each row's tokens contiguous, on either
    side) or None (no padding). temperature 0 decodes greedily; > 0 samples from softmax(logits / temperature),
    restricted to the smallest set of tokens whose probability reaches `top_p`, with `jax.random.key(seed)`.
    eos_token_id: an id or a list of ids that end a row; None takes `model.config.eos_token_id`, [] never stops.
    After its end token a row holds `pad_token_id` (None: the config's pad id, else the first end id, else 0).
    As transformers does, the output keeps the prompt as given (padding included) and ends when every row has
    finished, so `steps` <= max_new_tokens. Raises ValueError when a prompt token (padding aside) or the pad id is
    not an id of the model's vocabulary.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids: expected a non-empty integer array [batch, tokens], got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; accepted: an int >= 1")
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature!r}; accepted: a float >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}; accepted: a float in (0, 1]")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    eos = _eos_ids(model.config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos[0] >= 0 else 0
    vocab_size = model.config.vocab_size
    check_token_ids(ids[mask], vocab_size, where="input_ids")  # padding slots get pad_token_id, checked next
    if pad_token_id >= vocab_size:  # it fills the prompt bucket's padding slots, which the model embeds
        raise ValueError(f"pad_token_id={pad_token_id!r}; accepted: an id < the model's vocab_size {vocab_size}")

    left_ids, left_mask = _left_align(ids, mask, pad_token_id)
    B, T = ids.shape
    prompt_bucket = bucket(T)
    pad = prompt_bucket - T
    left_ids = np.pad(left_ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)
    left_mask = np.pad(left_mask, ((0, 0), (pad, 0)), constant_values=False)

    graphdef, state = nnx.split(model)
    greedy = temperature == 0.0
    new, steps = _generate_jit(
        graphdef, state, jnp.asarray(left_ids, jnp.int32), jnp.asarray(left_mask), jnp.int32(max_new_tokens),
        jnp.asarray(eos), jnp.int32(pad_token_id), jnp.float32(temperature if not greedy else 1.0),
        jnp.float32(top_p), jax.random.key(seed), new_bucket=bucket(int(max_new_tokens)), greedy=greedy,
        use_top_p=bool(top_p < 1.0) and not greedy)
    steps = int(steps)
    return jnp.concatenate([jnp.asarray(ids, jnp.int32), new[:, :steps]], axis=1)


def for_inference(model):
    """Switches a model to inference: `model.training = False` (a flag for the caller's code: dropout runs only where
    a train step passes a dropout rng, which generation never does), and its NF4 layers at the default rounding to
    "bitsandbytes": a one-token call (batch-1 decoding) then rounds the weights as bitsandbytes' inference kernel
    does, as Unsloth's and transformers' 4-bit generation do (one bf16 rounding per weight away;
    `fastlora_jax.nf4.LAYER_ROUNDINGS`)."""
    from fastlora_jax.nf4 import set_rounding

    model.training = False
    set_rounding(model, "bitsandbytes", where="dequantize_4bit")
    return model


def for_training(model, use_gradient_checkpointing=True):
    """Switches a model back to training after `for_inference`: `model.training = True`, NF4 layers back to
    "dequantize_4bit" (from the "bitsandbytes" that for_inference set; a rounding set otherwise stays).

    use_gradient_checkpointing: as Unsloth's: True (the default) keeps the remat mode the model trains with
    (get_peft_model's; for_inference leaves it as it is), False turns remat off, and a mode name ("unsloth",
    "dots", ...; see fastlora_jax.remat) switches to it."""
    from fastlora_jax import remat
    from fastlora_jax.nf4 import set_rounding

    if use_gradient_checkpointing is not True:
        mode = remat.validate(use_gradient_checkpointing)
        model.model.gradient_checkpointing = mode
    model.training = True
    set_rounding(model, "dequantize_4bit", where="bitsandbytes")
    return model


# ------------------------------------------------------------------------------------------------- host helpers

def _eos_ids(eos) -> np.ndarray:
    """An end id, a list of them or None -> int32 [MAX_EOS_IDS], padded with -1 (matches no token)."""
    if eos is None:
        eos = []
    elif isinstance(eos, (int, np.integer)):
        eos = [eos]
    eos = [int(e) for e in eos]
    if len(eos) > MAX_EOS_IDS or any(e < 0 for e in eos):
        raise ValueError(f"eos_token_id={eos!r}; accepted: None, an id >= 0 or up to {MAX_EOS_IDS} of them")
    return np.array(eos + [-1] * (MAX_EOS_IDS - len(eos)), np.int32)


def _left_align(ids: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's tokens to the right end (left padding): ids, mask [B, T]."""
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise ValueError(f"attention_mask: rows {np.flatnonzero(lengths == 0).tolist()} hold no token")
    out_ids = np.full_like(ids, pad_id)
    out_mask = np.zeros_like(mask)
    T = ids.shape[1]
    for b, (row, m, n) in enumerate(zip(ids, mask, lengths)):
        where = np.flatnonzero(m)
        if where[-1] - where[0] + 1 != n:
            raise ValueError(f"attention_mask row {b} has holes; each row's tokens must be contiguous")
        out_ids[b, T - n:] = row[where]
        out_mask[b, T - n:] = True
    return out_ids, out_mask


# --------------------------------------------------------------------------------------------- the compiled loop

def _sample(logits, key, temperature, top_p, *, greedy: bool, use_top_p: bool):
    """Next tokens [B] from logits [B, V] float32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the better tokens
        kept = jnp.sum(before < top_p, axis=-1)  # [B] >= 1
        cutoff = jnp.take_along_axis(sorted_logits, (kept - 1)[:, None], axis=-1)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket", "greedy", "use_top_p"))
def _generate_jit(graphdef, state, ids, mask, max_new, eos, pad_id, temperature, top_p, key, *,
                  new_bucket: int, greedy: bool, use_top_p: bool):
    """ids, mask [B, T] left-padded -> (new tokens [B, N] padded with pad_id, steps taken [])."""
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    S = T + new_bucket
    cache = KVCache.zeros(model.config, B, S, model.dtype)
    cache_mask = jnp.concatenate([mask, jnp.ones((B, new_bucket), bool)], axis=1)  # [B, S]
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [B]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)  # [B, T]
    sample = functools.partial(_sample, temperature=temperature, top_p=top_p, greedy=greedy, use_top_p=use_top_p)

    def is_eos(tok):  # [B] -> [B] bool
        return jnp.any(tok[:, None] == eos[None, :], axis=-1)

    hidden, cache = model.model(ids, attention_mask=cache_mask, positions=positions, cache=cache)  # [B, T, D]
    key, sub = jax.random.split(key)
    tok = sample(model.logits(hidden[:, -1]).astype(jnp.float32), sub)  # [B]
    out = jnp.full((B, new_bucket), pad_id, jnp.int32).at[:, 0].set(tok)
    done = is_eos(tok)

    def cond(carry):
        i, _, done, _, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, done, out, cache, key = carry
        pos = (lengths + i - 1)[:, None]  # [B, 1] position of the token fed in
        hidden, cache = model.model(tok[:, None], attention_mask=cache_mask, positions=pos, cache=cache)
        key, sub = jax.random.split(key)
        nxt = sample(model.logits(hidden[:, 0]).astype(jnp.float32), sub)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, nxt, done | is_eos(nxt), out, cache, key

    steps, _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, done, out, cache, key))
    return out, steps
