"""QLoRA end to end: bnb-4bit checkpoints and load_in_4bit=True through from_pretrained, and a QLoRA training step."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from fastlora_jax import TRAINABLE, FastLanguageModel
from fastlora_jax.loss import causal_lm_loss
from fastlora_jax.nf4 import NF4Linear, NF4State

from helpers import make_hf_llama, rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """(16-bit dir, transformers+bitsandbytes NF4 model, its saved dir) for a tiny random bf16 Llama."""
    root = tmp_path_factory.mktemp("qlora")
    make_hf_llama(root / "bf16", seed=3, torch_dtype=torch.bfloat16)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        str(root / "bf16"), device_map="cpu", dtype=torch.bfloat16,
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_compute_dtype=torch.bfloat16))
    quantized.save_pretrained(str(root / "nf4"))
    return str(root / "bf16"), quantized.eval(), str(root / "nf4")


def _nf4_state(model):
    return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, NF4State))}


def test_prequantized_checkpoint_gives_transformers_logits(bnb_checkpoint):
    _, quantized, nf4_dir = bnb_checkpoint
    model, _ = FastLanguageModel.from_pretrained(nf4_dir, dtype="bfloat16")
    assert all(isinstance(getattr(model.model.layers.self_attn, n, None) or getattr(model.model.layers.mlp, n),
                          NF4Linear) for n in LINEARS)
    ids = np.random.default_rng(0).integers(0, 256, (2, 10))
    with torch.no_grad():
        ref = quantized(torch.tensor(ids)).logits.float().numpy()
    ours = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    assert rel_err(ours, ref) < 2e-2


def test_quantize_on_load_equals_prequantized(bnb_checkpoint):
    bf16_dir, _, nf4_dir = bnb_checkpoint
    fresh, _ = FastLanguageModel.from_pretrained(bf16_dir, dtype="bfloat16", load_in_4bit=True)
    loaded, _ = FastLanguageModel.from_pretrained(nf4_dir, dtype="bfloat16")
    a, b = _nf4_state(fresh), _nf4_state(loaded)
    assert a.keys() == b.keys() and len(a) == 4 * 7
    for path in a:
        if path[-1] == "offset":  # the mean of the absmax: torch's float32 summation order may differ by an ulp
            np.testing.assert_allclose(a[path], b[path], rtol=1e-6)
        else:
            np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_qlora_step_changes_only_lora(tmp_path):
    make_hf_llama(tmp_path / "m", seed=4)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32", load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=TRAINABLE)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)))

    @nnx.jit
    def step(model, optimizer, ids):
        def loss_fn(model):
            total, count = causal_lm_loss(model, ids, ids)
            return total / count

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(2):
        step(model, optimizer, ids)
    trainable = {p for p, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    for path, value in after.items():
        if path in trainable:
            assert not np.array_equal(value, before[path]), path
        else:
            np.testing.assert_array_equal(value, before[path], err_msg=str(path))
    assert any(path[-1] == "packed" for path in after)


def test_set_rounding_switches_every_nf4_layer(tmp_path):
    # gemv_4bit (bitsandbytes' inference-kernel weights) on the whole model and back: the bf16 logits move by one
    # weight rounding's worth, and return bit for bit.
    from fastlora_jax.nf4 import set_rounding

    make_hf_llama(tmp_path / "m", seed=5)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="bfloat16", load_in_4bit=True)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 8)))
    exact = np.asarray(model(ids).astype(jnp.float32))
    assert set_rounding(model, "gemv_4bit") == len(LINEARS)
    assert all(m.rounding == "gemv_4bit" for _, m in nnx.iter_graph(model) if isinstance(m, NF4Linear))
    gemv = np.asarray(model(ids).astype(jnp.float32))
    assert not np.array_equal(gemv, exact) and rel_err(gemv, exact) < 2e-2
    set_rounding(model, "dequantize_4bit")
    np.testing.assert_array_equal(np.asarray(model(ids).astype(jnp.float32)), exact)
    with pytest.raises(ValueError, match=r"rounding='bf16'; accepted: 'dequantize_4bit', 'gemv_4bit', 'bitsandbytes'"):
        set_rounding(model, "bf16")
    with pytest.raises(ValueError, match=r"rounding='bf16'; accepted: 'dequantize_4bit', 'gemv_4bit', 'bitsandbytes'"):
        set_rounding(model, "gemv_4bit", where="bf16")
    assert set_rounding(model, "gemv_4bit", where="bitsandbytes") == 0  # no layer has it: none changes
