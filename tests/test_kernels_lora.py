"""LoRA linear kernels (XLA and Pallas) against the pure-jnp PEFT reference: forward, every gradient, errors.

On CPU the Pallas kernel runs in interpret mode; on a GPU the same tests run it compiled (the backend decides).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import kernels
from fastlora_jax.kernels import api, lora, reference
from helpers import dot_shapes, rel_err

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Small tiles so the test shapes (none a multiple of them) need several row, column and contraction tiles.
SMALL = lora.BlockSizes(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")


def make_inputs(m, k, n, r, dtype, seed=0):
    """Fresh random x [m, k], w [k, n], float32 a [k, r], b [r, n], bias [n], scaling [], cotangent g [m, n]."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0, dt=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * scale).astype(dt)

    x, w = normal((m, k), 1.0, dtype), normal((k, n), k ** -0.5, dtype)
    a, b = normal((k, r), k ** -0.5), normal((r, n), r ** -0.5)  # float32 LoRA params, as the model keeps them
    bias, g = normal((n,), 1.0, dtype), normal((m, n), 1.0, dtype)
    return x, w, a, b, bias, jnp.float32(rng.uniform(0.5, 2.0)), g


def forward_and_grads(fn, x, w, a, b, bias, scaling, g):
    """(y, dx, da, db, dbias, dscaling) of y = fn(x, w, a, b, scaling, bias) under the cotangent g."""

    @jax.jit
    def run(x, w, a, b, bias, scaling, g):
        y, vjp = jax.vjp(lambda x, a, b, bias, s: fn(x, w, a, b, s, bias), x, a, b, bias, scaling)
        return (y, *vjp(g))

    return run(x, w, a, b, bias, scaling, g)


CASES = [  # (r, dtype, tokens, in, out): none a multiple of SMALL's 16 / 32 / 32 tiles
    (1, jnp.float32, 37, 72, 90), (1, jnp.bfloat16, 21, 40, 50),
    (8, jnp.float32, 21, 40, 50), (8, jnp.bfloat16, 37, 72, 90),
    (16, jnp.float32, 37, 72, 90), (16, jnp.bfloat16, 5, 40, 50),
    (64, jnp.float32, 5, 40, 50), (64, jnp.bfloat16, 37, 72, 90),
    (128, jnp.float32, 21, 72, 50), (128, jnp.bfloat16, 21, 40, 90),
]


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("r, dtype, m, k, n", CASES)
def test_matches_reference(implementation, r, dtype, m, k, n):
    inputs = make_inputs(m, k, n, r, dtype, seed=r)
    got = forward_and_grads(
        lambda *z: lora.lora_linear(*z, implementation=implementation, block_sizes=SMALL), *inputs)
    want = forward_and_grads(reference.lora_linear_reference, *inputs)
    names = ("y", "dx", "da", "db", "dbias", "dscaling")
    for name, out, ref in zip(names, got, want):
        assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, out.dtype, ref.shape, ref.dtype)
        assert rel_err(out, ref) < TOL[dtype], (name, rel_err(out, ref))


@pytest.mark.parametrize("implementation", ["xla", "pallas", "auto"])
def test_api_leading_axes_and_default_tiles(implementation):
    x, w, a, b, bias, scaling, _ = make_inputs(2 * 19, 96, 80, 8, jnp.float32, seed=3)
    x3 = x.reshape(2, 19, 96)
    y = kernels.lora_linear(x3, w, a, b, scaling, bias, implementation=implementation)
    ref = reference.lora_linear_reference(x3, w, a, b, scaling, bias)
    assert y.shape == (2, 19, 80) and rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_no_weight_gradient_is_computed(implementation):
    x, w, a, b, bias, scaling, _ = make_inputs(24, 48, 80, 8, jnp.float32)

    def loss(x, a, b, w):
        return jnp.sum(lora.lora_linear(x, w, a, b, scaling, bias, implementation=implementation) ** 2)

    weight_shapes = {(48, 80), (80, 48)}
    dots = dot_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, a, b, w).jaxpr)
    assert dots and not weight_shapes & set(dots), dots
    # The detector sees a weight gradient where one is computed: the reference differentiated w.r.t. w.
    ref_loss = lambda x, a, b, w: jnp.sum(reference.lora_linear_reference(x, w, a, b, scaling, bias) ** 2)
    assert weight_shapes & set(dot_shapes(jax.make_jaxpr(jax.grad(ref_loss, argnums=3))(x, a, b, w).jaxpr))
    # Asked for anyway, w's gradient is zeros (the symbolic zero of a frozen weight), not a computed product.
    assert not np.any(np.asarray(jax.grad(loss, argnums=3)(x, a, b, w)))


@pytest.mark.parametrize("fn", [kernels.lora_linear, lora.lora_linear])
def test_bad_shapes_raise_naming_the_shapes(fn):
    x, w, a, b, bias, scaling, _ = make_inputs(4, 16, 24, 4, jnp.float32)
    bad = {
        "in": (x[:, :15], w, a, b, scaling, bias),
        "out": (x, w, a, b[:, :23], scaling, bias),
        "r": (x, w, a, b[:3], scaling, bias),
        "bias": (x, w, a, b, scaling, bias[:5]),
        "scaling": (x, w, a, b, jnp.ones(2), bias),
        "dtype": (x.astype(jnp.int32), w, a, b, scaling, bias),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError, match=r"x\.shape=\(4, 1[56]\)") as info:
            fn(*args)
        assert "w.shape=(16, 24)" in str(info.value), (name, str(info.value))


@pytest.mark.parametrize("fn", [kernels.lora_linear, lora.lora_linear])
def test_non_arrays_and_non_numeric_scalings_raise(fn):
    x, w, a, b, bias, _, _ = make_inputs(4, 16, 24, 4, jnp.float32)
    for scaling in ("0.5", True, 1j, jnp.array(True), jnp.array(2, jnp.complex64)):
        with pytest.raises(ValueError, match=r"lora_linear: scaling must be a real scalar"):
            fn(x, w, a, b, scaling, bias)
    with pytest.raises(ValueError, match=r"lora_linear: x must be an array; got a list"):
        fn(np.asarray(x).tolist(), w, a, b, 2.0, bias)
    for scaling in (2, 2.0, np.float64(2.0), jnp.float32(2.0), jnp.asarray(2, jnp.int32)):
        np.testing.assert_allclose(fn(x, w, a, b, scaling, bias), fn(x, w, a, b, 2.0, bias), rtol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_zero_sized_features_give_empty_or_bias_outputs(implementation):
    """in_features 0 gives the bias alone; out_features 0 an empty output (the kernel has nothing to tile)."""
    rng = np.random.default_rng(3)
    x0, bias = jnp.zeros((3, 0)), jnp.asarray(rng.standard_normal(5), jnp.float32)
    y = lora.lora_linear(x0, jnp.zeros((0, 5)), jnp.zeros((0, 2)), jnp.zeros((2, 5)), 2.0, bias,
                         implementation=implementation)
    np.testing.assert_array_equal(y, jnp.broadcast_to(bias, (3, 5)))
    x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    y = lora.lora_linear(x, jnp.zeros((16, 0)), jnp.ones((16, 2)), jnp.zeros((2, 0)), 2.0,
                         implementation=implementation)
    assert y.shape == (3, 0)


def test_lowrank_matmul_validates_and_transposes():
    x, w, a, b, bias, _, _ = make_inputs(20, 40, 36, 8, jnp.float32)
    u = jnp.asarray(np.random.default_rng(9).standard_normal((20, 8), np.float32))
    got = lora.lowrank_matmul(x, w.T, u, b.T, bias, transpose=True, block_sizes=SMALL)
    want = x @ w + u @ b + bias
    assert rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match=r"x\.shape=\(20, 40\) w\.shape=\(40, 36\)"):
        lora.lowrank_matmul(x, w, u, b.T, bias)


def test_auto_is_xla_off_gpu_and_table_is_well_formed():
    for op, entries in api.PALLAS_FASTER_ON_GPU.items():
        assert op in ("lora", "nf4")
        for entry in entries:
            assert len(entry) == 6 and all(isinstance(v, int) for v in entry), entry
            assert entry[2] <= entry[3] and entry[4] <= entry[5], entry
    if jax.default_backend() != "gpu":
        assert api.resolve("lora", "auto", 4096, 4096, 8192, 16) == "xla"  # listed for GPUs only
    assert api.resolve("lora", "pallas", 4096, 4096, 8192) == "pallas"
    assert api.resolve("nf4", "xla", 4096, 4096, 1) == "xla"
    if jax.default_backend() != "gpu":
        assert api.resolve("nf4", "auto", 4096, 4096, 1) == "xla"  # "reduce" is for GPUs only
    with pytest.raises(ValueError, match="implementation='triton'; accepted: auto, xla, pallas"):
        api.resolve("lora", "triton", 8, 8, 8)


def test_auto_matches_shape_tokens_and_rank_on_gpu(monkeypatch):
    monkeypatch.setattr(api._compat, "on_gpu", lambda: True)  # the table's GPU reading, on any backend
    monkeypatch.setattr(api.lora_mosaic, "on_hopper", lambda: False)  # a GPU the tables were not measured on
    assert api.resolve("lora", "auto", 4096, 1024, 16, 16) == "xla"
    assert api.resolve("nf4", "auto", 4096, 4096, 1) == "xla"
    assert api.resolve("nf4", "auto", 4096, 14336, 1) == "xla"
    monkeypatch.setattr(api.lora_mosaic, "on_hopper", lambda: True)  # H100, H200: where they were
    assert api.resolve("lora", "auto", 4096, 1024, 16, 16) == "pallas"
    assert api.resolve("lora", "auto", 4096, 1024, 16, 128) == "xla"  # rank above the measured ones
    assert api.resolve("lora", "auto", 4096, 1024, 16, 8) == "xla"  # rank below the measured ones
    assert api.resolve("lora", "auto", 4096, 4096, 16, 64) == "pallas"
    assert api.resolve("lora", "auto", 4096, 4096, 16, 16) == "xla"  # measured, not faster
    assert api.resolve("lora", "auto", 4096, 1024, 4096, 16) == "xla"  # token count not measured
    assert api.resolve("lora", "auto", 4096, 4096, 8192, 16) == "xla"  # no dtype given: no Mosaic GEMM
    assert api.resolve("nf4", "auto", 4096, 4096, 1) == "reduce"  # one token: the multiply-and-sum form
    assert api.resolve("nf4", "auto", 4096, 14336, 1) == "pallas"  # ... except where the kernel measured faster
    assert api.resolve("nf4", "auto", 4096, 14336, 16) == "pallas"  # the fused kernel's forward, 2..16 tokens
    assert api.resolve("nf4", "auto", 14336, 4096, 2, 64) == "pallas"  # any rank: the LoRA branch is XLA anyway
    assert api.resolve("nf4", "auto", 4096, 4096, 17) == "xla"  # past the measured token counts
    assert api.resolve("nf4", "auto", 4096, 1024, 16) == "xla"  # measured, not reliably faster
    assert api.resolve("nf4", "auto", 4096, 1024, 1) == "xla"  # measured, not faster
    assert api.resolve("nf4", "xla", 4096, 14336, 1) == "xla"  # asked for: kept


def test_auto_picks_the_mosaic_gemm_where_its_tiles_fit_on_one_hopper_gpu(monkeypatch):
    monkeypatch.setattr(api._compat, "on_gpu", lambda: True)
    monkeypatch.setattr(api.lora_mosaic, "on_hopper", lambda: True)
    monkeypatch.setattr(api.jax, "device_count", lambda: 1)
    bf16 = jnp.bfloat16
    assert api.resolve("lora", "auto", 4096, 14336, 8192, 16, bf16) == "mosaic"
    assert api.resolve("lora", "auto", 4096, 1024, 8192, 1, jnp.float16) == "mosaic"
    assert api.resolve("lora", "auto", 4096, 14336, 8192, 64, bf16) == "xla"  # rank 64: 3 stages, measured slower
    assert api.resolve("lora", "auto", 4096, 14336, 8192 - 64, 16, bf16) == "xla"  # tokens not a multiple of 128
    assert api.resolve("lora", "auto", 4096 + 64, 4096, 8192, 16, bf16) == "xla"  # in: the input gradient's N
    assert api.resolve("lora", "auto", 4096, 14336, 8192, 16, jnp.float32) == "xla"  # 16-bit operands only
    assert api.resolve("lora", "auto", 4096, 14336, 8192, 16) == "xla"  # dtype unknown
    assert api.resolve("lora", "auto", 4096, 1024, 16, 16, bf16) == "pallas"  # 16 tokens: the Triton table
    assert api.resolve("lora", "xla", 4096, 14336, 8192, 16, bf16) == "xla"
    assert api.resolve("nf4", "auto", 4096, 14336, 8192, 16, bf16) == "mosaic"  # NF4 + LoRA, weight dequantized
    assert api.resolve("nf4", "auto", 4096, 14336, 8192, 0, bf16) == "xla"  # NF4 alone: no rank-r term
    assert api.resolve("nf4", "auto", 4096, 14336, 8192, 64, bf16) == "xla"
    monkeypatch.setattr(api.jax, "device_count", lambda: 2)
    assert api.resolve("lora", "auto", 4096, 14336, 8192, 16, bf16) == "xla"  # a custom call is not partitioned
    monkeypatch.setattr(api.jax, "device_count", lambda: 1)
    monkeypatch.setattr(api.lora_mosaic, "on_hopper", lambda: False)
    assert api.resolve("lora", "auto", 4096, 14336, 8192, 16, bf16) == "xla"
