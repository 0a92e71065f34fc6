"""NF4 storage against bitsandbytes on CPU: code tables, quantize byte for byte, dequantize exactly; NF4Linear."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from fastlora_jax import nf4
from fastlora_jax.linear import LoraLinear
from fastlora_jax.variables import TRAINABLE

from helpers import rel_err

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 96), (300, 200), (1024, 640), (5, 7), (3, 64), (1, 1)]
DTYPES = ["float32", "bfloat16", "float16"]


def _torch(w: np.ndarray):
    if w.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(w)


def _random_weight(shape, dtype, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    scale = scale * rng.uniform(0.01, 2.0, size=(shape[0], 1))  # rows of different magnitudes
    return (rng.standard_normal(shape) * scale).astype(np.dtype(dtype) if dtype != "bfloat16" else ml_dtypes.bfloat16)


def _bnb_quantize(w: np.ndarray):
    return F.quantize_4bit(_torch(w), quant_type="nf4", compress_statistics=True, blocksize=64)


def _assert_same_bytes(t: nf4.NF4Array, packed, state):
    assert t.shape == tuple(state.shape) and t.dtype.name == str(state.dtype).removeprefix("torch.")
    pairs = [(t.packed, packed.reshape(-1)), (t.absmax_q, state.absmax), (t.nested_absmax, state.state2.absmax),
             (t.offset, state.offset)]
    for ours, ref in pairs:
        ref = ref.numpy()
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.dtype, ref.shape)
        assert ours.tobytes() == ref.tobytes()


def test_code_tables_equal_bnb():
    assert nf4.NF4_CODE.tobytes() == F.get_4bit_type("nf4", device="cpu").numpy().tobytes()
    assert nf4.dynamic_map().tobytes() == F.create_dynamic_map().numpy().tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_match_bnb(shape, dtype):
    w = _random_weight(shape, dtype, seed=10 * SHAPES.index(shape) + DTYPES.index(dtype))
    packed, state = _bnb_quantize(w)
    t = nf4.quantize_nf4(w, mean_threads=torch.get_num_threads())
    _assert_same_bytes(t, packed, state)

    ours = np.asarray(_dequantize(jax.tree.map(jnp.asarray, t)))
    assert ours.dtype == w.dtype and ours.shape == shape
    # bnb's generic (torch) dequantization, which its CPU backend uses for odd widths (eager, not torch.compile'd):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    generic = eager(packed.reshape(-1), absmax, state.code, 64, shape, state.dtype)
    assert ours.tobytes() == _as_numpy(generic).tobytes()
    # bnb's public CPU dequantize_4bit, where it runs its C kernel (even widths; odd ones use the function above).
    # Its AVX-512 kernel indexes the absmax per row (absmax[row * (in // 64) + col // 64]), which is wrong when
    # in % 64 != 0 and in % 16 == 0; those widths are checked against the generic function only.
    if shape[1] % 2 == 0 and (shape[1] % 64 == 0 or shape[1] % 16 != 0):
        assert ours.tobytes() == _as_numpy(F.dequantize_4bit(packed, state)).tobytes()


_dequantize = jax.jit(nf4.dequantize_nf4)


def _as_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("threads", [1, 2])
def test_offset_matches_bnb_above_one_torch_grain(threads):
    # 2.2M elements: 35200 blocks (> 32768, where torch.mean splits over threads), not a multiple of 64 * 256.
    w = _random_weight((1100, 2048), "float32", seed=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        packed, state = _bnb_quantize(w)
    finally:
        torch.set_num_threads(before)
    _assert_same_bytes(nf4.quantize_nf4(w, mean_threads=threads), packed, state)


def test_ties_zero_blocks_and_extremes_match_bnb():
    bounds = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / np.float32(2)
    ties = [[1.0], bounds, -bounds, np.nextafter(bounds, np.float32(2)), np.zeros(64 - 1 - 45)]
    rows = [np.concatenate(ties),  # elements exactly on the midpoints between NF4 values, and just above
            np.zeros(64),  # an all-zero block
            np.concatenate([[-3.0], np.full(63, 3.0)]),  # +-absmax
            np.full(64, 1e-39)]  # subnormals
    w = np.stack(rows).astype(np.float32)
    _assert_same_bytes(nf4.quantize_nf4(w), *_bnb_quantize(w))
    zeros = np.zeros((4, 64), np.float32)
    _assert_same_bytes(nf4.quantize_nf4(zeros), *_bnb_quantize(zeros))


def test_quantize_accepts_jax_arrays_and_rejects_bad_input():
    w = _random_weight((32, 64), "bfloat16", seed=3)
    a, b = nf4.quantize_nf4(jnp.asarray(w)), nf4.quantize_nf4(w)
    assert a.packed.tobytes() == b.packed.tobytes() and a.offset == b.offset
    with pytest.raises(ValueError, match="int32.*accepted: float32, bfloat16, float16"):
        nf4.quantize_nf4(np.ones((4, 64), np.int32))
    with pytest.raises(ValueError, match=r"\[out, in\].*\(64,\)"):
        nf4.quantize_nf4(np.ones(64, np.float32))


def test_stack_index_jit_and_nbytes():
    ws = [_random_weight((48, 200), "bfloat16", seed=i) for i in range(3)]
    ts = [nf4.quantize_nf4(w) for w in ws]
    stacked = nf4.stack_nf4(ts)
    assert stacked.stack == (3,) and stacked.packed.shape == (3, 4800) and stacked.nested_absmax.shape == (3, 1)
    dense = jax.jit(nf4.dequantize_nf4)(jax.tree.map(jnp.asarray, stacked))  # [3, 48, 200]
    for i, t in enumerate(ts):
        assert np.asarray(dense[i]).tobytes() == np.asarray(nf4.dequantize_nf4(t)).tobytes()
        assert stacked[i].packed.tobytes() == t.packed.tobytes()
    assert nf4.nf4_nbytes(stacked) == 3 * (4800 + 150 + 4 * 1 + 4)
    with pytest.raises(ValueError, match="arrays\\[1\\] has shape=\\(48, 100\\)"):
        nf4.stack_nf4([ts[0], nf4.quantize_nf4(_random_weight((48, 100), "bfloat16", seed=0))])


# ------------------------------------------------------------------------------------------------------ NF4Linear

def _layer(dtype, stack=3, out_features=96, in_features=128, bias=True, seed=0):
    ws = [_random_weight((out_features, in_features), dtype, seed=seed + i, scale=0.05) for i in range(stack)]
    t = nf4.stack_nf4([nf4.quantize_nf4(w) for w in ws])
    b = jnp.asarray(np.random.default_rng(seed).standard_normal((stack, out_features)), dtype) if bias else None
    return nf4.NF4Linear.from_nf4(t, b), t, b


def _slice(module, i):
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda v: v[i], state))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_nf4_linear_forward_matches_dense_reference(dtype, tol):
    layer, t, b = _layer(dtype)
    assert (layer.in_features, layer.out_features, layer.dtype) == (128, 96, jnp.dtype(dtype))
    dense = layer.dense_weight()  # [3, in, out]
    assert dense.shape == (3, 128, 96) and dense.dtype == jnp.dtype(dtype)
    assert np.asarray(dense).tobytes() == np.asarray(jnp.swapaxes(nf4.dequantize_nf4(t), -1, -2)).tobytes()
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 5, 128)), dtype)
    for i in range(3):
        y = _slice(layer, i)(x)
        ref = x.astype(jnp.float32) @ dense[i].astype(jnp.float32) + b[i].astype(jnp.float32)
        assert y.shape == (2, 5, 96) and y.dtype == jnp.dtype(dtype)
        assert rel_err(y, ref) < tol


def test_nf4_linear_scanned_over_layers():
    layer, _, b = _layer("float32")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 128)), jnp.float32)
    graphdef, state = nnx.split(layer)

    def body(carry, layer_state):
        return carry, nnx.merge(graphdef, layer_state)(x)

    _, ys = jax.lax.scan(body, None, state)  # [3, 4, 96]
    dense = layer.dense_weight()
    ref = jnp.einsum("ti,lio->lto", x, dense) + b[:, None]
    assert rel_err(ys, ref) < 1e-5


def test_qlora_gradients_reach_lora_and_x_never_nf4_state():
    base, _, b = _layer("float32", stack=1, bias=True)
    base = _slice(base, 0)
    rng = np.random.default_rng(2)
    r, scaling = 4, 2.0
    a0 = jnp.asarray(rng.standard_normal((128, r)) * 0.1, jnp.float32)
    b0 = jnp.asarray(rng.standard_normal((r, 96)) * 0.1, jnp.float32)
    model = LoraLinear(base, r=r, scaling=scaling, dropout=0.0, lora_a=a0, lora_b=b0,
                       layer_scale=jnp.asarray(scaling, jnp.float32))
    x = jnp.asarray(rng.standard_normal((6, 128)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((6, 96)), jnp.float32)
    dense = base.dense_weight()

    def loss(m, x):
        return jnp.sum(m(x) * g)

    grads, dx = nnx.grad(loss, argnums=(nnx.DiffState(0, TRAINABLE), 1))(model, x)
    leaves = nnx.to_flat_state(grads)
    assert sorted(path[-1] for path, _ in leaves) == ["lora_a", "lora_b"]
    assert not any(isinstance(v, nf4.NF4State) for _, v in leaves)

    def ref_loss(a, bb, x):
        y = x @ dense + b[0] + scaling * (x @ a) @ bb
        return jnp.sum(y * g)

    ra, rb, rx = jax.grad(ref_loss, argnums=(0, 1, 2))(a0, b0, x)
    assert rel_err(grads["lora_a"][...], ra) < 1e-5 and rel_err(grads["lora_b"][...], rb) < 1e-5
    assert rel_err(dx, rx) < 1e-5 and float(jnp.abs(dx).max()) > 0
    # NF4 state is its own variable type, which the trainable filter never selects.
    assert sorted(path[-1] for path, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))) == ["lora_a", "lora_b"]
    assert len(nnx.to_flat_state(nnx.state(model, nf4.NF4State))) == 4


def test_quantize_nf4_jax_gives_the_same_bytes():
    for i, (shape, dtype) in enumerate([((300, 200), "bfloat16"), ((64, 96), "float32"), ((5, 7), "float16")]):
        w = _random_weight(shape, dtype, seed=40 + i)
        ours, ref = nf4.quantize_nf4_jax(jnp.asarray(w)), nf4.quantize_nf4(w)
        assert (ours.shape, ours.dtype) == (ref.shape, ref.dtype)
        for field in ("packed", "absmax_q", "nested_absmax", "offset"):
            a, b = np.asarray(getattr(ours, field)), getattr(ref, field)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (shape, field)
