"""The Mosaic GPU LoRA GEMM (kernels/lora_mosaic.py): its products and lora_linear's gradients through it against the
references, compiled on a Hopper GPU (it has no interpreter); its shape errors on every backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from fastlora_jax.kernels import lora, lora_mosaic, reference
from helpers import rel_err
from test_kernels_lora import forward_and_grads, make_inputs

hopper = pytest.mark.skipif(not lora_mosaic.on_hopper(),
                            reason="needs a Hopper GPU (compute capability 9.0): Mosaic GPU wgmma kernels "
                                   "run nowhere else")


def _normal(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("m, k, n, r, transpose_w", [
    (128, 64, 256, 1, False), (256, 512, 256, 8, True), (384, 1024, 512, 16, False), (256, 320, 768, 64, True)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_lowrank_matmul_matches_float32_product(m, k, n, r, transpose_w, dtype):
    keys = jax.random.split(jax.random.key(m + k + n + r), 4)
    x, u = _normal(keys[0], (m, k), dtype), _normal(keys[2], (m, r), dtype)
    w = _normal(keys[1], (n, k) if transpose_w else (k, n), dtype, k ** -0.5)
    v = _normal(keys[3], (r, n), dtype, r ** -0.5)
    got = jax.jit(lambda *z: lora_mosaic.lowrank_matmul(*z, transpose_w=transpose_w))(x, w, u, v)
    f32 = lambda z: z.astype(jnp.float32)
    want = f32(x) @ (f32(w).T if transpose_w else f32(w)) + f32(u) @ f32(v)
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, want) < 1e-2, rel_err(got, want)
    # The rank-r term is there: without it the product misses by far more than the rounding.
    assert rel_err(got, f32(x) @ (f32(w).T if transpose_w else f32(w))) > 0.1


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("k", [512, 320])  # 8 K steps: one pipeline across tiles; 5 (not a multiple of 4): per tile
def test_lowrank_matmul_steady_pipeline_matches_float32_product(k):
    # Two output tiles or more for every program, so each has a first (START), a last (STOP) and, with three or
    # more, middle (STEADY) tiles whose loads the memory warpgroup issues while the previous tile still computes.
    cores = jax.devices()[0].core_count
    m, n = 4096, 256 * (-(-3 * cores // 32))  # 32 x ceil(3 * cores / 32) tiles: about three per program
    keys = jax.random.split(jax.random.key(k), 4)
    x, u = _normal(keys[0], (m, k), jnp.bfloat16), _normal(keys[2], (m, 16), jnp.bfloat16)
    w, v = _normal(keys[1], (k, n), jnp.bfloat16, k ** -0.5), _normal(keys[3], (16, n), jnp.bfloat16, 0.25)
    tiles = lora_mosaic.Tiles(steady=True)
    got = jax.jit(lambda *z: lora_mosaic.lowrank_matmul(*z, tiles=tiles))(x, w, u, v)
    f32 = lambda z: z.astype(jnp.float32)
    assert rel_err(got, f32(x) @ f32(w) + f32(u) @ f32(v)) < 1e-2


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("r", [16, 64])
def test_lora_linear_mosaic_matches_reference(r):
    inputs = make_inputs(256, 512, 256, r, jnp.bfloat16, seed=r)
    got = forward_and_grads(lambda *z: lora.lora_linear(*z, implementation="mosaic"), *inputs)
    want = forward_and_grads(reference.lora_linear_reference, *inputs)
    for name, out, ref in zip(("y", "dx", "da", "db", "dbias", "dscaling"), got, want):
        assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, out.dtype, ref.shape, ref.dtype)
        assert rel_err(out, ref) < 1e-2, (name, rel_err(out, ref))


@pytest.mark.gpu
@hopper
def test_lora_linear_mosaic_under_vmap_matches_each_example_alone():
    # A vmapped caller (per-example gradients, say) batches the kernel's call; each example must come out as alone.
    x, w, a, b, bias, scaling, _ = make_inputs(256, 512, 256, 16, jnp.bfloat16, seed=3)
    xs = jnp.stack([x, x[::-1] * 0.5])  # [2, 256, 512]

    def grads(x, a, b):
        f = lambda x, a, b: lora.lora_linear(x, w, a, b, scaling, bias, implementation="mosaic")
        return jax.grad(lambda *z: f(*z).astype(jnp.float32).sum(), argnums=(0, 1, 2))(x, a, b) + (f(x, a, b),)

    batched = jax.jit(jax.vmap(grads, in_axes=(0, None, None)))(xs, a, b)
    for i in range(2):
        alone = jax.jit(grads)(xs[i], a, b)
        for name, got, want in zip(("dx", "da", "db", "y"), batched, alone):
            assert rel_err(got[i], want) < 1e-2, (i, name, rel_err(got[i], want))


@pytest.mark.gpu
@hopper
def test_nf4_lora_linear_mosaic_matches_reference():
    from test_kernels_nf4 import forward_and_grads as nf4_forward_and_grads
    from test_kernels_nf4 import make_inputs as nf4_inputs

    from fastlora_jax.kernels import nf4

    inputs = nf4_inputs(256, 512, 256, 16, jnp.bfloat16, seed=7)
    got = nf4_forward_and_grads(lambda *z: nf4.nf4_linear(*z, implementation="mosaic"), *inputs)
    want = nf4_forward_and_grads(reference.nf4_linear_reference, *inputs)
    for name, out, ref in zip(("y", "dx", "dbias", "da", "db"), got, want):
        assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, out.dtype, ref.shape, ref.dtype)
        assert rel_err(out, ref) < 1e-2, (name, rel_err(out, ref))


@pytest.mark.gpu
@hopper
def test_nf4_lora_linear_mosaic_with_the_weight_dequantized_by_the_caller():
    """The MLP chunks' path (the weight dequantized once, kernels.nf4_weight_for_calls): the same bits as
    dequantizing it in each pass."""
    import numpy as np
    from test_kernels_nf4 import forward_and_grads as nf4_forward_and_grads
    from test_kernels_nf4 import make_inputs as nf4_inputs

    from fastlora_jax import kernels
    from fastlora_jax.kernels import nf4

    inputs = nf4_inputs(256, 512, 256, 16, jnp.bfloat16, seed=7)

    def once(x, w, bias, a, b, scaling):
        dense = kernels.nf4_weight_for_calls(w, x.shape[0], x.dtype, implementation="mosaic")
        return nf4.nf4_linear(x, w, bias, a, b, scaling, implementation="mosaic", dequantized=dense)

    got = nf4_forward_and_grads(once, *inputs)
    want = nf4_forward_and_grads(lambda *z: nf4.nf4_linear(*z, implementation="mosaic"), *inputs)
    for name, out, ref in zip(("y", "dx", "dbias", "da", "db"), got, want):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=name)


def test_lowrank_matmul_refuses_shapes_it_cannot_tile():
    x, w = jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((64, 256), jnp.bfloat16)
    u, v = jnp.zeros((128, 8), jnp.bfloat16), jnp.zeros((8, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x\.shape=\(128, 64\) w\.shape=\(64, 256\) u\.shape=\(128, 8\) "
                                         r"v\.shape=\(8, 255\)"):
        lora_mosaic.lowrank_matmul(x, w, u, v[:, :255])
    with pytest.raises(ValueError, match=r"\[120, 64\] @ \[64, 256\] does not divide into 128 x 256"):
        lora_mosaic.lowrank_matmul(x[:120], w, u[:120], v)
    with pytest.raises(ValueError, match="must all be bfloat16 or all float16; got x.dtype=float32"):
        lora_mosaic.lowrank_matmul(x.astype(jnp.float32), w, u, v)
    with pytest.raises(ValueError, match="rank 128 needs .* bytes of shared memory"):
        lora_mosaic.lowrank_matmul(x, w, jnp.zeros((128, 100), jnp.bfloat16), jnp.zeros((100, 256), jnp.bfloat16))
    assert lora_mosaic.supports(8192, 14336, 4096) and not lora_mosaic.supports(8192, 14336 + 64, 4096)
    assert lora_mosaic._padded_rank(1) == lora_mosaic.MIN_RANK and lora_mosaic._padded_rank(65) == 128


class _Hopper:
    core_count = 132  # what lowrank_matmul reads from jax.devices()[0]: an H100's multiprocessors


@pytest.mark.parametrize("r, transpose_w", [(1, True), (16, False), (64, True)])
def test_kernel_lowers_for_cuda_and_once_per_program(monkeypatch, r, transpose_w):
    # On any backend: lowering for cuda runs Mosaic GPU's layout checks (it caught mismatched operand swizzles), and
    # four calls of one shape must lower into one kernel (a Python loop over layers must not lower it per call).
    monkeypatch.setattr(jax, "devices", lambda *_: [_Hopper()])
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16)
    u, v = jax.ShapeDtypeStruct((256, r), jnp.bfloat16), jax.ShapeDtypeStruct((r, 512), jnp.bfloat16)

    def four_calls(x, w, u, v):
        for _ in range(4):
            x = lora_mosaic.lowrank_matmul(x, w, u, v, transpose_w=transpose_w)
        return x

    text = jax.jit(four_calls).trace(x, w, u, v).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1, text.count("custom_call @mosaic_gpu")
    assert text.count("call @_call(") == 4


def _lowered_kernel(monkeypatch, m, k, n, tiles):
    monkeypatch.setattr(jax, "devices", lambda *_: [_Hopper()])
    shapes = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in ((m, k), (k, n), (m, 16), (16, n))]
    f = lambda *z: lora_mosaic.lowrank_matmul(*z, tiles=tiles)
    return jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def test_steady_pipeline_applies_only_where_every_program_has_two_tiles():
    t, hopper_programs = lora_mosaic.Tiles(steady=True), _Hopper.core_count
    assert lora_mosaic.runs_steady(t, 8192, 14336, 4096, hopper_programs)  # 64 x 56 tiles, 64 K steps
    assert not lora_mosaic.runs_steady(t, 8192, 1024, 4096, hopper_programs)  # 256 tiles: not two per program
    assert not lora_mosaic.runs_steady(t, 8192, 14336, 4160, hopper_programs)  # 65 K steps, not a multiple of 4
    assert not lora_mosaic.runs_steady(lora_mosaic.Tiles(steady=False), 8192, 14336, 4096, hopper_programs)


def test_steady_pipeline_is_a_different_kernel_only_where_it_applies(monkeypatch):
    plain, steady = lora_mosaic.Tiles(steady=False), lora_mosaic.Tiles(steady=True)
    small_plain = _lowered_kernel(monkeypatch, 8192, 4096, 1024, plain)
    if small_plain != _lowered_kernel(monkeypatch, 8192, 4096, 1024, plain):
        pytest.skip(f"jax {jax.__version__} on this machine serializes a Mosaic GPU kernel differently at each "
                    "lowering, so lowered text cannot be compared (runs_steady is tested above)")
    assert _lowered_kernel(monkeypatch, 8192, 4096, 14336, plain) != _lowered_kernel(monkeypatch, 8192, 4096, 14336,
                                                                                     steady)
    assert small_plain == _lowered_kernel(monkeypatch, 8192, 4096, 1024, steady)
