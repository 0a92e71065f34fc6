"""Autoregressive generation with a KV cache under jit, and the for_inference / for_training switches.

`generate` left-aligns the prompts, pads them on the left to a length bucket, fills the cache with one prefill
pass and decodes one token per step in a `jax.lax.while_loop` that stops when every row has produced an end
token. Prompt length and the number of new tokens are rounded up to buckets, so repeated calls with other lengths
reuse the compiled program. With a `streamer` (batch 1) the same prefill and decode steps run as separate jitted
calls driven from Python, so each token reaches the host as it is made. Works with any model built from `Llama`
(16-bit or NF4 base, merged or unmerged LoRA).
Axis letters: B batch, T prompt tokens (bucketed), S cache slots, N new tokens (bucketed), V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
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
             pad_token_id: int | None = None, min_p: float | None = None, use_cache: bool = True,
             streamer=None) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens after each prompt; returns ids [B, T + steps] (an int32 numpy array,
    so `tokenizer.batch_decode(outputs)` reads it as it reads transformers' output).

    input_ids [B, T] ints, or a tokenizer's output (a mapping with "input_ids" and optionally "attention_mask", as
    transformers 5's `apply_chat_template(..., tokenize=True)` returns); attention_mask [B, T] (1 = token,
    0 = padding; each row's tokens contiguous, on either side) or None (no padding). temperature 0 decodes greedily
    (top_p and min_p then do nothing); > 0 samples from softmax(logits / temperature) with `jax.random.key(seed)`,
    filtered as transformers' warpers are, in its order: top_p keeps the smallest set of tokens whose probability
    reaches `top_p`, then min_p (0 or None: off) keeps the tokens whose probability is >= min_p * the top token's.
    eos_token_id: an id or a list of ids that end a row; None takes `model.config.eos_token_id`, [] never stops.
    After its end token a row holds `pad_token_id` (None: the config's pad id, else the first end id, else 0).
    As transformers does, the output keeps the prompt as given (padding included) and ends when every row has
    finished, so `steps` <= max_new_tokens. use_cache: accepted for transformers' API; decoding always uses a KV
    cache, and use_cache=False (a full forward pass per token in transformers) would give the same tokens.
    streamer: an object with `put` and `end` (transformers' `TextStreamer`); as transformers' generate does, it gets
    `put(prompt ids [1, T])`, then `put(token [1])` for each new token up to and including the end token, then
    `end()`. Batch size 1 only. Raises ValueError when a prompt token (padding aside) or the pad id is not an id of
    the model's vocabulary, or on a bad argument.
    """
    if isinstance(input_ids, Mapping):
        if "input_ids" not in input_ids:
            raise ValueError(f"input_ids: a mapping without an 'input_ids' key (keys {list(input_ids)}); accepted: "
                             f"an integer array [batch, tokens] or a tokenizer's output")
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
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
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p={min_p!r}; accepted: None or a float in [0, 1] (0 or None: off)")
    if use_cache not in (True, False):
        raise ValueError(f"use_cache={use_cache!r}; accepted: True or False (both decode with a KV cache)")
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise ValueError(f"streamer={streamer!r}; accepted: None or an object with put(ids) and end() methods, "
                         f"such as transformers' TextStreamer")
    if streamer is not None and ids.shape[0] != 1:
        raise ValueError(f"streamer: input_ids has batch size {ids.shape[0]}; streaming accepts batch size 1 only")
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
    sampling = dict(greedy=greedy, use_top_p=bool(top_p < 1.0) and not greedy,
                    use_min_p=bool(min_p) and not greedy)  # static: the plain path compiles as without them
    args = (graphdef, state, jnp.asarray(left_ids, jnp.int32), jnp.asarray(left_mask), jnp.asarray(eos),
            jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p), jnp.float32(min_p or 0.0),
            jax.random.key(seed))
    if streamer is not None:
        streamer.put(np.asarray(ids, np.int64))  # as transformers: the prompt as given, then each new token
        new = _stream(*args, max_new_tokens=int(max_new_tokens), streamer=streamer, **sampling)
        streamer.end()
        return np.concatenate([ids.astype(np.int32), np.asarray(new)], axis=1)
    new, steps = _generate_jit(*args, jnp.int32(max_new_tokens), jnp.int32(pad_token_id),
                               new_bucket=bucket(int(max_new_tokens)), **sampling)
    steps = int(steps)
    return np.concatenate([ids.astype(np.int32), np.asarray(new[:, :steps])], axis=1)


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

def _warp(logits, temperature, top_p, min_p, *, use_top_p: bool, use_min_p: bool):
    """logits [B, V] float32 / temperature, with the tokens top_p and min_p remove at -inf (transformers' warpers)."""
    logits = logits / temperature
    if use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the better tokens
        kept = jnp.sum(before < top_p, axis=-1)  # [B] >= 1
        cutoff = jnp.take_along_axis(sorted_logits, (kept - 1)[:, None], axis=-1)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if use_min_p:  # transformers' MinPLogitsWarper; the top token always stays (min_p <= 1)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
        logits = jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def _sample(logits, key, temperature, top_p, min_p, *, greedy: bool, use_top_p: bool, use_min_p: bool):
    """Next tokens [B] from logits [B, V] float32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _warp(logits, temperature, top_p, min_p, use_top_p=use_top_p, use_min_p=use_min_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _is_eos(tok, eos):  # [B], [E] -> [B] bool
    return jnp.any(tok[:, None] == eos[None, :], axis=-1)


def _prefill(model, ids, mask, key, sample, new_bucket: int):
    """Fills the cache with the prompt ids, mask [B, T]: (first tokens [B], cache, cache_mask [B, S], lengths [B],
    key)."""
    B, T = ids.shape
    cache = KVCache.zeros(model.config, B, T + new_bucket, model.dtype)
    cache_mask = jnp.concatenate([mask, jnp.ones((B, new_bucket), bool)], axis=1)  # [B, S]
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [B]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)  # [B, T]
    hidden, cache = model.model(ids, attention_mask=cache_mask, positions=positions, cache=cache)  # [B, T, D]
    key, sub = jax.random.split(key)
    tok = sample(model.logits(hidden[:, -1]).astype(jnp.float32), sub)  # [B]
    return tok, cache, cache_mask, lengths, key


def _decode(model, i, tok, cache, cache_mask, lengths, key, sample):
    """Feeds tok [B], the i-th new token (from 1), and samples the next: (next [B], cache, key)."""
    pos = (lengths + i - 1)[:, None]  # [B, 1] position of the token fed in
    hidden, cache = model.model(tok[:, None], attention_mask=cache_mask, positions=pos, cache=cache)
    key, sub = jax.random.split(key)
    return sample(model.logits(hidden[:, 0]).astype(jnp.float32), sub), cache, key


_SAMPLING = ("greedy", "use_top_p", "use_min_p")


@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket") + _SAMPLING)
def _generate_jit(graphdef, state, ids, mask, eos, temperature, top_p, min_p, key, max_new, pad_id, *,
                  new_bucket: int, greedy: bool, use_top_p: bool, use_min_p: bool):
    """ids, mask [B, T] left-padded -> (new tokens [B, N] padded with pad_id, steps taken [])."""
    model = nnx.merge(graphdef, state)
    B = ids.shape[0]
    sample = functools.partial(_sample, temperature=temperature, top_p=top_p, min_p=min_p, greedy=greedy,
                               use_top_p=use_top_p, use_min_p=use_min_p)
    tok, cache, cache_mask, lengths, key = _prefill(model, ids, mask, key, sample, new_bucket)
    out = jnp.full((B, new_bucket), pad_id, jnp.int32).at[:, 0].set(tok)
    done = _is_eos(tok, eos)

    def cond(carry):
        i, _, done, _, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, done, out, cache, key = carry
        nxt, cache, key = _decode(model, i, tok, cache, cache_mask, lengths, key, sample)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, nxt, done | _is_eos(nxt, eos), out, cache, key

    steps, _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, done, out, cache, key))
    return out, steps


# ------------------------------------------------------------------------------ streaming: one jitted call a step

@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket") + _SAMPLING)
def _prefill_jit(graphdef, state, ids, mask, temperature, top_p, min_p, key, *, new_bucket: int, greedy: bool,
                 use_top_p: bool, use_min_p: bool):
    sample = functools.partial(_sample, temperature=temperature, top_p=top_p, min_p=min_p, greedy=greedy,
                               use_top_p=use_top_p, use_min_p=use_min_p)
    return _prefill(nnx.merge(graphdef, state), ids, mask, key, sample, new_bucket)


@functools.partial(jax.jit, static_argnames=("graphdef",) + _SAMPLING, donate_argnames=("cache",))
def _decode_jit(graphdef, state, i, tok, cache, cache_mask, lengths, temperature, top_p, min_p, key, *,
                greedy: bool, use_top_p: bool, use_min_p: bool):
    sample = functools.partial(_sample, temperature=temperature, top_p=top_p, min_p=min_p, greedy=greedy,
                               use_top_p=use_top_p, use_min_p=use_min_p)
    return _decode(nnx.merge(graphdef, state), i, tok, cache, cache_mask, lengths, key, sample)


def _stream(graphdef, state, ids, mask, eos, temperature, top_p, min_p, key, *, max_new_tokens: int, streamer,
            greedy: bool, use_top_p: bool, use_min_p: bool) -> jax.Array:
    """Batch-1 decoding that hands each new token to `streamer.put` as [1] int64, up to and including the first end
    token; returns the new tokens [1, steps]. Same key sequence and cache layout as `_generate_jit`."""
    flags = dict(greedy=greedy, use_top_p=use_top_p, use_min_p=use_min_p)
    tok, cache, cache_mask, lengths, key = _prefill_jit(graphdef, state, ids, mask, temperature, top_p, min_p, key,
                                                        new_bucket=bucket(max_new_tokens), **flags)
    end_ids = set(np.asarray(eos).tolist()) - {-1}
    new = []
    for i in range(1, max_new_tokens + 1):
        host = np.asarray(tok, np.int64)  # [1]
        new.append(int(host[0]))
        streamer.put(host)
        if new[-1] in end_ids or i == max_new_tokens:
            break
        tok, cache, key = _decode_jit(graphdef, state, jnp.int32(i), tok, cache, cache_mask, lengths, temperature,
                                      top_p, min_p, key, **flags)
    return jnp.asarray([new], jnp.int32)
