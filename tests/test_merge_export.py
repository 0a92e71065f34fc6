"""Merged exports: 16-bit and bnb-4bit transformers checkpoints, GGUF, merge_and_unload / unmerge, crash-safe saves."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fastlora_jax import TRAINABLE, FastLanguageModel
from fastlora_jax.converters import atomic, merge
from fastlora_jax.lora import get_peft_model

from helpers import make_hf_llama, rel_err

transformers = pytest.importorskip("transformers")
VOCAB = 320
IDS = np.random.default_rng(5).integers(3, VOCAB, (2, 10))
_forward = nnx.jit(lambda model, ids: model(ids))
LORA = dict(r=4, lora_alpha=8, use_rslora=True, bias="all", modules_to_save=["lm_head"],
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def logits(model) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(IDS)).astype(jnp.float32))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("merge") / "base"
    make_hf_llama(path, seed=11, vocab_size=VOCAB, attention_bias=True, bos_token_id=1, eos_token_id=2)
    return str(path)


@pytest.fixture(scope="module")
def base_without_bias(tmp_path_factory):
    """transformers' GGUF loader reads no llama biases (its config has no attention_bias), so the GGUF test
    uses a bias-free base."""
    path = tmp_path_factory.mktemp("merge") / "base_without_bias"
    make_hf_llama(path, seed=12, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer of ~300 tokens with a chat template (fast to train, write and read)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")


def lora_model(base, seed=0, load_in_4bit=False, **settings):
    model, _ = FastLanguageModel.from_pretrained(base, dtype="float32", load_in_4bit=load_in_4bit)
    get_peft_model(model, **{**LORA, **settings})
    return perturbed(model, seed)


def perturbed(model, seed=0):
    state = nnx.state(model, TRAINABLE)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, var in nnx.to_flat_state(state):  # every adapter weight, copy and bias away from its init
        value = var[...]
        var.set_value(value + 0.1 * jax.random.normal(next(keys), value.shape, value.dtype))
    nnx.update(model, state)
    return model


def snapshot(directory) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_merged_16bit_loads_in_transformers_with_our_logits(base, tokenizer, tmp_path):
    model = lora_model(base)
    ours = logits(model)
    out = str(tmp_path / "merged")
    model.save_pretrained_merged(out, tokenizer, save_method="merged_16bit", max_shard_size="60KB", dtype="float32")
    files = os.listdir(out)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "generation_config.json", merge.INDEX_NAME, "tokenizer.json"} <= set(files)
    index = json.load(open(os.path.join(out, merge.INDEX_NAME)))
    assert set(index["weight_map"].values()) == set(shards)
    # a shard exceeds the limit only when one tensor alone does (the 320 x 64 float32 embedding and head)
    assert all(os.path.getsize(os.path.join(out, s)) <= 60_000 + 1024 for s in shards if "00001" not in s
               and index["weight_map"]["lm_head.weight"] != s)
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert rel_err(torch_logits(hf), ours) < 1e-4
    loaded_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded_tok("the lazy fox")["input_ids"] == tokenizer("the lazy fox")["input_ids"]

    # the default into the same directory: bfloat16 (16 bits, though the model is float32), in one file now; the
    # old shards and index are gone
    assert model.dtype == jnp.float32
    model.save_pretrained_merged(out, tokenizer, save_method="merged_16bit")
    assert not [f for f in os.listdir(out) if f.startswith("model-") or f == merge.INDEX_NAME]
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf16.dtype == torch.bfloat16
    assert rel_err(torch_logits(hf16), ours) < 2e-2

    model.save_pretrained_merged(str(tmp_path / "lora"), tokenizer, save_method="lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "lora"))
    with pytest.raises(ValueError, match=r"save_method='merged_8bit'; accepted: 'merged_16bit', 'merged_4bit'"):
        model.save_pretrained_merged(str(tmp_path / "x"), tokenizer, save_method="merged_8bit")


def test_merge_and_unload_then_unmerge(base, tmp_path):
    model = lora_model(base)
    before = logits(model)
    lora_state = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    weight = np.asarray(model.model.layers.self_attn.q_proj.base.weight[...])

    merged = model.merge_and_unload()
    assert merged is model and model.peft_config is None
    assert not nnx.to_flat_state(nnx.state(model, TRAINABLE))  # nothing trains: a plain model
    assert rel_err(logits(model), before) < 1e-5
    model.save_pretrained(str(tmp_path / "plain"))  # a plain model saves a transformers checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32)
    assert rel_err(torch_logits(hf), before) < 1e-4

    model.unmerge()
    assert model.peft_config is not None
    np.testing.assert_allclose(np.asarray(model.model.layers.self_attn.q_proj.base.weight[...]), weight, atol=1e-6)
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    assert after.keys() == lora_state.keys()
    for path in after:
        np.testing.assert_allclose(after[path], lora_state[path], atol=1e-6, err_msg=str(path))
    assert rel_err(logits(model), before) < 1e-5
    with pytest.raises(ValueError, match="not merged"):
        model.unmerge()


def test_qlora_merges_dequantize_first(base, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    del bnb
    model = lora_model(base, load_in_4bit=True, modules_to_save=None, bias="none")
    ours = logits(model)

    model.save_pretrained_merged(str(tmp_path / "m16"), None, save_method="merged_16bit", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m16"), dtype=torch.float32)
    assert rel_err(torch_logits(hf), ours) < 1e-4

    model.save_pretrained_merged(str(tmp_path / "m4"), None, save_method="merged_4bit")
    config = json.load(open(tmp_path / "m4" / "config.json"))
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m4"), device_map="cpu")
    assert type(hf4.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    requantized = model.merge_and_unload()  # NF4 base: dequantize, merge, requantize (as PEFT)
    # The file's bytes, dequantized by bitsandbytes, are exactly our requantized merged weights.
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    from fastlora_jax.nf4 import dequantize_nf4

    saved = load_file(str(tmp_path / "m4" / "model.safetensors"))
    for i in range(2):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            prefix = f"model.layers.{i}.{name}."
            state = F.QuantState.from_dict({k[len(prefix) + 7:]: v for k, v in saved.items()
                                            if k.startswith(prefix + "weight.")}, device="cpu")
            ref = F.dequantize_4bit(saved[prefix + "weight"], state).numpy()
            layer = getattr(getattr(requantized.model.layers, name.split(".")[0]), name.split(".")[1])
            np.testing.assert_array_equal(np.asarray(dequantize_nf4(layer.nf4()[i])), ref, err_msg=prefix)
    theirs, mine = torch_logits(hf4), logits(requantized)
    assert rel_err(theirs, mine) < 1e-2  # bitsandbytes' CPU kernel keeps the block absmax in bfloat16
    assert rel_err(mine, ours) < 0.2  # requantizing the merged weight costs 4-bit precision, nothing more
    with pytest.raises(ValueError, match=r"4-bit \(NF4\) base.*cannot be undone"):
        model.unmerge()


def test_gguf_f16_export_read_back_by_transformers(base_without_bias, tokenizer, tmp_path):
    pytest.importorskip("gguf")
    model = lora_model(base_without_bias, bias="none")
    ours = logits(model)
    model.save_pretrained_gguf(str(tmp_path / "gguf"), tokenizer, quantization_method="f16")
    assert os.listdir(tmp_path / "gguf") == ["model.F16.gguf"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file="model.F16.gguf",
                                                           dtype=torch.float32)
    assert rel_err(torch_logits(hf), ours) < 2e-3
    with pytest.raises(ValueError, match=r"quantization_method='q4_k_m'; accepted: 'f32', 'f16', 'bf16', 'q8_0'"):
        model.save_pretrained_gguf(str(tmp_path / "x"), tokenizer, quantization_method="q4_k_m")


def test_gguf_f32_and_a_list_of_methods(base_without_bias, tokenizer, tmp_path):
    """"f32" stores every tensor in float32 (not the model's 16-bit type); a list writes one file a method (as
    Unsloth) and returns their paths."""
    gguf = pytest.importorskip("gguf")
    model = lora_model(base_without_bias, bias="none")
    out = str(tmp_path / "gguf")
    paths = model.save_pretrained_gguf(out, tokenizer, quantization_method=["f32", "q8_0"])
    assert [os.path.basename(p) for p in paths] == ["model.F32.gguf", "model.Q8_0.gguf"]
    reader = gguf.GGUFReader(paths[0])
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    ours, _ = FastLanguageModel.from_pretrained(out, gguf_file="model.F32.gguf", dtype="float32")
    assert rel_err(logits(ours), logits(model)) < 1e-5  # float32 all the way: only the merge's rounding
    with pytest.raises(ValueError, match=r"a non-empty list of methods without file_name"):
        model.save_pretrained_gguf(out, tokenizer, quantization_method=["f16"], file_name="x.gguf")


def test_adapter_of_a_gguf_base_reloads_from_its_directory(base_without_bias, tokenizer, tmp_path):
    """An adapter trained over a GGUF picked by gguf_file names that file as its base, so from_pretrained(adapter)
    finds it again."""
    pytest.importorskip("gguf")
    lora_model(base_without_bias, bias="none").merge_and_unload().save_pretrained_gguf(
        str(tmp_path / "g"), tokenizer, quantization_method="f32")
    base, _ = FastLanguageModel.from_pretrained(str(tmp_path / "g"), gguf_file="model.F32.gguf", dtype="float32")
    model = perturbed(get_peft_model(base, r=4, lora_alpha=8))
    ours = logits(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["base_model_name_or_path"].endswith("model.F32.gguf")
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype="float32")
    assert rel_err(logits(again), ours) < 1e-6


def test_merged_save_refuses_a_directory_holding_an_adapter(base, tokenizer, tmp_path):
    """Every loader prefers adapter_config.json: a merged checkpoint written beside an adapter would never load.
    The directory is left as it was."""
    model = lora_model(base)
    out = str(tmp_path / "both")
    model.save_pretrained(out)
    before = snapshot(out)
    for method in ("merged_16bit", "merged_4bit"):
        with pytest.raises(FileExistsError, match=r"holds a PEFT adapter \(adapter_config.json\)"):
            model.save_pretrained_merged(out, tokenizer, save_method=method)
    assert snapshot(out) == before


def test_merged_save_takes_torch_dtypes(base, tmp_path):
    model = lora_model(base)
    out = str(tmp_path / "fp16")
    model.save_pretrained_merged(out, save_method="merged_16bit", dtype=torch.float16)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float16"
    with pytest.raises(ValueError, match=r"dtype=torch.int8; accepted: None \(the model's dtype\)"):
        model.save_pretrained_merged(str(tmp_path / "x"), save_method="merged_16bit", dtype=torch.int8)
    with pytest.raises(ValueError, match=r"dtype=\[1\] is not a dtype"):
        model.save_pretrained_merged(str(tmp_path / "x"), save_method="merged_16bit", dtype=[1])


class _Interrupted(RuntimeError):
    pass


def _raising_after(items, n):
    for i, item in enumerate(items):
        if i == n:
            raise _Interrupted("killed midway")
        yield item


def test_interrupted_saves_leave_previous_files_intact(base, tokenizer, tmp_path):
    model = lora_model(base)
    out = str(tmp_path / "merged")
    model.save_pretrained_merged(out, tokenizer, max_shard_size="60KB")
    before = snapshot(out)

    # the merge stream dies after several shards were written: nothing of it reaches `out`
    other = lora_model(base, seed=1)
    with pytest.raises(_Interrupted):
        merge.write_checkpoint(out, other, tokenizer, dtype=jnp.float32, max_shard_size="60KB",
                               tensors=_raising_after(merge.merged_tensors(other), 20))
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging directory left behind

    # the same into a directory that did not exist: it still does not
    with pytest.raises(_Interrupted):
        merge.write_checkpoint(str(tmp_path / "new"), other, None, dtype=jnp.float32,
                               tensors=_raising_after(merge.merged_tensors(other), 5))
    assert sorted(os.listdir(tmp_path)) == ["merged"]

    # an adapter save that fails while writing its tokenizer keeps the previous adapter
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)
    before = snapshot(adapter)

    class Failing:
        def save_pretrained(self, directory):
            open(os.path.join(directory, "tokenizer.json"), "w").write("{")  # a half-written file
            raise _Interrupted("killed while writing the tokenizer")

    with pytest.raises(_Interrupted):
        other.save_pretrained(adapter, tokenizer=Failing())
    assert snapshot(adapter) == before

    # one file: a failed write keeps the old content; too few tensors never produce a file
    path = tmp_path / "one.json"
    atomic.write_json(path, {"a": 1})
    with pytest.raises(_Interrupted):
        with atomic.atomic_file(path, "w") as f:
            f.write('{"a": ')
            raise _Interrupted("midway")
    assert json.loads(path.read_text()) == {"a": 1}
    specs = [atomic.TensorSpec("x", (2,), np.dtype(np.float32)), atomic.TensorSpec("y", (3,), np.dtype(np.float32))]
    with pytest.raises(ValueError, match="ended before 'y'"):
        atomic.write_safetensors(tmp_path / "t.safetensors", specs, [np.ones(2, np.float32)])
    assert not (tmp_path / "t.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "merged", "one.json"]


def test_gguf_default_method_is_unsloths_fast_quantized(base_without_bias, tokenizer, tmp_path):
    """Unsloth's save_pretrained_gguf defaults to quantization_method="fast_quantized" (q8_0), not f16."""
    pytest.importorskip("gguf")
    from fastlora_jax import export

    model = lora_model(base_without_bias, bias="none")
    assert os.path.basename(export.save_pretrained_gguf(model, str(tmp_path / "g"), tokenizer)) == "model.Q8_0.gguf"
    assert os.path.basename(model.save_pretrained_gguf(str(tmp_path / "m"), tokenizer)) == "model.Q8_0.gguf"


def test_hub_pushes_raise_naming_the_local_save(base, tmp_path):
    """Unsloth's push_to_hub* methods and TRL's push_to_hub=True: nothing here reaches the network, so each raises
    NotImplementedError naming the local save to run instead; nothing is written."""
    from fastlora_jax import SFTConfig

    model = lora_model(base)
    for method, save in (("push_to_hub", "save_pretrained"), ("push_to_hub_merged", "save_pretrained_merged"),
                         ("push_to_hub_gguf", "save_pretrained_gguf")):
        with pytest.raises(NotImplementedError, match=rf"^{method}: fastlora-jax does not upload .* model\.{save}\("):
            getattr(model, method)("me/my-lora", token="hf_x")
    with pytest.raises(NotImplementedError, match=r"push_to_hub=True: .*accepted: False"):
        SFTConfig(output_dir=str(tmp_path), push_to_hub=True)
    assert not SFTConfig(output_dir=str(tmp_path)).push_to_hub
