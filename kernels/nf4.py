"""NF4 linear, y = x @ dequantize(w).T + bias (+ s * (x @ a) @ b): a fused dequant-matmul Pallas kernel and XLA.

w is one bitsandbytes NF4 weight [out, in] (`fastlora_jax.nf4.NF4Array`): row-major codes, two per byte (first in
the high nibble), one double-quantized absmax per 64 consecutive elements. With in % 64 == 0 every 64-block lies
in one row, so the codes view as [out, in / 2] bytes and the absmax as [out, in / 64].

The Pallas kernels read only the 4-bit codes and the float32 block absmax (double-dequantized by XLA first: 1/64
of the elements): each program decodes a tile of codes in registers (each nibble's NF4 value by byte permutes in
PTX on an NVIDIA GPU, kernels/nf4_ptx.py, else by a tree of selects on its four bits, or a gather from the 16-entry
table; times its block's absmax in float32, then x's dtype; or, with rounding="gemv_4bit", each rounded to x's
dtype and multiplied in it, in PTX straight from bf16 byte planes), puts the two nibbles of each byte back into
column order (high first; the PTX for 16-bit inputs returns each byte's two weights as one pair, already in that
order), and multiplies the tile with one dot. Few
programs per output tile would leave the GPU idle at few tokens, so the contraction is split over `split_k`
programs whose float32 partial sums XLA adds. The XLA path dequantizes the whole layer and
calls one matmul; its "reduce" variant writes the forward as a multiply-and-sum, which XLA fuses with the decoding
into one reduction kernel that reads only the codes (no 16-bit weight written; each token decodes the weight again,
so it pays at one token only). All share a custom_vjp whose only residuals are the NF4 arrays: the backward
dequantizes again. A caller that runs many calls on one weight (the MLP's token chunks) may dequantize it once
(`api.nf4_weight_for_calls`) and pass it as `dequantized` to the XLA and Mosaic paths: the same bits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from fastlora_jax.kernels import _compat, nf4_ptx
from fastlora_jax.kernels.lora import XA_NAME, check_arrays_and_scaling, nf4_lora_linear

if TYPE_CHECKING:
    from fastlora_jax.nf4 import NF4Array

_F32 = jnp.float32
_BLOCK = 64  # bitsandbytes' NF4 blocksize
# Programs a kernel's contraction is split until (BlockSizes.split_k=None), per decode: about two per multiprocessor
# for the select tree and the gather (H200 sweep, session 8); about four for the PTX decode: split so, its
# dequantize_4bit forward ran 6-9% and its backward 9-15% faster on the 14336-wide shapes at 1 and 16 tokens, and the
# other two shapes kept their splits (H100, benchmarks/RESULTS.md, "## Kernels", session 13).
_TARGET_PROGRAMS = {"select": 264, "gather": 264, "prmt": 512}
DECODES = ("auto", "select", "gather", "prmt")  # how the kernels turn a 4-bit code into its NF4 value


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiles of one fused NF4 kernel and its Triton launch settings (block sizes powers of two).

    The select-tree defaults per kernel (`for_forward`, `for_backward`) are the fastest of a sweep on an H200 at
    16 tokens over the four Llama-3.1-8B shapes (benchmarks/RESULTS.md, "## Kernels", session 8), where the select
    tree beat the table gather by 1.3-2.6x. The PTX decode's tiles (4 warps; backward 32 rows x 2 blocks) come from
    a later H200 sweep whose records were lost; with them the PTX forward ran 1.4-1.7x faster than the select tree
    on the three large shapes on an H100 (session 9; on 4096->1024 within 3%, or slower at one token).
    """

    block_m: int = 16  # token rows per program (>= 16)
    block_n: int = 64  # forward: output features per program (>= 16)
    block_k: int = 64  # backward: output features (contraction rows) per loop step (>= 32)
    blocks_per_step: int = 2  # 64-element NF4 blocks of input features per step (fwd) / per program (bwd)
    split_k: int | None = None  # programs sharing one contraction; None: the decode's _TARGET_PROGRAMS
    num_warps: int = 4
    num_stages: int = 3
    # NF4 values by a tree of selects, "gather" (from the [16] table in memory) or "prmt" (byte permutes in PTX,
    # kernels/nf4_ptx.py: compiled on an NVIDIA GPU only); "auto": "prmt" compiled on an NVIDIA GPU, else "select".
    # The weights are the call's `rounding`'s whatever the decode. With rounding="gemv_4bit" and bfloat16 inputs,
    # "prmt" looks up bf16 values and multiplies in bf16 (nf4_ptx.decode_bf16): the forward ran 1.25-1.5x faster
    # than with "dequantize_4bit" at 1-16 tokens on the 14336-wide shapes and 1.1-1.3x on 4096->4096 (H100,
    # benchmarks/RESULTS.md, "## Kernels", session 10); for float16 inputs "auto" then uses the select tree.
    decode: str = "auto"

    def __post_init__(self):
        if self.decode not in DECODES:
            raise ValueError(f"BlockSizes(decode={self.decode!r}); accepted: {', '.join(map(repr, DECODES))}")
        # At block_k=16 the compiled backward kernel gave wrong bf16 products on an H200 (JAX 0.11.2's Triton,
        # relative error ~1.5 against XLA; float32 was right), while 32 and 64 were right: 16 is refused.
        if self.block_k < 32 or self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"BlockSizes(block_m={self.block_m}, block_n={self.block_n}, block_k={self.block_k}): "
                             "accepted block_m >= 16, block_n >= 16, block_k >= 32")

    @classmethod
    def for_forward(cls, m: int, out_features: int, in_features: int, decode: str = "select",
                    rounding: str = "dequantize_4bit") -> BlockSizes:
        """x @ W.T: 64 output rows, 4 NF4 blocks (256 input features) per step; 8 warps for the select tree, 4 for
        the PTX decode (each the faster for it). The bf16 PTX decode ("prmt", "gemv_4bit"): 32 rows, the
        contraction split 4 ways where it divides (the fastest measured on 4096->14336 and 14336->4096, session
        10)."""
        if decode == "prmt" and rounding == "gemv_4bit":  # 4 steps of 4 blocks split the contraction: in % 1024 == 0
            return cls(block_m=_token_block(m), block_n=min(32, _pow2_at_least(out_features)), blocks_per_step=4,
                       split_k=4 if in_features % (16 * _BLOCK) == 0 else None, decode=decode)
        return cls(block_m=_token_block(m), block_n=min(64, _pow2_at_least(out_features)), blocks_per_step=4,
                   num_warps=4 if decode == "prmt" else 8, decode=decode)

    @classmethod
    def for_backward(cls, m: int, out_features: int, in_features: int, decode: str = "select") -> BlockSizes:
        """g @ W. PTX decode: 32 contraction rows per step, two NF4 blocks of input features per program. Select
        tree: 64 rows; one block per program, two when the contraction is short (out <= 1024: fewer, longer
        programs measured 1.35x faster)."""
        if decode == "prmt":
            return cls(block_m=_token_block(m), block_k=32, blocks_per_step=2, decode=decode)
        return cls(block_m=_token_block(m), block_k=min(64, _pow2_at_least(out_features, 32)),
                   blocks_per_step=2 if out_features <= 1024 else 1, decode=decode)


def _products_in_dtype(rounding: str, dtype) -> bool:
    """Whether the weights are NF4 value * absmax rounded and multiplied in `dtype` ("gemv_4bit"; in float32 that
    is dequantize_4bit's product)."""
    from fastlora_jax.nf4 import check_rounding

    check_rounding(rounding)
    return rounding == "gemv_4bit" and dtype != jnp.float32


def _decode_that_runs(requested: BlockSizes | None, interpret: bool, in_dtype: bool, dtype) -> str:
    """The decode of `requested` ("auto" when None) for this call: "auto" is "prmt" compiled on an NVIDIA GPU and
    "select" elsewhere (the same products, so the same weights), and "select" for products in float16 (the PTX
    has float32 and bfloat16 tables only); "prmt" raises elsewhere and for products in float16."""
    decode = requested.decode if requested is not None else "auto"
    nvidia = not interpret and _compat.on_nvidia_gpu()
    ptx_can = not in_dtype or dtype == jnp.bfloat16
    if decode == "auto":
        return "prmt" if nvidia and ptx_can else "select"
    if decode == "prmt" and not ptx_can:
        raise ValueError(f"BlockSizes(decode='prmt') with rounding='gemv_4bit' has float32 and bfloat16 tables "
                         f"only; got dtype {jnp.dtype(dtype).name} (use decode='select' or 'auto')")
    if decode == "prmt" and not nvidia:
        raise ValueError(f"BlockSizes(decode='prmt') is PTX and runs compiled on an NVIDIA GPU only; got "
                         f"interpret={interpret} on backend {jax.default_backend()!r} (use decode='select' or 'auto')")
    return decode


def _token_block(m: int) -> int:
    return 16 if m <= 16 else min(64, _pow2_at_least(m))


def _pow2_at_least(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _split(steps: int, programs: int, requested: int | None, decode: str) -> int:
    """A divisor of `steps`: the requested one, or the smallest giving the decode's _TARGET_PROGRAMS programs (at
    most 16)."""
    if requested is not None:
        if steps % requested:
            raise ValueError(f"split_k={requested} must divide the {steps} contraction steps")
        return requested
    divisors = [d for d in range(1, min(16, steps) + 1) if steps % d == 0]
    return next((d for d in divisors if programs * d >= _TARGET_PROGRAMS[decode]), divisors[-1])


def _code_table() -> jax.Array:
    from fastlora_jax.nf4 import NF4_CODE

    return jnp.asarray(NF4_CODE, _F32)  # [16]


def _select_code(ints):
    """NF4_CODE[ints] for int32 codes 0..15 by a tree of selects on the four bits (no memory access)."""
    from fastlora_jax.nf4 import NF4_CODE

    level = [np.float32(v) for v in NF4_CODE]  # 16 leaves, then 8, 4, 2, 1 after each bit
    for bit in range(4):
        set_ = (ints & (1 << bit)) != 0
        level = [jnp.where(set_, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


def _decode_tile(codes, am, code_ref, dtype, decode: str, in_dtype: bool):
    """codes [R, C] uint8 (two per byte, high nibble first), am [R, C / 32] float32 -> the weight [R, 2C] in dtype,
    in column order: NF4_CODE[code] * absmax in float32, then dtype (bitsandbytes' dequantize_4bit); `in_dtype`:
    both rounded to dtype first and multiplied in it (gemv_4bit)."""
    r, c = codes.shape
    scale = jnp.broadcast_to(am[:, :, None], (r, c // (_BLOCK // 2), _BLOCK // 2)).reshape(r, c)  # [R, C]
    if decode == "prmt" and in_dtype:
        return nf4_ptx.decode_bf16(codes, scale)  # [R, 2C] bfloat16 (the only dtype it serves), column order
    if decode == "prmt" and dtype != _F32:
        return nf4_ptx.decode_rounded(codes, scale, dtype)  # [R, 2C], rounded to dtype in the PTX, column order
    if decode == "prmt":
        hi, lo = nf4_ptx.decode(codes, scale)  # [R, C] float32 each
    else:
        ints = codes.astype(jnp.int32)
        value = _select_code if decode == "select" else (lambda i: code_ref[i])  # "gather": from the [16] table
        if in_dtype:
            scale = scale.astype(dtype)
            hi, lo = value(ints >> 4).astype(dtype) * scale, value(ints & 15).astype(dtype) * scale
        else:
            hi, lo = value(ints >> 4) * scale, value(ints & 15) * scale
    hi, lo = hi.astype(dtype), lo.astype(dtype)  # even, odd columns
    return jnp.concatenate([hi[..., None], lo[..., None]], axis=-1).reshape(r, 2 * c)


def _xwt_kernel(x_ref, codes_ref, absmax_ref, code_ref, o_ref, *, bps: int, steps: int, decode: str,
                in_dtype: bool):
    # x_ref [bm, in], codes_ref [bn, in / 2] uint8, absmax_ref [bn, in / 64] float32, code_ref [16];
    # o_ref [bm, bn] (or float32 partial sums of this program's share of the contraction)
    s = pl.program_id(2)

    def body(t, acc):  # acc [bm, bn] float32; one step covers bps 64-blocks of input features
        kb = pl.multiple_of((s * steps + t) * bps, bps)  # the step's first 64-block
        codes = codes_ref[:, pl.ds(kb * (_BLOCK // 2), bps * (_BLOCK // 2))]  # [bn, 32 bps]
        am = absmax_ref[:, pl.ds(kb, bps)]
        w = _decode_tile(codes, am, code_ref, x_ref.dtype, decode, in_dtype)  # [bn, 64 bps]
        return acc + _dot_t(x_ref[:, pl.ds(kb * _BLOCK, bps * _BLOCK)], w)  # [bm, bn]

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape[-2:], _F32))
    o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)


def _xw_kernel(g_ref, codes_ref, absmax_ref, code_ref, o_ref, *, steps: int, block_k: int, decode: str,
               in_dtype: bool):
    # g_ref [bm, out], codes_ref [out, 32 * bps] uint8, absmax_ref [out, bps] float32, code_ref [16];
    # o_ref [bm, 64 * bps] (or float32 partial sums of this program's share of the contraction)
    s = pl.program_id(2)

    def body(t, acc):  # acc [bm, 64 bps] float32; one step covers block_k output features (contraction rows)
        r0 = pl.multiple_of((s * steps + t) * block_k, block_k)
        w = _decode_tile(codes_ref[pl.ds(r0, block_k), :], absmax_ref[pl.ds(r0, block_k), :], code_ref,
                         g_ref.dtype, decode, in_dtype)  # [bk, 64 bps]
        return acc + _dot(g_ref[:, pl.ds(r0, block_k)], w)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape[-2:], _F32))
    o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)


def _dot(a, b):  # a [m, k] @ b [k, n] -> [m, n] float32
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _dot_t(a, b):  # a [m, k] @ b [n, k].T -> [m, n] float32
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _operands(w: NF4Array, rows: int):
    """codes [rows, in / 2] uint8 and the float32 block absmax [rows, in / 64] (zero rows past out).

    The absmax (1/64 of the weight's elements, double-dequantized by XLA: a small fusion) is exactly
    `fastlora_jax.nf4.dequantize_absmax`; the kernels then dequantize the codes (two per byte) themselves.
    """
    from fastlora_jax.nf4 import dequantize_absmax

    out_features, in_features = w.shape
    codes = w.packed.reshape(out_features, in_features // 2)
    absmax = dequantize_absmax(w).reshape(out_features, in_features // _BLOCK)
    if rows != out_features:
        codes = jnp.pad(codes, ((0, rows - out_features), (0, 0)))
        absmax = jnp.pad(absmax, ((0, rows - out_features), (0, 0)))
    return codes, absmax


def _run(kernel, grid, in_specs, out_tile, out_size, dtype, bs: BlockSizes, interpret: bool, name: str, *operands):
    """pallas_call of `kernel` on grid (rows, cols, split): program (i, j, s) writes out tile (i, j) [out_tile] of
    the [out_size] output in `dtype`; with split > 1 each share of the contraction writes float32 partial sums,
    added here (in float32, then cast)."""
    split = grid[2]
    if split == 1:
        out_spec = pl.BlockSpec(out_tile, lambda i, j, s: (i, j))
        out_shape = jax.ShapeDtypeStruct(out_size, dtype)
    else:
        out_spec = pl.BlockSpec((None, *out_tile), lambda i, j, s: (s, i, j))
        out_shape = jax.ShapeDtypeStruct((split, *out_size), _F32)
    y = pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
                       interpret=interpret,
                       compiler_params=_compat.compiler_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
                       name=name)(*operands)
    return y if split == 1 else y.sum(axis=0).astype(dtype)


def _full(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def nf4_matmul_t(x: jax.Array, w: NF4Array, *, block_sizes: BlockSizes | None = None,
                 interpret: bool | None = None, rounding: str = "dequantize_4bit") -> jax.Array:
    """x [M, in] @ dequantize(w, rounding).T -> [M, out] in x.dtype, reading only the NF4 codes (in % 64 == 0)."""
    (m, k), (n, _) = x.shape, w.shape
    interpret = _compat.default_interpret() if interpret is None else interpret
    in_dtype = _products_in_dtype(rounding, x.dtype)
    decode = _decode_that_runs(block_sizes, interpret, in_dtype, x.dtype)
    tiles_for = "gemv_4bit" if in_dtype else "dequantize_4bit"  # float32: the float32 tables, their tiles
    bs = dataclasses.replace(block_sizes or BlockSizes.for_forward(m, n, k, decode, tiles_for), decode=decode)
    nkb = k // _BLOCK
    bps = next(d for d in (bs.blocks_per_step, 2, 1) if nkb % d == 0)
    mp, np_ = _round_up(m, bs.block_m), _round_up(n, bs.block_n)
    grid_m, grid_n = mp // bs.block_m, np_ // bs.block_n
    split = _split(nkb // bps, grid_m * grid_n, bs.split_k, bs.decode)
    codes, absmax = _operands(w, np_)
    x_p = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    kernel = functools.partial(_xwt_kernel, bps=bps, steps=nkb // bps // split, decode=bs.decode, in_dtype=in_dtype)
    in_specs = [pl.BlockSpec((bs.block_m, k), lambda i, j, s: (i, 0)),
                pl.BlockSpec((bs.block_n, k // 2), lambda i, j, s: (j, 0)),
                pl.BlockSpec((bs.block_n, nkb), lambda i, j, s: (j, 0)), _full((16,))]
    y = _run(kernel, (grid_m, grid_n, split), in_specs, (bs.block_m, bs.block_n), (mp, np_), x.dtype, bs, interpret,
             "nf4_matmul_t", x_p, codes, absmax, _code_table())
    return y[:m, :n]


def nf4_matmul(g: jax.Array, w: NF4Array, *, block_sizes: BlockSizes | None = None,
               interpret: bool | None = None, rounding: str = "dequantize_4bit") -> jax.Array:
    """g [M, out] @ dequantize(w, rounding) -> [M, in] in g.dtype (the input gradient), reading only the codes."""
    (m, n), (_, k) = g.shape, w.shape
    interpret = _compat.default_interpret() if interpret is None else interpret
    in_dtype = _products_in_dtype(rounding, g.dtype)
    decode = _decode_that_runs(block_sizes, interpret, in_dtype, g.dtype)
    bs = dataclasses.replace(block_sizes or BlockSizes.for_backward(m, n, k, decode), decode=decode)
    nkb = k // _BLOCK
    bps = next(d for d in (bs.blocks_per_step, 2, 1) if nkb % d == 0)
    mp, np_ = _round_up(m, bs.block_m), _round_up(n, bs.block_k)
    grid_m, grid_n = mp // bs.block_m, nkb // bps
    split = _split(np_ // bs.block_k, grid_m * grid_n, bs.split_k, bs.decode)
    codes, absmax = _operands(w, np_)
    g_p = jnp.pad(g, ((0, mp - m), (0, np_ - n))) if (mp, np_) != (m, n) else g
    kernel = functools.partial(_xw_kernel, steps=np_ // bs.block_k // split, block_k=bs.block_k, decode=bs.decode,
                               in_dtype=in_dtype)
    width = _BLOCK * bps
    in_specs = [pl.BlockSpec((bs.block_m, np_), lambda i, j, s: (i, 0)),
                pl.BlockSpec((np_, width // 2), lambda i, j, s: (0, j)),
                pl.BlockSpec((np_, bps), lambda i, j, s: (0, j)), _full((16,))]
    dx = _run(kernel, (grid_m, grid_n, split), in_specs, (bs.block_m, width), (mp, k), g.dtype, bs, interpret,
              "nf4_matmul", g_p, codes, absmax, _code_table())
    return dx[:m]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config:
    implementation: str  # "xla" | "pallas" | "reduce"
    forward_blocks: BlockSizes | None  # None: BlockSizes.for_forward
    backward_blocks: BlockSizes | None  # None: BlockSizes.for_backward
    interpret: bool | None
    rounding: str  # fastlora_jax.nf4.LAYER_ROUNDINGS

    def of_call(self, x, w, differentiated: bool) -> _Config:
        """This config with the rounding one call computes with (fastlora_jax.nf4.rounding_of_call); x [M, in]."""
        from fastlora_jax.nf4 import rounding_of_call

        rounding = rounding_of_call(self.rounding, x.shape[0], w.shape[1], differentiated)
        return self if rounding == self.rounding else dataclasses.replace(self, rounding=rounding)


def _weight(w, dtype, rounding: str) -> jax.Array:
    """W [out, in] in dtype: dequantized here (alive only inside this pass), or w itself where the caller passed the
    weight already dequantized (nf4_linear's `dequantized`)."""
    if isinstance(w, jax.Array):
        return w
    from fastlora_jax.nf4 import dequantize_nf4

    return dequantize_nf4(w, dtype, rounding)


def _matmul_t(x, w, cfg: _Config):  # x [M, in] @ W.T -> [M, out]
    if cfg.implementation == "pallas":
        return nf4_matmul_t(x, w, block_sizes=cfg.forward_blocks, interpret=cfg.interpret, rounding=cfg.rounding)
    weight = _weight(w, x.dtype, cfg.rounding)  # [out, in]
    if cfg.implementation == "reduce":  # [M, 1, in] * [out, in] summed over in: XLA fuses the decoding into the sum
        return jnp.sum(x.astype(_F32)[:, None, :] * weight.astype(_F32), axis=-1).astype(x.dtype)
    return jax.lax.dot_general(x, weight, (((1,), (1,)), ((), ()))).astype(x.dtype)


def _matmul(g, w, cfg: _Config):  # g [M, out] @ W -> [M, in] ("reduce" too: only its forward was measured faster)
    if cfg.implementation == "pallas":
        return nf4_matmul(g, w, block_sizes=cfg.backward_blocks, interpret=cfg.interpret, rounding=cfg.rounding)
    return jnp.dot(g, _weight(w, g.dtype, cfg.rounding)).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nf4_base(x, w, bias, cfg: _Config):  # JAX runs this body only where nothing differentiates the call
    return _nf4_product(x, w, bias, cfg.of_call(x, w, differentiated=False))


def _nf4_product(x, w, bias, cfg: _Config):
    y = _matmul_t(x, w, cfg)  # [M, out]
    if bias is not None:
        y = (y.astype(_F32) + bias.astype(_F32)).astype(x.dtype)
    return y


def _nf4_fwd(x, w, bias, cfg: _Config):
    # no 16-bit weight and no activation kept: the backward dequantizes again
    return _nf4_product(x, w, bias, cfg.of_call(x, w, differentiated=True)), (w, bias)


def _nf4_bwd(cfg: _Config, residuals, g):
    w, bias = residuals
    dx = _matmul(g, w, cfg.of_call(g, w, differentiated=True))
    dbias = None if bias is None else jnp.sum(g.astype(_F32), axis=0).astype(bias.dtype)
    return dx, None, dbias


_nf4_base.defvjp(_nf4_fwd, _nf4_bwd)


def check_nf4_shapes(x, w, bias, a, b, scaling=0.0) -> None:
    """Raises ValueError naming the shapes unless x [..., in], w one NF4 [out, in], bias [out], a [in, r], b [r, out],
    scaling a real scalar."""
    if not all(hasattr(w, field) for field in ("packed", "stack", "shape")):
        raise ValueError(f"nf4_linear: w must be an NF4Array (fastlora_jax.nf4.quantize_nf4); got a "
                         f"{type(w).__name__} of shape {getattr(w, 'shape', None)} (16-bit weights: lora_linear / "
                         "linear)")
    check_arrays_and_scaling("nf4_linear", (("x", x), ("bias", bias), ("a", a), ("b", b)), scaling)
    out_features, in_features = w.shape
    described = (f"{x.shape=} w.shape={w.shape} w.stack={w.stack} bias.shape={None if bias is None else bias.shape} "
                 f"a.shape={None if a is None else a.shape} b.shape={None if b is None else b.shape} "
                 f"scaling.shape={jnp.shape(scaling)}")
    for name, arr in (("x", x), ("bias", bias), ("a", a), ("b", b)):
        if arr is not None and not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"nf4_linear: {name} must be floating point; got {name}.dtype={arr.dtype} ({described})")
    ok = (w.stack == () and x.ndim >= 1 and x.shape[-1] == in_features and jnp.ndim(scaling) == 0
          and (bias is None or bias.shape == (out_features,)) and (a is None) == (b is None)
          and (a is None or (a.ndim == 2 and b.ndim == 2 and a.shape[0] == in_features and b.shape[1] == out_features
                             and a.shape[1] == b.shape[0])))
    if not ok:
        raise ValueError(f"nf4_linear: expected x [..., in], one NF4 weight [out, in] (no stack axes), bias [out], "
                         f"a [in, r] and b [r, out] (both or neither), scalar scaling; got {described}")


def nf4_linear(x: jax.Array, w: NF4Array, bias: jax.Array | None = None, a: jax.Array | None = None,
               b: jax.Array | None = None, scaling: float | jax.Array = 0.0, *, implementation: str = "xla",
               block_sizes: BlockSizes | tuple[BlockSizes, BlockSizes] | None = None,
               interpret: bool | None = None, rounding: str = "dequantize_4bit",
               dequantized: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ dequantize(w, rounding).T + bias (+ scaling * (x @ a) @ b) -> [..., out] in x.dtype.

    `block_sizes` ("pallas"): one BlockSizes for both kernels, a (forward, backward) pair, or None for each
    kernel's default. `rounding` (fastlora_jax.nf4.LAYER_ROUNDINGS: "bitsandbytes" picks per call) gives the same
    weights on every implementation.
    "pallas" needs in % 64 == 0 (every 64-block of codes inside one row). "reduce" is XLA with the forward product
    as a multiply-and-sum instead of a matmul (what "auto" runs for one token on a GPU where `api` lists it). The
    LoRA branch, when given, is the reference formulation (plain XLA, differentiated by JAX) in x.dtype, added to
    the NF4 product; "mosaic" (LoRA factors required; Hopper, token count and features that divide its tiles)
    instead dequantizes w with XLA in each pass and adds the rank-r term inside kernels/lora_mosaic.py's GEMM.
    `dequantized` ("xla" and "mosaic" only): w already dequantized to x.dtype [out, in] with this call's rounding
    (`weight_for_calls`), used instead of dequantizing w in each pass: for a caller that runs many calls on one
    weight, such as the MLP's token chunks.
    """
    from fastlora_jax.nf4 import LAYER_ROUNDINGS, check_rounding

    check_nf4_shapes(x, w, bias, a, b, scaling)
    check_rounding(rounding, LAYER_ROUNDINGS)
    if implementation not in ("xla", "pallas", "reduce", "mosaic"):
        raise ValueError(f"implementation={implementation!r}; accepted here: 'xla', 'pallas', 'reduce', 'mosaic'")
    if implementation == "mosaic" and a is None:
        raise ValueError(f"nf4_linear(implementation='mosaic') needs the LoRA factors a and b (the rank-r term is "
                         f"what its GEMM adds); got a=None for w.shape={w.shape}")
    out_features, in_features = w.shape
    if implementation == "pallas" and in_features % _BLOCK:
        raise ValueError(f"nf4_linear(implementation='pallas') needs in_features % 64 == 0; got w.shape={w.shape}")
    if dequantized is not None:
        if implementation not in ("xla", "mosaic"):
            raise ValueError(f"nf4_linear(implementation={implementation!r}) reads the NF4 codes itself; "
                             f"`dequantized` is accepted with 'xla' and 'mosaic' only")
        if dequantized.shape != w.shape or dequantized.dtype != x.dtype:
            raise ValueError(f"nf4_linear: dequantized must be [out, in] in x.dtype; got {dequantized.shape} "
                             f"{dequantized.dtype} for w.shape={w.shape}, x.dtype={x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # [M, in]
    if x2.shape[0] == 0:
        implementation = "xla"
    weight = w if dequantized is None else dequantized  # an NF4Array, or [out, in] in x.dtype
    if implementation == "mosaic":  # NF4 + LoRA: kernels/lora.py's custom_vjp, the LoRA term in the GEMM's epilogue
        from fastlora_jax.nf4 import rounding_of_call

        # Its tiles take >= 128 tokens, where "bitsandbytes" dequantizes whether or not the call is differentiated.
        call_rounding = rounding_of_call(rounding, x2.shape[0], in_features, differentiated=True)
        y = nf4_lora_linear(x2, weight, a, b, scaling, bias, rounding=call_rounding)
        return y.reshape(*lead, out_features)
    forward_blocks, backward_blocks = block_sizes if isinstance(block_sizes, tuple) else (block_sizes,) * 2
    cfg = _Config(implementation=implementation, forward_blocks=forward_blocks, backward_blocks=backward_blocks,
                  interpret=interpret, rounding=rounding)
    y = _nf4_base(x2, weight, bias, cfg)  # [M, out]
    if a is not None:  # GEMM outputs in x.dtype as in kernels/lora.py's XLA path (no [M, out] float32 pass)
        dt = x.dtype
        xa = checkpoint_name(jnp.dot(x2, a.astype(dt), preferred_element_type=dt), XA_NAME)  # [M, r]
        xa_s = (jnp.asarray(scaling, _F32) * xa.astype(_F32)).astype(dt)
        y = y + jnp.dot(xa_s, b.astype(dt), preferred_element_type=dt)  # [M, out]
    return y.reshape(*lead, out_features)

