"""PEFT adapters both ways: ours load in PEFT with PEFT's keys and outputs; PEFT's load here with PEFT's outputs."""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from fastlora_jax import TRAINABLE, FastLanguageModel
from fastlora_jax.lora import get_peft_model

from helpers import make_hf_llama, rel_err

IDS = np.random.default_rng(7).integers(0, 256, (2, 9))
_forward = nnx.jit(lambda model, ids: model(ids))  # eager scans are slow; one compile per model structure


def logits(model) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(IDS)))

# name -> (checkpoint overrides, LoRA settings)
CASES = {
    "plain": (dict(), dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])),
    "rslora_layers_bias": (dict(attention_bias=True, mlp_bias=True),
                           dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                layers_to_transform=[1], bias="all")),
    "modules_to_save": (dict(), dict(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"],
                                     modules_to_save=["embed_tokens", "lm_head"])),
    "tied_modules_to_save": (dict(tie_word_embeddings=True),
                             dict(r=2, lora_alpha=2, target_modules="all-linear", modules_to_save=["lm_head"],
                                  ensure_weight_tying=True)),
    "regex_lm_head": (dict(), dict(r=4, lora_alpha=8, target_modules=r".*\.o_proj|lm_head")),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One tiny checkpoint per distinct overrides (written once per module)."""
    root = tmp_path_factory.mktemp("bases")
    cache = {}

    def get(overrides):
        key = json.dumps(overrides, sort_keys=True)
        if key not in cache:
            path = root / f"base{len(cache)}"
            make_hf_llama(path, seed=len(cache), **overrides)
            cache[key] = str(path)
        return cache[key]

    return get


def _torch_base(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()


def _ours(directory):
    model, _ = FastLanguageModel.from_pretrained(directory, dtype="float32")
    return model


def _randomize(model, seed=0) -> None:
    """Every trainable variable (LoRA A and B, copies, biases) moved away from its init."""
    state = nnx.state(model, TRAINABLE)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, var in nnx.to_flat_state(state):
        value = var[...]
        var.set_value(value + 0.1 * jax.random.normal(next(keys), value.shape, value.dtype))
    nnx.update(model, state)


def _peft_config(settings, base_dir=None):
    import peft

    kw = dict(settings)
    kw.setdefault("lora_dropout", 0.0)
    if kw.get("modules_to_save"):  # as ours with tied embeddings: one copy serves the embedding and the head
        kw["ensure_weight_tying"] = True
    return peft.LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=base_dir, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_load_in_peft_with_its_keys_and_outputs(bases, tmp_path, case):
    import peft

    overrides, settings = CASES[case]
    base_dir = bases(overrides)
    model = get_peft_model(_ours(base_dir), **settings)
    _randomize(model)
    ours = logits(model)
    model.save_pretrained(str(tmp_path / "adapter"))

    # The keys, shapes and config fields PEFT itself writes for the same adapter.
    reference = peft.get_peft_model(_torch_base(base_dir), _peft_config(settings))
    reference.save_pretrained(str(tmp_path / "peft"))
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir
    peft_fields = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "bias", "layers_to_transform",
                  "fan_in_fan_out", "inference_mode", "init_lora_weights", "use_dora"):
        assert config[field] == peft_fields[field], field

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(_torch_base(base_dir), str(tmp_path / "adapter")).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    result = peft.set_peft_model_state_dict(loaded, {k: torch.from_numpy(v) for k, v in mine.items()})
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    assert rel_err(ours, _torch_logits(loaded)) < 1e-4
    assert rel_err(ours, _torch_logits(_torch_base(base_dir))) > 1e-3  # the adapter matters


def _peft_trained(base_dir, settings, directory, seed=0):
    """An adapter made by PEFT in torch, every trainable tensor set to random non-zero values; returns its logits."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(_torch_base(base_dir), _peft_config(settings))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return _torch_logits(model.eval())


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapters_load_here_with_peft_outputs(bases, tmp_path, case):
    overrides, settings = CASES[case]
    base_dir = bases(overrides)
    adapter = str(tmp_path / "peft_adapter")
    ref = _peft_trained(base_dir, settings, adapter)
    assert json.loads(open(os.path.join(adapter, "adapter_config.json")).read())["base_model_name_or_path"] == base_dir

    model = _ours(base_dir).load_adapter(adapter)  # a plain model gets the adapter's structure, then its weights
    assert rel_err(logits(model), ref) < 1e-4
    model2, _ = FastLanguageModel.from_pretrained(adapter, dtype="float32")  # base named by the adapter, then it
    assert rel_err(logits(model2), ref) < 1e-4
    # Into a model that already has these adapters (from get_peft_model with the same settings): same result.
    model3 = get_peft_model(_ours(base_dir), **settings).load_adapter(adapter)
    assert rel_err(logits(model3), ref) < 1e-4
    # And back out: our save of the loaded adapter holds exactly PEFT's tensors.
    model.save_pretrained(str(tmp_path / "again"))
    a, b = load_file(os.path.join(adapter, "adapter_model.safetensors")), \
        load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_mismatched_adapters_raise_naming_the_mismatch(bases, tmp_path):
    base_dir = bases({})
    adapter = str(tmp_path / "r4")
    _peft_trained(base_dir, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter)

    # other r than the model's LoRA
    with pytest.raises(ValueError, match=r"r: adapter 4, model 8"):
        get_peft_model(_ours(base_dir), r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]).load_adapter(adapter)
    # other targets than the model's LoRA
    with pytest.raises(ValueError, match=r"LoRA layers"):
        get_peft_model(_ours(base_dir), r=4, lora_alpha=8, target_modules=["q_proj"]).load_adapter(adapter)

    # a target the model does not have
    config = json.loads(open(os.path.join(adapter, "adapter_config.json")).read())
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "qkv_proj"]}))
    os.link(os.path.join(adapter, "adapter_model.safetensors"), unknown / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no module matches 'qkv_proj'"):
        _ours(base_dir).load_adapter(str(unknown))

    # another base shape (hidden size 96 instead of 64): names the key and both shapes, model left unchanged
    other_dir = bases(dict(hidden_size=96, intermediate_size=160))
    wide = str(tmp_path / "wide")
    _peft_trained(other_dir, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), wide)
    model = _ours(base_dir)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight: adapter has \(4, 96\), model expects \(4, 64\)"):
        model.load_adapter(wide)
    assert model.peft_config is None

    # a config that says r=8 over r=4 tensors
    lying = tmp_path / "lying"
    lying.mkdir()
    (lying / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    os.link(os.path.join(adapter, "adapter_model.safetensors"), lying / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"mis-shaped.*adapter has \(4, 64\), model expects \(8, 64\)"):
        _ours(base_dir).load_adapter(str(lying))

    # PEFT features we do not implement are refused by name
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NotImplementedError, match=r"use_dora=True"):
        _ours(base_dir).load_adapter(str(dora))


def test_loftq_adapter_reloads_on_the_base_loftq_made(bases, tmp_path):
    """LoftQ replaces the targeted base weights by their NF4 dequantization, and PEFT does so again when it loads a
    LoftQ adapter: so do ours, and the reloaded model equals the trained one (not the adapter over the original
    base). Over an NF4 base, where LoftQ cannot run, loading names the reason."""
    base_dir = bases({})
    model = get_peft_model(_ours(base_dir), r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                           init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    _randomize(model)
    trained = logits(model)
    adapter = str(tmp_path / "loftq")
    with pytest.warns(UserWarning, match="LoftQ: their NF4 dequantization"):
        model.save_pretrained(adapter)
    assert rel_err(logits(_ours(base_dir).load_adapter(adapter)), trained) < 1e-6
    assert rel_err(logits(FastLanguageModel.from_pretrained(adapter, dtype="float32")[0]), trained) < 1e-6
    nf4_model, _ = FastLanguageModel.from_pretrained(base_dir, dtype="float32", load_in_4bit=True)
    with pytest.raises(ValueError, match="loftq.*full-precision.*also when it loads a LoftQ adapter"):
        nf4_model.load_adapter(adapter)


def test_adapters_of_inits_that_set_only_a_and_b_load_with_peft_outputs(bases, tmp_path):
    """PEFT's "orthogonal" init sets A and B alone (the base stays), so its adapters load as any other."""
    base_dir = bases({})
    adapter = str(tmp_path / "orthogonal")
    ref = _peft_trained(base_dir, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights="orthogonal"), adapter)
    assert json.load(open(os.path.join(adapter, "adapter_config.json")))["init_lora_weights"] == "orthogonal"
    assert rel_err(logits(_ours(base_dir).load_adapter(adapter)), ref) < 1e-4


def test_unreadable_adapter_config_names_the_file(bases, tmp_path):
    for name, text in (("corrupt", '{"r": 4,'), ("list", "[4]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"{name}/adapter_config.json .*JSON"):
            _ours(bases({})).load_adapter(str(tmp_path / name))
