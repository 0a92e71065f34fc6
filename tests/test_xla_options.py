"""fastlora_jax.compiler_options(): the overrides, the errors, and (on a GPU) the LoRA sum fused into cuBLAS."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastlora_jax
from fastlora_jax.kernels import lora_linear, reference


def test_defaults_turn_triton_gemms_off_pipeline_host_offloading_and_are_a_fresh_dict():
    options = fastlora_jax.compiler_options()
    assert options == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_pipelined_host_offloading": True}
    options["other"] = 1
    assert "other" not in fastlora_jax.compiler_options()


def test_overrides_parse_booleans_and_keep_text():
    options = fastlora_jax.compiler_options("xla_gpu_enable_triton_gemm=TRUE", "xla_gpu_autotune_level=2")
    assert options == {"xla_gpu_enable_triton_gemm": True, "xla_gpu_enable_pipelined_host_offloading": True,
                       "xla_gpu_autotune_level": "2"}


@pytest.mark.parametrize("bad", ["xla_gpu_enable_triton_gemm", "=true", ""])
def test_bad_override_names_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        fastlora_jax.compiler_options(bad)


def test_lora_linear_compiles_and_agrees_with_the_options():
    """The options change how XLA compiles, never what the layer computes (here on this machine's backend)."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (64, 48), jnp.float32)
    w = jax.random.normal(keys[1], (48, 40), jnp.float32) * 0.1
    a = jax.random.normal(keys[2], (48, 8), jnp.float32) * 0.1
    b = jax.random.normal(keys[3], (8, 40), jnp.float32) * 0.1
    f = jax.jit(lambda x, a, b: lora_linear(x, w, a, b, 2.0, implementation="xla"),
                compiler_options=fastlora_jax.compiler_options())
    with jax.default_matmul_precision("highest"):
        got, want = f(x, a, b), reference.lora_linear_reference(x, w, a, b, 2.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_lora_sum_is_folded_into_a_cublas_gemm_on_gpu():
    """With the options, XLA's GEMM rewriter adds the rank-r product inside the base GEMM (cuBLAS beta = 1):
    the compiled forward + input gradient has GEMMs with beta 1 and no [M, N] add of two GEMM outputs."""
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (512, 256), jnp.bfloat16)
    w = jax.random.normal(keys[1], (256, 384), jnp.bfloat16)
    a = jax.random.normal(keys[2], (256, 16), jnp.bfloat16)
    b = jax.random.normal(keys[3], (16, 384), jnp.bfloat16)
    g = jax.random.normal(keys[4], (512, 384), jnp.bfloat16)

    def fwd_bwd(x, a, b):
        y, vjp = jax.vjp(lambda x: lora_linear(x, w, a, b, 2.0, implementation="xla"), x)
        return y, vjp(g)[0]

    def betas(options):
        hlo = jax.jit(fwd_bwd, compiler_options=options).lower(x, a, b).compile().as_text()
        return re.findall(r'"beta":([0-9.e+-]+)', hlo)

    fused = betas(fastlora_jax.compiler_options())
    assert fused.count("1") >= 2, fused  # the forward sum and the input-gradient sum
