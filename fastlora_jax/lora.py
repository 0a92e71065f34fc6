"""LoRA injection with Hugging Face PEFT's semantics: `LoraConfig`, target matching, `get_peft_model`, counting.

Matching runs over the module names transformers gives a LlamaForCausalLM (`model.layers.3.self_attn.q_proj`,
`model.embed_tokens`, `lm_head`, ...), exactly as PEFT's `check_target_module_exists`. Our decoder layers are one
stacked module, so a projection targeted in some layers only is wrapped once with `layer_scale` 0 (and A, B zero)
in the others; parameter counts include only the targeted layers, as PEFT creates adapters only there.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax import lora_init, remat
from fastlora_jax.config import LlamaConfig
from fastlora_jax.linear import LoraLinear
from fastlora_jax.modules_to_save import SavedEmbed, SavedLinear
from fastlora_jax.variables import TrainableBias

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BIAS_MODES = ("none", "all", "lora_only")
_PARAMETERS = ("r", "target_modules", "lora_alpha", "lora_dropout", "bias", "layers_to_transform", "layers_pattern",
               "finetune_last_n_layers", "use_gradient_checkpointing", "random_state", "max_seq_length", "use_rslora",
               "modules_to_save", "init_lora_weights", "loftq_config", "ensure_weight_tying", "temporary_location")
_DEFAULT_LOFTQ = {"loftq_bits": 4, "loftq_iter": 1}  # Unsloth's LoftQConfig when loftq_config is left empty


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """PEFT's LoraConfig fields (hashable: tuples for lists, `loftq_config` as sorted (key, value) pairs).

    `random_state` seeds the init and the dropout keys; `ensure_weight_tying` is True when tied embeddings are in
    `modules_to_save` (one trained copy serves the embedding and the head, as PEFT with that flag)."""

    r: int = 16
    target_modules: tuple[str, ...] | str = DEFAULT_TARGET_MODULES
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    bias: str = "none"
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    init_lora_weights: bool | str = True
    loftq_config: tuple[tuple[str, Any], ...] = ()
    ensure_weight_tying: bool = False
    random_state: int = 3407
    task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r={self.r!r}; accepted: an int > 0")
        if not _is_real(self.lora_alpha):
            raise ValueError(f"lora_alpha={self.lora_alpha!r}; accepted: a number")
        if not _is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r}; accepted: a number in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r}; accepted: {', '.join(map(repr, BIAS_MODES))}")
        if not isinstance(self.random_state, int) or isinstance(self.random_state, bool):
            raise ValueError(f"random_state={self.random_state!r}; accepted: an int")
        lora_init.validate_init(self.init_lora_weights)
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None or self.layers_pattern is not None:
                raise ValueError("layers_to_transform / layers_pattern cannot be used when target_modules is a str "
                                 f"({self.target_modules!r}), as in PEFT; pass a list of module names")
        elif not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"target_modules={self.target_modules!r}; accepted: a non-empty list of module names, "
                             "a regex string, or 'all-linear'")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform, as in PEFT")

    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def peft_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `peft.LoraConfig(**kwargs)` describing the same adapter."""
        return dict(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, bias=self.bias,
            target_modules=(self.target_modules if isinstance(self.target_modules, str)
                            else list(self.target_modules)),
            layers_to_transform=(list(self.layers_to_transform) if isinstance(self.layers_to_transform, tuple)
                                 else self.layers_to_transform),
            layers_pattern=(list(self.layers_pattern) if isinstance(self.layers_pattern, tuple)
                            else self.layers_pattern),
            use_rslora=self.use_rslora,
            modules_to_save=None if self.modules_to_save is None else list(self.modules_to_save),
            init_lora_weights=self.init_lora_weights, loftq_config=dict(self.loftq_config),
            ensure_weight_tying=self.ensure_weight_tying, task_type=self.task_type,
        )


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------ module names


def module_names(config: LlamaConfig) -> list[str]:
    """transformers' `LlamaForCausalLM.named_modules()` names, in its order (the root "" left out)."""
    names = ["model", "model.embed_tokens", "model.layers"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", *(f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                  f"{p}.mlp", *(f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")), f"{p}.mlp.act_fn",
                  f"{p}.input_layernorm", f"{p}.post_attention_layernorm"]
    return names + ["model.norm", "model.rotary_emb", "lm_head"]


_LAYER_LINEAR = re.compile(r"model\.layers\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+_proj)")
_LINEAR_NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"


def _linear(name: str) -> tuple[str, int] | None:
    """(projection path, layer) for a decoder linear layer name, ("lm_head", -1) for the head, else None."""
    if name == "lm_head":
        return "lm_head", -1
    m = _LAYER_LINEAR.fullmatch(name)
    return (m.group(2), int(m.group(1))) if m else None


# ------------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a LoraConfig does to a model: LoRA layers per projection (and the head), trainable biases, copies."""

    lora: dict[str, tuple[int, ...]]  # projection path ("self_attn.q_proj") -> targeted layers; "lm_head" -> ()
    biases: dict[str, tuple[int, ...]]  # projection path -> layers whose bias trains
    saved: tuple[str, ...]  # modules_to_save resolved: "embed_tokens" and/or "lm_head" ("embed_tokens" when tied)


def plan(config: LoraConfig, model_config: LlamaConfig) -> Plan:
    """Resolves a LoraConfig against a model's shape; raises ValueError for targets or layers that do not fit."""
    names = module_names(model_config)
    saved = _resolve_modules_to_save(config, model_config, names)
    L = model_config.num_hidden_layers
    layers = config.layers_to_transform
    for i in ([layers] if isinstance(layers, int) else layers or ()):
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < L:
            raise ValueError(f"layers_to_transform: layer {i!r} is out of range; the model has {L} layers "
                             f"(0..{L - 1})")
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        matched = [n for n in names if _linear(n) and n != "lm_head" and not _excluded(config, n)]
    else:
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"target_modules={targets!r} is not a valid regex: {e}") from None
            entries = [targets]
        else:
            entries = list(targets)
        for entry in entries:  # every entry must name some module (stricter than PEFT, which needs only one)
            if not any(_entry_matches(entry, n, isinstance(targets, str)) for n in names):
                raise ValueError(f"target_modules: no module matches {entry!r}; linear layers are {_LINEAR_NAMES}")
        matched = [n for n in names if not _excluded(config, n) and _target_matches(config, n)]
    if not matched:
        raise ValueError(f"target_modules={targets!r} with layers_to_transform={config.layers_to_transform!r}, "
                         f"layers_pattern={config.layers_pattern!r} selects no module of this {L}-layer model")
    lora: dict[str, list[int]] = {}
    for name in matched:
        linear = _linear(name)
        if linear is None:
            if name == "model.embed_tokens":
                raise NotImplementedError(f"target_modules selects {name!r}: LoRA on the embedding is not "
                                          "supported; train it fully with modules_to_save=['embed_tokens']")
            raise ValueError(f"target_modules selects {name!r}, which is not a linear layer; linear layers are "
                             f"{_LINEAR_NAMES}")
        path, layer = linear
        if path == "lm_head" and model_config.tie_word_embeddings:
            raise NotImplementedError("target_modules selects 'lm_head', which is tied to the embedding in this "
                                      "model; LoRA on a tied head is not supported (use modules_to_save)")
        lora.setdefault(path, [])
        if layer >= 0:
            lora[path].append(layer)
    lora_t = {p: tuple(sorted(set(v))) for p, v in lora.items()}
    if "lm_head" in lora_t and "lm_head" in saved:  # PEFT raises TypeError here too
        raise ValueError(f"modules_to_save={list(config.modules_to_save)} selects 'lm_head', which target_modules "
                         "also selects; a module is either LoRA-adapted or trained fully")
    return Plan(lora=lora_t, biases=_trainable_biases(config, model_config, lora_t), saved=saved)


def _excluded(config: LoraConfig, name: str) -> bool:
    """PEFT never puts LoRA on a module listed in modules_to_save."""
    return bool(config.modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name)
                                                for m in config.modules_to_save)


def _entry_matches(entry: str, name: str, regex: bool) -> bool:
    return bool(re.fullmatch(entry, name)) if regex else name == entry or name.endswith("." + entry)


def _target_matches(config: LoraConfig, name: str) -> bool:
    """PEFT's check_target_module_exists (after the modules_to_save exclusion)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return bool(re.fullmatch(targets, name))
    if name in targets:
        return True
    found = any(name.endswith("." + t) for t in targets)
    indexes = config.layers_to_transform
    if not found or indexes is None or (isinstance(indexes, tuple) and not indexes):
        return found
    patterns = config.layers_pattern
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    if m is None:
        return False
    index = int(m.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _resolve_modules_to_save(config: LoraConfig, model_config: LlamaConfig, names: list[str]) -> tuple[str, ...]:
    saved: list[str] = []
    for entry in config.modules_to_save or ():
        hits = [n for n in names if n.endswith(entry)]  # PEFT's _set_trainable: a plain suffix match
        if not hits:
            top = [n for n in names if not n.startswith("model.layers.") or n.startswith("model.layers.0.")]
            raise ValueError(f"modules_to_save: {entry!r} is not a module of the model; modules are "
                             f"{', '.join(top)} (and the same in every layer)")
        for hit in hits:
            if hit not in ("model.embed_tokens", "lm_head"):
                raise NotImplementedError(f"modules_to_save: {entry!r} matches {hit!r}; only 'embed_tokens' and "
                                          "'lm_head' can be trained fully")
            module = "embed_tokens" if hit == "model.embed_tokens" or model_config.tie_word_embeddings else "lm_head"
            if module not in saved:
                saved.append(module)
    return tuple(sorted(saved))


def _trainable_biases(config: LoraConfig, model_config: LlamaConfig,
                      lora: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """bias="all": every bias of the model; "lora_only": the biases of the LoRA layers (as PEFT)."""
    with_bias = [p for p in PROJECTIONS
                 if (model_config.attention_bias if p.startswith("self_attn") else model_config.mlp_bias)]
    everywhere = tuple(range(model_config.num_hidden_layers))
    if config.bias == "all":
        return {p: everywhere for p in with_bias}
    if config.bias == "lora_only":
        out = {p: lora[p] for p in with_bias if p in lora}
        for p, layers in out.items():
            if layers != everywhere:
                raise NotImplementedError(f"bias='lora_only' with {p} targeted in layers {list(layers)} only: the "
                                          "stacked bias trains in all layers or none; use bias='all' or 'none'")
        return out
    return {}


# ----------------------------------------------------------------------------------------------- get_peft_model


def get_peft_model(model, r: int = 16, target_modules=DEFAULT_TARGET_MODULES, lora_alpha: float = 16,
                   lora_dropout: float = 0.0, bias: str = "none", layers_to_transform=None, layers_pattern=None,
                   finetune_last_n_layers: int | None = None, use_gradient_checkpointing="unsloth",
                   random_state: int = 3407, max_seq_length: int = 2048, use_rslora: bool = False,
                   modules_to_save=None, init_lora_weights=True, loftq_config=None, ensure_weight_tying: bool = False,
                   temporary_location: str | None = None, **kwargs):
    """Adds LoRA adapters to a Llama in place and returns it, with PEFT's semantics for every argument.

    target_modules: module names (a name matches a module path equal to it or ending in "." + name), a regex
      string (full match over paths such as "model.layers.0.self_attn.q_proj"), or "all-linear" (all but lm_head).
      "embed_tokens" in a list moves to modules_to_save (trained fully), as Unsloth does.
    lora_alpha, use_rslora: scaling lora_alpha / r, or lora_alpha / sqrt(r).
    lora_dropout: on the LoRA branch input, in training only (the forward's `dropout_rng`; keys from random_state).
    bias: "none", "all" (every bias trains) or "lora_only" (biases of LoRA layers); trained biases are float32.
    layers_to_transform / layers_pattern: restrict list targets to these decoder layers, as PEFT.
    finetune_last_n_layers: n -> layers_to_transform = the last n layers (clipped to 1..L), as Unsloth; ignored when
      layers_to_transform is given.
    use_gradient_checkpointing: False, True, "unsloth" (layer inputs offloaded to host), or the measured extras
      "dots" (save the projection outputs) and "long_context" (block-input offload); see fastlora_jax.remat.
    modules_to_save: ["embed_tokens", "lm_head"] train float32 copies (compute in the model dtype); with tied
      embeddings ONE copy serves both the embedding and the head, which needs ensure_weight_tying=True: with
      Unsloth's default False, PEFT trains the embedding and the head apart (or one of them alone), which is not
      supported here and raises NotImplementedError.
    init_lora_weights: True, False, "gaussian", "pissa", "pissa_niter_K", "olora", "loftq" (with loftq_config
      {"loftq_bits": 4, "loftq_iter": n} or a peft.LoftQConfig); pissa / olora replace the targeted base weights
      by their residual and loftq by their NF4 dequantization, as PEFT; "loftq" without a loftq_config uses
      {"loftq_bits": 4, "loftq_iter": 1} with a warning, as Unsloth. Deterministic in random_state.
    max_seq_length, temporary_location: accepted and ignored, as Unsloth (max_seq_length is unused there too;
      temporary_location is where Unsloth offloads embeddings to disk, which fastlora-jax never does).
    A second call with the same settings warns and returns the model unchanged; different settings raise.
    """
    if kwargs:
        raise TypeError(f"get_peft_model got unexpected keyword arguments {sorted(kwargs)}; accepted: "
                        f"{', '.join(_PARAMETERS)}")
    del max_seq_length, temporary_location
    mode = remat.validate(use_gradient_checkpointing)
    if isinstance(target_modules, (list, tuple)) and "embed_tokens" in target_modules:  # Unsloth's remap
        target_modules = [t for t in target_modules if t != "embed_tokens"]
        saved = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or ())
        modules_to_save = saved if "embed_tokens" in saved else [*saved, "embed_tokens"]
        if not target_modules:
            raise ValueError("target_modules=['embed_tokens'] moves the embedding to modules_to_save (as Unsloth) and "
                             "leaves no module for LoRA; add linear layers such as 'q_proj'")
    if finetune_last_n_layers is not None and layers_to_transform is None:
        if not isinstance(finetune_last_n_layers, int) or isinstance(finetune_last_n_layers, bool):
            raise ValueError(f"finetune_last_n_layers={finetune_last_n_layers!r}; accepted: an int or None")
        L = model.config.num_hidden_layers
        n = max(1, min(finetune_last_n_layers, L))
        layers_to_transform = list(range(L - n, L))
    if init_lora_weights == "loftq" and not loftq_config:
        warnings.warn("init_lora_weights='loftq' without loftq_config: using loftq_bits=4, loftq_iter=1, as Unsloth",
                      stacklevel=2)
        loftq_config = dict(_DEFAULT_LOFTQ)
    config = _make_config(model, r=r, target_modules=target_modules, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, bias=bias, layers_to_transform=layers_to_transform,
                          layers_pattern=layers_pattern, use_rslora=use_rslora, modules_to_save=modules_to_save,
                          init_lora_weights=init_lora_weights, loftq_config=loftq_config, random_state=random_state,
                          ensure_weight_tying=ensure_weight_tying)
    if model.peft_config is not None:
        old = model.peft_config
        changed = [f.name for f in dataclasses.fields(LoraConfig) if getattr(old, f.name) != getattr(config, f.name)]
        if model.model.gradient_checkpointing != mode:
            changed.append("use_gradient_checkpointing")
        if changed:
            raise ValueError(f"get_peft_model: this model already has LoRA adapters with other settings "
                             f"({', '.join(changed)} differ); load the base model again to change them")
        warnings.warn("get_peft_model: the model already has these LoRA adapters; returning it unchanged",
                      stacklevel=2)
        return model
    the_plan = plan(config, model.config)
    _apply(model, config, the_plan)
    model.peft_config = config
    model.model.gradient_checkpointing = mode
    return model


def _make_config(model, *, target_modules, layers_to_transform, layers_pattern, modules_to_save, loftq_config,
                 ensure_weight_tying, **fields) -> LoraConfig:
    def as_tuple(x, what):
        if x is None or isinstance(x, str):
            return x
        if isinstance(x, (list, tuple, set, frozenset)):
            return tuple(sorted(x)) if isinstance(x, (set, frozenset)) else tuple(x)
        raise ValueError(f"{what}={x!r}; accepted: a list of names, a str, or None")

    for name in ("r", "lora_alpha", "lora_dropout", "random_state"):  # numpy scalars as PEFT takes them
        if isinstance(fields.get(name), np.generic):
            fields[name] = fields[name].item()
    if isinstance(layers_to_transform, (list, tuple)):
        layers_to_transform = tuple(layers_to_transform)
    elif layers_to_transform is not None and not isinstance(layers_to_transform, int):
        raise ValueError(f"layers_to_transform={layers_to_transform!r}; accepted: an int, a list of ints, or None")
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    modules_to_save = as_tuple(modules_to_save, "modules_to_save") or None
    if fields["init_lora_weights"] == "loftq":
        loftq = lora_init.validate_loftq_config(loftq_config)
    else:
        if loftq_config:
            warnings.warn("loftq_config is ignored when init_lora_weights is not 'loftq' (as PEFT)", stacklevel=3)
        loftq = {}
    tied_saved = bool(modules_to_save) and model.config.tie_word_embeddings and any(
        n.endswith(m) for m in modules_to_save for n in ("model.embed_tokens", "lm_head"))
    if not isinstance(ensure_weight_tying, bool):
        raise ValueError(f"ensure_weight_tying={ensure_weight_tying!r}; accepted: True or False")
    if tied_saved and not ensure_weight_tying:
        raise NotImplementedError(
            f"modules_to_save={list(modules_to_save)} on a model with tied embeddings (tie_word_embeddings=True) and "
            "ensure_weight_tying=False: Unsloth and PEFT then train the embedding and the output head as separate "
            "copies (or one of them alone, the other staying frozen), which fastlora-jax does not support; pass "
            "ensure_weight_tying=True for one trained copy serving both, as PEFT does with that flag")
    if ensure_weight_tying and not tied_saved:
        warnings.warn("ensure_weight_tying=True has no effect: no tied embedding or head is in modules_to_save "
                      "(as PEFT, which warns too)", stacklevel=3)
    return LoraConfig(target_modules=as_tuple(target_modules, "target_modules"),
                      layers_to_transform=layers_to_transform,
                      layers_pattern=as_tuple(layers_pattern, "layers_pattern"),
                      modules_to_save=modules_to_save, loftq_config=tuple(sorted(loftq.items())),
                      ensure_weight_tying=tied_saved, **fields)


def _apply(model, config: LoraConfig, the_plan: Plan) -> None:
    root = jax.random.key(config.random_state)
    L = model.config.num_hidden_layers
    layers = model.model.layers
    for path, targeted in the_plan.lora.items():
        key = jax.random.fold_in(root, ([*PROJECTIONS, "lm_head"]).index(path))
        if path == "lm_head":
            model.lm_head = _lora_layer(model.lm_head, config, key, None)
            continue
        parent_name, name = path.split(".")
        parent = getattr(layers, parent_name)
        mask = jnp.zeros((L,), bool).at[jnp.asarray(targeted)].set(True)
        setattr(parent, name, _lora_layer(getattr(parent, name), config, key, mask))
    train_biases_and_saved_modules(model, the_plan)


def train_biases_and_saved_modules(model, the_plan: Plan) -> None:
    """Makes the plan's biases trainable (float32 `TrainableBias`) and wraps its modules_to_save in trainable
    copies, in place, starting from their current values (get_peft_model, and export.unmerge after a merge)."""
    layers = model.model.layers
    for path in the_plan.biases:
        parent_name, name = path.split(".")
        layer = getattr(getattr(layers, parent_name), name)
        base = layer.base if isinstance(layer, LoraLinear) else layer
        base.bias = TrainableBias(base.bias[...].astype(jnp.float32))
    if "embed_tokens" in the_plan.saved:
        model.model.embed_tokens = SavedEmbed(model.model.embed_tokens)
    if "lm_head" in the_plan.saved:
        model.lm_head = SavedLinear(model.lm_head)


def _lora_layer(base, config: LoraConfig, key: jax.Array, mask: jax.Array | None) -> LoraLinear:
    """Wraps one (possibly stacked) linear layer; `mask` [L] marks the targeted layers (None: unstacked)."""
    init, r, scaling = config.init_lora_weights, config.r, config.scaling
    stack = () if mask is None else mask.shape
    if lora_init.needs_base_weight(init):
        base, a, b = lora_init.init_with_base(init, key, base, r, scaling, mask, dict(config.loftq_config))
    else:
        a, b = lora_init.init_random(init, key, stack, base.in_features, base.out_features, r)
    if mask is None:
        layer_scale = jnp.asarray(scaling, jnp.float32)
    else:
        a = jnp.where(mask[:, None, None], a, 0.0)
        b = jnp.where(mask[:, None, None], b, 0.0)
        layer_scale = jnp.where(mask, scaling, 0.0).astype(jnp.float32)
    return LoraLinear(base, r=r, scaling=scaling, dropout=float(config.lora_dropout), lora_a=a, lora_b=b,
                      layer_scale=layer_scale)


# ------------------------------------------------------------------------------------------------------ counting


def base_parameter_count(config: LlamaConfig) -> int:
    """Parameters of transformers' LlamaForCausalLM for this config (tied embeddings counted once)."""
    d, v = config.hidden_size, config.vocab_size
    per_layer = 2 * d  # two RMSNorm weights
    for path, (fan_in, fan_out) in config.linear_shapes().items():
        has_bias = config.attention_bias if path.startswith("self_attn") else config.mlp_bias
        per_layer += fan_in * fan_out + (fan_out if has_bias else 0)
    return v * d + config.num_hidden_layers * per_layer + d + (0 if config.tie_word_embeddings else d * v)


def get_nb_trainable_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters as PEFT's `get_nb_trainable_parameters`: LoRA A/B of the targeted layers, the
    trained biases and the modules_to_save copies are trainable; "all" adds LoRA and copies to the base model
    (whose 4-bit weights count at their unquantized size, as PEFT counts Params4bit)."""
    mc = model.config
    base = base_parameter_count(mc)
    config = model.peft_config
    if config is None:
        return 0, base
    the_plan = plan(config, mc)
    shapes = {**mc.linear_shapes(), "lm_head": (mc.hidden_size, mc.vocab_size)}
    lora = 0
    for path, layers in the_plan.lora.items():
        fan_in, fan_out = shapes[path]
        lora += config.r * (fan_in + fan_out) * (1 if path == "lm_head" else len(layers))
    biases = sum(shapes[p][1] * len(layers) for p, layers in the_plan.biases.items())
    copies = len(the_plan.saved) * mc.vocab_size * mc.hidden_size
    return lora + biases + copies, base + lora + copies


def print_trainable_parameters(model) -> None:
    """Prints PEFT's line: `trainable params: N || all params: M || trainable%: P`."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def targeted_module_names(model) -> list[str]:
    """The transformers module names that carry a LoRA adapter (`model.layers.0.self_attn.q_proj`, ...)."""
    if model.peft_config is None:
        return []
    the_plan = plan(model.peft_config, model.config)
    return [n for n in module_names(model.config)
            if (lin := _linear(n)) and lin[0] in the_plan.lora and (lin[1] < 0 or lin[1] in the_plan.lora[lin[0]])]
