"""PEFT LoRA adapter directories <-> our LoRA model: `adapter_config.json` and `adapter_model.safetensors`.

PEFT's layout: keys `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r) for every
targeted module (`model.layers.3.self_attn.q_proj`, `lm_head`); modules_to_save copies under the module's own
weight name (`base_model.model.model.embed_tokens.weight`, `base_model.model.lm_head.weight`, both when tied
embeddings share one copy); trained biases as `<module>.base_layer.bias` for LoRA layers, `<module>.bias` elsewhere.
Ours: lora_a [L, in, r] = A.T, lora_b [L, r, out] = B.T per stacked projection (see fastlora_jax.linear.LoraLinear).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from fastlora_jax.converters import atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json fields that change what PEFT computes and that fastlora-jax does not implement:
# the field -> its neutral value(s).
_UNSUPPORTED = {"use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None),
                "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layer_replication": (None, []),
                "target_parameters": (None, []), "trainable_token_indices": (None, {}, []),
                "exclude_modules": (None, [], ""), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
                "arrow_config": (None,), "megatron_config": (None,), "use_bdlora": (None, False),
                "layers_pattern_is_regex": (None, False)}
_LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+_proj)")


# ------------------------------------------------------------------------------------------------ adapter_config

def adapter_config_dict(config, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for our `fastlora_jax.lora.LoraConfig`."""
    kw = config.peft_kwargs()
    return {
        "peft_type": "LORA", "task_type": config.task_type or "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or None, "revision": None, "inference_mode": True,
        "r": kw["r"], "lora_alpha": kw["lora_alpha"], "lora_dropout": kw["lora_dropout"],
        "target_modules": kw["target_modules"], "exclude_modules": None, "bias": kw["bias"],
        "use_rslora": kw["use_rslora"], "modules_to_save": kw["modules_to_save"],
        "layers_to_transform": kw["layers_to_transform"], "layers_pattern": kw["layers_pattern"],
        "init_lora_weights": kw["init_lora_weights"], "loftq_config": kw["loftq_config"],
        "ensure_weight_tying": kw["ensure_weight_tying"], "fan_in_fan_out": False, "use_dora": False,
        "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
        "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
    }


def read_adapter_config(directory: str) -> dict[str, Any]:
    """adapter_config.json of an adapter directory (FileNotFoundError naming the directory when absent)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} is not a PEFT adapter directory: it has no {CONFIG_NAME}")
    with open(path) as f:
        return json.load(f)


def lora_kwargs(adapter_config: dict[str, Any], where: str = "adapter_config.json") -> dict[str, Any]:
    """`get_peft_model` keyword arguments describing the adapter; raises for PEFT features we do not implement."""
    peft_type = adapter_config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise NotImplementedError(f"{where}: peft_type={peft_type!r}; only 'LORA' adapters are supported")
    bad = [f"{k}={adapter_config[k]!r}" for k, neutral in _UNSUPPORTED.items()
           if k in adapter_config and adapter_config[k] not in neutral]
    if bad:
        raise NotImplementedError(f"{where}: {', '.join(bad)} not supported; fastlora-jax loads plain LoRA "
                                  f"(supported fields: r, lora_alpha, lora_dropout, target_modules, bias, use_rslora, "
                                  f"modules_to_save, layers_to_transform, layers_pattern, init_lora_weights)")
    if "r" not in adapter_config or "target_modules" not in adapter_config:
        raise ValueError(f"{where}: 'r' and 'target_modules' are required; got fields {sorted(adapter_config)}")
    init = adapter_config.get("init_lora_weights", True)
    if init == "loftq":  # LoftQ only initialises A and B, which the adapter's weights replace
        init = True
    targets = adapter_config["target_modules"]
    return dict(
        r=adapter_config["r"], lora_alpha=adapter_config.get("lora_alpha", 8),
        lora_dropout=adapter_config.get("lora_dropout", 0.0) or 0.0, bias=adapter_config.get("bias", "none"),
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        layers_to_transform=adapter_config.get("layers_to_transform"),
        layers_pattern=adapter_config.get("layers_pattern"), use_rslora=bool(adapter_config.get("use_rslora")),
        modules_to_save=adapter_config.get("modules_to_save"), init_lora_weights=init,
    )


# ------------------------------------------------------------------------------------------------ our modules

def _module(model, name: str):
    """(module, layer index or None) of a transformers module name among our stacked layers."""
    if name == "lm_head":
        return model.lm_head, None
    m = _LAYER_MODULE.fullmatch(name)
    if m is None:
        raise KeyError(name)
    parent, child = m.group(2).split(".")
    return getattr(getattr(model.model.layers, parent), child), int(m.group(1))


def _slots(model) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray], Callable]]:
    """Every PEFT key our LoRA model has: key -> (HF shape, getter of the HF-layout array, setter).

    Setters stage values (key -> array) into a dict of updates applied together by `_apply`.
    """
    from fastlora_jax import lora
    from fastlora_jax.modules_to_save import SavedEmbed, SavedLinear

    config, mc = model.peft_config, model.config
    the_plan = lora.plan(config, mc)
    slots = {}
    targeted = set(lora.targeted_module_names(model))
    for name in sorted(targeted, key=_name_order):
        module, layer = _module(model, name)
        for which, var, to_hf in (("lora_A", module.lora_a, lambda x: x.T), ("lora_B", module.lora_b, lambda x: x.T)):
            shape = tuple(reversed(var.get_value().shape[-2:]))
            slots[f"{PREFIX}{name}.{which}.weight"] = (shape, _getter(var, layer, to_hf), (var, layer, to_hf))
    for path, layers in the_plan.biases.items():
        parent, child = path.split(".")
        module = getattr(getattr(model.model.layers, parent), child)
        var = (module.base if hasattr(module, "lora_a") else module).bias
        for layer in layers:
            name = f"model.layers.{layer}.{path}"
            key = f"{PREFIX}{name}.{'base_layer.bias' if name in targeted else 'bias'}"
            slots[key] = (tuple(var.get_value().shape[1:]), _getter(var, layer, None), (var, layer, None))
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(embed, SavedEmbed):
        var = embed.trainable_weight  # [V, D], HF layout
        slots[f"{PREFIX}model.embed_tokens.weight"] = (tuple(var.get_value().shape), _getter(var, None, None), (var, None, None))
        if mc.tie_word_embeddings:  # one copy serves the head too; PEFT writes it under both names
            slots[f"{PREFIX}lm_head.weight"] = (tuple(var.get_value().shape), _getter(var, None, None), None)
    if isinstance(head, SavedLinear):
        var = head.trainable_weight  # [D, V] ours
        slots[f"{PREFIX}lm_head.weight"] = (tuple(reversed(var.get_value().shape)), _getter(var, None, lambda x: x.T),
                                            (var, None, lambda x: x.T))
    return slots


def _name_order(name: str):
    m = _LAYER_MODULE.fullmatch(name)
    return (1 << 30, name) if m is None else (int(m.group(1)), name)


def _getter(var, layer, to_hf):
    def get():  # sliced and transposed on the host: no device computation to compile per shape
        value = np.asarray(jax.device_get(var[...]))
        value = value if layer is None else value[layer]
        return np.ascontiguousarray(value if to_hf is None else to_hf(value))
    return get


# ------------------------------------------------------------------------------------------------ save / load

def adapter_tensors(model) -> dict[str, np.ndarray]:
    """The adapter of a LoRA model as PEFT's state dict (float32 host arrays in HF layout)."""
    if model.peft_config is None:
        raise ValueError("the model has no LoRA adapters; call FastLanguageModel.get_peft_model(model, ...) first")
    return {key: np.asarray(get(), np.float32) for key, (_, get, _) in _slots(model).items()}


def write_adapter(directory: str, config_dict: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Writes adapter_model.safetensors and adapter_config.json into `directory` (a staging directory)."""
    atomic.save_tensors(os.path.join(directory, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    atomic.write_json(os.path.join(directory, CONFIG_NAME), config_dict)


def read_adapter_tensors(directory: str) -> dict[str, np.ndarray]:
    """adapter_model.safetensors of an adapter directory (a pickled adapter_model.bin is refused)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        extra = (" (it has adapter_model.bin: pickled checkpoints are not loaded; re-save it with "
                 "safe_serialization=True)") if os.path.exists(os.path.join(directory, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME}{extra}")
    from safetensors.numpy import load_file

    return load_file(path)


def load_adapter_tensors(model, tensors: dict[str, np.ndarray], where: str = WEIGHTS_NAME, *,
                         check_only: bool = False) -> None:
    """Puts PEFT-layout tensors into a LoRA model whose structure already matches the adapter.

    Raises ValueError naming every missing, unexpected and mis-shaped key; the model is unchanged then.
    check_only: only check (works on an abstract model from nnx.eval_shape).
    """
    slots = _slots(model)
    tensors = {_strip_adapter_name(k): v for k, v in tensors.items()}
    missing = [k for k in slots if k not in tensors]
    unexpected = [k for k in tensors if k not in slots]
    misshaped = [f"{k}: adapter has {tuple(v.shape)}, model expects {slots[k][0]}"
                 for k, v in tensors.items() if k in slots and tuple(v.shape) != slots[k][0]]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("mis-shaped tensors (other r or another base model?)", misshaped)):
        if items:
            problems.append(f"{what}: {'; '.join(items[:12])}{' ...' if len(items) > 12 else ''}")
    if problems:
        raise ValueError(f"{where} does not fit the model: " + " | ".join(problems))
    if check_only:
        return
    updates: dict[int, tuple[Any, np.ndarray]] = {}
    for key, (_, _, target) in slots.items():
        if target is None:
            continue
        var, layer, to_hf = target
        if id(var) not in updates:
            updates[id(var)] = (var, np.array(jax.device_get(var[...]), np.float32))
        value = np.asarray(tensors[key], np.float32)
        value = value if to_hf is None else to_hf(value)  # the transposes are their own inverses
        if layer is None:
            updates[id(var)][1][...] = value
        else:
            updates[id(var)][1][layer] = value
    for var, host in updates.values():
        old = var[...]
        var.set_value(jax.device_put(host.astype(old.dtype), old.sharding))


def _strip_adapter_name(key: str) -> str:
    """Older PEFT versions kept the adapter name: `...lora_A.default.weight` -> `...lora_A.weight`."""
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)
