"""from_pretrained rejects bad input with errors that name the value and what is accepted."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fastlora_jax import FastLanguageModel


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _edit_tensors(directory, edit):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_model_type(hf_llama):
    directory, _ = hf_llama()
    _edit_config(directory, model_type="mistral")
    with pytest.raises(ValueError, match=r"model_type='mistral'.*supported model types: llama"):
        FastLanguageModel.from_pretrained(directory)


def test_missing_tensor_is_named(hf_llama):
    directory, _ = hf_llama()
    _edit_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        FastLanguageModel.from_pretrained(directory)


def test_unexpected_tensor_is_named(hf_llama):
    directory, _ = hf_llama()
    _edit_tensors(directory, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.ones((2, 2), np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected keys: model\.layers\.0\.self_attn\.extra\.weight"):
        FastLanguageModel.from_pretrained(directory)


def test_misshaped_tensor_names_key_and_both_shapes(hf_llama):
    directory, _ = hf_llama()
    _edit_tensors(directory, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.ones((16, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint has \(16, 64\), "
                                         r"model expects \(32, 64\)"):
        FastLanguageModel.from_pretrained(directory)


def test_bad_dtype_and_kwargs(hf_llama):
    directory, _ = hf_llama()
    with pytest.raises(ValueError, match=r"dtype='float8'; accepted: None, 'float32', 'bfloat16', 'float16'"):
        FastLanguageModel.from_pretrained(directory, dtype="float8")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['colour'\]"):
        FastLanguageModel.from_pretrained(directory, colour="red")


def test_missing_directory_and_files(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        FastLanguageModel.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match="empty"):
        FastLanguageModel.from_pretrained(str(tmp_path / "empty"))


def test_no_tokenizer_warns(hf_llama):
    directory, _ = hf_llama()
    with pytest.warns(UserWarning, match="no tokenizer"):
        _, tokenizer = FastLanguageModel.from_pretrained(directory)
    assert tokenizer is None


def test_unsloth_notebook_keywords(hf_llama, tmp_path):
    """The keywords an Unsloth notebook passes load as they mean there: the hub's, device placement's and vLLM's
    settings are ignored, Unsloth's extras at their defaults are taken, anything with an effect we lack raises
    naming it, and use_gradient_checkpointing sets the remat mode of a model loaded from an adapter directory."""
    directory, _ = hf_llama()
    with pytest.warns(UserWarning, match="no tokenizer"):
        model, _ = FastLanguageModel.from_pretrained(
            directory, max_seq_length=2048, dtype=None, load_in_4bit=False, token=None, device_map="auto",
            full_finetuning=False, load_in_8bit=False, load_in_16bit=True, rope_scaling=None, random_state=3407,
            fast_inference=False, max_lora_rank=16, gpu_memory_utilization=0.6, use_gradient_checkpointing="unsloth")
    for kwargs, match in [(dict(fast_inference=True), "fast_inference=True is not supported.*fast_generate"),
                          (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling=.*accepted: "
                                                                                   "rope_scaling=None"),
                          (dict(full_finetuning=True), "full_finetuning=True"),
                          (dict(load_in_8bit=True), "load_in_8bit=True"),
                          (dict(resize_model_vocab=300), "resize_model_vocab=300")]:
        with pytest.raises(NotImplementedError, match=match):
            FastLanguageModel.from_pretrained(directory, **kwargs)
    with pytest.raises(ValueError, match="load_in_16bit=True and load_in_4bit=True"):
        FastLanguageModel.from_pretrained(directory, load_in_4bit=True, load_in_16bit=True)
    with pytest.raises(ValueError, match="use_gradient_checkpointing='yes'"):
        FastLanguageModel.from_pretrained(directory, use_gradient_checkpointing="yes")
    FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.warns(UserWarning, match="no tokenizer"):
        loaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), use_gradient_checkpointing=False)
    assert loaded.model.gradient_checkpointing is False and loaded.peft_config.target_modules == ("q_proj",)
