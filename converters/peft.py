"""PEFT LoRA adapter directories <-> our LoRA model: `adapter_config.json` and `adapter_model.safetensors`.

PEFT's layout: keys `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r) for every
targeted module (`model.layers.3.self_attn.q_proj`, `lm_head`); modules_to_save copies under the module's own
weight name (`base_model.model.model.embed_tokens.weight`, `base_model.model.lm_head.weight`, both when tied
embeddings share one copy); trained biases as `<module>.base_layer.bias` for LoRA layers, `<module>.bias` elsewhere.
Ours: lora_a [L, in, r] = A.T, lora_b [L, r, out] = B.T per stacked projection (see fastlora_jax.linear.LoraLinear).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

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
# PEFT initialisations that set A and B only (the base weights stay), so an adapter's weights replace all they did.
_INITS_OF_A_AND_B_ONLY = ("orthogonal", "eva")
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
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); a PEFT adapter_config.json is a JSON object") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}; a PEFT adapter_config.json is a JSON object")
    return config


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
    if init in _INITS_OF_A_AND_B_ONLY:  # they set A and B alone, which the adapter's weights replace
        init = True
    # PEFT re-runs the other methods when it loads an adapter (LoraLayer.update_layer), and pissa, olora and loftq
    # replace the base weights there: so does get_peft_model with the same init_lora_weights (and loftq_config).
    loftq = (adapter_config.get("loftq_config") or None) if init == "loftq" else None
    targets = adapter_config["target_modules"]
    return dict(
        r=adapter_config["r"], lora_alpha=adapter_config.get("lora_alpha", 8),
        lora_dropout=adapter_config.get("lora_dropout", 0.0) or 0.0, bias=adapter_config.get("bias", "none"),
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        layers_to_transform=adapter_config.get("layers_to_transform"),
        layers_pattern=adapter_config.get("layers_pattern"), use_rslora=bool(adapter_config.get("use_rslora")),
        modules_to_save=adapter_config.get("modules_to_save"), init_lora_weights=init, loftq_config=loftq,
        ensure_weight_tying=bool(adapter_config.get("ensure_weight_tying", False)),
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


@dataclasses.dataclass(frozen=True)
class Slot:
    """One PEFT key of our model: its HF shape, where it lives (variable, layer index or None, our -> HF layout
    function, its own inverse), and whether an adapter may leave it out."""

    shape: tuple[int, ...]
    var: Any
    layer: int | None = None
    transpose: bool = False
    optional: bool = False
    loads: bool = True  # False for a second name of the same tensor (the tied head)

    def get(self) -> np.ndarray:
        """The HF-layout host array (sliced and transposed on the host: nothing to compile per shape)."""
        value = np.asarray(jax.device_get(self.var[...]))
        value = value if self.layer is None else value[self.layer]
        return np.ascontiguousarray(value.T if self.transpose else value)


def _slots(model) -> dict[str, Slot]:
    """Every PEFT key our LoRA model has, in PEFT's naming."""
    from fastlora_jax import lora
    from fastlora_jax.modules_to_save import SavedEmbed, SavedLinear

    config, mc = model.peft_config, model.config
    the_plan = lora.plan(config, mc)
    slots: dict[str, Slot] = {}
    targeted = set(lora.targeted_module_names(model))
    for name in sorted(targeted, key=_name_order):
        module, layer = _module(model, name)
        for which, var in (("lora_A", module.lora_a), ("lora_B", module.lora_b)):
            shape = tuple(reversed(_shape(var)[-2:]))
            slots[f"{PREFIX}{name}.{which}.weight"] = Slot(shape, var, layer, transpose=True)
    if "lm_head" in targeted and _embedding_targeted(config):
        # PEFT also writes the base weight of a targeted embedding layer (save_embedding_layers="auto")
        var = model.lm_head.base.weight  # [D, V]
        slots[f"{PREFIX}lm_head.base_layer.weight"] = Slot(tuple(reversed(_shape(var))), var, transpose=True,
                                                           optional=True)
    for path, layers in the_plan.biases.items():
        parent, child = path.split(".")
        module = getattr(getattr(model.model.layers, parent), child)
        var = (module.base if hasattr(module, "lora_a") else module).bias
        for layer in layers:
            name = f"model.layers.{layer}.{path}"
            key = f"{PREFIX}{name}.{'base_layer.bias' if name in targeted else 'bias'}"
            slots[key] = Slot(_shape(var)[1:], var, layer)
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(embed, SavedEmbed):
        var = embed.trainable_weight  # [V, D], HF layout
        slots[f"{PREFIX}model.embed_tokens.weight"] = Slot(_shape(var), var)
        if mc.tie_word_embeddings:  # one copy serves the head too; PEFT writes it under both names
            slots[f"{PREFIX}lm_head.weight"] = Slot(_shape(var), var, loads=False)
    if isinstance(head, SavedLinear):
        var = head.trainable_weight  # [D, V] ours
        slots[f"{PREFIX}lm_head.weight"] = Slot(tuple(reversed(_shape(var))), var, transpose=True)
    return slots


def _shape(var) -> tuple[int, ...]:
    return tuple(var.get_value().shape)  # also for the abstract variables of nnx.eval_shape


def _embedding_targeted(config) -> bool:
    """PEFT's `embedding_is_targeted`: a list naming embed_tokens / lm_head, or a regex matching either."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targets != "all-linear" and any(re.fullmatch(targets, n) for n in ("model.embed_tokens", "lm_head"))
    return any(n in targets for n in ("embed_tokens", "lm_head"))


def _name_order(name: str):
    m = _LAYER_MODULE.fullmatch(name)
    return (1 << 30, name) if m is None else (int(m.group(1)), name)


# ------------------------------------------------------------------------------------------------ save / load

def adapter_tensors(model, save_embedding_layers: bool | str = "auto") -> dict[str, np.ndarray]:
    """The adapter of a LoRA model as PEFT's state dict: HF-layout host arrays in their own dtypes (float32 for
    LoRA factors, modules_to_save copies and trained biases). save_embedding_layers: "auto" writes the base
    weight of a targeted lm_head as PEFT does; False leaves it out."""
    if model.peft_config is None:
        raise ValueError("the model has no LoRA adapters; call FastLanguageModel.get_peft_model(model, ...) first")
    if save_embedding_layers not in ("auto", False):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r}; accepted: 'auto', False (embeddings "
                         "are never resized here)")
    return {key: slot.get() for key, slot in _slots(model).items()
            if not (slot.optional and save_embedding_layers is False)}


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
    missing = [k for k, slot in slots.items() if k not in tensors and not slot.optional]
    unexpected = [k for k in tensors if k not in slots]
    misshaped = [f"{k}: adapter has {tuple(v.shape)}, model expects {slots[k].shape}"
                 for k, v in tensors.items() if k in slots and tuple(v.shape) != slots[k].shape]
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
    for key, slot in slots.items():
        if not slot.loads or key not in tensors:
            continue
        var = slot.var
        if id(var) not in updates:
            updates[id(var)] = (var, np.array(jax.device_get(var[...]), np.float32))
        value = np.asarray(tensors[key], np.float32)
        value = value.T if slot.transpose else value
        if slot.layer is None:
            updates[id(var)][1][...] = value
        else:
            updates[id(var)][1][slot.layer] = value
    for var, host in updates.values():
        old = var[...]
        var.set_value(jax.device_put(host.astype(old.dtype), old.sharding))


def _strip_adapter_name(key: str) -> str:
    """Older PEFT versions kept the adapter name: `...lora_A.default.weight` -> `...lora_A.weight`."""
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)
