"""NF4 dequantization in one Pallas pass (kernels/nf4_dequant.py): bit for bit dequantize_nf4, inside QLoRA, errors.

On CPU the kernel runs in interpret mode (the select-tree decode); on a GPU the same tests run it compiled (the PTX
decode where it applies: the backend decides).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels import lora, nf4_dequant
from fastlora_jax.nf4 import dequantize_nf4, quantize_nf4
from helpers import rel_err
from test_kernels_nf4 import forward_and_grads, make_inputs

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")

# [48, 256] in these blocks: 3 row blocks x 2 column blocks of 64 code bytes (two absmax blocks each)
SMALL = nf4_dequant.Blocks(rows=16, cols=64)


def _bits(w):
    return np.asarray(jax.lax.bitcast_convert_type(w, jnp.uint16))


@pytest.mark.parametrize("rounding", ["dequantize_4bit", "gemv_4bit"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dequantize_gives_dequantize_nf4_bit_for_bit(dtype, rounding):
    rng = np.random.default_rng(7)
    # every code and large / small / negative scales: rows of very different magnitudes
    w = quantize_nf4(rng.standard_normal((48, 256), np.float32) * np.logspace(-3, 2, 48, dtype=np.float32)[:, None])
    got = jax.jit(lambda w: nf4_dequant.dequantize(w, dtype, rounding, blocks=SMALL))(w)
    want = dequantize_nf4(w, dtype, rounding)
    assert got.shape == want.shape == (48, 256) and got.dtype == want.dtype
    assert np.array_equal(_bits(got), _bits(want)), int(np.sum(_bits(got) != _bits(want)))


def _lowered(fn, *inputs) -> str:
    return str(jax.make_jaxpr(lambda *z: forward_and_grads(fn, *z))(*inputs))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_qlora_layer_through_the_kernel_equals_xla_dequantization(dtype):
    # [32, 512] divides into the default blocks (16 rows x 256 code bytes); [24, 512] does not and takes XLA's
    # dequantization: the same weights, so the same outputs and gradients either way.
    for n, through_kernel in ((32, True), (24, False)):
        inputs = make_inputs(8, 512, n, 16, dtype, seed=n)

        def qlora(dequantize):
            return lambda x, w, bias, a, b, s: lora.nf4_lora_linear(x, w, a, b, s, bias, rounding="dequantize_4bit",
                                                                    implementation="xla", dequantize=dequantize)

        assert ("nf4_dequantize" in _lowered(qlora("pallas"), *inputs)) == through_kernel, n
        got, want = forward_and_grads(qlora("pallas"), *inputs), forward_and_grads(qlora("xla"), *inputs)
        for name, out, ref in zip(("y", "dx", "dbias", "da", "db"), got, want):
            assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, out.dtype)
            assert rel_err(out, ref) < 1e-6, (n, name, rel_err(out, ref))


def test_bad_dtypes_shapes_and_blocks_raise_naming_them():
    w = quantize_nf4(np.ones((48, 256), np.float32))
    with pytest.raises(ValueError, match="dtype=float32; accepted: bfloat16, float16"):
        nf4_dequant.dequantize(w, jnp.float32)
    with pytest.raises(ValueError, match=r"w\.shape=\(48, 256\) does not divide into 32 rows x 128 input features"):
        nf4_dequant.dequantize(w, jnp.bfloat16, blocks=nf4_dequant.Blocks(rows=32, cols=64))
    with pytest.raises(ValueError, match="rounding"):
        nf4_dequant.dequantize(w, jnp.bfloat16, "nearest", blocks=SMALL)
    with pytest.raises(ValueError, match=r"Blocks\(rows=3\); accepted: a power of two"):
        nf4_dequant.Blocks(rows=3)
    with pytest.raises(ValueError, match=r"Blocks\(cols=16\); accepted: a multiple of 32 code bytes"):
        nf4_dequant.Blocks(cols=16)
    x, wq, bias, a, b, scaling, _ = make_inputs(4, 128, 24, 4, jnp.bfloat16)
    with pytest.raises(ValueError, match="nf4_lora_linear: dequantize='fast'; accepted: 'xla', 'pallas'"):
        lora.nf4_lora_linear(x, wq, a, b, scaling, rounding="dequantize_4bit", dequantize="fast")
    assert nf4_dequant.supports((14336, 4096)) and nf4_dequant.supports((1024, 4096))
    assert not nf4_dequant.supports((24, 4096)) and not nf4_dequant.supports((32, 96))
