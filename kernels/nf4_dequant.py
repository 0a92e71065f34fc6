"""An NF4 weight to its 16-bit weight in one Pallas pass (Triton; the PTX decode on NVIDIA GPUs), for QLoRA's GEMMs.

    w: NF4 [out, in] (in % 64 == 0)  ->  dequantize(w) [out, in] bfloat16 or float16, bit for bit dequantize_nf4's

QLoRA's large products (kernels/lora.py with an NF4 weight) dequantize the layer's weight and then run the GEMM, in
each pass. XLA's dequantization (`fastlora_jax.nf4.dequantize_nf4`: a gather from a [256, 2] table per code byte)
moved 2.5 bytes a weight at about 1.3 TB/s on an H200 (benchmarks/RESULTS.md, "## Kernels", session 4). Here each
program decodes a [rows, cols] tile of code bytes in registers (kernels/nf4_ptx.py's byte permutes; the select tree
where that PTX cannot run) and stores each byte's two weights as one 32-bit word, which XLA views as two 16-bit
values: nothing is gathered and nothing is interleaved. The double-dequantized block absmax comes from XLA (1/64 of
the weights, `fastlora_jax.nf4.dequantize_absmax`), as in the fused kernels.
Opt-in (`nf4_lora_linear(..., dequantize="pallas")`). It ran 14-25% faster than XLA's on the 8B's large weights
(1.8-2.0 TB/s) and the same on the small ones; the 8B QLoRA "unsloth" step ran +0.4% with it, within the spread
(H100, benchmarks/RESULTS.md, session 17).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fastlora_jax.kernels import _compat, nf4_ptx
from fastlora_jax.kernels.nf4 import _BLOCK, _decode_that_runs, _operands, _products_in_dtype, _select_code

if TYPE_CHECKING:
    from fastlora_jax.nf4 import NF4Array

_HALF = _BLOCK // 2  # code bytes per absmax block


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blocks:
    """Each program decodes [rows, cols] code bytes (cols a multiple of 32: whole absmax blocks; powers of two)."""

    rows: int = 16
    cols: int = 256
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Blocks({name}={value}); accepted: a power of two")
        if self.cols % _HALF:
            raise ValueError(f"Blocks(cols={self.cols}); accepted: a multiple of {_HALF} code bytes (an absmax block)")


def supports(shape: tuple[int, ...], blocks: Blocks | None = None) -> bool:
    """Whether an NF4 weight of `shape` [out, in] divides into the blocks (no padding: that would copy the weight)."""
    b = blocks or Blocks()
    return len(shape) == 2 and shape[1] % _BLOCK == 0 and shape[0] % b.rows == 0 and (shape[1] // 2) % b.cols == 0


def _kernel(codes_ref, absmax_ref, o_ref, *, dtype, decode: str, in_dtype: bool):
    # codes_ref [rows, cols] uint8 (two codes a byte, the first in the high nibble), absmax_ref [rows, cols / 32]
    # float32; o_ref [rows, cols] int32: each byte's two weights as 16-bit values, the first in the low half
    codes = codes_ref[...]
    r, c = codes.shape
    scale = jnp.broadcast_to(absmax_ref[...][:, :, None], (r, c // _HALF, _HALF)).reshape(r, c)  # [rows, cols]
    if decode == "prmt":
        o_ref[...] = (nf4_ptx.decode_bf16_pairs(codes, scale) if in_dtype
                      else nf4_ptx.decode_rounded_pairs(codes, scale, dtype))
        return
    ints = codes.astype(jnp.int32)
    first, second = _select_code(ints >> 4), _select_code(ints & 15)  # [rows, cols] float32 NF4 values
    if in_dtype:  # gemv_4bit: both rounded to dtype, multiplied in it
        first, second = first.astype(dtype) * scale.astype(dtype), second.astype(dtype) * scale.astype(dtype)
    else:  # dequantize_4bit: the float32 product, rounded once
        first, second = (first * scale).astype(dtype), (second * scale).astype(dtype)
    bits = lambda v: jax.lax.bitcast_convert_type(v, jnp.int16).astype(jnp.int32) & 0xFFFF
    o_ref[...] = bits(first) | (bits(second) << 16)


def dequantize(w: NF4Array, dtype, rounding: str = "dequantize_4bit", *, blocks: Blocks | None = None,
               interpret: bool | None = None) -> jax.Array:
    """dequantize_nf4(w, dtype, rounding) [out, in] for one 2-D NF4 weight, `dtype` bfloat16 or float16, in one
    Pallas pass over the codes. Raises ValueError naming the shape or dtype it cannot take (see `supports`)."""
    b = blocks or Blocks()
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"nf4_dequant.dequantize: dtype={dtype.name}; accepted: bfloat16, float16")
    if not supports(w.shape, b):
        raise ValueError(f"nf4_dequant.dequantize: w.shape={w.shape} does not divide into {b.rows} rows x "
                         f"{2 * b.cols} input features, or in % {_BLOCK} != 0 (check supports() first)")
    out_features, in_features = w.shape
    interpret = _compat.default_interpret() if interpret is None else interpret
    in_dtype = _products_in_dtype(rounding, dtype)
    decode = _decode_that_runs(None, interpret, in_dtype, dtype)  # "prmt" compiled on NVIDIA GPUs, else "select"
    codes, absmax = _operands(w, out_features)  # [out, in / 2] uint8, [out, in / 64] float32
    pairs = pl.pallas_call(
        functools.partial(_kernel, dtype=dtype, decode=decode, in_dtype=in_dtype),
        grid=(out_features // b.rows, in_features // 2 // b.cols),
        in_specs=[pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)),
                  pl.BlockSpec((b.rows, b.cols // _HALF), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((out_features, in_features // 2), jnp.int32),
        interpret=interpret,
        compiler_params=_compat.compiler_params(num_warps=b.num_warps, num_stages=b.num_stages),
        name="nf4_dequantize",
    )(codes, absmax)
    # Little-endian: bitcasting a word to two 16-bit values puts its low half first, the byte's first weight.
    return jax.lax.bitcast_convert_type(pairs, dtype).reshape(out_features, in_features)
