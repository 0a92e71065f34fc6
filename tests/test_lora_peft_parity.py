"""get_peft_model against Hugging Face PEFT: parameter counts, logits and LoRA gradients, PiSSA / OLoRA inits."""

from __future__ import annotations

import contextlib
import io

import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx

import fastlora_jax
from fastlora_jax import FastLanguageModel, Llama, preset
from fastlora_jax.lora import get_peft_model, targeted_module_names

from helpers import rel_err

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peft_model(torch_model, ours):
    return peft.get_peft_model(torch_model, peft.LoraConfig(**ours.peft_config.peft_kwargs()))


def _printed(fn) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue()


COUNT_SETTINGS = {
    "default": ({}, {}),
    "r64": ({}, dict(r=64, lora_alpha=64)),
    "attention_layers": ({}, dict(target_modules=ATTENTION, layers_to_transform=[0, 7, 15])),
    "all_linear": ({}, dict(target_modules="all-linear")),
    "rslora": ({}, dict(r=32, use_rslora=True)),
    "modules_to_save_untied": (dict(tie_word_embeddings=False), dict(modules_to_save=["embed_tokens", "lm_head"])),
    "modules_to_save_tied": ({}, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"],
                                      ensure_weight_tying=True)),
    "layers_pattern": ({}, dict(target_modules=["gate_proj"], layers_to_transform=3, layers_pattern="layers")),
    "regex": ({}, dict(target_modules=r"model\.layers\.1[0-9]\.self_attn\.(q|v)_proj")),
    "lm_head_lora": (dict(tie_word_embeddings=False), dict(target_modules=["v_proj", "lm_head"])),
    "bias_all": (dict(attention_bias=True, mlp_bias=True), dict(bias="all", target_modules=["q_proj"])),
    "bias_lora_only": (dict(attention_bias=True, mlp_bias=True), dict(bias="lora_only", target_modules=ATTENTION)),
}


@pytest.mark.parametrize("setting", list(COUNT_SETTINGS))
def test_counts_equal_peft_on_the_1b_shape(setting):
    overrides, kwargs = COUNT_SETTINGS[setting]
    config = preset("llama-3.2-1b", **overrides)
    ours = nnx.eval_shape(lambda: get_peft_model(Llama(config, dtype=jnp.bfloat16), **kwargs))
    with torch.device("meta"):
        torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config()))
    theirs = _peft_model(torch_model, ours)
    line = _printed(theirs.print_trainable_parameters)
    assert _printed(ours.print_trainable_parameters) == line
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    peft_targets = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(targeted_module_names(ours)) == peft_targets
    if setting == "default":
        assert line == "trainable params: 11,272,192 || all params: 1,247,086,592 || trainable%: 0.9039\n"


MATCHING = [
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[2]),  # exact names
    dict(target_modules=["mlp.down_proj", "self_attn.o_proj"], layers_to_transform=[]),  # [] means every layer
    dict(target_modules=["up_proj"], layers_to_transform=[1, 3], layers_pattern=["blocks", "layers"]),
    dict(target_modules=r"model\.layers\.[13]\..*_proj"),
    dict(target_modules="ALL-LINEAR", modules_to_save=["lm_head"]),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),  # modules_to_save wins
    dict(target_modules=["gate_proj", "k_proj"], layers_to_transform=0),
]


@pytest.mark.parametrize("kwargs", MATCHING, ids=range(len(MATCHING)))
def test_matching_equals_peft(kwargs):
    config = preset("llama-3.2-1b", num_hidden_layers=4, tie_word_embeddings=False)
    ours = nnx.eval_shape(lambda: get_peft_model(Llama(config, dtype=jnp.bfloat16), **kwargs))
    with torch.device("meta"):
        torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config()))
    theirs = _peft_model(torch_model, ours)
    peft_targets = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(targeted_module_names(ours)) == peft_targets
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# ------------------------------------------------------------------------------------ logits and gradient parity

PARITY_SETTINGS = {
    "default": ({}, {}),
    "rslora_layers_to_transform": (dict(num_hidden_layers=3), dict(r=8, lora_alpha=16, use_rslora=True,
                                                                    target_modules=["q_proj", "down_proj"],
                                                                    layers_to_transform=[1])),
    "bias_all_lm_head_lora": (dict(attention_bias=True, mlp_bias=True),
                              dict(r=4, bias="all", target_modules=["q_proj", "up_proj", "lm_head"])),
    "modules_to_save": ({}, dict(r=4, target_modules=["q_proj", "v_proj"],
                                 modules_to_save=["embed_tokens", "lm_head"])),
    "tied_modules_to_save": (dict(tie_word_embeddings=True), dict(r=4, target_modules=["o_proj"],
                                                                  modules_to_save=["lm_head"],
                                                                  ensure_weight_tying=True)),
}


def _fill_lora(ours, theirs, rng):
    """Writes the same random non-zero LoRA weights (and modules_to_save copies) into both models."""
    named = dict(theirs.named_modules())
    L = ours.config.num_hidden_layers
    for name in targeted_module_names(ours):
        torch_layer = named[f"base_model.model.{name}"]
        a = rng.normal(0, 0.2, torch_layer.lora_A["default"].weight.shape).astype(np.float32)  # [r, in]
        b = rng.normal(0, 0.2, torch_layer.lora_B["default"].weight.shape).astype(np.float32)  # [out, r]
        torch_layer.lora_A["default"].weight.data = torch.tensor(a)
        torch_layer.lora_B["default"].weight.data = torch.tensor(b)
        ours_layer, index = _our_layer(ours, name)
        if index is None:
            ours_layer.lora_a.value, ours_layer.lora_b.value = jnp.asarray(a.T), jnp.asarray(b.T)
        else:
            assert ours_layer.lora_a[...].shape[0] == L
            ours_layer.lora_a.value = ours_layer.lora_a[...].at[index].set(a.T)
            ours_layer.lora_b.value = ours_layer.lora_b[...].at[index].set(b.T)
    for name, module in named.items():
        if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
            weight = module.modules_to_save["default"].weight
            noise = rng.normal(0, 0.05, weight.shape).astype(np.float32)
            weight.data = weight.data + torch.tensor(noise)
            saved = _our_saved(ours, name)
            saved.value = saved[...] + jnp.asarray(noise if saved[...].shape == noise.shape else noise.T)


def _our_layer(ours, name):
    if name == "lm_head":
        return ours.lm_head, None
    parts = name.split(".")  # model.layers.{i}.{self_attn|mlp}.{proj}
    return getattr(getattr(ours.model.layers, parts[3]), parts[4]), int(parts[2])


def _our_saved(ours, name):
    name = name.removeprefix("base_model.model.")
    return (ours.model.embed_tokens if name == "model.embed_tokens" or ours.lm_head is None
            else ours.lm_head).trainable_weight


def _loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@nnx.jit
def _loss_and_grads(model, ids):
    def loss_fn(model):
        logits = model(ids)
        return _loss(logits, ids), logits

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, fastlora_jax.TRAINABLE), has_aux=True)
    (loss, logits), grads = grad_fn(model)
    return loss, logits, grads


@pytest.mark.parametrize("setting", list(PARITY_SETTINGS))
def test_logits_and_gradients_equal_peft(hf_llama, setting):
    overrides, kwargs = PARITY_SETTINGS[setting]
    directory, torch_model = hf_llama(**overrides)
    with pytest.warns(UserWarning, match="no tokenizer"):
        ours, _ = FastLanguageModel.from_pretrained(directory, dtype="float32")
    get_peft_model(ours, **kwargs)
    theirs = _peft_model(torch_model, ours)
    _fill_lora(ours, theirs, np.random.default_rng(0))
    ids = np.random.default_rng(1).integers(0, ours.config.vocab_size, (2, 12))

    logits_ref = theirs(input_ids=torch.tensor(ids)).logits
    loss_ref = torch.nn.functional.cross_entropy(logits_ref[:, :-1].reshape(-1, logits_ref.shape[-1]),
                                                 torch.tensor(ids[:, 1:]).reshape(-1))
    loss_ref.backward()
    loss, logits, grads = _loss_and_grads(ours, jnp.asarray(ids))
    assert rel_err(logits, logits_ref.detach().numpy()) < 1e-4
    assert abs(float(loss) - loss_ref.item()) < 1e-4 * abs(loss_ref.item())

    ours_grads = {tuple(str(k) for k in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    torch_grads = {n.removeprefix("base_model.model."): p.grad.numpy()
                   for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for name, ref in torch_grads.items():
        ours_grad = _our_grad(ours_grads, name)
        assert rel_err(ours_grad, ref) < 1e-4, name
        checked += 1
    assert checked == len(torch_grads) and checked > 0
    # Layers left out by layers_to_transform get no gradient (PEFT has no adapter there).
    targeted = targeted_module_names(ours)
    for path, grad in ours_grads.items():
        if path[-1] in ("lora_a", "lora_b") and path[1] == "layers":
            for i in range(ours.config.num_hidden_layers):
                if f"model.layers.{i}.{path[2]}.{path[3]}" not in targeted:
                    assert not np.any(grad[i]), (path, i)


def _our_grad(ours_grads, torch_name):
    """Our gradient for a torch parameter name, in torch's layout."""
    parts = torch_name.split(".")
    if "lora_A" in parts or "lora_B" in parts:
        kind = "lora_a" if "lora_A" in parts else "lora_b"
        module = parts[:parts.index(kind.replace("lora_a", "lora_A").replace("lora_b", "lora_B"))]
        if module == ["lm_head"]:
            return ours_grads[("lm_head", kind)].T
        grad = ours_grads[("model", "layers", module[3], module[4], kind)]
        return grad[int(module[2])].T
    if "modules_to_save" in parts:
        if parts[0] == "lm_head" and ("lm_head", "trainable_weight") in ours_grads:
            return ours_grads[("lm_head", "trainable_weight")].T
        return ours_grads[("model", "embed_tokens", "trainable_weight")]
    if parts[-1] == "bias":  # model.layers.{i}.{attn|mlp}.{proj}[.base_layer].bias
        key = ("model", "layers", parts[3], parts[4]) + (("base",) if parts[5] == "base_layer" else ()) + ("bias",)
        return ours_grads[key][int(parts[2])]
    raise AssertionError(f"no gradient of ours maps to {torch_name}")


# --------------------------------------------------------------------------------------------- PiSSA and OLoRA init


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_based_init_equals_peft(hf_llama, init):
    directory, torch_model = hf_llama()
    with pytest.warns(UserWarning, match="no tokenizer"):
        ours, _ = FastLanguageModel.from_pretrained(directory, dtype="float32")
    get_peft_model(ours, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init,
                   layers_to_transform=[1])
    theirs = _peft_model(torch_model, ours)
    named = dict(theirs.named_modules())
    for name in targeted_module_names(ours):
        torch_layer = named[f"base_model.model.{name}"]
        ours_layer, i = _our_layer(ours, name)
        w_ref = torch_layer.base_layer.weight.detach().numpy()  # the residual, [out, in]
        assert rel_err(np.asarray(ours_layer.base.weight[...])[i].T, w_ref) < 1e-5, name
        delta_ref = (torch_layer.lora_B["default"].weight @ torch_layer.lora_A["default"].weight).detach().numpy()
        delta = np.asarray(ours_layer.lora_a[...])[i] @ np.asarray(ours_layer.lora_b[...])[i]  # [in, out]
        assert rel_err(delta.T, delta_ref) < 1e-4, name
    # layer 0 keeps its original weights
    w0 = torch_model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(ours.model.layers.self_attn.q_proj.base.weight[...])[0].T, w0)
    ids = np.random.default_rng(2).integers(0, ours.config.vocab_size, (1, 9))
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(np.asarray(ours(jnp.asarray(ids))), ref) < 1e-4


def _peft_loftq_on_cpu(weight: torch.Tensor, r: int, num_iter: int):
    """PEFT's `loftq_init` (4-bit) step by step with bitsandbytes' CPU functions (PEFT's own needs CUDA)."""
    import bitsandbytes.functional as bnbf
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = weight.float()
    res = weight.clone()
    for i in range(num_iter):
        # flattened: bitsandbytes' CPU dequantize of a 2-D weight whose rows are not whole blocks does not invert its
        # own (flat) quantize; on CUDA, where PEFT runs LoftQ, blocks are flat
        q, state = bnbf.quantize_4bit(res.reshape(-1), quant_type="nf4", compress_statistics=False, blocksize=64)
        dequantized = bnbf.dequantize_4bit(q, state).reshape(res.shape)
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=r)
        if i + 1 == num_iter:
            break
        res = weight - out["L"] @ out["R"]
    return dequantized, out["R"], out["L"]  # base, lora_A, lora_B


def test_loftq_equals_peft_algorithm(hf_llama):
    directory, torch_model = hf_llama()
    with pytest.warns(UserWarning, match="no tokenizer"):
        ours, _ = FastLanguageModel.from_pretrained(directory, dtype="float32")
    get_peft_model(ours, r=4, target_modules=["v_proj", "gate_proj"], init_lora_weights="loftq",
                   loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    for name in targeted_module_names(ours):
        layer, i = _our_layer(ours, name)
        hf = dict(torch_model.named_modules())[name]
        base, lora_a, lora_b = _peft_loftq_on_cpu(hf.weight.detach(), 4, 2)
        # the second round quantizes W - L R, whose SVD rounding differs from torch's in the last bits
        assert rel_err(np.asarray(layer.base.weight[...])[i].T, base.numpy()) < 1e-6, name
        delta = np.asarray(layer.lora_a[...])[i] @ np.asarray(layer.lora_b[...])[i]
        assert rel_err(delta.T, (lora_b @ lora_a).numpy()) < 1e-4, name


def test_nf4_roundtrip_equals_bitsandbytes_without_double_quant():
    import bitsandbytes.functional as bnbf

    from fastlora_jax.lora_init import nf4_roundtrip

    x = np.random.default_rng(3).normal(0, 0.02, (96, 80)).astype(np.float32)  # 7680 = 120 blocks of 64
    flat = torch.tensor(x.reshape(-1))  # flat blocks, as on CUDA (see _peft_loftq_on_cpu)
    q, state = bnbf.quantize_4bit(flat, quant_type="nf4", compress_statistics=False, blocksize=64)
    np.testing.assert_array_equal(nf4_roundtrip(x).reshape(-1), bnbf.dequantize_4bit(q, state).numpy().reshape(-1))
