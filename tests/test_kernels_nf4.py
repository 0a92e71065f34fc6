"""NF4 linear kernels (XLA dequantize+matmul, Pallas fused dequant-matmul) against the dequantize_nf4 reference.

On CPU the Pallas kernels run in interpret mode; on a GPU the same tests run them compiled (the backend decides).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fastlora_jax import kernels
from fastlora_jax.kernels import nf4 as knf4
from fastlora_jax.kernels import lora, reference
from fastlora_jax.nf4 import dequantize_nf4, quantize_nf4, stack_nf4
from helpers import dot_shapes, rel_err

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}
# Small tiles: the test shapes need several token, feature and contraction tiles, and padded edges.
SMALL = knf4.BlockSizes(block_m=16, block_n=16, block_k=32, blocks_per_step=2, num_warps=4, num_stages=2)
SPLIT = knf4.BlockSizes(block_m=16, block_n=16, block_k=32, blocks_per_step=1, split_k=3, num_warps=4, num_stages=2)
GATHER = knf4.BlockSizes(block_m=16, block_n=16, block_k=32, blocks_per_step=4, num_warps=4, num_stages=2,
                         decode="gather")
PRMT = knf4.BlockSizes(block_m=16, block_n=16, block_k=32, blocks_per_step=2, num_warps=4, num_stages=2,
                       decode="prmt")


pytestmark = pytest.mark.usefixtures("full_float32_matmuls")


def make_inputs(m, k, n, r, dtype, seed=0):
    """x [m, k], an NF4 weight [n, k] (HF layout), bias [n], float32 LoRA a [k, r], b [r, n] (or None), cotangent."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0, dt=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * scale).astype(dt)

    w = jax.tree.map(jnp.asarray, quantize_nf4(rng.standard_normal((n, k), np.float32) * k ** -0.5))
    a, b = (normal((k, r), k ** -0.5), normal((r, n), r ** -0.5)) if r else (None, None)
    return normal((m, k), 1.0, dtype), w, normal((n,), 1.0, dtype), a, b, jnp.float32(rng.uniform(0.5, 2.0)), \
        normal((m, n), 1.0, dtype)


def forward_and_grads(fn, x, w, bias, a, b, scaling, g):
    """(y, dx, dbias[, da, db]) of y = fn(x, w, bias, a, b, scaling) under the cotangent g."""

    @jax.jit
    def run(x, w, bias, a, b, scaling, g):
        y, vjp = jax.vjp(lambda x, bias, a, b: fn(x, w, bias, a, b, scaling), x, bias, a, b)
        return (y, *vjp(g))

    return [v for v in run(x, w, bias, a, b, scaling, g) if v is not None]


CASES = [  # (tokens, in, out, r, dtype): in a multiple of 64 (NF4 blocks in rows), nothing else of the tiles
    (1, 192, 40, 0, jnp.float32), (5, 192, 40, 0, jnp.bfloat16), (33, 256, 72, 0, jnp.bfloat16),
    (16, 128, 24, 1, jnp.float32), (3, 256, 40, 16, jnp.bfloat16), (21, 128, 72, 128, jnp.float32),
    (7, 192, 40, 8, jnp.float16),
]


@pytest.mark.parametrize("implementation, blocks", [
    pytest.param("xla", None, id="xla"), pytest.param("reduce", None, id="reduce"),
    pytest.param("pallas", SMALL, id="pallas"), pytest.param("pallas", GATHER, id="gather"),
    pytest.param("pallas", PRMT, id="prmt", marks=pytest.mark.gpu), pytest.param("pallas", None, id="default_tiles")])
@pytest.mark.parametrize("m, k, n, r, dtype", CASES)
def test_matches_reference(implementation, blocks, m, k, n, r, dtype):
    check_case(implementation, blocks, m, k, n, r, dtype)


# 3 NF4 blocks per row (forward) and 3 steps of 32 output rows (backward): split_k=3 divides both contractions
@pytest.mark.parametrize("m, k, n, r, dtype", [(1, 192, 96, 0, jnp.float32), (5, 192, 96, 0, jnp.bfloat16)])
def test_split_contraction_matches_reference(m, k, n, r, dtype):
    check_case("pallas", SPLIT, m, k, n, r, dtype)


def test_separate_forward_and_backward_tiles():
    check_case("pallas", (GATHER, SPLIT), 5, 192, 96, 0, jnp.bfloat16)


@pytest.mark.parametrize("bad, match", [
    (dict(decode="lut"), r"decode='lut'\); accepted: 'auto', 'select', 'gather', 'prmt'"),
    (dict(block_k=16), r"block_k=16\): accepted block_m >= 16")])
def test_bad_tiles_raise_naming_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        knf4.BlockSizes(**bad)


def _code_words():
    """Words of four code bytes: every byte in all four positions (runs of four consecutive bytes, rolled), then
    random mixes, in which neighbouring codes differ in bit 3 (a run's codes mostly share it)."""
    for start in range(0, 256, 4):
        for shift in range(4):  # each byte of the run in each of the word's four byte positions
            yield start // 4, np.roll(np.arange(start, start + 4), shift)
    rng = np.random.default_rng(1)
    for _ in range(4):  # four shuffles of the 256 bytes
        yield from enumerate(rng.permutation(256).reshape(64, 4))


def test_prmt_decode_scheme_gives_every_nf4_value():
    # The PTX's byte operations, replayed: every byte's two codes, in all four positions of a 32-bit word.
    from fastlora_jax.kernels import nf4_ptx
    from fastlora_jax.nf4 import NF4_CODE

    table = np.asarray(NF4_CODE, np.float32)
    for _, word in _code_words():
        hi, lo = nf4_ptx.decode_emulated(word)
        np.testing.assert_array_equal(hi, table[word >> 4])
        np.testing.assert_array_equal(lo, table[word & 15])


def test_bf16_prmt_decode_scheme_rounds_as_gemv_4bit():
    # decode_bf16's byte operations, replayed: bf16(NF4 value) * bf16(scale) rounded to bf16, for every byte's two
    # codes in all four positions of a 32-bit word, with scales that need rounding to bf16 themselves.
    from fastlora_jax.kernels import nf4_ptx
    from fastlora_jax.nf4 import NF4_CODE

    bf16 = ml_dtypes.bfloat16
    table = np.asarray(NF4_CODE, np.float32).astype(bf16).astype(np.float32)
    scales = np.random.default_rng(0).uniform(0.01, 3.0, (64, 4)).astype(np.float32)
    for i, word in _code_words():
        sc = scales[i]
        ws = sc.astype(bf16).astype(np.float32)
        got = nf4_ptx.decode_bf16_emulated(word, sc)  # [8]: byte 0's high nibble, its low nibble, byte 1's ...
        codes = np.stack([word >> 4, word & 15], axis=-1).reshape(8)
        want = (table[codes] * np.repeat(ws, 2)).astype(bf16)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_rounded_prmt_decode_scheme_gives_dequantize_4bit_weights(dtype):
    # decode_rounded's byte operations, replayed: NF4 value * scale in float32, rounded to the 16-bit dtype, for
    # every byte's two codes in all four positions of a 32-bit word, in column order.
    from fastlora_jax.kernels import nf4_ptx
    from fastlora_jax.nf4 import NF4_CODE

    table = np.asarray(NF4_CODE, np.float32)
    scales = np.random.default_rng(0).uniform(0.01, 3.0, (64, 4)).astype(np.float32)
    for i, word in _code_words():
        got = nf4_ptx.decode_rounded_emulated(word, scales[i], dtype)  # [8]
        codes = np.stack([word >> 4, word & 15], axis=-1).reshape(8)
        want = (table[codes] * np.repeat(scales[i], 2)).astype(dtype)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def _bf16(v) -> np.ndarray:
    return np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _gemv_4bit_weight(w) -> np.ndarray:
    """The NF4 weight [out, in] as bitsandbytes' inference kernel rounds it, in numpy: bf16(NF4 value) *
    bf16(absmax), rounded to bf16 (float32 array)."""
    from fastlora_jax.nf4 import NF4_CODE, dequantize_absmax

    (out_features, in_features) = w.shape
    codes = np.asarray(w.packed).reshape(out_features, in_features // 2)
    values = np.asarray(NF4_CODE, np.float32)[np.stack([codes >> 4, codes & 15], -1).reshape(w.shape)]
    absmax = np.asarray(dequantize_absmax(w)).reshape(out_features, in_features // 64)
    return _bf16(_bf16(values) * _bf16(np.repeat(absmax, 64, axis=1)))


def test_gemv_4bit_rounding_of_the_weight():
    # dequantize_nf4(rounding="gemv_4bit") against the formula in numpy; in float32 it is dequantize_4bit's weight.
    # The two roundings differ on some bf16 weights, so the check can fail.
    from fastlora_jax.nf4 import dequantize_nf4

    _, w, *_ = make_inputs(1, 256, 40, 0, jnp.float32, seed=4)
    got = np.asarray(dequantize_nf4(w, jnp.bfloat16, "gemv_4bit"), np.float32)
    np.testing.assert_array_equal(got, _gemv_4bit_weight(w))
    exact = np.asarray(dequantize_nf4(w, jnp.bfloat16), np.float32)
    assert (got != exact).any()
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(w, jnp.float32, "gemv_4bit")),
                                  np.asarray(dequantize_nf4(w, jnp.float32)))


@pytest.mark.parametrize("implementation, blocks", [
    pytest.param("xla", None, id="xla"), pytest.param("reduce", None, id="reduce"),
    pytest.param("pallas", SMALL, id="pallas"), pytest.param("pallas", GATHER, id="gather"),
    pytest.param("pallas", PRMT, id="prmt", marks=pytest.mark.gpu), pytest.param("pallas", None, id="default_tiles")])
@pytest.mark.parametrize("m, k, n, r", [(m, k, n, r) for m, k, n, r, dtype in CASES if dtype == jnp.bfloat16])
def test_gemv_4bit_rounding_matches_its_reference(implementation, blocks, m, k, n, r):
    check_case(implementation, blocks, m, k, n, r, jnp.bfloat16, rounding="gemv_4bit")


@pytest.mark.parametrize("blocks", [pytest.param(SMALL, id="small_tiles"), pytest.param(None, id="default_tiles")])
def test_gemv_4bit_kernel_uses_the_xla_paths_weights(blocks):
    # The same weights on both paths, so only the accumulation order differs (0 to 2e-8 on CPU), where
    # dequantize_4bit's weights against gemv_4bit's give 3.7e-3. On a GPU the default tiles run the bf16 PTX tables.
    x, w, *_ = make_inputs(33, 256, 72, 0, jnp.bfloat16, seed=1)
    want = knf4.nf4_linear(x, w, implementation="xla", rounding="gemv_4bit")
    got = knf4.nf4_linear(x, w, implementation="pallas", block_sizes=blocks, rounding="gemv_4bit")
    assert rel_err(got, want) < 1e-3


def test_gemv_4bit_rounding_refused_where_the_ptx_has_no_table():
    x, w, *_ = make_inputs(4, 128, 24, 0, jnp.float16)
    with pytest.raises(ValueError, match=r"rounding='gemv_4bit' has float32 and bfloat16 tables only; got dtype "
                                         r"float16"):
        knf4.nf4_linear(x, w, implementation="pallas", block_sizes=PRMT, rounding="gemv_4bit")


def test_unknown_rounding_raises_naming_it():
    x, w, *_ = make_inputs(4, 128, 24, 0, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"rounding='bnb'; accepted: 'dequantize_4bit', 'gemv_4bit', 'bitsandbytes'"):
        kernels.nf4_linear(x, w, rounding="bnb")
    with pytest.raises(ValueError, match=r"rounding='bitsandbytes'; accepted: 'dequantize_4bit', 'gemv_4bit'$"):
        dequantize_nf4(w, jnp.bfloat16, "bitsandbytes")  # a weight alone has no call to choose by


@pytest.mark.parametrize("implementation", ["xla", "reduce", "pallas"])
def test_bitsandbytes_rounding_chooses_per_call_as_matmul_4bit(implementation):
    # bitsandbytes' matmul_4bit: gemv_4bit for one token that needs no gradient, dequantize_4bit otherwise (more
    # tokens, a differentiated call, its gradient, or rows not made of whole 64-blocks).
    def run(rounding, x, w):
        return knf4.nf4_linear(x, w, implementation=implementation, rounding=rounding)

    x, w, *_ = make_inputs(3, 192, 40, 0, jnp.bfloat16, seed=4)
    one = x[:1]
    gemv, exact = run("gemv_4bit", one, w), run("dequantize_4bit", one, w)
    assert not np.array_equal(gemv, exact)  # the inputs tell the two roundings apart
    np.testing.assert_array_equal(run("bitsandbytes", one, w), gemv)
    np.testing.assert_array_equal(run("bitsandbytes", x, w), run("dequantize_4bit", x, w))

    def value_and_grad(rounding):
        return jax.value_and_grad(lambda x: jnp.sum(run(rounding, x, w).astype(jnp.float32) ** 2))(one)

    (value, grad), (want_value, want_grad) = value_and_grad("bitsandbytes"), value_and_grad("dequantize_4bit")
    np.testing.assert_array_equal(value, want_value)
    np.testing.assert_array_equal(grad, want_grad)
    if implementation != "pallas":  # the kernels need in % 64 == 0
        x, w, *_ = make_inputs(1, 96, 40, 0, jnp.bfloat16, seed=4)  # 64-blocks straddle the rows
        np.testing.assert_array_equal(run("bitsandbytes", x, w), run("dequantize_4bit", x, w))


@pytest.mark.gpu
def test_gemv_4bit_ptx_forward_uses_its_weights():
    # Compiled, at the default tiles: the product is x @ W'.T with W' = bf16(NF4 value) * bf16(absmax) rounded in
    # bf16, not merely near the dequantize_4bit product: against bf16(x @ W'.T) only accumulation order differs
    # (0 on CPU in numpy's float32), while the dequantize_4bit weights give 3.5e-3 on these inputs.
    x, w, *_ = make_inputs(16, 2048, 96, 0, jnp.bfloat16, seed=3)
    want = _bf16(np.asarray(x, np.float64) @ _gemv_4bit_weight(w).T.astype(np.float64))
    got = knf4.nf4_matmul_t(x, w, block_sizes=knf4.BlockSizes.for_forward(16, 96, 2048, "prmt", "gemv_4bit"),
                            rounding="gemv_4bit")
    assert rel_err(got, want) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_rounded_ptx_forward_uses_dequantize_4bit_weights(dtype):
    # Compiled, at the default tiles (16-bit inputs: the PTX rounds each byte's two products into one pair): the
    # product is x @ W.T with W dequantize_4bit's weights in dtype; only the accumulation order differs, while
    # gemv_4bit's weights give 3.5e-3 (bf16) on these inputs and a wrong byte or nibble order 1.4.
    x, w, *_ = make_inputs(16, 2048, 96, 0, dtype, seed=3)
    weight = np.asarray(dequantize_nf4(w, dtype), np.float64)
    want = (np.asarray(x, np.float64) @ weight.T).astype(np.float32).astype(dtype).astype(np.float32)
    got = knf4.nf4_matmul_t(x, w)
    assert got.dtype == dtype and rel_err(got, want) < 1e-3


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off an NVIDIA GPU")
def test_prmt_decode_refused_where_ptx_cannot_run():
    x, w, *_ = make_inputs(4, 128, 24, 0, jnp.float32)
    with pytest.raises(ValueError, match=r"decode='prmt'\) is PTX and runs compiled on an NVIDIA GPU only"):
        knf4.nf4_linear(x, w, implementation="pallas", block_sizes=PRMT)
    with pytest.raises(ValueError, match=r"interpret=True"):  # asked to interpret: refused whatever the backend
        knf4.nf4_matmul(x[:, :24], w, block_sizes=PRMT, interpret=True)


def check_case(implementation, blocks, m, k, n, r, dtype, rounding="dequantize_4bit"):
    inputs = make_inputs(m, k, n, r, dtype, seed=m + r)
    got = forward_and_grads(
        lambda *z: knf4.nf4_linear(*z, implementation=implementation, block_sizes=blocks, rounding=rounding), *inputs)
    want = forward_and_grads(lambda *z: reference.nf4_linear_reference(*z, rounding=rounding), *inputs)
    assert len(got) == len(want) == (5 if r else 3)
    for name, out, ref in zip(("y", "dx", "dbias", "da", "db"), got, want):
        assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, out.dtype, ref.shape, ref.dtype)
        assert rel_err(out, ref) < TOL[dtype], (name, rel_err(out, ref))


def test_api_leading_axes_and_auto():
    x, w, bias, a, b, scaling, _ = make_inputs(2 * 7, 128, 48, 4, jnp.float32, seed=5)
    x3 = x.reshape(2, 7, 128)
    for implementation in ("auto", "pallas"):
        y = kernels.nf4_linear(x3, w, bias, a, b, scaling, implementation=implementation)
        ref = reference.nf4_linear_reference(x3, w, bias, a, b, scaling)
        assert y.shape == (2, 7, 48) and rel_err(y, ref) < 1e-5


def _float_residual_shapes(fn, *args) -> set[tuple[int, ...]]:
    """Shapes of the floating-point arrays the vjp keeps alive between the forward and the backward pass."""
    _, vjp = jax.vjp(fn, *args)
    return {leaf.shape for leaf in jax.tree.leaves(vjp) if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.mark.parametrize("implementation", ["xla", "reduce", "pallas"])
def test_no_16bit_weight_kept_and_no_weight_gradient(implementation):
    x, w, bias, _, _, _, _ = make_inputs(6, 128, 48, 0, jnp.bfloat16)
    weight_shapes = {(48, 128), (128, 48)}
    f = lambda x: knf4.nf4_linear(x, w, bias, implementation=implementation)
    assert not weight_shapes & _float_residual_shapes(f, x)
    # The check sees a kept weight where there is one: plain autodiff of the reference keeps the dequantized weight.
    assert weight_shapes & _float_residual_shapes(lambda x: reference.nf4_linear_reference(x, w, bias), x)
    dots = dot_shapes(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) ** 2)))(x).jaxpr)
    assert dots and not weight_shapes & set(dots), dots


@pytest.mark.parametrize("fn", [kernels.nf4_linear, knf4.nf4_linear])
def test_bad_shapes_raise_naming_the_shapes(fn):
    x, w, bias, a, b, scaling, _ = make_inputs(4, 128, 24, 4, jnp.float32)
    stacked = stack_nf4([jax.tree.map(np.asarray, w)] * 2)
    bad = {
        "in": (x[:, :100], w, bias, a, b),
        "bias": (x, w, bias[:5], a, b),
        "a without b": (x, w, bias, a, None),
        "r": (x, w, bias, a, b[:3]),
        "out": (x, w, bias, a, b[:, :20]),
        "stacked": (x, stacked, bias, a, b),
        "dtype": (x.astype(jnp.int32), w, bias, a, b),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError, match=r"x\.shape=\(4, 1(00|28)\) w\.shape=\(24, 128\)"):
            fn(*args, scaling)
    with pytest.raises(ValueError, match=r"x\.shape=\(4, 128\) w\.shape=\(24, 128\).* scaling\.shape=\(4,\)"):
        fn(x, w, bias, a, b, jnp.ones(4))  # not one scaling per rank
    with pytest.raises(ValueError, match=r"nf4_linear: w must be an NF4Array .* of shape \(24, 128\)"):
        fn(x, jnp.ones((24, 128)), bias, a, b, scaling)
    x96, w96, *_ = make_inputs(4, 96, 24, 0, jnp.float32)  # 96 % 64 != 0: NF4 blocks cross rows
    with pytest.raises(ValueError, match=r"needs in_features % 64 == 0; got w\.shape=\(24, 96\)"):
        fn(x96, w96, implementation="pallas")
    assert rel_err(fn(x96, w96, implementation="xla"), reference.nf4_linear_reference(x96, w96)) < 1e-5


@pytest.mark.parametrize("m, k, n, r, dtype", [c for c in CASES if c[3]])
def test_nf4_lora_through_the_lora_custom_vjp_matches_reference(m, k, n, r, dtype):
    # The path the Mosaic GEMM takes for NF4 + LoRA (kernels/lora.py, w dequantized in each pass), run with XLA's
    # dots, so the weight's orientation in the forward and the input gradient is checked on every backend.
    def nf4_lora(x, w, bias, a, b, scaling):
        return lora.nf4_lora_linear(x, w, a, b, scaling, bias, rounding="dequantize_4bit", implementation="xla")

    inputs = make_inputs(m, k, n, r, dtype, seed=m + r)
    got = forward_and_grads(nf4_lora, *inputs)
    want = forward_and_grads(reference.nf4_linear_reference, *inputs)
    for name, out, ref in zip(("y", "dx", "dbias", "da", "db"), got, want):
        assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, out.dtype, ref.shape, ref.dtype)
        assert rel_err(out, ref) < TOL[dtype], (name, rel_err(out, ref))


@pytest.mark.parametrize("m, k, n, r, dtype", [c for c in CASES if c[3]][:2])
def test_nf4_lora_with_the_weight_dequantized_by_the_caller(m, k, n, r, dtype):
    # The MLP's token chunks pass the weight dequantized once (kernels.nf4_weight_for_calls): the same bits out, and
    # gradients, as dequantizing it inside the custom_vjp in each pass.
    from fastlora_jax.nf4 import dequantize_nf4

    def nf4_lora(dequantize_first):
        def fn(x, w, bias, a, b, scaling):
            weight = dequantize_nf4(w, x.dtype) if dequantize_first else w
            return lora.nf4_lora_linear(x, weight, a, b, scaling, bias, rounding="dequantize_4bit",
                                        implementation="xla")
        return fn

    inputs = make_inputs(m, k, n, r, dtype, seed=m + r)
    for name, out, ref in zip(("y", "dx", "dbias", "da", "db"), forward_and_grads(nf4_lora(True), *inputs),
                              forward_and_grads(nf4_lora(False), *inputs)):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=name)
    x, w, bias, a, b, scaling, _ = inputs
    with pytest.raises(ValueError, match=r"a dequantized w must be \[out, in\] in x.dtype; got w \(%d, %d\)" % (k, n)):
        lora.nf4_lora_linear(x, dequantize_nf4(w, x.dtype).T, a, b, scaling, rounding="dequantize_4bit",
                             implementation="xla")


def test_mosaic_needs_the_lora_factors():
    x, w, *_ = make_inputs(4, 128, 24, 0, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"'mosaic'\) needs the LoRA factors a and b .*w.shape=\(24, 128\)"):
        knf4.nf4_linear(x, w, implementation="mosaic")
    with pytest.raises(ValueError, match="nf4_lora_linear: implementation='pallas'; accepted: 'xla', 'mosaic'"):
        lora.nf4_lora_linear(x, w, jnp.zeros((128, 4)), jnp.zeros((4, 24)), 1.0, rounding="dequantize_4bit",
                             implementation="pallas")
