"""Our float32 logits equal transformers' on tiny random Llama checkpoints (tied/untied, GQA, llama3 rope, biases)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fastlora_jax import FastLanguageModel

from helpers import rel_err

VARIANTS = {
    "untied_gqa": dict(tie_word_embeddings=False),
    "tied": dict(tie_word_embeddings=True),
    "mha_head_dim": dict(num_key_value_heads=4, head_dim=32),
    "llama3_rope_bias": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64),
                             rope_theta=500000.0, attention_bias=True, mlp_bias=True),
}


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(hf_llama, variant):
    directory, torch_model = hf_llama(**VARIANTS[variant])
    model, tokenizer = FastLanguageModel.from_pretrained(directory, dtype="float32")
    assert tokenizer is None
    ids = np.random.default_rng(1).integers(0, 256, (2, 11))
    ours = np.asarray(model(jnp.asarray(ids)))
    assert ours.shape == (2, 11, 256)
    assert rel_err(ours, _torch_logits(torch_model, ids)) < 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(hf_llama, side):
    directory, torch_model = hf_llama(tie_word_embeddings=False)
    model, _ = FastLanguageModel.from_pretrained(directory, dtype="float32")
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 256, (3, 9))
    lengths = [9, 6, 3]
    mask = np.zeros((3, 9), np.int64)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, 9 - n:] = 1
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = _torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    assert rel_err(ours[real], ref[real]) < 1e-4
    # Each padded row's real tokens give the same logits as that sequence alone, unpadded.
    for row, n in enumerate(lengths):
        alone = ids[row, :n] if side == "right" else ids[row, 9 - n:]
        single = np.asarray(model(jnp.asarray(alone[None])))[0]
        assert rel_err(ours[row][real[row]], single) < 1e-4


def test_bf16_checkpoint_loads_in_bf16(hf_llama):
    directory, torch_model = hf_llama(torch_dtype=torch.bfloat16)
    model, _ = FastLanguageModel.from_pretrained(directory, dtype="bfloat16")
    assert model.model.layers.self_attn.q_proj.weight[...].dtype == jnp.bfloat16
    ids = np.random.default_rng(3).integers(0, 256, (1, 8))
    ours = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    ref = _torch_logits(torch_model.to(torch.bfloat16).float(), ids)
    assert rel_err(ours, ref) < 2e-2


def test_float16_runs_on_every_backend(hf_llama):
    """float16 (a name or torch.float16, as Unsloth users pass it) runs on CPU too, where XLA's dot has no float16
    x float16 -> float32 (the grouped-query attention's einsum): logits near transformers' float32 ones."""
    directory, torch_model = hf_llama(tie_word_embeddings=False)
    model, _ = FastLanguageModel.from_pretrained(directory, dtype=torch.float16)
    assert model.model.layers.self_attn.q_proj.weight[...].dtype == jnp.float16
    ids = np.random.default_rng(4).integers(0, 256, (2, 8))
    ours = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    assert rel_err(ours, _torch_logits(torch_model, ids)) < 1e-2


def test_max_seq_length_beyond_the_model_scales_rope_linearly_as_unsloth(hf_llama):
    """max_seq_length above max_position_embeddings applies linear RoPE scaling by their ratio (Unsloth's rule, with
    a warning): logits equal transformers' with that rope_scaling, which merged exports write. None takes the
    model's own length; within it nothing changes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory, torch_model = hf_llama(max_position_embeddings=256)
    ids = np.random.default_rng(5).integers(0, 256, (1, 300))
    with pytest.warns(UserWarning, match=r"at most 256 positions; max_seq_length=1024 applies linear RoPE scaling of "
                                         r"factor 4"):
        model, _ = FastLanguageModel.from_pretrained(directory, max_seq_length=1024, dtype="float32")
    assert model.config.to_hf_config()["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}  # for exports
    config = LlamaConfig.from_pretrained(directory)
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}  # transformers 5's field
    scaled = LlamaForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32).eval()
    assert rel_err(np.asarray(model(jnp.asarray(ids))), _torch_logits(scaled, ids)) < 1e-4
    unscaled, _ = FastLanguageModel.from_pretrained(directory, max_seq_length=None, dtype="float32")
    assert unscaled.max_seq_length == 256 and unscaled.config.rope_scaling.rope_type == "default"
    assert rel_err(np.asarray(unscaled(jnp.asarray(ids))), _torch_logits(torch_model, ids)) < 1e-4
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=64)
    directory3, _ = hf_llama(max_position_embeddings=256, rope_scaling=llama3, rope_theta=500000.0)
    with pytest.warns(UserWarning, match="'llama3' RoPE scaling is kept"):
        kept, _ = FastLanguageModel.from_pretrained(directory3, max_seq_length=1024, dtype="float32")
    assert kept.config.rope_scaling.rope_type == "llama3"
