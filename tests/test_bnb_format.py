"""bitsandbytes 4-bit checkpoints written by transformers on CPU <-> NF4Array (converters/bnb.py), byte for byte."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (lets safetensors.numpy read bfloat16)
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel, nf4
from fastlora_jax.converters import bnb

from helpers import make_hf_llama, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
NF4_CONFIG = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def _quantized_by_transformers(src: str, dst: str, **config):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=transformers.BitsAndBytesConfig(**config), device_map="cpu")
    model.save_pretrained(dst)
    with open(os.path.join(dst, "config.json")) as f:
        return model, json.load(f), load_file(os.path.join(dst, "model.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(16-bit tensors, transformers' NF4 model, its config.json dict, its tensors) for a tiny random Llama."""
    root = tmp_path_factory.mktemp("bnb")
    make_hf_llama(root / "bf16", seed=0, torch_dtype=torch.bfloat16, vocab_size=128, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2)
    original = load_file(str(root / "bf16" / "model.safetensors"))
    model, config, tensors = _quantized_by_transformers(str(root / "bf16"), str(root / "nf4"), **NF4_CONFIG)
    return str(root), original, model, config, tensors


def _prefixes():
    return [f"model.layers.{i}.{name}" for i in range(2) for name in LINEARS]


def test_prequantized_layers_equal_quantize_on_load(checkpoints):
    _, original, model, config, tensors = checkpoints
    bnb.check_bnb_config(config)
    assert bnb.bnb_linear_prefixes(tensors) == sorted(_prefixes())
    import bitsandbytes.functional as F

    for prefix in _prefixes():
        loaded = bnb.bnb_tensors_to_nf4(config, prefix, tensors)
        fresh = nf4.quantize_nf4(original[f"{prefix}.weight"], mean_threads=torch.get_num_threads())
        assert (loaded.shape, loaded.dtype) == (fresh.shape, fresh.dtype) == (original[f"{prefix}.weight"].shape,
                                                                               np.dtype(jnp.bfloat16))
        for field in ("packed", "absmax_q", "nested_absmax", "offset"):
            a, b = np.asarray(getattr(loaded, field)), np.asarray(getattr(fresh, field))
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (prefix, field)
        # The dequantized weight equals bitsandbytes' dequantization of transformers' Linear4bit module.
        module = model.get_submodule(prefix)
        ref = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
        ours = np.asarray(nf4.dequantize_nf4(loaded))
        assert ours.tobytes() == ref.view(torch.int16).numpy().tobytes()


def test_nf4_linear_matches_bnb_linear4bit_forward(checkpoints):
    _, _, model, config, tensors = checkpoints
    prefix = "model.layers.1.mlp.down_proj"
    layer = nf4.NF4Linear.from_nf4(bnb.bnb_tensors_to_nf4(config, prefix, tensors))
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    with torch.no_grad():
        ref = model.get_submodule(prefix)(torch.from_numpy(x)).numpy()  # float32 compute dtype
    assert rel_err(layer(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32), ref) < 1e-2


def test_nf4_to_bnb_tensors_round_trips(checkpoints):
    _, original, _, _, tensors = checkpoints
    for prefix in _prefixes():
        written = bnb.nf4_to_bnb_tensors(prefix, nf4.quantize_nf4(original[f"{prefix}.weight"],
                                                                  mean_threads=torch.get_num_threads()))
        assert sorted(written) == sorted(f"{prefix}.{s}" for s in bnb.BNB_SUFFIXES)
        for key, value in written.items():
            ref = tensors[key]
            assert value.dtype == ref.dtype and value.shape == ref.shape and value.tobytes() == ref.tobytes(), key
        stacked = nf4.stack_nf4([bnb.bnb_tensors_to_nf4(None, prefix, tensors)] * 2)
        with pytest.raises(ValueError, match="stack axes \\(2,\\)"):
            bnb.nf4_to_bnb_tensors(prefix, stacked)


def test_merged_4bit_export_loads_in_transformers(checkpoints, tmp_path):
    root, original, model, _, _ = checkpoints
    out = {k: v for k, v in original.items() if not any(k.startswith(p + ".") for p in _prefixes())}
    for prefix in _prefixes():
        out.update(bnb.nf4_to_bnb_tensors(prefix, nf4.quantize_nf4(original[f"{prefix}.weight"])))
    save_file(out, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(root, "bf16", "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = bnb.quantization_config("float32")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), device_map="cpu")
    assert type(exported.get_submodule(_prefixes()[0])).__name__ == "Linear4bit"
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 128, (2, 9)))
    with torch.no_grad():
        got, ref = exported(ids).logits.float().numpy(), model(ids).logits.float().numpy()
    assert rel_err(got, ref) < 1e-6


def test_fp4_and_8bit_checkpoints_raise_naming_what_is_supported(checkpoints, tmp_path):
    root, _, _, nf4_config, nf4_tensors = checkpoints
    src = os.path.join(root, "bf16")
    _, config, tensors = _quantized_by_transformers(src, str(tmp_path / "fp4"), load_in_4bit=True,
                                                    bnb_4bit_quant_type="fp4")
    with pytest.raises(ValueError, match="bnb_4bit_quant_type='fp4'.*supported: bitsandbytes 4-bit NF4"):
        bnb.check_bnb_config(config)
    with pytest.raises(ValueError, match="fp4-quantized layer; supported: .*nf4"):
        bnb.bnb_linear_prefixes(tensors)
    with pytest.raises(ValueError, match="fp4-quantized layer"):
        bnb.bnb_tensors_to_nf4(None, "model.layers.0.self_attn.q_proj", tensors)

    _, config, tensors = _quantized_by_transformers(src, str(tmp_path / "int8"), load_in_8bit=True)
    with pytest.raises(ValueError, match="8-bit bitsandbytes checkpoint .*supported: bitsandbytes 4-bit NF4"):
        bnb.check_bnb_config(config)
    with pytest.raises(ValueError, match="8-bit \\(LLM.int8\\) layer"):
        bnb.bnb_linear_prefixes(tensors)

    for bad, match in [({"quant_method": "gptq"}, "quant_method='gptq'"),
                       ({**nf4_config["quantization_config"], "bnb_4bit_use_double_quant": False},
                        "bnb_4bit_use_double_quant=False"),
                       ({**nf4_config["quantization_config"], "bnb_4bit_quant_storage": "bfloat16"},
                        "bnb_4bit_quant_storage='bfloat16'")]:
        with pytest.raises(ValueError, match=match):
            bnb.check_bnb_config({"quantization_config": bad})
    with pytest.raises(ValueError, match="no quantization_config"):
        bnb.check_bnb_config({})
    assert bnb.is_bnb_checkpoint(nf4_config) and not bnb.is_bnb_checkpoint({})


def test_malformed_layer_tensors_raise(checkpoints):
    _, _, _, config, tensors = checkpoints
    prefix = "model.layers.0.mlp.up_proj"
    layer = {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    with pytest.raises(ValueError, match="missing: model.layers.0.mlp.up_proj.weight.nested_absmax"):
        bnb.bnb_tensors_to_nf4(config, prefix, {k: v for k, v in layer.items() if not k.endswith("nested_absmax")})
    bad_map = {**layer, f"{prefix}.weight.quant_map": layer[f"{prefix}.weight.quant_map"][::-1].copy()}
    with pytest.raises(ValueError, match="quant_map is not the NF4 table"):
        bnb.bnb_tensors_to_nf4(config, prefix, bad_map)
    short = {**layer, f"{prefix}.weight.absmax": layer[f"{prefix}.weight.absmax"][:-1]}
    with pytest.raises(ValueError, match=r"weight.absmax: uint8 \(127,\); .* stores uint8 \(128,\)"):
        bnb.bnb_tensors_to_nf4(config, prefix, short)
    state = json.loads(bytes(layer[f"{prefix}.{bnb.QUANT_STATE_KEY}"]).decode())
    state["blocksize"] = 128
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    with pytest.raises(ValueError, match="blocksize=128"):
        bnb.bnb_tensors_to_nf4(config, prefix, {**layer, f"{prefix}.{bnb.QUANT_STATE_KEY}": raw})


def test_checkpoint_keeping_some_layers_in_16bit_loads_them_quantized(checkpoints, tmp_path):
    """Unsloth's dynamic 4-bit checkpoints keep some decoder projections in 16-bit (llm_int8_skip_modules). Each
    projection's layers are stacked in one format here, so those load quantized as load_in_4bit=True quantizes them
    (with a warning naming them); every other layer keeps the checkpoint's own NF4 bytes."""
    root, original, _, _, _ = checkpoints
    skip = "model.layers.1.mlp.down_proj"
    _, config, tensors = _quantized_by_transformers(
        os.path.join(root, "bf16"), str(tmp_path / "mixed"), **NF4_CONFIG, llm_int8_skip_modules=["lm_head", skip])
    assert tensors[f"{skip}.weight"].dtype == np.dtype(jnp.bfloat16) and f"{skip}.weight.absmax" not in tensors
    with pytest.warns(UserWarning, match=rf"keeps {skip} in 16-bit \(llm_int8_skip_modules\)"):
        mixed, _ = FastLanguageModel.from_pretrained(str(tmp_path / "mixed"), dtype="bfloat16")
    on_load, _ = FastLanguageModel.from_pretrained(os.path.join(root, "bf16"), dtype="bfloat16", load_in_4bit=True)
    for name in ("down_proj", "up_proj"):
        a, b = getattr(mixed.model.layers.mlp, name).nf4(), getattr(on_load.model.layers.mlp, name).nf4()
        for field in ("packed", "absmax_q", "nested_absmax", "offset"):
            assert np.asarray(getattr(a, field)).tobytes() == np.asarray(getattr(b, field)).tobytes(), (name, field)
