"""Merged Hugging Face checkpoints of a (LoRA) model: 16-bit or bitsandbytes-NF4 transformers directories.

The merge runs one weight of one layer at a time, on the device, in float32 (precision HIGHEST, so GPUs do not
round through TF32): W' = dequantize(W) + scale * A @ B, then cast; modules_to_save copies and trained biases
replace their originals. Tensors stream into safetensors shards of at most `max_shard_size` (with
`model.safetensors.index.json` when there is more than one), inside a staged directory (converters/atomic.py).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.converters import atomic

MAX_SHARD_SIZE = "5GB"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
STALE = ("model.safetensors", "model-*-of-*.safetensors", INDEX_NAME)
"""Files of an older checkpoint in the same directory that a new save must not leave behind."""
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_HIGHEST = jax.lax.Precision.HIGHEST


def parse_size(size: int | str) -> int:
    """"5GB" -> 5 * 10**9, "500MiB" -> 500 * 2**20, an int -> itself (transformers' convention)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+)\s*(B|KB|MB|GB|KIB|MIB|GIB)\s*", str(size).upper())
    if m is None:
        raise ValueError(f"max_shard_size={size!r}; accepted: a positive int (bytes) or a string such as '5GB', "
                         "'500MB', '2GiB'")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[m.group(2)]
    return int(m.group(1)) * unit


def resolve_dtype(dtype, model) -> jnp.dtype:
    """None -> the model's 16-bit dtype (float32 stays float32); else "bfloat16" / "float16" / "float32" (a name,
    a jnp or a torch dtype)."""
    if dtype is None:
        return jnp.dtype(model.dtype)
    from fastlora_jax.loading import dtype_name

    name = dtype_name(dtype)
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; accepted: None (the model's dtype), {', '.join(map(repr, _DTYPES))}")
    return jnp.dtype(_DTYPES[name])


# ----------------------------------------------------------------------------------------------- merged weights

def linear_weight(module, layer: int | None) -> jax.Array:
    """The effective weight [out, in] (HF layout) of one linear layer, float32: base (dequantized) + LoRA delta."""
    from fastlora_jax.linear import Linear
    from fastlora_jax.modules_to_save import SavedLinear
    from fastlora_jax.nf4 import NF4Linear, dequantize_nf4

    lora = hasattr(module, "lora_a")
    base = module.base if lora else module
    pick = (lambda x: x) if layer is None else (lambda x: x[layer])
    if isinstance(base, SavedLinear):
        w = pick(base.trainable_weight[...]).astype(jnp.float32).T
    elif isinstance(base, NF4Linear):
        w = dequantize_nf4(pick(base.nf4())).astype(jnp.float32)  # [out, in], rounded to its dtype as bnb
    elif isinstance(base, Linear):
        w = pick(base.weight[...]).astype(jnp.float32).T
    else:
        raise TypeError(f"cannot merge a {type(base).__name__} layer; known: Linear, NF4Linear, SavedLinear")
    if lora:
        a, b = pick(module.lora_a[...]), pick(module.lora_b[...])  # [in, r], [r, out]
        scale = pick(module.layer_scale[...])
        w = w + scale * jnp.matmul(b.T, a.T, precision=_HIGHEST)  # [out, in]
    return w


def linear_bias(module, layer: int | None) -> jax.Array | None:
    base = module.base if hasattr(module, "lora_a") else module
    if base.bias is None:
        return None
    return base.bias[...] if layer is None else base.bias[...][layer]


def embed_weight(model) -> jax.Array:
    """[V, D]: the modules_to_save copy when the embedding trains, else the frozen embedding."""
    embed = model.model.embed_tokens
    return (embed.trainable_weight if hasattr(embed, "trainable_weight") else embed.weight)[...]


def merged_plan(model) -> list[tuple[str, Callable[[], jax.Array], str]]:
    """(HF key, getter of the merged float32 HF-layout array, kind) in transformers' order; kind is "linear" for
    the decoder projection weights (what a 4-bit export quantizes), else "other"."""
    mc, layers = model.config, model.model.layers
    plan: list[tuple[str, Callable[[], jax.Array], str]] = [
        ("model.embed_tokens.weight", lambda: embed_weight(model), "other")]
    for i in range(mc.num_hidden_layers):
        p = f"model.layers.{i}"
        plan.append((f"{p}.input_layernorm.weight", lambda i=i: layers.input_layernorm.weight[...][i], "other"))
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            parent, child = path.split(".")
            module = getattr(getattr(layers, parent), child)
            plan.append((f"{p}.{path}.weight", lambda m=module, i=i: linear_weight(m, i), "linear"))
            if linear_bias(module, None) is not None:
                plan.append((f"{p}.{path}.bias", lambda m=module, i=i: linear_bias(m, i), "other"))
        plan.append((f"{p}.post_attention_layernorm.weight",
                     lambda i=i: layers.post_attention_layernorm.weight[...][i], "other"))
    plan.append(("model.norm.weight", lambda: model.model.norm.weight[...], "other"))
    if not mc.tie_word_embeddings:
        plan.append(("lm_head.weight", lambda: linear_weight(model.lm_head, None), "other"))
    return plan


def merged_tensors(model, dtype=jnp.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF key, host array in `dtype`), one merged tensor at a time."""
    for key, get, _ in merged_plan(model):
        yield key, np.asarray(jax.device_get(get().astype(dtype)))


def merged_4bit_tensors(model, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """As merged_tensors, with every decoder projection weight quantized to bitsandbytes NF4 (six tensors each)."""
    from fastlora_jax.converters import bnb
    from fastlora_jax.nf4 import quantize_nf4

    for key, get, kind in merged_plan(model):
        value = np.asarray(jax.device_get(get().astype(dtype)))
        if kind == "linear":
            yield from bnb.nf4_to_bnb_tensors(key[:-len(".weight")], quantize_nf4(value)).items()
        else:
            yield key, value


# ----------------------------------------------------------------------------------------------- files

def write_shards(directory: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_size: int | str) -> list[str]:
    """Writes safetensors shards (each at most max_shard_size bytes unless one tensor is bigger) and, for more
    than one shard, the index; returns the file names. Holds one shard's tensors at a time."""
    limit = parse_size(max_shard_size)
    parts: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    shard: list[tuple[str, np.ndarray]] = []
    size = 0
    seen: set[str] = set()

    def flush():
        name = f".shard-{len(parts):05d}"
        specs = [atomic.TensorSpec(k, tuple(a.shape), a.dtype) for k, a in shard]
        atomic.write_safetensors(os.path.join(directory, name), specs, [a for _, a in shard], {"format": "pt"})
        parts.append(name)
        weight_map.update({k: name for k, _ in shard})

    for key, array in tensors:
        if key in seen:
            raise ValueError(f"duplicate tensor key {key!r}")
        seen.add(key)
        if shard and size + array.nbytes > limit:
            flush()
            shard, size = [], 0
        shard.append((key, array))
        size += array.nbytes
        total += array.nbytes
    if shard or not parts:
        flush()
    n = len(parts)
    names = {p: WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, p in enumerate(parts)}
    for part, name in names.items():
        os.replace(os.path.join(directory, part), os.path.join(directory, name))
    if n == 1:
        return [WEIGHTS_NAME]
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[p] for k, p in sorted(weight_map.items())}}
    atomic.write_json(os.path.join(directory, INDEX_NAME), index)
    return [*names.values(), INDEX_NAME]


def hf_config_dict(model, dtype, quantization_config: dict | None = None) -> dict[str, Any]:
    """config.json of the merged model: the model's LlamaConfig plus the stored dtype (and quantization)."""
    config = model.config.to_hf_config()
    config["dtype"] = np.dtype(dtype).name
    if model.name_or_path:
        config["_name_or_path"] = str(model.name_or_path)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def generation_config_dict(model) -> dict[str, Any]:
    """generation_config.json: the base checkpoint's when it has one, else the special tokens of the config."""
    source = str(model.name_or_path or "")
    source = os.path.dirname(source) if os.path.isfile(source) else source  # a GGUF file: its directory
    path = os.path.join(source, "generation_config.json")
    if source and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    mc = model.config
    out = {"_from_model_config": True, "bos_token_id": mc.bos_token_id, "eos_token_id": mc.eos_token_id}
    if mc.pad_token_id is not None:
        out["pad_token_id"] = mc.pad_token_id
    return out


def save_tokenizer(directory: str, tokenizer) -> None:
    """tokenizer.save_pretrained into a staging directory (flat files only), or a warning when there is none."""
    if tokenizer is None:
        warnings.warn("no tokenizer given: the checkpoint has no tokenizer files (pass tokenizer=...)", stacklevel=3)
        return
    tokenizer.save_pretrained(directory)


def write_checkpoint(save_directory: str, model, tokenizer, *, dtype, tensors: Iterator[tuple[str, np.ndarray]],
                     quantization_config: dict | None = None, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """A transformers checkpoint directory: shards (+ index), config.json, generation_config.json, tokenizer.
    Refuses a directory that holds a PEFT adapter: every loader would load the adapter instead of this checkpoint."""
    from fastlora_jax.converters.peft import CONFIG_NAME

    if os.path.isfile(os.path.join(save_directory, CONFIG_NAME)):
        raise FileExistsError(f"{save_directory!r} holds a PEFT adapter ({CONFIG_NAME}): transformers and "
                              "fastlora-jax would load that adapter, not the merged checkpoint. Save it to another "
                              "directory, or remove the adapter's files first")
    with atomic.staged_directory(save_directory, commit_last=(INDEX_NAME, "config.json"), stale=STALE) as stage:
        write_shards(stage, tensors, max_shard_size)
        atomic.write_json(os.path.join(stage, "generation_config.json"), generation_config_dict(model))
        save_tokenizer(stage, tokenizer)
        atomic.write_json(os.path.join(stage, "config.json"), hf_config_dict(model, dtype, quantization_config))
