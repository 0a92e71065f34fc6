"""NF4 decoding by byte permutes: PTX for the fused NF4 kernels' `decode="prmt"` (NVIDIA GPUs, compiled only).

One instance of the inline assembly takes four code bytes and their four float32 block absmax and returns the four
weights of the high (or the low) nibbles: NF4_CODE[code] * absmax in float32, which the kernel then rounds to its
dtype (bitsandbytes' order, so the select tree's weights by construction; the GPU tests compare the products within
tolerance). The table lookup is PRMT: byte j of the sixteen float32 NF4 values lies in four registers (four entries
each), so two PRMTs pick byte j for four codes at once (entries 0-7 and 8-15, by the code's low three bits), a LOP3
keeps the right one by the code's bit 3, and eight PRMTs transpose the four byte planes back into four float32
values: about 8 instructions per weight against ~20 for the select tree. `decode_emulated` replays the same byte
operations in numpy, so the scheme is checked on any machine; the PTX itself runs only in a compiled kernel.

`decode_bf16` (the same decode with `rounding="gemv_4bit"` and bfloat16 inputs) rounds as bitsandbytes' own 4-bit
inference kernel (gemm_4bit_inference_naive) does: bf16(NF4_CODE[code]) * bf16(absmax), rounded to bf16. Its
table has two byte planes (bf16 values), no transposes and one bf16x2 FMA per two weights: 18 instructions per four
weights against 32 (counted; with an earlier 20- against 34-instruction selector the whole forward kernel issued 33%
fewer, ncu on an H100). Each weight can differ
from dequantize_4bit's by one bf16 rounding (the products by ~3e-3 relative on the Llama shapes).
`decode_bf16_emulated` replays it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_CONSTRAINTS = "=r,=r,=r,=r,r,r,r,r,r"  # four float32 out; the four code bytes (one register), four scales in
# decode_bf16: two bf16x2 out (four weights, element 0 in the low half); the four code bytes; two bf16x2 scales
_CONSTRAINTS_BF16 = "=r,=r,r,r,r"
_NEG_ZERO_BF16X2 = 0x80008000  # the FMA's addend: x * s + (-0) is x * s, signed zeros included
_BLEND = 0xD8  # LOP3 truth table of (a & ~c) | (b & c), with a = 0xF0, b = 0xCC, c = 0xAA
_TRANSPOSE = ((0, 1, 0x5140), (0, 1, 0x7362), (2, 3, 0x5140), (2, 3, 0x7362))  # byte planes -> pairs
_GATHER = ((0, 2, 0x5410), (0, 2, 0x7632), (1, 3, 0x5410), (1, 3, 0x7632))  # pairs -> the four float32 words
_BF16_PAIRS = (0x5140, 0x7362)  # low and high byte planes -> bf16x2 words of weights (0, 1) and (2, 3)
_SIGN_BYTES = 0xBA98  # PRMT selector: byte k of the result is 0xFF where byte k's sign bit is set, else 0


def _table_words(dtype=np.float32) -> list[list[int]]:
    """[byte j][quarter q]: byte j of NF4_CODE[4q + i] (as `dtype` bits: float32 or bfloat16) in byte i of one
    32-bit word."""
    from fastlora_jax.nf4 import NF4_CODE

    values = np.asarray(NF4_CODE, np.float32).astype(dtype)
    bits = values.view(np.uint32 if values.itemsize == 4 else np.uint16).astype(np.uint32)
    return [[sum(((int(bits[4 * q + i]) >> (8 * j)) & 0xFF) << (8 * i) for i in range(4)) for q in range(4)]
            for j in range(values.itemsize)]


def _header_lines(registers: tuple[str, ...], table: list[list[int]], constants: tuple[str, ...]) -> list[str]:
    """PTX opening the block: declares the b32 `registers` (one line each) and the table's byte-plane words
    t{j}{q}, sets the `constants` ("name value"), then the table words."""
    planes = range(len(table))
    return (["{", *(f".reg .b32 {r};" for r in registers),
             ".reg .b32 " + ", ".join(f"t{j}{q}" for j in planes for q in range(4)) + ";"]
            + [f"mov.b32 {c.replace(' ', ', ')};" for c in constants]
            + [f"mov.b32 t{j}{q}, {table[j][q]:#010x};" for j in planes for q in range(4)])


def _lookup_lines(planes: int) -> list[str]:
    """PTX looking up byte plane j < `planes` of the four selected codes into l{j}, after `_select_lines`: two
    PRMTs by the code's low three bits, a LOP3 by its bit 3."""
    return [line for j in range(planes) for line in (f"prmt.b32 lo, t{j}0, t{j}1, s7;",
                                                     f"prmt.b32 hi, t{j}2, t{j}3, s7;",
                                                     f"lop3.b32 l{j}, lo, hi, m, {_BLEND:#04x};")]


def _select_lines(shift: int, codes: str) -> list[str]:
    """PTX leaving in s7 the PRMT selector of the four codes at bit `shift` of the code bytes in `codes` (nibble k:
    byte k's code & 7) and in m a byte mask, byte k 0xFF where that code is >= 8."""
    # sel: nibble k = the code in byte k ([z | z >> 4] has codes 0, 1 in byte 0 and 2, 3 in byte 2)
    return [f"shr.u32 x, {codes}, {shift};", "and.b32 z, x, 0x0F0F0F0F;", "shr.u32 y, z, 4;", "or.b32 y, y, z;",
            "prmt.b32 sel, y, y, 0x0020;", "and.b32 s7, sel, 0x7777;",
            # m: each code's bit 3 moved to its byte's sign bit, then PRMT's sign-replicating selectors (8 + k)
            "shl.b32 y, z, 4;", f"prmt.b32 m, y, y, {_SIGN_BYTES:#06x};"]


@functools.cache
def _assembly(shift: int) -> str:
    """PTX with outputs $0-$3, the four float32 weights of the codes at bit `shift` of four code bytes (4: the high
    nibbles, 0: the low ones), and inputs $4 (the four code bytes) and $5-$8 (their float32 scales)."""
    lines = _header_lines(("x, y, z, sel, s7, m, lo, hi", "l<4>, p<4>, v<4>"), _table_words(), ())
    lines += _select_lines(shift, "$4") + _lookup_lines(4)
    lines += [f"prmt.b32 p{i}, l{a}, l{b}, {s:#06x};" for i, (a, b, s) in enumerate(_TRANSPOSE)]
    lines += [f"prmt.b32 v{i}, p{a}, p{b}, {s:#06x};" for i, (a, b, s) in enumerate(_GATHER)]
    lines += [f"mul.rn.f32 ${k}, v{k}, ${5 + k};" for k in range(4)]
    lines.append("}")
    return "\n".join(lines)


@functools.cache
def _assembly_bf16(shift: int) -> str:
    """PTX with outputs $0 = (w0, w1) and $1 = (w2, w3), bf16x2, the weights of the codes at bit `shift` of four
    code bytes ($2), each bf16(NF4 value) * its bf16 scale ($3 = (s0, s1), $4 = (s2, s3)) rounded to bf16."""
    # two byte planes: the low and the high byte of each bf16 value
    lines = _header_lines(("x, y, z, sel, s7, m, lo, hi, nz, l0, l1, v0, v1",),
                          _table_words(ml_dtypes.bfloat16), (f"nz {_NEG_ZERO_BF16X2:#010x}",))
    lines += _select_lines(shift, "$2") + _lookup_lines(2)
    # (low byte, high byte) of weights 0, 1 and of weights 2, 3: two bf16x2 words, then times the scales
    lines += [f"prmt.b32 v0, l0, l1, {_BF16_PAIRS[0]:#06x};", f"prmt.b32 v1, l0, l1, {_BF16_PAIRS[1]:#06x};",
              "fma.rn.bf16x2 $0, v0, $3, nz;", "fma.rn.bf16x2 $1, v1, $4, nz;", "}"]
    return "\n".join(lines)


def decode(codes: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inside a compiled Pallas-Triton kernel: codes [R, C] uint8, scale [R, C] float32 (each byte's block absmax)
    -> (high-nibble weights, low-nibble weights), each [R, C] float32.

    The outputs are float32 (the caller rounds): with bfloat16 outputs packed two to a register, the compiled
    kernel gave wrong products on an H200 (JAX 0.11.2; relative error ~1), float32 ones were right. One output per
    call: JAX 0.11.2's lowering of `elementwise_inline_asm` returns only the first of several results.
    """
    from jax.experimental.pallas import triton as pltriton

    shape = jax.ShapeDtypeStruct(codes.shape, jnp.float32)
    return tuple(pltriton.elementwise_inline_asm(_assembly(shift), args=[codes, scale], constraints=_CONSTRAINTS,
                                                 pack=4, result_shape_dtypes=[shape])[0] for shift in (4, 0))


def decode_bf16(codes: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inside a compiled Pallas-Triton kernel: codes [R, C] uint8, scale [R, C] float32 -> (high-nibble weights,
    low-nibble weights), each [R, C] bfloat16, rounded as bitsandbytes' 4-bit inference kernel rounds them.

    The assembly's bf16 values travel as int16 bits: with bfloat16-typed results the compiled kernel gave wrong
    products (relative error ~1 on an H100, JAX 0.11.2), int16 ones bitcast to bfloat16 were right.
    """
    from jax.experimental.pallas import triton as pltriton

    scale_bits = jax.lax.bitcast_convert_type(scale.astype(jnp.bfloat16), jnp.int16)
    shape = jax.ShapeDtypeStruct(codes.shape, jnp.int16)
    return tuple(jax.lax.bitcast_convert_type(
        pltriton.elementwise_inline_asm(_assembly_bf16(shift), args=[codes, scale_bits],
                                        constraints=_CONSTRAINTS_BF16, pack=4, result_shape_dtypes=[shape])[0],
        jnp.bfloat16) for shift in (4, 0))


def _prmt(a: int, b: int, c: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        s = (c >> (4 * k)) & 0xF
        byte = src[s & 7] if not s & 8 else (0xFF if src[s & 7] & 0x80 else 0)  # bit 3: replicate the sign bit
        out |= byte << (8 * k)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i for i in range(32))


def decode_emulated(four_bytes) -> tuple[np.ndarray, np.ndarray]:
    """The PTX's byte operations replayed in Python for four code bytes -> (NF4 values of the high nibbles, of the
    low nibbles), float32 [4] each, before the scale."""
    code = sum(int(v) << (8 * i) for i, v in enumerate(four_bytes))
    values = []
    for shift in (4, 0):
        planes = _planes_emulated(_table_words(), code, shift)
        pairs = [_prmt(planes[a], planes[b], s) for a, b, s in _TRANSPOSE]
        words = [_prmt(pairs[a], pairs[b], s) for a, b, s in _GATHER]
        values.append(np.asarray(words, np.uint32).view(np.float32))
    return values[0], values[1]


def _planes_emulated(table: list[list[int]], code: int, shift: int) -> list[int]:
    """`_select_lines` then `_lookup_lines` replayed: byte plane j of the four codes at bit `shift` of `code`."""
    z = (code >> shift) & 0x0F0F0F0F
    sel = _prmt(z | (z >> 4), z | (z >> 4), 0x0020)
    s7 = sel & 0x7777
    m = _prmt((z << 4) & 0xFFFFFFFF, (z << 4) & 0xFFFFFFFF, _SIGN_BYTES)
    return [_lop3(_prmt(t[0], t[1], s7), _prmt(t[2], t[3], s7), m, _BLEND) for t in table]


def decode_bf16_emulated(four_bytes, four_scales) -> tuple[np.ndarray, np.ndarray]:
    """decode_bf16's byte operations replayed in Python for four code bytes and their four scales -> (weights of
    the high nibbles, of the low nibbles), bfloat16 [4] each (the bf16x2 FMA: the exact product, rounded)."""
    code = sum(int(v) << (8 * i) for i, v in enumerate(four_bytes))
    scales = np.asarray(four_scales, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    weights = []
    for shift in (4, 0):
        planes = _planes_emulated(_table_words(ml_dtypes.bfloat16), code, shift)
        words = [_prmt(planes[0], planes[1], s) for s in _BF16_PAIRS]
        halves = np.asarray([w >> (16 * h) & 0xFFFF for w in words for h in range(2)], np.uint16)
        values = halves.view(ml_dtypes.bfloat16).astype(np.float32)
        weights.append((values * scales).astype(ml_dtypes.bfloat16))  # bf16 x bf16 is exact in float32
    return weights[0], weights[1]
