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

import dataclasses
import functools
import secrets
from collections.abc import Mapping
from typing import NamedTuple, Sequence

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


def generate(model, input_ids, max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, attention_mask=None, seed: int | None = None,
             pad_token_id: int | None = None, min_p: float | None = None, use_cache: bool = True,
             streamer=None, top_k: int | None = None, repetition_penalty: float = 1.0,
             max_length: int | None = None) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens after each prompt; returns ids [B, T + steps] (an int32 numpy array,
    so `tokenizer.batch_decode(outputs)` reads it as it reads transformers' output).

    input_ids [B, T] ints, or a tokenizer's output (a mapping with "input_ids" and optionally "attention_mask", as
    transformers 5's `apply_chat_template(..., tokenize=True)` returns); attention_mask [B, T] (1 = token,
    0 = padding; each row's tokens contiguous, on either side) or None (no padding).
    max_new_tokens: None takes `max_length - T` where max_length (transformers' meaning: prompt width T, padding
    included, plus new tokens) is given, else 32; when both are given max_new_tokens wins, as in transformers.
    Logits go through transformers' processors in its order: repetition_penalty (1.0: off; for every id already in
    the row, its real prompt tokens and the tokens generated so far, a logit < 0 is multiplied by the penalty, else
    divided by it; unlike transformers, which also counts the pad tokens of a left-padded batch, padding never
    counts), then, when sampling, temperature, top_k, top_p and min_p. temperature 0 decodes greedily (argmax of the
    penalized logits; top_k, top_p, min_p and seed then do nothing); > 0 samples from softmax(logits / temperature)
    filtered as transformers' warpers are: top_k (0 or None: off) keeps the k best tokens (and those tied with the
    k-th), top_p keeps the smallest set of tokens whose probability reaches `top_p`, min_p (0 or None: off) keeps the
    tokens whose probability is >= min_p * the top token's. seed: an int samples with `jax.random.key(seed)`, the
    same tokens on every call; None (the default) draws a fresh seed from the operating system each call, so calls
    differ as transformers' do with torch's advancing global generator (pass an int to repeat a sample).
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
    max_new_tokens = _max_new_tokens(max_new_tokens, max_length, ids.shape[1])
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature!r}; accepted: a float >= 0 (0 = greedy)")
    if top_k is not None and not (_is_int(top_k) and top_k >= 0):
        raise ValueError(f"top_k={top_k!r}; accepted: None or an int >= 0 (0 or None: off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}; accepted: a float in (0, 1]")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p={min_p!r}; accepted: None or a float in [0, 1] (0 or None: off)")
    if not (isinstance(repetition_penalty, (int, float, np.integer, np.floating))
            and not isinstance(repetition_penalty, bool) and 0.0 < repetition_penalty < np.inf):
        raise ValueError(f"repetition_penalty={repetition_penalty!r}; accepted: a float > 0 (1.0: off; > 1 "
                         f"discourages repeating a token)")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed={seed!r}; accepted: None (a new sample on each call) or an int")
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
    flags = _Flags(greedy=greedy, top_k=bool(top_k) and not greedy, top_p=bool(top_p < 1.0) and not greedy,
                   min_p=bool(min_p) and not greedy, penalty=repetition_penalty != 1.0)
    knobs = _Knobs(temperature=jnp.float32(temperature if not greedy else 1.0),
                   top_k=jnp.int32(min(top_k or 0, vocab_size)), top_p=jnp.float32(top_p),
                   min_p=jnp.float32(min_p or 0.0), penalty=jnp.float32(repetition_penalty))
    if greedy:
        key = jax.random.key(0)  # never used; unseeded greedy calls leave the count alone
    elif seed is None:
        key = jax.random.key(secrets.randbits(63))  # a new sample each call, as re-running a notebook cell gives
    else:
        key = jax.random.key(seed)
    args = (graphdef, state, jnp.asarray(left_ids, jnp.int32), jnp.asarray(left_mask), jnp.asarray(eos), knobs, key)
    if streamer is not None:
        streamer.put(np.asarray(ids, np.int64))  # as transformers: the prompt as given, then each new token
        new = _stream(*args, max_new_tokens=max_new_tokens, streamer=streamer, flags=flags)
        streamer.end()
        return np.concatenate([ids.astype(np.int32), np.asarray(new)], axis=1)
    new, steps = _generate_jit(*args, jnp.int32(max_new_tokens), jnp.int32(pad_token_id),
                               new_bucket=bucket(max_new_tokens), flags=flags)
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

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _max_new_tokens(max_new_tokens, max_length, T: int) -> int:
    """The number of new tokens from max_new_tokens and max_length (prompt width T + new tokens), as transformers."""
    if max_new_tokens is not None and not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; accepted: None or an int >= 1")
    if max_length is not None and not (_is_int(max_length) and max_length >= 1):
        raise ValueError(f"max_length={max_length!r}; accepted: None or an int >= 1 (prompt tokens + new tokens)")
    if max_new_tokens is not None:
        return int(max_new_tokens)
    if max_length is None:
        return 32
    if max_length <= T:
        raise ValueError(f"max_length={max_length} leaves no room after the {T} prompt tokens of input_ids (its "
                         f"padded width); accepted: max_length > {T}, or pass max_new_tokens")
    return int(max_length) - T


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

@dataclasses.dataclass(frozen=True, kw_only=True)
class _Flags:
    """Which logits processors run: a static jit argument, so the plain path compiles without the others."""
    greedy: bool
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    penalty: bool = False


class _Knobs(NamedTuple):
    """Their values, traced: another value reuses the compiled program."""
    temperature: jax.Array  # [] float32, 1.0 when greedy
    top_k: jax.Array  # [] int32
    top_p: jax.Array  # [] float32
    min_p: jax.Array  # [] float32
    penalty: jax.Array  # [] float32, the repetition penalty


def _penalize(logits, seen, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor: logits [B, V] float32 of the ids seen [B, V] bool times the
    penalty where < 0, else divided by it."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def _warp(logits, temperature, top_k, top_p, min_p, *, use_top_k: bool, use_top_p: bool, use_min_p: bool):
    """logits [B, V] float32 / temperature, with the tokens top_k, top_p and min_p remove (in this order, as
    transformers' warpers) at -inf."""
    logits = logits / temperature
    if use_top_k or use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    if use_top_k:  # TopKLogitsWarper: the tokens tied with the k-th stay
        k = jnp.clip(top_k, 1, logits.shape[-1])
        cutoff = jax.lax.dynamic_slice_in_dim(sorted_logits, k - 1, 1, axis=1)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        sorted_logits = jnp.where(sorted_logits < cutoff, -jnp.inf, sorted_logits)  # still descending
    if use_top_p:
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the better tokens
        kept = jnp.sum(before < top_p, axis=-1)  # [B] >= 1
        cutoff = jnp.take_along_axis(sorted_logits, (kept - 1)[:, None], axis=-1)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if use_min_p:  # transformers' MinPLogitsWarper; the top token always stays (min_p <= 1)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
        logits = jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def _sample(logits, key, seen, knobs: _Knobs, flags: _Flags):
    """Next tokens [B] from logits [B, V] float32 and the ids seen so far [B, V] bool (None without a penalty)."""
    if flags.penalty:  # a processor: it changes greedy decoding too
        logits = _penalize(logits, seen, knobs.penalty)
    if flags.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _warp(logits, knobs.temperature, knobs.top_k, knobs.top_p, knobs.min_p, use_top_k=flags.top_k,
                   use_top_p=flags.top_p, use_min_p=flags.min_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _mark(seen, tok):
    """seen [B, V] bool with tok [B] set; None (no penalty) stays None."""
    return None if seen is None else seen.at[jnp.arange(tok.shape[0]), tok].set(True)


def _is_eos(tok, eos):  # [B], [E] -> [B] bool
    return jnp.any(tok[:, None] == eos[None, :], axis=-1)


def _prefill(model, ids, mask, key, knobs, flags, new_bucket: int):
    """Fills the cache with the prompt ids, mask [B, T]: (first tokens [B], seen [B, V] or None, cache,
    cache_mask [B, S], lengths [B], key)."""
    B, T = ids.shape
    cache = KVCache.zeros(model.config, B, T + new_bucket, model.dtype)
    cache_mask = jnp.concatenate([mask, jnp.ones((B, new_bucket), bool)], axis=1)  # [B, S]
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [B]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)  # [B, T]
    hidden, cache = model.model(ids, attention_mask=cache_mask, positions=positions, cache=cache)  # [B, T, D]
    logits = model.logits(hidden[:, -1]).astype(jnp.float32)  # [B, V]
    seen = None
    if flags.penalty:  # the prompt's tokens; padding slots point past the vocab and are dropped
        V = logits.shape[-1]
        seen = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], jnp.where(mask, ids, V)].set(True, mode="drop")
    key, sub = jax.random.split(key)
    tok = _sample(logits, sub, seen, knobs, flags)  # [B]
    return tok, _mark(seen, tok), cache, cache_mask, lengths, key


def _decode(model, i, tok, seen, cache, cache_mask, lengths, key, knobs, flags):
    """Feeds tok [B], the i-th new token (from 1), and samples the next: (next [B], seen, cache, key)."""
    pos = (lengths + i - 1)[:, None]  # [B, 1] position of the token fed in
    hidden, cache = model.model(tok[:, None], attention_mask=cache_mask, positions=pos, cache=cache)
    key, sub = jax.random.split(key)
    nxt = _sample(model.logits(hidden[:, 0]).astype(jnp.float32), sub, seen, knobs, flags)
    return nxt, _mark(seen, nxt), cache, key


@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket", "flags"))
def _generate_jit(graphdef, state, ids, mask, eos, knobs, key, max_new, pad_id, *, new_bucket: int,
                  flags: _Flags):
    """ids, mask [B, T] left-padded -> (new tokens [B, N] padded with pad_id, steps taken [])."""
    model = nnx.merge(graphdef, state)
    B = ids.shape[0]
    tok, seen, cache, cache_mask, lengths, key = _prefill(model, ids, mask, key, knobs, flags, new_bucket)
    out = jnp.full((B, new_bucket), pad_id, jnp.int32).at[:, 0].set(tok)
    done = _is_eos(tok, eos)

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, seen, done, out, cache, key = carry
        nxt, seen, cache, key = _decode(model, i, tok, seen, cache, cache_mask, lengths, key, knobs, flags)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, nxt, seen, done | _is_eos(nxt, eos), out, cache, key

    steps, _, _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, seen, done, out, cache, key))
    return out, steps


# ------------------------------------------------------------------------------ streaming: one jitted call a step

@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket", "flags"))
def _prefill_jit(graphdef, state, ids, mask, knobs, key, *, new_bucket: int, flags: _Flags):
    return _prefill(nnx.merge(graphdef, state), ids, mask, key, knobs, flags, new_bucket)


@functools.partial(jax.jit, static_argnames=("graphdef", "flags"), donate_argnames=("cache", "seen"))
def _decode_jit(graphdef, state, i, tok, seen, cache, cache_mask, lengths, knobs, key, *, flags: _Flags):
    return _decode(nnx.merge(graphdef, state), i, tok, seen, cache, cache_mask, lengths, key, knobs, flags)


def _stream(graphdef, state, ids, mask, eos, knobs, key, *, max_new_tokens: int, streamer, flags: _Flags):
    """Batch-1 decoding that hands each new token to `streamer.put` as [1] int64, up to and including the first end
    token; returns the new tokens [1, steps]. Same key sequence, seen ids and cache layout as `_generate_jit`."""
    tok, seen, cache, cache_mask, lengths, key = _prefill_jit(graphdef, state, ids, mask, knobs, key,
                                                              new_bucket=bucket(max_new_tokens), flags=flags)
    end_ids = set(np.asarray(eos).tolist()) - {-1}
    new = []
    for i in range(1, max_new_tokens + 1):
        host = np.asarray(tok, np.int64)  # [1]
        new.append(int(host[0]))
        streamer.put(host)
        if new[-1] in end_ids or i == max_new_tokens:
            break
        tok, seen, cache, key = _decode_jit(graphdef, state, jnp.int32(i), tok, seen, cache, cache_mask, lengths,
                                            knobs, key, flags=flags)
    return jnp.asarray([new], jnp.int32)
