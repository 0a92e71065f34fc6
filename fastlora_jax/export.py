"""Back to Hugging Face: the model's save / load / merge methods (`Llama.save_pretrained`, `load_adapter`, ...).

- save_pretrained: a PEFT adapter directory (a LoRA model) or a transformers checkpoint (a plain model).
- load_adapter / load_adapter_model: PEFT adapter directories into our model (PEFT's outputs, to float32 rounding).
- save_pretrained_merged: "merged_16bit", "merged_4bit" (bitsandbytes NF4) or "lora"; save_pretrained_gguf.
- merge_and_unload / unmerge: fold the adapters into the base weights in place, and take them out again.
Every file is written through fastlora_jax.converters.atomic (temporary name, then rename).
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastlora_jax.converters import atomic, merge, peft

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
GGUF_METHODS = ("f32", "f16", "bf16", "q8_0")
_GGUF_ALIASES = {"not_quantized": None, "fast_quantized": "q8_0"}  # Unsloth's names
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "chat_template.jinja")


class MergedLora(nnx.Variable):
    """LoRA factors folded into a base weight by `merge_and_unload`, kept so that `unmerge` can take them out."""


# --------------------------------------------------------------------------------------------------- adapters

def save_pretrained(model, save_directory: str, *, tokenizer=None, safe_serialization: bool = True,
                    is_main_process: bool = True, selected_adapters=None, save_embedding_layers="auto",
                    max_shard_size: int | str = merge.MAX_SHARD_SIZE) -> None:
    """A LoRA model writes a PEFT adapter directory (adapter_config.json, adapter_model.safetensors); a plain
    model (no adapters, or after merge_and_unload) writes a transformers checkpoint in its own dtype.

    tokenizer: also written into the directory, as Unsloth users do with `tokenizer.save_pretrained(dir)`.
    save_embedding_layers: "auto" (PEFT's default: a LoRA-targeted lm_head's base weight is written too) or False.
    """
    if not safe_serialization:
        raise ValueError("safe_serialization=False (pickled .bin files) is not supported; safetensors only")
    if selected_adapters not in (None, ["default"], ("default",)):
        raise ValueError(f"selected_adapters={selected_adapters!r}; the model holds one adapter, 'default'")
    if not is_main_process:
        return
    if model.peft_config is None:
        merge.write_checkpoint(save_directory, model, tokenizer, dtype=model.dtype, max_shard_size=max_shard_size,
                               tensors=merge.merged_tensors(model, model.dtype))
        return
    init = str(model.peft_config.init_lora_weights)
    if init.startswith(("pissa", "olora", "loftq")):
        randomized = (" The randomized SVD of pissa_niter_K gives the same residual again only with the same random "
                      "state: fastlora-jax's loader uses random_state=3407, PEFT's torch's global RNG."
                      if init.startswith("pissa_niter") else "")
        warnings.warn(f"init_lora_weights={init!r}: the adapter is relative to the base weights this init replaced "
                      "(PiSSA, OLoRA: their residual; LoftQ: their NF4 dequantization); PEFT and fastlora-jax "
                      "recompute them from the original base when they load the adapter (as for PEFT's own saves)."
                      + randomized, stacklevel=3)
    config = peft.adapter_config_dict(model.peft_config, model.name_or_path)
    tensors = peft.adapter_tensors(model, save_embedding_layers)
    with atomic.staged_directory(save_directory, commit_last=(peft.CONFIG_NAME,),
                                 stale=(peft.WEIGHTS_NAME,)) as stage:
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        peft.write_adapter(stage, config, tensors)


def load_adapter(model, adapter_directory: str, *, adapter_name: str = "default", is_trainable: bool = True,
                 use_gradient_checkpointing=None):
    """Loads a PEFT LoRA adapter directory into `model` (in place) and returns it.

    A model without adapters gets them first (get_peft_model with the adapter's config); a LoRA model must already
    have the adapter's structure (r, alpha, rsLoRA, targets, layers, bias, modules_to_save). Anything that does not
    fit (other r, a target the model lacks, another base shape) raises ValueError naming the mismatch, before the
    model is changed. is_trainable is accepted for PEFT compatibility (our LoRA parameters are always trainable).
    """
    del is_trainable
    from fastlora_jax import lora

    if adapter_name != "default":
        raise ValueError(f"adapter_name={adapter_name!r}; the model holds one adapter, 'default'")
    where = os.path.join(str(adapter_directory), peft.CONFIG_NAME)
    adapter_config = peft.read_adapter_config(adapter_directory)
    kwargs = peft.lora_kwargs(adapter_config, where)
    tensors = peft.read_adapter_tensors(adapter_directory)
    _check_tying(model, adapter_config, where)
    wanted = _config(model, kwargs, where)
    weights = os.path.join(str(adapter_directory), peft.WEIGHTS_NAME)
    if model.peft_config is None:
        mode = "unsloth" if use_gradient_checkpointing is None else use_gradient_checkpointing
        shapes_only = {**kwargs, "init_lora_weights": True, "loftq_config": None}  # the init changes no shape
        abstract = nnx.eval_shape(lambda: lora.get_peft_model(_skeleton(model), **shapes_only))
        peft.load_adapter_tensors(abstract, tensors, weights, check_only=True)
        lora.get_peft_model(model, use_gradient_checkpointing=mode, **kwargs)
    else:
        _check_same_structure(model, wanted, where)
        if use_gradient_checkpointing is not None:
            from fastlora_jax import remat

            model.model.gradient_checkpointing = remat.validate(use_gradient_checkpointing)
    peft.load_adapter_tensors(model, tensors, weights)
    return model


def load_adapter_model(adapter_directory: str, *, use_gradient_checkpointing=None, **from_pretrained_kwargs):
    """`FastLanguageModel.from_pretrained(adapter_dir)`: loads the base named by adapter_config.json's
    base_model_name_or_path (a local path, also relative to the adapter directory, a cached repo id or an alias),
    applies the adapter's LoRA config and loads its weights. Returns (model, tokenizer); the tokenizer comes from
    the adapter directory when it holds one, else from the base. use_gradient_checkpointing: the LoRA model's
    remat mode (None: "unsloth", as Unsloth's from_pretrained default)."""
    from fastlora_jax.fast_language_model import FastLanguageModel

    adapter_directory = str(adapter_directory)
    config = peft.read_adapter_config(adapter_directory)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{os.path.join(adapter_directory, peft.CONFIG_NAME)} names no base_model_name_or_path; "
                         "load the base with FastLanguageModel.from_pretrained(base) and call "
                         "model.load_adapter(adapter_dir)")
    if not os.path.exists(base) and os.path.exists(os.path.join(adapter_directory, base)):
        base = os.path.join(adapter_directory, base)
    if os.path.exists(base) and os.path.samefile(base, adapter_directory):
        raise ValueError(f"{adapter_directory!r}: adapter_config.json names the adapter itself as its base model")
    model, tokenizer = FastLanguageModel.from_pretrained(base, **from_pretrained_kwargs)
    load_adapter(model, adapter_directory, use_gradient_checkpointing=use_gradient_checkpointing)
    if any(os.path.exists(os.path.join(adapter_directory, n)) for n in _TOKENIZER_FILES[:3]):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_directory)
    return model, tokenizer


def _config(model, kwargs: dict, where: str):
    """The LoraConfig the adapter describes, resolved against the model (ValueError naming a bad target)."""
    from fastlora_jax import lora

    fields = dict(kwargs)
    for key in ("target_modules", "layers_pattern", "modules_to_save"):
        if isinstance(fields[key], list):
            fields[key] = tuple(fields[key])
    if isinstance(fields["layers_to_transform"], list):
        fields["layers_to_transform"] = tuple(fields["layers_to_transform"])
    try:
        config = lora.LoraConfig(**fields)
        lora.plan(config, model.config)
    except (ValueError, NotImplementedError) as e:
        raise type(e)(f"{where} does not fit the model: {e}") from None
    return config


def _check_same_structure(model, wanted, where: str) -> None:
    from fastlora_jax import lora

    have = model.peft_config
    diffs = [f"{name}: adapter {getattr(wanted, name)!r}, model {getattr(have, name)!r}"
             for name in ("r", "use_rslora") if getattr(wanted, name) != getattr(have, name)]
    if not diffs and not np.isclose(wanted.scaling, have.scaling):
        diffs.append(f"lora_alpha: adapter {wanted.lora_alpha!r}, model {have.lora_alpha!r}")
    p_want, p_have = lora.plan(wanted, model.config), lora.plan(have, model.config)
    for field in ("lora", "biases", "saved"):
        if getattr(p_want, field) != getattr(p_have, field):
            what = {"lora": "LoRA layers", "biases": "trained biases", "saved": "modules_to_save"}[field]
            diffs.append(f"{what}: adapter {getattr(p_want, field)!r}, model {getattr(p_have, field)!r}")
    if diffs:
        raise ValueError(f"{where} does not fit the model's LoRA adapters ({'; '.join(diffs)}); load it into a "
                         "model without adapters to get the adapter's structure")


def _check_tying(model, adapter_config: dict, where: str) -> None:
    """A tied model shares one modules_to_save copy between embedding and head (PEFT's ensure_weight_tying)."""
    saved = adapter_config.get("modules_to_save") or ()
    if (model.config.tie_word_embeddings and any(m.split(".")[-1] in ("embed_tokens", "lm_head") for m in saved)
            and not adapter_config.get("ensure_weight_tying", False)):
        raise NotImplementedError(
            f"{where}: modules_to_save={saved!r} on a model with tied embeddings and ensure_weight_tying=false: PEFT "
            "then trains the embedding and the head apart; fastlora-jax keeps them tied (ensure_weight_tying=True)")


def _skeleton(model):
    """A fresh 16-bit Llama of the same config (used abstractly, to check an adapter before changing `model`)."""
    from fastlora_jax.model import Llama

    return Llama(model.config, dtype=model.dtype)


# --------------------------------------------------------------------------------------------------- exports

def save_pretrained_merged(model, save_directory: str, tokenizer=None, *, save_method: str = "merged_16bit",
                           dtype=None, max_shard_size: int | str = merge.MAX_SHARD_SIZE,
                           safe_serialization: bool = True) -> None:
    """Writes a merged transformers checkpoint, or the adapter alone.

    save_method: "merged_16bit" (the LoRA deltas folded into the base in float32, layer by layer, then cast to
      `dtype`; a 4-bit base is dequantized first), "merged_4bit" (the same, then every decoder projection quantized
      to bitsandbytes NF4 with double quantization: transformers + bitsandbytes load it), or "lora" (the PEFT
      adapter directory, as save_pretrained).
    dtype: None keeps the model's dtype where it is 16-bit; "merged_16bit" writes a float32 model (the CPU default)
      in bfloat16, as its name says ("merged_4bit" keeps float32 beside its NF4 weights); or "bfloat16", "float16",
      "float32" (a name, a jnp or a torch dtype).
    Shards hold at most max_shard_size bytes ("5GB"), with model.safetensors.index.json when there are several.
    """
    if not safe_serialization:
        raise ValueError("safe_serialization=False (pickled .bin files) is not supported; safetensors only")
    if save_method == "merged_4bit_forced":  # Unsloth's spelling
        save_method = "merged_4bit"
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r}; accepted: {', '.join(map(repr, SAVE_METHODS))}")
    if save_method == "lora":
        if model.peft_config is None:
            raise ValueError("save_method='lora' needs a model with LoRA adapters (this one has none)")
        save_pretrained(model, save_directory, tokenizer=tokenizer)
        return
    if save_method == "merged_16bit" and dtype is None and jnp.dtype(model.dtype) == jnp.float32:
        dtype = jnp.bfloat16  # 16 bits, as Unsloth's merged_16bit: its models compute in 16 bits
    dtype = merge.resolve_dtype(dtype, model)
    if save_method == "merged_16bit":
        merge.write_checkpoint(save_directory, model, tokenizer, dtype=dtype, max_shard_size=max_shard_size,
                               tensors=merge.merged_tensors(model, dtype))
        return
    from fastlora_jax.converters import bnb

    merge.write_checkpoint(save_directory, model, tokenizer, dtype=dtype, max_shard_size=max_shard_size,
                           tensors=merge.merged_4bit_tensors(model, dtype),
                           quantization_config=bnb.quantization_config(np.dtype(dtype).name))


def save_pretrained_gguf(model, save_directory: str, tokenizer=None, *, quantization_method: str = "fast_quantized",
                         file_name: str | None = None) -> str | list[str]:
    """Writes `<save_directory>/model.<METHOD>.gguf` of the merged model (tokenizer and chat template included
    when a tokenizer is given) and returns its path. quantization_method: "f32", "f16", "bf16" or "q8_0" (Unsloth's
    "not_quantized" is the model's 16-bit type, "fast_quantized", Unsloth's default, is q8_0), or a list of them
    (as Unsloth: one file each, their paths returned as a list). Unsloth's llama.cpp k-quants ("quantized" =
    "q4_k_m", "q5_k_m", ...) are not written here and raise ValueError."""
    from fastlora_jax.converters import gguf

    if isinstance(quantization_method, (list, tuple)):
        if file_name is not None or not quantization_method:
            raise ValueError(f"quantization_method={quantization_method!r} with file_name={file_name!r}; accepted: "
                             "a non-empty list of methods without file_name (each file is named by its method)")
        return [save_pretrained_gguf(model, save_directory, tokenizer, quantization_method=m)
                for m in quantization_method]
    method = quantization_method.lower() if isinstance(quantization_method, str) else quantization_method
    if method in _GGUF_ALIASES:
        method = _GGUF_ALIASES[method] or ("bf16" if model.dtype == jnp.bfloat16 else "f16")
    if method not in GGUF_METHODS:
        raise ValueError(f"quantization_method={quantization_method!r}; accepted: "
                         f"{', '.join(map(repr, GGUF_METHODS + tuple(_GGUF_ALIASES)))}")
    if tokenizer is None:
        warnings.warn("save_pretrained_gguf without a tokenizer: the GGUF has no vocabulary (pass tokenizer=...)",
                      stacklevel=3)
    name = file_name or f"model.{method.upper()}.gguf"
    hf_config = merge.hf_config_dict(model, jnp.float32)
    with atomic.staged_directory(save_directory) as stage:
        gguf.write_gguf(os.path.join(stage, name), hf_config, merge.merged_tensors(model, jnp.float32), tokenizer,
                        method)
    return os.path.join(os.path.abspath(save_directory), name)


# --------------------------------------------------------------------------------------------------- merging

def merge_and_unload(model):
    """Folds the adapters into the base weights in place and returns the model, now without LoRA layers.

    16-bit bases: W <- cast(W + scale * A @ B) (float32 math); the factors stay in `MergedLora` variables so that
    `unmerge` can take them out again. NF4 bases are dequantized, merged and requantized to NF4 (as PEFT); that
    cannot be undone. modules_to_save copies and trained biases become the frozen weights.
    """
    from fastlora_jax.linear import Linear, LoraLinear
    from fastlora_jax.model import Embed
    from fastlora_jax.modules_to_save import SavedEmbed, SavedLinear
    from fastlora_jax.nf4 import NF4Linear
    from fastlora_jax.variables import Frozen, TrainableBias

    if model.peft_config is None:
        raise ValueError("merge_and_unload: the model has no LoRA adapters to merge")
    for parent, name, module in _linear_slots(model):
        if not isinstance(module, LoraLinear):
            continue
        base = module.base
        a, b, scale = module.lora_a[...], module.lora_b[...], module.layer_scale[...]
        if isinstance(base, Linear):
            base.weight.set_value(_fold(base.weight[...], a, b, scale, 1.0))
            base.merged_lora_a, base.merged_lora_b, base.merged_layer_scale = MergedLora(a), MergedLora(b), \
                MergedLora(scale)
        elif isinstance(base, NF4Linear):
            base = _requantized(module)
        else:
            raise TypeError(f"merge_and_unload: cannot merge into a {type(base).__name__} base")
        setattr(parent, name, base)
    for parent, name, module in _linear_slots(model):
        if module.bias is not None and isinstance(module.bias, TrainableBias):
            module.bias = Frozen(module.bias[...].astype(module.dtype))
    embed = model.model.embed_tokens
    if isinstance(embed, SavedEmbed):
        plain = nnx.eval_shape(lambda: Embed(model.config.vocab_size, model.config.hidden_size, dtype=embed.dtype))
        plain.weight.set_value(embed.trainable_weight[...].astype(embed.dtype))
        model.model.embed_tokens = plain
    if isinstance(model.lm_head, SavedLinear):
        head = model.lm_head
        plain = nnx.eval_shape(lambda: Linear(head.in_features, head.out_features, dtype=head.dtype,
                                              implementation=head.implementation))
        plain.weight.set_value(head.dense_weight())
        model.lm_head = plain
    model.merged_peft_config = model.peft_config
    model.peft_config = None
    return model


def unmerge(model):
    """Undoes `merge_and_unload` in place: the LoRA layers come back with their factors (base weights exact for
    float32, within one rounding of a 16-bit base, as PEFT's unmerge); trained biases and modules_to_save copies
    become trainable again, starting from their merged values. Raises ValueError where the merge cannot be undone
    (no merge happened, or an NF4 base was requantized)."""
    from fastlora_jax import lora
    from fastlora_jax.linear import LoraLinear
    config = getattr(model, "merged_peft_config", None)
    if model.peft_config is not None:
        raise ValueError("unmerge: the model's adapters are not merged (it still has its LoRA layers)")
    if config is None:
        raise ValueError("unmerge: nothing to undo; the model was not merged by merge_and_unload")
    the_plan = lora.plan(config, model.config)
    slots = [(p, n, m) for p, n, m in _linear_slots(model) if _slot_path(model, p, n) in the_plan.lora]
    lost = [_slot_path(model, p, n) for p, n, m in slots if not hasattr(m, "merged_lora_a")]
    if lost:
        raise ValueError(f"unmerge: the adapters of {', '.join(lost)} were merged into a 4-bit (NF4) base, which was "
                         "requantized: the merge cannot be undone; load the base and the adapter again")
    for parent, name, base in slots:
        a, b, scale = base.merged_lora_a[...], base.merged_lora_b[...], base.merged_layer_scale[...]
        base.weight.set_value(_fold(base.weight[...], a, b, scale, -1.0))
        del base.merged_lora_a, base.merged_lora_b, base.merged_layer_scale
        setattr(parent, name, LoraLinear(base, r=config.r, scaling=config.scaling, dropout=float(config.lora_dropout),
                                         lora_a=a, lora_b=b, layer_scale=scale))
    lora.train_biases_and_saved_modules(model, the_plan)
    model.peft_config = config
    model.merged_peft_config = None
    return model


def _linear_slots(model):
    """(parent module, attribute name, module) of every linear layer: the stacked projections, then lm_head."""
    layers = model.model.layers
    out = [(getattr(layers, p), c, getattr(getattr(layers, p), c))
           for p, c in (path.split(".") for path in _PROJECTIONS)]
    if model.lm_head is not None:
        out.append((model, "lm_head", model.lm_head))
    return out


_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _slot_path(model, parent, name) -> str:
    if parent is model:
        return name
    return ("self_attn." if parent is model.model.layers.self_attn else "mlp.") + name


@jax.jit
def _fold(w, a, b, scale, sign):
    """w [*stack, in, out] (its own dtype) + sign * scale * a @ b, computed in float32, one layer at a time."""
    def one(args):
        w, a, b, s = args
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [in, out]
        return (w.astype(jnp.float32) + sign * s * delta).astype(w.dtype)

    if w.ndim == 2:
        return one((w, a, b, scale))
    return jax.lax.map(one, (w, a, b, scale))


def _requantized(module):
    """The NF4Linear of dequantize(W) + delta, requantized layer by layer (bitsandbytes' quantization)."""
    from fastlora_jax.nf4 import NF4Linear, quantize_nf4, stack_nf4

    base = module.base
    stack = module.lora_a[...].shape[:-2]
    if not stack:
        return NF4Linear.from_nf4(quantize_nf4(np.asarray(merge.linear_weight(module, None).astype(base.dtype))),
                                  bias=None if base.bias is None else base.bias[...],
                                  implementation=base.implementation, rounding=base.rounding)
    weights = [quantize_nf4(np.asarray(jax.device_get(merge.linear_weight(module, i).astype(base.dtype))))
               for i in range(stack[0])]
    return NF4Linear.from_nf4(stack_nf4(weights), bias=None if base.bias is None else base.bias[...],
                              implementation=base.implementation, rounding=base.rounding)
