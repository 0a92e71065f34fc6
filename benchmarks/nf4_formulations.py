"""XLA formulations of the NF4 forward (x @ W.T) and input gradient (g @ W) that decode the codes without a gather,
so that XLA may fuse the decoding into the GEMM's operand load (a Triton GEMM fusion) instead of writing a 16-bit
copy of the weight: candidates for few tokens, timed by benchmarks/kernels.py as the paths "nf4_split",
"nf4_concat" and "nf4_select" against "nf4_xla" (fastlora_jax.nf4.dequantize_nf4: one gather per byte).

Every formulation decodes each code to exactly `dequantize_nf4`'s value (NF4_CODE[code] * absmax in float32, then
rounded); they differ in how the two codes of a byte meet the activations:
  select:  decode both nibbles, interleave them into W [out, in], one matmul per product;
  split:   keep the nibbles apart, W_hi = W[:, 0::2] and W_lo = W[:, 1::2]: x @ W.T = x[:, 0::2] @ W_hi.T +
           x[:, 1::2] @ W_lo.T, and g @ W interleaves g @ W_hi with g @ W_lo (two matmuls per product, no interleave
           of the weight);
  concat:  the split halves side by side, [W_hi | W_lo], against [x[:, 0::2] | x[:, 1::2]] (one matmul).
Needs in % 64 == 0 (every 64-value absmax block inside one row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.nf4 import BLOCKSIZE, NF4_CODE, NF4Array, dequantize_absmax

FORMULATIONS = ("split", "concat", "select")


def decode_codes(codes: jax.Array) -> jax.Array:
    """NF4_CODE[codes] in float32 for 4-bit codes (any integer dtype), by a tree of 15 selects on the code's bits."""
    level = [jnp.float32(v) for v in NF4_CODE]
    for bit in range(4):
        is_set = (codes >> bit) & 1 == 1
        level = [jnp.where(is_set, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
    return level[0]


def weight_halves(w: NF4Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(W[:, 0::2], W[:, 1::2]) in dtype, each [out, in / 2], from the high and low nibbles of the packed bytes."""
    n, k = w.shape
    if k % BLOCKSIZE:
        raise ValueError(f"weight_halves needs in % {BLOCKSIZE} == 0; got {w.shape=}")
    packed = w.packed.reshape(n, k // 2)  # byte j of row r holds codes (r, 2j) high and (r, 2j + 1) low
    absmax = dequantize_absmax(w).reshape(n, k // BLOCKSIZE, 1)  # one per 64 codes = per 32 bytes of a row

    def half(codes):  # [n, k / 2] uint8 -> [n, k / 2] dtype
        values = decode_codes(codes).reshape(n, k // BLOCKSIZE, BLOCKSIZE // 2)
        return (values * absmax).reshape(n, k // 2).astype(dtype)

    return half(packed >> 4), half(packed & 15)


def _interleave(even: jax.Array, odd: jax.Array) -> jax.Array:
    """[..., c] and [..., c] -> [..., 2c] with even[..., j] at 2j and odd[..., j] at 2j + 1."""
    return jnp.stack([even, odd], axis=-1).reshape(*even.shape[:-1], 2 * even.shape[-1])


def forward(x: jax.Array, w: NF4Array, formulation: str) -> jax.Array:
    """x [M, in] @ dequantize(w).T -> [M, out] in x.dtype."""
    hi, lo = weight_halves(w, x.dtype)
    dims = (((1,), (1,)), ((), ()))
    if formulation == "select":
        return jax.lax.dot_general(x, _interleave(hi, lo), dims)
    x_even, x_odd = x[:, 0::2], x[:, 1::2]
    if formulation == "split":
        return jax.lax.dot_general(x_even, hi, dims) + jax.lax.dot_general(x_odd, lo, dims)
    if formulation == "concat":
        return jax.lax.dot_general(jnp.concatenate([x_even, x_odd], 1), jnp.concatenate([hi, lo], 1), dims)
    raise ValueError(f"formulation={formulation!r}; accepted: {', '.join(FORMULATIONS)}")


def input_gradient(g: jax.Array, w: NF4Array, formulation: str) -> jax.Array:
    """g [M, out] @ dequantize(w) -> [M, in] in g.dtype."""
    hi, lo = weight_halves(w, g.dtype)
    if formulation == "select":
        return g @ _interleave(hi, lo)
    if formulation == "split":
        return _interleave(g @ hi, g @ lo)
    if formulation == "concat":
        both = g @ jnp.concatenate([hi, lo], 1)  # [M, in]: the even columns, then the odd ones
        half = both.shape[1] // 2
        return _interleave(both[:, :half], both[:, half:])
    raise ValueError(f"formulation={formulation!r}; accepted: {', '.join(FORMULATIONS)}")
