"""The one real pretrained model available offline: SmolLM2-135M-Instruct from its GGUF, ours vs transformers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fastlora_jax import FastLanguageModel
from fastlora_jax.converters.resolve import resolve_model_name

from helpers import rel_err


@pytest.fixture(scope="module")
def smollm2():
    resolved = resolve_model_name("SmolLM2-135M-Instruct")
    model, tokenizer = FastLanguageModel.from_pretrained("SmolLM2-135M-Instruct", dtype="float32")
    return resolved, model, tokenizer


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    resolved, model, tokenizer = smollm2
    torch_model = AutoModelForCausalLM.from_pretrained(
        str(resolved.directory), gguf_file=resolved.gguf_path.name, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    ids = np.asarray(ids, np.int64)[None]
    ours = np.asarray(model(jnp.asarray(ids)))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
    assert rel_err(ours, ref) < 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_preset_has_the_bundled_checkpoints_shapes(smollm2):
    """`config.preset("smollm2-135m")` (benchmarks' random-weight stand-in for the main job's model) is the GGUF's
    config but for the float32 rounding of its epsilon and the tokenizer's pad id."""
    import dataclasses

    from fastlora_jax.config import preset

    _, model, _ = smollm2
    loaded = dataclasses.replace(model.config, rms_norm_eps=1e-5, pad_token_id=None)
    assert preset("smollm2-135m") == loaded
    assert model.config.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
