"""The Llama model in flax.nnx: module tree and names mirror transformers' LlamaForCausalLM.

Decoder layers are one `DecoderLayer` module whose variables carry a leading [L] axis; `LlamaModel` scans it with
`jax.lax.scan`, so compile time does not grow with depth (or, with `scan_layers=False`, runs it as a Python loop over
the layers, each slicing its weights out of the stacked arrays). Axis letters: B batch, T query tokens, S key tokens,
D hidden, N query heads, K key/value heads, H head_dim, V vocab, L layers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fastlora_jax import remat
from fastlora_jax.attention import attention
from fastlora_jax.config import LlamaConfig
from fastlora_jax.linear import Linear, LoraLinear
from fastlora_jax.nf4 import NF4Linear
from fastlora_jax.rope import apply_rope, inverse_frequencies, rope_angles
from fastlora_jax.variables import TRAINABLE, Frozen, read

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class KVCache(NamedTuple):
    """Keys and values of every layer for generation: k, v [L, B, S, K, H]; `end` [B] tokens written so far."""

    k: jax.Array
    v: jax.Array
    end: jax.Array

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


class AttentionInputs(NamedTuple):
    """What every layer's attention needs besides its hidden states (computed once per forward)."""

    cos: jax.Array  # [B, T, H] float32
    sin: jax.Array  # [B, T, H] float32
    mask: jax.Array | None  # [B, 1, T, S] bool (padding / packed segments / cache slots), or None
    write_index: jax.Array | None  # [] int32 cache slot of the first query token (generation), else None
    causal: bool = True  # query t attends keys <= t on top of `mask` (False against a cache: the mask says it all)
    mlp_chunk: int | None = None  # tokens per MLP chunk (None: all at once)
    mlp_dequantize_once: bool = True  # NF4 MLP weights dequantized once per pass for all chunks, not once per chunk
    batch_sharding: object = None  # a jax.sharding.Mesh under FSDP/data parallelism: activations stay batch-sharded
    # packed rows' ragged layout (offsets [R, M + 1], lengths [R, M]; fastlora_jax.packed_attention), the same
    # segments as `mask`, which attention uses where cuDNN's ragged path does not apply
    segments: tuple[jax.Array, jax.Array] | None = None


def constrain_batch(x: jax.Array, mesh) -> jax.Array:
    """Pins an activation [B, ...] to batch sharding over ("data", "fsdp") on `mesh` (no-op without a mesh).

    Under FSDP the weights are sharded on their input features; without this pin XLA may shard activations on a
    feature axis instead, which cuDNN attention's partitioner rejects. Pinned, each weight is gathered (FSDP).
    """
    if mesh is None:
        return x
    from fastlora_jax.sharding import batch_sharding

    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, stack: tuple[int, ...] = ()):
        self.eps = eps
        self.weight = Frozen(jnp.ones((*stack, dim), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return read(self.weight) * normed.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs | None = None):
        shape = (vocab, dim)
        value = (jnp.zeros(shape, dtype) if rngs is None
                 else (jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02).astype(dtype))
        self.weight = Frozen(value)  # [V, D]

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(read(self.weight), ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:  # tied output head: [..., D] -> [..., V]
        return jnp.einsum("...d,vd->...v", h, read(self.weight, h.dtype))

    def dense_weight(self) -> jax.Array:
        """The [V, D] weight (the tied output head's too)."""
        return read(self.weight)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, stack, rngs, implementation: str):
        kw = dict(use_bias=config.attention_bias, dtype=dtype, stack=stack, rngs=rngs, implementation=implementation)
        d = config.hidden_size
        self.q_proj = Linear(d, config.q_size, **kw)
        self.k_proj = Linear(d, config.kv_size, **kw)
        self.v_proj = Linear(d, config.kv_size, **kw)
        self.o_proj = Linear(config.q_size, d, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)

    def __call__(self, x, inputs: AttentionInputs, cache_kv=None, rngs=(None,) * 4):
        B, T, _ = x.shape
        q = checkpoint_name(_call(self.q_proj, x, rngs[0]), "q_proj").reshape(B, T, self.num_heads, self.head_dim)
        k = checkpoint_name(_call(self.k_proj, x, rngs[1]), "k_proj").reshape(B, T, self.num_kv_heads, self.head_dim)
        v = checkpoint_name(_call(self.v_proj, x, rngs[2]), "v_proj").reshape(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, inputs.cos, inputs.sin), apply_rope(k, inputs.cos, inputs.sin)  # [B, T, N|K, H]
        q, k, v = (constrain_batch(t, inputs.batch_sharding) for t in (q, k, v))
        if cache_kv is not None:  # generation: write this step's keys/values, attend over the whole cache
            k_cache, v_cache = cache_kv  # [B, S, K, H]
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), inputs.write_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), inputs.write_index, axis=1)
            cache_kv = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), inputs.mask, causal=inputs.causal,
                        segments=inputs.segments)  # [B, T, N, H]
        out = checkpoint_name(out, "attention")
        y = _call(self.o_proj, out.reshape(B, T, self.num_heads * self.head_dim), rngs[3])
        return checkpoint_name(y, "o_proj"), cache_kv


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, stack, rngs, implementation: str):
        kw = dict(use_bias=config.mlp_bias, dtype=dtype, stack=stack, rngs=rngs, implementation=implementation)
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, **kw)
        self.up_proj = Linear(d, f, **kw)
        self.down_proj = Linear(f, d, **kw)

    def weights_for_chunks(self, tokens: int, dtype) -> tuple:
        """(gate, up, down): each NF4 projection's weight dequantized once for calls of `tokens` tokens in dtype,
        None for the others (16-bit weights are read in place)."""
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        return tuple(_weight_for_calls(layer, tokens, dtype) for layer in layers)

    def __call__(self, x, rngs=(None,) * 3, dequantized=(None,) * 3):  # [B, T, D] -> [B, T, D]
        """`dequantized`: `weights_for_chunks(T * B, x.dtype)`, or Nones (each NF4 weight dequantized in the call)."""
        gate = checkpoint_name(_call(self.gate_proj, x, rngs[0], dequantized[0]), "gate_proj")
        up = checkpoint_name(_call(self.up_proj, x, rngs[1], dequantized[1]), "up_proj")
        return checkpoint_name(_call(self.down_proj, jax.nn.silu(gate) * up, rngs[2], dequantized[2]), "down_proj")


def _weight_for_calls(layer, tokens: int, dtype) -> jax.Array | None:
    """The weight of an NF4 layer (bare or under LoRA) dequantized for many calls (NF4Linear.weight_for_calls);
    None for any other layer."""
    base = layer.base if isinstance(layer, LoraLinear) else layer
    return base.weight_for_calls(tokens, dtype) if isinstance(base, NF4Linear) else None


def _call(layer, x, rng, dequantized=None):
    """Calls a linear layer: only LoRA layers take the dropout rng (the frozen projections `target_modules` leaves
    out take none); NF4 ones, bare or under LoRA, may take their weight already dequantized."""
    args = (x, rng) if rng is not None and isinstance(layer, LoraLinear) else (x,)
    return layer(*args) if dequantized is None else layer(*args, dequantized=dequantized)


class DecoderLayer(nnx.Module):
    """All decoder layers at once: every variable has a leading [L] axis; `__call__` sees one layer's slice."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs | None, implementation: str = "auto"):
        stack = (config.num_hidden_layers,)
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, stack=stack)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, dtype=dtype, stack=stack, rngs=rngs, implementation=implementation)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, stack=stack, rngs=rngs, implementation=implementation)

    def __call__(self, x, inputs: AttentionInputs, cache_kv=None, rng=None):  # x [B, T, D]
        rngs = (None,) * 7 if rng is None else tuple(jax.random.split(rng, 7))
        x = checkpoint_name(constrain_batch(x, inputs.batch_sharding), "layer_input")
        attn_out, cache_kv = self.self_attn(self.input_layernorm(x), inputs, cache_kv, rngs[:4])
        x = x + attn_out
        return x + self._mlp_block(x, rngs[4:], inputs.mlp_chunk, inputs.mlp_dequantize_once), cache_kv

    def _mlp_block(self, x, rngs, chunk: int | None, dequantize_once: bool):
        """post_attention_layernorm + MLP, over token chunks of `chunk` (each recomputed in the backward pass). With
        `dequantize_once`, NF4 MLP weights are dequantized before the chunk loop (once in each pass, 352 MB of bf16
        held during the loop for 8B), not in every chunk."""
        B, T, D = x.shape
        if chunk is None or B * T <= chunk:
            return self.mlp(self.post_attention_layernorm(x), rngs)
        n = -(-B * T // chunk)
        flat = x.reshape(B * T, D)
        if n * chunk != B * T:
            flat = jnp.pad(flat, ((0, n * chunk - B * T), (0, 0)))
        dequantized = (None,) * 3
        if dequantize_once:
            dtype = jax.eval_shape(self.post_attention_layernorm, flat[:1]).dtype  # the MLP's input dtype
            dequantized = self.mlp.weights_for_chunks(chunk, dtype)

        @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        def one(_, xs):
            xc, i = xs  # [C, D], chunk index
            chunk_rngs = tuple(None if r is None else jax.random.fold_in(r, i) for r in rngs)
            return None, self.mlp(self.post_attention_layernorm(xc[None]), chunk_rngs, dequantized)[0]

        _, out = jax.lax.scan(one, None, (flat.reshape(n, chunk, D), jnp.arange(n)))  # [n, C, D]
        return out.reshape(n * chunk, D)[: B * T].reshape(B, T, D)


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs | None, implementation: str = "auto"):
        self.config = config
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = DecoderLayer(config, dtype=dtype, rngs=rngs, implementation=implementation)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.gradient_checkpointing: bool | str = False  # a fastlora_jax.remat mode
        self.mlp_chunk_size: int | None = None  # tokens per MLP chunk; None: the checkpointing mode's default
        # True: NF4 MLP weights are dequantized once per pass before the chunk loop, not in each chunk (8B QLoRA
        # "unsloth": 3.1% faster, peak 0.03 GiB higher; benchmarks/RESULTS.md, session 18). False: in each chunk.
        self.mlp_dequantize_once = True
        # True: the layers run under one jax.lax.scan (compile time flat in depth). False: a Python loop of per-layer
        # checkpoints (training forward only; generation and "long_context" always scan): compiles several times
        # longer (8B: 27-55 s against 4-13 s), but no copies of saved activations into the scan's stacked residuals
        # ("dots": 8B +3%, 1B +4.6%; "unsloth" no faster with it and 25.2 instead of 17.6 GiB on 8B;
        # benchmarks/RESULTS.md, sessions 3 and 4).
        self.scan_layers = True
        self.mesh = None  # set by fastlora_jax.sharding.shard_model / from_pretrained(mesh=...)

    def __call__(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None,
                 cache: KVCache | None = None, dropout_rng=None, segment_offsets=None, segment_lengths=None):
        """input_ids [B, T] -> (hidden states [B, T, D] after the final norm, updated cache or None).

        segment_offsets / segment_lengths: the ragged layout of `segment_ids` (`packed_attention.segment_layout`;
        SFTTrainer's packed batches carry it); with it, packed rows' attention runs on cuDNN's ragged path where that
        applies (same results, less time). Ignored under a mesh, with an attention_mask or a cache."""
        x = self.embed_tokens(input_ids)  # [B, T, D]
        inputs, positions = _attention_inputs(input_ids, attention_mask, positions, segment_ids, cache)
        if (segment_ids is not None and segment_offsets is not None and segment_lengths is not None
                and attention_mask is None and cache is None and self.mesh is None):
            inputs = inputs._replace(segments=(jnp.asarray(segment_offsets), jnp.asarray(segment_lengths)))
        inputs = inputs._replace(**dict(zip(("cos", "sin"), rope_angles(positions, inverse_frequencies(self.config)))))
        mode = self.gradient_checkpointing
        inputs = inputs._replace(mlp_chunk=self.mlp_chunk_size or remat.mlp_chunk_size(mode), batch_sharding=self.mesh,
                                 mlp_dequantize_once=self.mlp_dequantize_once)
        L = self.config.num_hidden_layers
        layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, L)
        k = remat.layers_per_block(mode, L)
        if cache is None and k == 1 and not self.scan_layers:
            return self.norm(self._layer_loop(x, inputs, layer_rngs)), None
        graphdef, state = nnx.split(self.layers)

        def body(x, per_layer):
            layer_state, cache_kv, rng = per_layer
            y, cache_kv = nnx.merge(graphdef, layer_state)(x, inputs, cache_kv, rng)
            return y, cache_kv

        body = remat.checkpoint_layer(body, mode)
        if cache is None and k > 1:  # blocks of k layers: only each block's input is offloaded
            def block(x, per_block):
                x = checkpoint_name(x, remat.BLOCK_INPUT)
                return jax.lax.scan(body, x, per_block)[0], None

            blocks = jax.tree.map(lambda a: a.reshape(L // k, k, *a.shape[1:]), (state, None, layer_rngs))
            x, _ = jax.lax.scan(remat.checkpoint_block(block), x, blocks)
            return self.norm(x), None
        cache_kv = None if cache is None else (cache.k, cache.v)
        x, new_kv = jax.lax.scan(body, x, (state, cache_kv, layer_rngs))
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_kv[0], new_kv[1], cache.end + input_ids.shape[1])
        return self.norm(x), new_cache

    def _layer_loop(self, x, inputs: AttentionInputs, layer_rngs):
        """The decoder layers as a Python loop (scan_layers=False): no scan, so saved activations are never copied
        into stacked residual arrays. Layer i slices its frozen weights out of the stacked arrays inside its own
        checkpoint, so the slices are redone in the backward pass rather than kept alive (13 GiB for 8B)."""
        graphdef, trainable, frozen = nnx.split(self.layers, TRAINABLE, ...)

        def layer(i, x, trainable_i, frozen, rng):
            x, frozen = jax.lax.optimization_barrier((x, frozen))  # no slice before this layer's input exists
            frozen_i = jax.tree.map(lambda a: jax.lax.index_in_dim(a, i, keepdims=False), frozen)
            return nnx.merge(graphdef, trainable_i, frozen_i)(x, inputs, None, rng)[0]

        for i in range(self.config.num_hidden_layers):
            trainable_i = jax.tree.map(lambda a: jax.lax.index_in_dim(a, i, keepdims=False), trainable)
            rng = None if layer_rngs is None else layer_rngs[i]
            x = remat.checkpoint_loop_layer(functools.partial(layer, i), self.gradient_checkpointing)(
                x, trainable_i, frozen, rng)
        return x


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, T] that restart at 0 where the segment id changes (packed rows)."""
    B, T = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # [B, T] index of each segment's first token
    return index - first


def _attention_inputs(input_ids, attention_mask, positions, segment_ids, cache):
    """Positions [B, T] and the attention mask [B, 1, T, S] (None when plain causal attention suffices)."""
    B, T = input_ids.shape
    if cache is None:
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if attention_mask is None and segment_ids is None:
            return AttentionInputs(None, None, None, None), positions
        mask = jnp.ones((B, T, T), bool)  # [B, T, S=T]; causality is added by the attention itself
        if attention_mask is not None:
            mask &= attention_mask.astype(bool)[:, None, :]
        if segment_ids is not None:
            mask &= segment_ids[:, None, :] == segment_ids[:, :, None]
        return AttentionInputs(None, None, mask[:, None], None), positions
    # Generation: keys are the cache slots [0, S); the new tokens go to slots [end, end + T).
    S = cache.k.shape[2]
    start = cache.end[0]
    slots = start + jnp.arange(T)  # [T]
    if positions is None:
        positions = jnp.broadcast_to(slots, (B, T)).astype(jnp.int32)
    key_slot = jnp.arange(S)
    mask = key_slot[None, None, :] <= slots[None, :, None]  # [1, T, S]
    if attention_mask is not None:  # [B, S]: which cache slots hold real tokens
        mask = mask & attention_mask.astype(bool)[:, None, :]
    mask = jnp.broadcast_to(mask, (B, T, S))
    return AttentionInputs(None, None, mask[:, None], start, causal=False), positions


class Llama(nnx.Module):
    """LlamaForCausalLM: `model(input_ids, attention_mask=None) -> logits [B, T, V]`."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 implementation: str = "auto"):
        self.config = config
        self.name_or_path = ""  # where the base model was loaded from (for adapter configs)
        self.max_seq_length = 2048
        self.peft_config = None  # a fastlora_jax.lora.LoraConfig once get_peft_model has run
        self.merged_peft_config = None  # the LoraConfig folded in by merge_and_unload (what unmerge undoes)
        self.training = True  # FastLanguageModel.for_inference / for_training switch it
        self.model = LlamaModel(config, dtype=dtype, rngs=rngs, implementation=implementation)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs,
                               implementation=implementation))

    @property
    def dtype(self):
        return self.model.embed_tokens.weight[...].dtype

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, dropout_rng=None,
                 segment_offsets=None, segment_lengths=None):
        hidden, _ = self.model(input_ids, attention_mask=attention_mask, positions=positions,
                               segment_ids=segment_ids, dropout_rng=dropout_rng, segment_offsets=segment_offsets,
                               segment_lengths=segment_lengths)
        return self.logits(hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output head: hidden [..., D] -> logits [..., V] in the model dtype."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ PEFT-style methods (implemented elsewhere)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as PEFT counts them."""
        from fastlora_jax import lora

        return lora.get_nb_trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line: `trainable params: N || all params: M || trainable%: P`."""
        from fastlora_jax import lora

        lora.print_trainable_parameters(self)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Writes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
        from fastlora_jax import export

        export.save_pretrained(self, save_directory, **kwargs)

    def load_adapter(self, adapter_directory: str, **kwargs):
        """Loads a PEFT adapter directory into this model."""
        from fastlora_jax import export

        return export.load_adapter(self, adapter_directory, **kwargs)

    def save_pretrained_merged(self, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                               **kwargs) -> None:
        """Writes a merged checkpoint ("merged_16bit", "merged_4bit") or the adapter alone ("lora")."""
        from fastlora_jax import export

        export.save_pretrained_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)

    def save_pretrained_gguf(self, save_directory: str, tokenizer=None, quantization_method: str = "fast_quantized",
                             **kwargs) -> str | list[str]:
        """Writes a GGUF file of the merged model ("f32", "f16", "bf16", "q8_0"; Unsloth's default "fast_quantized"
        is q8_0; a list: one file each); returns its path (a list of paths for a list)."""
        from fastlora_jax import export

        return export.save_pretrained_gguf(self, save_directory, tokenizer, quantization_method=quantization_method,
                                    **kwargs)

    def push_to_hub(self, repo_id: str | None = None, *args, **kwargs):
        """Not implemented: fastlora-jax never reaches the network. Save locally, then upload the directory."""
        _no_hub("push_to_hub", "model.save_pretrained(directory)")

    def push_to_hub_merged(self, repo_id: str | None = None, *args, **kwargs):
        """Not implemented: fastlora-jax never reaches the network. Save locally, then upload the directory."""
        _no_hub("push_to_hub_merged", "model.save_pretrained_merged(directory, tokenizer, save_method=...)")

    def push_to_hub_gguf(self, repo_id: str | None = None, *args, **kwargs):
        """Not implemented: fastlora-jax never reaches the network. Save locally, then upload the directory."""
        _no_hub("push_to_hub_gguf", "model.save_pretrained_gguf(directory, tokenizer, quantization_method=...)")

    def merge_and_unload(self) -> "Llama":
        """A plain model with the adapters folded into the base weights."""
        from fastlora_jax import export

        return export.merge_and_unload(self)

    def unmerge(self) -> "Llama":
        """Undoes a merge where the adapters are still known."""
        from fastlora_jax import export

        return export.unmerge(self)

    def generate(self, input_ids, max_new_tokens: int | None = None, **kwargs):
        """Autoregressive generation with a KV cache (see fastlora_jax.generate.generate)."""
        from fastlora_jax import generate

        return generate.generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)


def _no_hub(method: str, save_call: str):
    raise NotImplementedError(f"{method}: fastlora-jax does not upload to the Hugging Face Hub (nothing here reaches "
                              f"the network); write the files with {save_call}, then upload that directory with "
                              "huggingface_hub (`hf upload <repo_id> <directory>`)")
