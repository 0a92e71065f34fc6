"""NF4 decoding by byte permutes: PTX for the fused NF4 kernels' `decode="prmt"` (NVIDIA GPUs, compiled only).

One instance of the inline assembly takes four code bytes and their four float32 block absmax and returns the four
weights of the high (or the low) nibbles: NF4_CODE[code] * absmax in float32, which the kernel then rounds to its
dtype (bitsandbytes' order, so the select tree's weights by construction; the GPU tests compare the products within
tolerance). The table lookup is PRMT: byte j of the sixteen float32 NF4 values lies in four registers (four entries
each), so two PRMTs pick byte j for four codes at once (entries 0-7 and 8-15, by the code's low three bits), a LOP3
keeps the right one by the code's bit 3, and eight PRMTs transpose the four byte planes back into four float32
values: about 8 instructions per weight against ~20 for the select tree. `decode_emulated` replays the same byte
operations in numpy, so the scheme is checked on any machine; the PTX itself runs only in a compiled kernel. That
path now serves float32 inputs only: for bfloat16 and float16 inputs `decode_rounded` computes the same products and
rounds them in the PTX, one instance per four code bytes with the selector work shared as in `decode_bf16` below,
each byte's two weights one 16-bit pair (57 instructions per eight weights, conversions included, against 64 plus
the conversions after; the whole forward kernel issued 7% fewer and took 10% less time on an H100 at 16 tokens;
`decode_rounded_emulated` replays it).

`decode_bf16` (the same decode with `rounding="gemv_4bit"` and bfloat16 inputs) rounds as bitsandbytes' own 4-bit
inference kernel (gemm_4bit_inference_naive) does: bf16(NF4_CODE[code]) * bf16(absmax), rounded to bf16. Its
table has two byte planes (bf16 values) and no transposes, and one instance takes four code bytes to their eight
weights: two code bytes are themselves the PRMT selectors of their four codes, so the selector work is shared by the
two nibbles, and each byte's two weights come out side by side as one bf16x2 word, already in column order (no
interleave after): 25 instructions per eight weights against 36 with one instance per nibble; on an H100 the
whole forward kernel issued 14% fewer and ran 12-17% faster at 1 and 16 tokens on the 14336-wide shapes
(benchmarks/RESULTS.md, "## Kernels", session 12). Each weight can differ from dequantize_4bit's by one bf16
rounding (the products by ~3e-3 relative on the Llama shapes). `decode_bf16_emulated` replays it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_CONSTRAINTS = "=r,=r,=r,=r,r,r,r,r,r"  # four float32 out; the four code bytes (one register), four scales in
# decode_bf16: four bf16x2 out (each byte's two weights, the high nibble's in the low half); the four code bytes;
# two bf16x2 scales
_CONSTRAINTS_BF16 = "=r,=r,=r,=r,r,r,r"
# decode_rounded: four 16-bit pairs out (each byte's two weights); the four code bytes; their four float32 scales
_CONSTRAINTS_ROUNDED = "=r,=r,=r,=r,r,r,r,r,r"
_CVT = {jnp.dtype(jnp.bfloat16): "cvt.rn.bf16x2.f32", jnp.dtype(jnp.float16): "cvt.rn.f16x2.f32"}
_NEG_ZERO_BF16X2 = 0x80008000  # the FMA's addend: x * s + (-0) is x * s, signed zeros included
_BLEND = 0xD8  # LOP3 truth table of (a & ~c) | (b & c), with a = 0xF0, b = 0xCC, c = 0xAA
_TRANSPOSE = ((0, 1, 0x5140), (0, 1, 0x7362), (2, 3, 0x5140), (2, 3, 0x7362))  # byte planes -> pairs
_GATHER = ((0, 2, 0x5410), (0, 2, 0x7632), (1, 3, 0x5410), (1, 3, 0x7632))  # pairs -> the four float32 words
# The pair decodes (decode_bf16, decode_rounded) look up the codes of bytes 0, 1 and of bytes 2, 3 with the bytes
# themselves as selectors (nibbles l0, h0, l1, h1): their >= 8 masks from the codes << 4 (the l's bit 3 in a sign
# bit) and the codes (the h's) ...
_PAIR_SIGNS = (0xD9C8, 0xFBEA)
# ... and the two byte planes of (T[l0], T[h0], T[l1], T[h1]) -> bf16x2 words (T[h0], T[l0]) and (T[h1], T[l1])
_PAIR_WORDS = (0x4051, 0x6273)
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


def _lookup_lines(planes: int, sel: str = "s7", mask: str = "m", out: str = "l") -> list[str]:
    """PTX looking up byte plane j < `planes` of the four codes whose low three bits are the nibbles of `sel` (bits
    0-15) into {out}{j}: two PRMTs by those bits, a LOP3 by the codes' bit 3 (`mask`: byte k 0xFF where code k >= 8)."""
    return [line for j in range(planes) for line in (f"prmt.b32 lo, t{j}0, t{j}1, {sel};",
                                                     f"prmt.b32 hi, t{j}2, t{j}3, {sel};",
                                                     f"lop3.b32 {out}{j}, lo, hi, {mask}, {_BLEND:#04x};")]


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


def _pair_select_lines() -> list[str]:
    """PTX leaving in s7 (bytes 0, 1) and s7b (bytes 2, 3) the four codes of two code bytes as PRMT selectors
    (nibbles l0, h0, l1, h1, each & 7) and in ma, mb their >= 8 byte masks."""
    return ["and.b32 s7, $4, 0x77777777;", "shr.u32 s7b, s7, 16;", "shl.b32 y, $4, 4;",
            f"prmt.b32 ma, y, $4, {_PAIR_SIGNS[0]:#06x};", f"prmt.b32 mb, y, $4, {_PAIR_SIGNS[1]:#06x};"]


@functools.cache
def _assembly_rounded(cvt: str) -> str:
    """PTX with outputs $0-$3, one word per code byte: its two weights NF4_CODE[code] * scale in float32, rounded
    by `cvt` (to bf16x2 or f16x2), the high nibble's in the low half; inputs $4 (four code bytes) and $5-$8 (their
    float32 scales)."""
    lines = _header_lines(("y, s7, s7b, ma, mb, lo, hi, a<4>, b<4>, p<4>, v<4>, f<4>",), _table_words(), ())
    lines += _pair_select_lines() + _lookup_lines(4, "s7", "ma", "a") + _lookup_lines(4, "s7b", "mb", "b")
    for half, planes in enumerate("ab"):  # bytes 0, 1 then 2, 3; v0-v3: T[l0], T[h0], T[l1], T[h1]
        lines += [f"prmt.b32 p{i}, {planes}{a}, {planes}{b}, {s:#06x};" for i, (a, b, s) in enumerate(_TRANSPOSE)]
        lines += [f"prmt.b32 v{i}, p{a}, p{b}, {s:#06x};" for i, (a, b, s) in enumerate(_GATHER)]
        for k in range(2):  # byte 2 half + k: (T[h] * s, T[l] * s), the high nibble's rounded into the low half
            scale = f"${5 + 2 * half + k}"
            lines += [f"mul.rn.f32 f0, v{2 * k + 1}, {scale};", f"mul.rn.f32 f1, v{2 * k}, {scale};",
                      f"{cvt} ${2 * half + k}, f1, f0;"]
    lines.append("}")
    return "\n".join(lines)


@functools.cache
def _assembly_bf16() -> str:
    """PTX with outputs $0-$3, one bf16x2 word per code byte: (weight of the high nibble, weight of the low nibble),
    i.e. two neighbouring weights in column order, each bf16(NF4 value) * the byte's bf16 scale rounded to bf16;
    inputs $4 (four code bytes) and $5 = (s0, s1), $6 = (s2, s3) (their bf16 scales)."""
    lines = _header_lines(("y, s7, s7b, ma, mb, lo, hi, nz, a0, a1, b0, b1, v<4>, p<4>",),
                          _table_words(ml_dtypes.bfloat16), (f"nz {_NEG_ZERO_BF16X2:#010x}",))
    lines += [".reg .b16 h<4>;"]
    lines += _pair_select_lines() + _lookup_lines(2, "s7", "ma", "a") + _lookup_lines(2, "s7b", "mb", "b")
    # bytes (low, high) of T[h], then of T[l]: each code byte's two weights as one bf16x2 word
    lines += [f"prmt.b32 v{2 * i + k}, {ab}0, {ab}1, {_PAIR_WORDS[k]:#06x};" for i, ab in enumerate("ab")
              for k in range(2)]
    # each byte's scale in both halves, then the products rounded to bf16
    lines += ["mov.b32 {h0, h1}, $5;", "mov.b32 {h2, h3}, $6;"]
    lines += [f"mov.b32 p{k}, {{h{k}, h{k}}};" for k in range(4)]
    lines += [f"fma.rn.bf16x2 ${k}, v{k}, p{k}, nz;" for k in range(4)] + ["}"]
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


def _weights_of_pairs(pairs: jax.Array, dtype) -> jax.Array:
    """[R, C] int32 words of two 16-bit weights (the first in the low half) -> [R, 2C] `dtype`, in column order."""
    first = pairs.astype(jnp.int16)  # the low halves
    second = jax.lax.shift_right_logical(pairs, 16).astype(jnp.int16)
    r, c = pairs.shape
    weights = jnp.concatenate([first[..., None], second[..., None]], axis=-1).reshape(r, 2 * c)
    return jax.lax.bitcast_convert_type(weights, dtype)


def decode_rounded(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """Inside a compiled Pallas-Triton kernel: codes [R, C] uint8, scale [R, C] float32 -> the weights [R, 2C] in
    `dtype` (bfloat16 or float16), column order: NF4_CODE[code] * scale in float32, rounded to `dtype` (bitsandbytes'
    dequantize_4bit, as `decode` then a cast). One instance decodes four code bytes into four words, each byte's
    two weights side by side, sharing the selector work between the nibbles."""
    return _weights_of_pairs(decode_rounded_pairs(codes, scale, dtype), dtype)


def decode_rounded_pairs(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """`decode_rounded` before the split: [R, C] int32 words, each byte's two 16-bit weights (the high nibble's in
    the low half), as a kernel that stores weights writes them."""
    from jax.experimental.pallas import triton as pltriton

    shape = jax.ShapeDtypeStruct(codes.shape, jnp.int32)
    return pltriton.elementwise_inline_asm(_assembly_rounded(_CVT[jnp.dtype(dtype)]), args=[codes, scale],
                                           constraints=_CONSTRAINTS_ROUNDED, pack=4, result_shape_dtypes=[shape])[0]


def decode_bf16(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """Inside a compiled Pallas-Triton kernel: codes [R, C] uint8, scale [R, C] float32 -> the weights [R, 2C]
    bfloat16 in column order (each byte's high nibble first), rounded as bitsandbytes' 4-bit inference kernel
    rounds them.

    One instance of the assembly decodes four code bytes into four bf16x2 words, each byte's two weights side by
    side, sharing the selector work between the nibbles. The words travel as int32 and are split into int16 bits:
    bfloat16-typed results of the assembly gave wrong products (relative error ~1 on an H100, JAX 0.11.2).
    """
    return _weights_of_pairs(decode_bf16_pairs(codes, scale), jnp.bfloat16)


def decode_bf16_pairs(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """`decode_bf16` before the split: [R, C] int32 words, each byte's two bf16 weights (the high nibble's in the
    low half)."""
    from jax.experimental.pallas import triton as pltriton

    scale_bits = jax.lax.bitcast_convert_type(scale.astype(jnp.bfloat16), jnp.int16)
    shape = jax.ShapeDtypeStruct(codes.shape, jnp.int32)
    return pltriton.elementwise_inline_asm(_assembly_bf16(), args=[codes, scale_bits], constraints=_CONSTRAINTS_BF16,
                                           pack=4, result_shape_dtypes=[shape])[0]  # [R, C]


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


def _pair_planes_emulated(table: list[list[int]], code: int) -> list[list[int]]:
    """`_pair_select_lines` then `_lookup_lines` replayed: for bytes 0, 1 and then bytes 2, 3 of `code`, the byte
    planes of their four codes (l0, h0, l1, h1)."""
    s7, y = code & 0x77777777, (code << 4) & 0xFFFFFFFF
    return [[_lop3(_prmt(t[0], t[1], sel), _prmt(t[2], t[3], sel), _prmt(y, code, signs), _BLEND) for t in table]
            for sel, signs in ((s7, _PAIR_SIGNS[0]), (s7 >> 16, _PAIR_SIGNS[1]))]


def decode_bf16_emulated(four_bytes, four_scales) -> np.ndarray:
    """decode_bf16's byte operations replayed in Python for four code bytes and their four scales -> the eight
    weights in column order (byte 0's high nibble, its low nibble, byte 1's high nibble, ...), bfloat16 [8] (the
    bf16x2 FMA: the exact product, rounded)."""
    code = sum(int(v) << (8 * i) for i, v in enumerate(four_bytes))
    scales = np.asarray(four_scales, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    words = [_prmt(planes[0], planes[1], s) for planes in _pair_planes_emulated(_table_words(ml_dtypes.bfloat16), code)
             for s in _PAIR_WORDS]
    halves = np.asarray([w >> (16 * h) & 0xFFFF for w in words for h in range(2)], np.uint16)
    values = halves.view(ml_dtypes.bfloat16).astype(np.float32)
    return (values * np.repeat(scales, 2)).astype(ml_dtypes.bfloat16)  # bf16 x bf16 is exact in float32


def decode_rounded_emulated(four_bytes, four_scales, dtype) -> np.ndarray:
    """decode_rounded's byte operations replayed in Python for four code bytes and their four float32 scales ->
    the eight weights in column order, `dtype` [8] (the float32 product, rounded)."""
    code = sum(int(v) << (8 * i) for i, v in enumerate(four_bytes))
    values = []
    for planes in _pair_planes_emulated(_table_words(), code):
        pairs = [_prmt(planes[a], planes[b], s) for a, b, s in _TRANSPOSE]
        words = np.asarray([_prmt(pairs[a], pairs[b], s) for a, b, s in _GATHER], np.uint32).view(np.float32)
        values += [words[1], words[0], words[3], words[2]]  # (T[h0], T[l0], T[h1], T[l1])
    products = np.asarray(values, np.float32) * np.repeat(np.asarray(four_scales, np.float32), 2)
    return products.astype(dtype)
