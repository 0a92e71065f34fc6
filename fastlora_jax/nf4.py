"""NF4 4-bit storage, bit-exact with bitsandbytes: `NF4Array`, quantize / dequantize, and the `NF4Linear` layer.

One weight [out, in] is flattened row-major and cut into blocks of 64; each element becomes the index of the
nearest of the 16 NF4 code values after dividing by its block's absmax, two codes per byte (first in the high
nibble). The float32 absmax of every block is double-quantized: its mean (`offset`) is subtracted, and the result
is quantized with bitsandbytes' signed 8-bit dynamic map in blocks of 256, each with a float32 `nested_absmax`.
This is `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastlora_jax import kernels
from fastlora_jax.variables import Frozen, read

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_CODE.setflags(write=False)
"""The 16 NF4 values (bitsandbytes' `get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to [-1, 1]."""

_F32 = np.float32

ROUNDINGS = ("dequantize_4bit", "gemv_4bit")
"""How a weight is rounded to the compute dtype: "dequantize_4bit" (default, bitsandbytes' dequantize_4bit, which
training and merging use), NF4 value * absmax in float32, then rounded; "gemv_4bit" (bitsandbytes' 4-bit inference
kernel, which Unsloth's one-token generation uses), the NF4 value and the absmax each rounded to the dtype and their
product rounded in it. The two differ by at most one rounding per weight, and not at all in float32."""


LAYER_ROUNDINGS = (*ROUNDINGS, "bitsandbytes")
"""What an NF4 linear layer accepts (`fastlora_jax.kernels.nf4_linear`, `NF4Linear`, `set_rounding`): ROUNDINGS, or
"bitsandbytes", the choice bitsandbytes' `matmul_4bit` makes per call, which Unsloth's generation makes too:
gemv_4bit's weights for a call of one token (one row of x, in % 64 == 0) that is not differentiated,
dequantize_4bit's for every other call and every gradient. `for_inference` sets it on a model's default-rounded NF4
layers; `for_training` sets them back."""


def check_rounding(rounding: str, accepted: tuple[str, ...] = ROUNDINGS) -> None:
    """Raises ValueError naming `rounding` unless it is one of `accepted` (ROUNDINGS, or LAYER_ROUNDINGS)."""
    if rounding not in accepted:
        raise ValueError(f"rounding={rounding!r}; accepted: {', '.join(map(repr, accepted))}")


def rounding_of_call(rounding: str, tokens: int, in_features: int, differentiated: bool) -> str:
    """The ROUNDINGS entry one linear call computes with: `rounding` itself, or for "bitsandbytes" the choice of
    bitsandbytes' matmul_4bit (gemv_4bit only when the call has one token, whole 64-blocks per row and no
    gradient)."""
    check_rounding(rounding, LAYER_ROUNDINGS)
    if rounding != "bitsandbytes":
        return rounding
    inference_kernel = tokens == 1 and in_features % 64 == 0 and not differentiated
    return "gemv_4bit" if inference_kernel else "dequantize_4bit"


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: float32 step, one fused multiply-add per value."""
    start32, end32 = _F32(start), _F32(end)
    step = _F32((end32 - start32) / _F32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    low = (np.float64(start32) + np.float64(step) * i).astype(_F32)  # exact in float64, rounded once (fma)
    high = (np.float64(end32) - np.float64(step) * (steps - 1 - i)).astype(_F32)
    return np.where(i < steps // 2, low, high)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted float32 values in [-1, 1]."""
    parts = []
    for i in range(7):  # max_exponent_bits = 7, total_bits = 8, signed: 2**i + 1 linspace boundaries per exponent
        bounds = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / _F32(2.0)
        scale = _F32(10.0 ** (i - 6))
        parts += [scale * means, -scale * means]
    parts.append(np.array([0.0, 1.0], _F32))
    table = np.sort(np.concatenate(parts))
    assert table.shape == (256,), table.shape
    table.setflags(write=False)
    return table


@functools.cache
def _dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantizer: [-1, 1] cut into 65536 bins, each mapped to its nearest-code index."""
    code = dynamic_map()
    midpoints = _F32(0.5) * (code[:-1] + code[1:])
    i = np.arange(65536, dtype=_F32)
    values = _F32(-1.0) + (_F32(2.0) * i) / _F32(65535.0)
    lut = np.searchsorted(midpoints, values, side="left").astype(np.uint8)
    lut.setflags(write=False)
    return lut


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "absmax_q", "nested_absmax", "offset"],
                   meta_fields=["shape", "dtype"])
@dataclasses.dataclass(frozen=True)
class NF4Array:
    """One bitsandbytes-NF4 weight [out, in], or a stack of them with the same leading axes `[*stack]`.

    packed uint8 [*stack, ceil(n / 2)] (n = out * in, row-major, first code in the high nibble),
    absmax_q uint8 [*stack, nblocks] (nblocks = ceil(n / 64)), nested_absmax float32 [*stack, ceil(nblocks / 256)],
    offset float32 [*stack]. Static: `shape` = (out, in) of one weight (HF layout), `dtype` it dequantizes to.
    """

    packed: jax.Array
    absmax_q: jax.Array
    nested_absmax: jax.Array
    offset: jax.Array
    shape: tuple[int, int]
    dtype: np.dtype

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(jnp.dtype(self.dtype)))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nblocks(self) -> int:
        return -(-self.numel // BLOCKSIZE)

    @property
    def stack(self) -> tuple[int, ...]:
        """The leading stack shape (() for one weight)."""
        return tuple(self.offset.shape)

    def __getitem__(self, index) -> NF4Array:
        """Index the stack axes (e.g. `t[3]` is layer 3's weight)."""
        return NF4Array(self.packed[index], self.absmax_q[index], self.nested_absmax[index], self.offset[index],
                        self.shape, self.dtype)


def nf4_sizes(shape: tuple[int, int]) -> tuple[int, int, int]:
    """(packed bytes, nblocks, nested blocks) of one NF4 weight of `shape`."""
    n = int(np.prod(shape))
    nblocks = -(-n // BLOCKSIZE)
    return -(-n // 2), nblocks, -(-nblocks // NESTED_BLOCKSIZE)


def nf4_nbytes(t: NF4Array) -> int:
    """Bytes held by an NF4Array (all stacked weights): packed codes plus the quantization state."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in (t.packed, t.absmax_q, t.nested_absmax, t.offset))


def stack_nf4(arrays: list[NF4Array]) -> NF4Array:
    """Stack per-layer NF4Arrays (same shape and dtype) along a new leading axis (numpy stays numpy on the host)."""
    if not arrays:
        raise ValueError("stack_nf4: got an empty list")
    first = arrays[0]
    for i, t in enumerate(arrays):
        if (t.shape, t.dtype, t.stack) != (first.shape, first.dtype, first.stack):
            raise ValueError(f"stack_nf4: arrays[{i}] has shape={t.shape} dtype={t.dtype} stack={t.stack}; "
                             f"arrays[0] has shape={first.shape} dtype={first.dtype} stack={first.stack}")
    xp = jnp if any(isinstance(t.packed, jax.Array) for t in arrays) else np
    stacked = {f: xp.stack([getattr(t, f) for t in arrays]) for f in ("packed", "absmax_q", "nested_absmax", "offset")}
    return NF4Array(**stacked, shape=first.shape, dtype=first.dtype)


# ---------------------------------------------------------------------------------------------------------- quantize

def _xp(x):
    """The array module of x: jax.numpy for jax arrays and tracers, numpy otherwise."""
    return jnp if isinstance(x, jax.Array) else np


def _blockwise_absmax(x, blocksize: int):
    """x [n] float32 -> (x padded with zeros to [nblocks, blocksize], absmax [nblocks] float32)."""
    xp = _xp(x)
    nblocks = -(-x.shape[0] // blocksize)
    padded = xp.pad(x, (0, nblocks * blocksize - x.shape[0])).reshape(nblocks, blocksize)
    return padded, xp.abs(padded).max(axis=1)


# torch.mean of a float32 vector on CPU (bnb's offset) is ATen's cascade sum divided by n. Its order of additions
# decides the last bit, so it is reproduced: 8 lanes x 4 interleaved accumulators, each summing in 4 levels of
# chunks, and above 32768 elements one such sum per thread over contiguous slices (`at::parallel_for`).
# Written once for numpy and jax.numpy (every addition explicit, so XLA keeps the order).

_GRAIN = 32768
_LANES = 8


def _sequential(v):
    """v [G, m, R] -> [G, R]: float32 running sums from 0 along axis 1, in order."""
    acc = _xp(v).zeros((v.shape[0], v.shape[2]), _F32)
    for j in range(v.shape[1]):
        acc = acc + v[:, j]
    return acc


def _multi_row_sum(x):
    """x [size, R] -> [R]: ATen's multi_row_sum (4 accumulator levels flushed every `level_step` rows)."""
    size, r = x.shape
    level_step = 1 << max(4, (1 if size <= 2 else (size - 1).bit_length()) // 4)
    groups = [x]
    for _ in range(3):  # level j+1 holds the finished running sums of level_step groups of level j
        full = groups[-1].shape[0] // level_step * level_step
        groups.append(_sequential(groups[-1][:full].reshape(-1, level_step, r)))
    acc0 = _sequential(x[groups[1].shape[0] * level_step:][None])[0]
    acc1 = _sequential(groups[1][groups[2].shape[0] * level_step:][None])[0]
    acc2 = _sequential(groups[2][groups[3].shape[0] * level_step:][None])[0]
    acc3 = _sequential(groups[3][None])[0]
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(x):
    """x [m, lanes] -> [lanes]: ATen's row_sum, 4 interleaved rows at a time, then the leftovers and partials."""
    m, lanes = x.shape
    k = m // 4
    partial = _multi_row_sum(x[:4 * k].reshape(k, 4 * lanes)).reshape(4, lanes)
    total = partial[0]
    for i in range(4 * k, m):
        total = total + x[i]
    for j in range(1, 4):
        total = total + partial[j]
    return total


def _serial_sum(x):
    if x.shape[0] < _LANES:
        return _row_sum(x.reshape(-1, 1))[0]
    nvec = x.shape[0] // _LANES
    lanes = _row_sum(x[:nvec * _LANES].reshape(nvec, _LANES))
    total = _xp(x).zeros((), _F32)
    for i in range(nvec * _LANES, x.shape[0]):
        total = total + x[i]
    for i in range(_LANES):
        total = total + lanes[i]
    return total


def _torch_mean_f32(x, threads: int = 1):
    """`torch.mean` of a float32 vector [n] on CPU run with `threads` torch threads, to the last bit."""
    xp, n = _xp(x), x.shape[0]
    if n < _GRAIN or threads == 1:
        total = _serial_sum(x)
    else:
        used = min(threads, -(-n // _GRAIN))
        chunk = -(-n // used)
        partial = [_serial_sum(x[i * chunk:(i + 1) * chunk]) for i in range(used)]
        total = _serial_sum(xp.stack(partial + [xp.zeros((), _F32)] * (threads - used)))
    if xp is jnp:  # keep XLA from turning the division by a constant into a multiplication by its reciprocal
        return total / jax.lax.optimization_barrier(jnp.asarray(n, _F32))
    return np.asarray(total / _F32(n), _F32)


def _quantize_dynamic_blockwise(x):
    """bitsandbytes' CPU `quantize_blockwise(x, blocksize=256)` with the dynamic map: (codes uint8, absmax float32)."""
    xp = _xp(x)
    blocks, absmax = _blockwise_absmax(x, NESTED_BLOCKSIZE)
    inv = _F32(1.0) / xp.where(absmax == 0, _F32(1.0), absmax)  # [nb]; all-zero blocks get code 0
    scaled = xp.clip(blocks * inv[:, None], _F32(-1.0), _F32(1.0))  # [nb, 256]
    # A 65536-bin lookup: index = (uint16)((v + 1) * 0.5 * 65535 + 0.5). (Fusing the last multiply-add, as the
    # compiled library may, gives the same index: both round the sum to float32 at the same scale.)
    index = (((scaled + _F32(1.0)) * _F32(0.5)) * _F32(65535.0) + _F32(0.5)).astype(np.uint16)
    codes = xp.where(absmax[:, None] == 0, np.uint8(0), xp.asarray(_dynamic_lut())[index])
    return codes.reshape(-1)[:x.shape[0]], absmax


_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / _F32(2.0)  # the 15 midpoints bnb bucketizes with
_CHUNK_BLOCKS = 4096  # blocks quantized per step (keeps temporaries in cache)


def _nf4_codes(scaled: np.ndarray) -> np.ndarray:
    """Index of the NF4 value nearest to each scaled element: `torch.bucketize(x, midpoints)` (ties go down)."""
    codes = np.zeros(scaled.shape, np.uint8)
    for bound in _NF4_BOUNDS:
        codes += scaled > bound
    return codes


def quantize_nf4(w, *, mean_threads: int = 1) -> NF4Array:
    """Quantize one weight [out, in] (numpy or jax; float32, bfloat16 or float16) to NF4 exactly as bitsandbytes does
    on CPU: `quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)`. Returns numpy arrays.

    `mean_threads`: the torch CPU thread count whose reduction order the float32 `offset` (the mean of the block
    absmax) reproduces; it only matters above 32768 blocks (2M elements) and then only in the last bit.
    """
    w = np.asarray(w)
    _check_weight(w)
    x = w.reshape(-1)
    n = x.size
    nfull, rem = divmod(n, BLOCKSIZE)
    nblocks = nfull + (rem > 0)
    codes = np.empty(nblocks * BLOCKSIZE, np.uint8)
    absmax = np.empty(nblocks, _F32)
    for start in range(0, nfull, _CHUNK_BLOCKS):  # full blocks: x * (1 / absmax)
        stop = min(nfull, start + _CHUNK_BLOCKS)
        blocks = x[start * BLOCKSIZE:stop * BLOCKSIZE].astype(_F32).reshape(-1, BLOCKSIZE)  # [k, 64]
        block_max = np.maximum(blocks.max(axis=1), -blocks.min(axis=1))
        absmax[start:stop] = block_max
        blocks *= (_F32(1.0) / np.maximum(block_max, _F32(1e-38)))[:, None]
        codes[start * BLOCKSIZE:stop * BLOCKSIZE] = _nf4_codes(blocks).reshape(-1)
    if rem:  # the partial last block: a true division x / absmax, zero padding gets code 7 (0.0)
        tail = np.zeros(BLOCKSIZE, _F32)
        tail[:rem] = x[nfull * BLOCKSIZE:]
        absmax[nfull] = np.abs(tail).max()
        codes[nfull * BLOCKSIZE:] = _nf4_codes(tail / np.maximum(absmax[nfull], _F32(1e-38)))
    codes = codes[:n + n % 2]  # bnb pads an odd count with one zero
    packed = (codes[0::2] << 4) | codes[1::2]

    offset = _torch_mean_f32(absmax, mean_threads)
    absmax_q, nested_absmax = _quantize_dynamic_blockwise(absmax - offset)
    return NF4Array(packed, absmax_q, nested_absmax, np.asarray(offset, _F32), shape=w.shape, dtype=w.dtype)


def _check_weight(w) -> None:
    if w.ndim != 2:
        raise ValueError(f"quantize_nf4: expected one weight [out, in], got shape {w.shape}")
    if w.dtype not in (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16)):
        raise ValueError(f"quantize_nf4: dtype {w.dtype} not supported; accepted: float32, bfloat16, float16")


@functools.partial(jax.jit, static_argnames="mean_threads")
def quantize_nf4_jax(w: jax.Array, *, mean_threads: int = 1) -> NF4Array:
    """`quantize_nf4` in jax.numpy, jitted (on the device; usable inside jit, e.g. for LoftQ): the same bytes,
    except for blocks of float32 subnormals (|w| < 1.2e-38) where a backend flushes denormals to zero."""
    _check_weight(w)
    n = w.size
    nfull, rem = divmod(n, BLOCKSIZE)
    blocks, absmax = _blockwise_absmax(w.reshape(-1).astype(_F32), BLOCKSIZE)  # [nblocks, 64], [nblocks]
    inv = _F32(1.0) / jnp.maximum(absmax, _F32(1e-38))
    scaled = blocks * inv[:, None]  # full blocks: x * (1 / absmax)
    if rem:  # the partial last block: a true division
        scaled = scaled.at[nfull].set(blocks[nfull] / jnp.maximum(absmax[nfull], _F32(1e-38)))
    scaled = jnp.where(absmax[:, None] > 0, scaled, _F32(0.0))  # all-zero blocks (even where denormals flush)
    codes = sum((scaled > bound).astype(jnp.uint8) for bound in _NF4_BOUNDS).reshape(-1)[:n + n % 2]
    packed = (codes[0::2] << 4) | codes[1::2]
    offset = _torch_mean_f32(absmax, mean_threads)
    absmax_q, nested_absmax = _quantize_dynamic_blockwise(absmax - offset)
    return NF4Array(packed, absmax_q, nested_absmax, offset, shape=w.shape, dtype=w.dtype)


# -------------------------------------------------------------------------------------------------------- dequantize

def dequantize_absmax(t: NF4Array) -> jax.Array:
    """The float32 block absmax [*stack, nblocks]: dynamic_map[absmax_q] * nested_absmax + offset."""
    code = jnp.asarray(dynamic_map())[t.absmax_q]  # [*stack, nblocks]; uint8 indices: no negative-index fix-up
    nested = jnp.repeat(t.nested_absmax, NESTED_BLOCKSIZE, axis=-1)[..., :t.absmax_q.shape[-1]]
    scaled = code * nested
    # Two roundings as in bnb (multiply, then add). XLA fuses and LLVM would contract a multiply feeding an add into
    # one FMA; a select between them (not removable: NaN != NaN) keeps the product rounded to float32.
    scaled = jnp.where(scaled == scaled, scaled, jnp.float32(jnp.nan))
    return scaled + t.offset[..., None]


@functools.cache
def _nf4_byte_values() -> np.ndarray:
    """[256, 2] float32: the NF4 values of a packed byte's (high, low) nibbles. Decoding by byte is one 8-byte
    gather per two codes, and needs no nibble split or interleave: 2.5x faster on an H200 than per code
    (benchmarks/RESULTS.md, session 4)."""
    table = np.stack([np.repeat(NF4_CODE, 16), np.tile(NF4_CODE, 16)], axis=-1)  # byte b -> (b >> 4, b & 15)
    table.setflags(write=False)
    return table


def dequantize_nf4(t: NF4Array, dtype=None, rounding: str = "dequantize_4bit") -> jax.Array:
    """The weight [*stack, out, in] in `dtype` (default t.dtype), equal to bitsandbytes' `dequantize_4bit`:
    NF4_CODE[code] * absmax in float32, then rounded to dtype; with rounding="gemv_4bit" the NF4 value and the
    absmax are rounded to dtype first and multiplied in it (see ROUNDINGS)."""
    check_rounding(rounding)
    dtype = t.dtype if dtype is None else dtype
    values = jnp.asarray(_nf4_byte_values())[t.packed]  # [*stack, bytes, 2]: one gather decodes both nibbles
    values = values.reshape(*values.shape[:-2], -1)  # [*stack, 2 * bytes] float32, the codes in order
    n, nblocks = t.numel, t.nblocks
    values = jnp.pad(values[..., :n], [(0, 0)] * (values.ndim - 1) + [(0, nblocks * BLOCKSIZE - n)])
    values = values.reshape(*values.shape[:-1], nblocks, BLOCKSIZE)  # [*stack, nblocks, 64]
    absmax = dequantize_absmax(t)[..., None]  # [*stack, nblocks, 1]
    if rounding == "gemv_4bit":  # in dtype: the exact product of two dtype values, rounded once
        out = values.astype(dtype) * absmax.astype(dtype)
    else:
        out = values * absmax
    out = out.reshape(*out.shape[:-2], -1)[..., :n]
    return out.reshape(*out.shape[:-1], *t.shape).astype(dtype)


# ---------------------------------------------------------------------------------------------------------- NNX layer

class NF4State(nnx.Variable):
    """Part of a frozen NF4 weight (packed codes, absmax codes, nested absmax, offset): never differentiated."""


class NF4Linear(nnx.Module):
    """A frozen NF4 linear layer, y = x @ dequantize(W).T + bias, with `fastlora_jax.linear.Linear`'s protocol.

    Holds one bnb-NF4 weight per stacked layer: NF4State variables [*stack, ...] (see `NF4Array`) and an optional
    `Frozen` bias [*stack, out]. Inside the layer scan each call sees one layer's slice; matmuls go through
    `fastlora_jax.kernels.nf4_linear`, with the weights rounded as `rounding` says (LAYER_ROUNDINGS; `set_rounding`
    switches a whole model).
    """

    def __init__(self, weight: NF4Array, *, bias: jax.Array | None = None, implementation: str = "auto",
                 rounding: str = "dequantize_4bit"):
        check_rounding(rounding, LAYER_ROUNDINGS)
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = np.dtype(weight.dtype).name
        self.implementation = implementation
        self.rounding = rounding
        self.packed = NF4State(jnp.asarray(weight.packed))
        self.absmax_q = NF4State(jnp.asarray(weight.absmax_q))
        self.nested_absmax = NF4State(jnp.asarray(weight.nested_absmax))
        self.offset = NF4State(jnp.asarray(weight.offset))
        if bias is not None and tuple(bias.shape) != (*weight.stack, self.out_features):
            raise ValueError(f"NF4Linear: bias shape {tuple(bias.shape)}; "
                             f"expected {(*weight.stack, self.out_features)}")
        self.bias = None if bias is None else Frozen(jnp.asarray(bias))

    @classmethod
    def from_nf4(cls, weight: NF4Array, bias: jax.Array | None = None, *, implementation: str = "auto",
                 rounding: str = "dequantize_4bit") -> NF4Linear:
        """The layer of a (stacked) NF4Array, e.g. `stack_nf4([quantize_nf4(w) for w in per_layer_weights])`."""
        return cls(weight, bias=bias, implementation=implementation, rounding=rounding)

    @property
    def dtype(self) -> jnp.dtype:
        """The 16-bit (or float32) dtype the weight dequantizes to."""
        return jnp.dtype(self.weight_dtype)

    def nf4(self) -> NF4Array:
        """The weight as an NF4Array (one layer's inside the scan, the whole stack outside)."""
        return NF4Array(self.packed[...], self.absmax_q[...], self.nested_absmax[...], self.offset[...],
                        shape=(self.out_features, self.in_features), dtype=self.dtype)

    def weight_for_calls(self, tokens: int, dtype) -> jax.Array | None:
        """One layer's weight [out, in] dequantized once for many calls of `tokens` tokens in dtype, to pass to each
        as `dequantized` (the same bits they would dequantize in each pass); None where those calls would not
        dequantize it (`fastlora_jax.kernels.nf4_weight_for_calls`)."""
        return kernels.nf4_weight_for_calls(self.nf4(), tokens, dtype, implementation=self.implementation,
                                            rounding=self.rounding)

    def __call__(self, x: jax.Array, dequantized: jax.Array | None = None) -> jax.Array:  # x [..., in] -> [..., out]
        return kernels.nf4_linear(x, self.nf4(), read(self.bias), implementation=self.implementation,
                                  rounding=self.rounding, dequantized=dequantized)

    def with_lora(self, x: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array,
                  dequantized: jax.Array | None = None) -> jax.Array:
        """x @ W.T + bias + scaling * (x @ a) @ b; a [in, r], b [r, out]; no gradient reaches the NF4 weight.
        `dequantized`: `weight_for_calls`'s array for x's token count, used instead of dequantizing W."""
        return kernels.nf4_linear(x, self.nf4(), read(self.bias), a, b, scaling, implementation=self.implementation,
                                  rounding=self.rounding, dequantized=dequantized)

    def dense_weight(self) -> jax.Array:
        """The dequantized weight [*stack, in, out] (for merging and export: dequantize_4bit's, whatever
        `rounding` says, as PEFT merges)."""
        return jnp.swapaxes(dequantize_nf4(self.nf4()), -1, -2)


def set_rounding(model: nnx.Module, rounding: str, *, where: str | None = None) -> int:
    """Sets `rounding` (LAYER_ROUNDINGS) on every NF4Linear in `model`, or with `where` only on those whose rounding
    is `where`; returns how many it set. E.g. "gemv_4bit" before generating, as bitsandbytes' inference kernel rounds
    (faster few-token NF4 kernels on an NVIDIA GPU, bfloat16), and "dequantize_4bit" back for training;
    `for_inference` / `for_training` switch "dequantize_4bit" <-> "bitsandbytes" with `where`. Jitted functions
    retrace: the rounding is static."""
    check_rounding(rounding, LAYER_ROUNDINGS)
    if where is not None:
        check_rounding(where, LAYER_ROUNDINGS)
    layers = [module for _, module in nnx.iter_graph(model)
              if isinstance(module, NF4Linear) and where in (None, module.rounding)]
    for layer in layers:
        layer.rounding = rounding
    return len(layers)
