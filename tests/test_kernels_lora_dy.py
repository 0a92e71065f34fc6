"""LoRA's backward products of dy in one pass (kernels/lora_dy.py): against the two dots, inside lora_linear, errors.

On CPU the kernel runs in interpret mode; on a GPU the same tests run it compiled (the backend decides).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels import lora, lora_dy, reference
from helpers import rel_err
from test_kernels_lora import forward_and_grads, make_inputs

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")

# 96 x 192 in these blocks: 3 row blocks x 3 column spans of 4 steps each, so both partial sums have several terms.
SMALL = lora_dy.Blocks(block_m=32, block_n=16, span=64, num_warps=4, num_stages=2)


def _as64(z):
    return np.asarray(z.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("r, dtype", [(1, jnp.float32), (8, jnp.bfloat16), (16, jnp.float32), (64, jnp.bfloat16),
                                      (128, jnp.float32)])
def test_dy_products_equal_the_two_products_in_float64(r, dtype):
    keys = jax.random.split(jax.random.key(r), 3)
    g = jax.random.normal(keys[0], (96, 192), dtype)
    bt, xat = jax.random.normal(keys[1], (192, r), dtype), jax.random.normal(keys[2], (r, 96), dtype)
    gb, db = jax.jit(lambda *z: lora_dy.dy_products(*z, blocks=SMALL))(g, bt, xat)
    assert (gb.shape, gb.dtype, db.shape, db.dtype) == ((96, r), jnp.float32, (r, 192), jnp.float32)
    # The dtype's values multiply exactly in float32; only the order of the float32 sums differs.
    assert rel_err(gb, _as64(g) @ _as64(bt)) < 1e-5 and rel_err(db, _as64(xat) @ _as64(g)) < 1e-5


def _lowered(fn, *inputs) -> str:
    return str(jax.make_jaxpr(lambda *z: forward_and_grads(fn, *z))(*inputs))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_lora_linear_gradients_through_the_one_pass_match_reference(dtype, tol):
    # [256, 1024] divides into its default blocks (8 programs of 128 columns); [256, 1000] does not and takes the two
    # XLA dots: the same gradients either way.
    for n, one_pass in ((1024, True), (1000, False)):
        inputs = make_inputs(256, 72, n, 16, dtype, seed=n)
        fn = lambda *z: lora.lora_linear(*z, implementation="xla", dy_pass="pallas")
        assert ("lora_dy_products" in _lowered(fn, *inputs)) == one_pass, n
        got = forward_and_grads(fn, *inputs)
        want = forward_and_grads(reference.lora_linear_reference, *inputs)
        for name, out, ref in zip(("y", "dx", "da", "db", "dbias", "dscaling"), got, want):
            assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, out.dtype, ref.shape)
            assert rel_err(out, ref) < tol, (n, name, rel_err(out, ref))


def test_default_blocks_halve_the_span_until_about_two_programs_per_multiprocessor():
    spans = {n: lora_dy.default_blocks(8192, n).span for n in (14336, 4096, 1024)}
    assert spans == {14336: 1024, 4096: 512, 1024: 128}, spans  # 448, 256 and 256 programs of 256 rows
    assert lora_dy.default_blocks(256, 1024).span == 128  # never narrower than 128 columns


def test_dy_pass_is_xla_unless_asked():
    inputs = make_inputs(256, 72, 1024, 16, jnp.float32)
    assert "lora_dy_products" not in _lowered(lambda *z: lora.lora_linear(*z, implementation="xla"), *inputs)


def test_bad_shapes_dtypes_and_blocks_raise_naming_them():
    g, bt, xat = jnp.zeros((96, 192)), jnp.zeros((192, 8)), jnp.zeros((8, 96))
    with pytest.raises(ValueError, match=r"g\.shape=\(96, 192\) bt\.shape=\(190, 8\) xat\.shape=\(8, 96\)"):
        lora_dy.dy_products(g, bt[:190], xat, blocks=SMALL)
    with pytest.raises(ValueError, match=r"xat\.shape=\(8, 95\)"):
        lora_dy.dy_products(g, bt, xat[:, :95], blocks=SMALL)
    with pytest.raises(ValueError, match=r"g \[96, 192\] does not divide into 64 rows x 64 columns"):
        lora_dy.dy_products(g, bt, xat, blocks=lora_dy.Blocks(block_m=64, block_n=16, span=64))
    with pytest.raises(ValueError, match="g must be floating point; got g.dtype=int32"):
        lora_dy.dy_products(g.astype(jnp.int32), bt, xat, blocks=SMALL)
    with pytest.raises(ValueError, match=r"Blocks\(block_m=48\); accepted: a power of two >= 16"):
        lora_dy.Blocks(block_m=48)
    with pytest.raises(ValueError, match=r"Blocks\(span=32, block_n=64\)"):
        lora_dy.Blocks(span=32, block_n=64)
    x, w, a, b, bias, scaling, _ = make_inputs(4, 8, 16, 2, jnp.float32)
    with pytest.raises(ValueError, match="dy_pass='fused'; accepted: 'xla', 'pallas'"):
        lora.lora_linear(x, w, a, b, scaling, dy_pass="fused")
    assert lora_dy.supports(8192, 14336) and not lora_dy.supports(8192, 1000) and not lora_dy.supports(100, 1024)
