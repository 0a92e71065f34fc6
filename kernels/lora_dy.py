"""LoRA's two backward products of dy in one pass over it (Pallas, Triton on GPUs, interpreted elsewhere).

    gb = dy @ bt          dy [M, N], bt = b.T [N, r]          -> gb [M, r] float32
    db = xat @ dy         xat = (s * x @ a).T [r, M]          -> db [r, N] float32

XLA computes them as two skinny dots, and each reads all of dy: [tokens, out] bf16, 235 MB for an 8B MLP projection at
8192 tokens, against 0.5 MB of everything else. Here each program reads one [block_m, span] block of dy once,
`block_n` columns at a time, and multiplies every piece by both (`default_blocks`). What a program cannot finish alone
is written as float32 partial sums and added by XLA: gb over the N / span column spans, db over the M / block_m row
blocks, 4 r (M N / span + N M / block_m) bytes, a sixth of dy's bytes at [8192, 14336] and a third at [8192, 1024]
with the default blocks (written, then read by the sum). The same sums as XLA's dots in another order: equal to
float32 rounding.
Opt-in (`lora_linear(..., dy_pass="pallas")`). Alone it ran 27-32% faster than XLA's two dots on [8192, 14336], but
the 8B "unsloth" step ran 2.5-3.1% slower with it: a custom call's operands must be whole buffers, so dy's slices
are copied out, and the step lost more with XLA's command buffers on than off (likely each Triton call splits them;
not traced) (H100, benchmarks/RESULTS.md, session 17).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fastlora_jax.kernels import _compat
from fastlora_jax.kernels.lora import _pow2_at_least

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blocks:
    """Each program reads dy[block_m rows, span columns] in block_n-wide steps (powers of two)."""

    block_m: int = 256
    block_n: int = 64
    span: int = 1024
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "span"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Blocks({name}={value}); accepted: a power of two >= 16")
        if self.span % self.block_n:
            raise ValueError(f"Blocks(span={self.span}, block_n={self.block_n}); span must be a multiple of block_n")


# About two programs per multiprocessor of an H100 (132): a first guess, as the NF4 kernels' split rule started; the
# next GPU measurement decides (.bench/s16/dy_ab.py sweeps the blocks).
_TARGET_PROGRAMS = 256


def default_blocks(m: int, n: int) -> Blocks:
    """Blocks() with its column span halved (down to 128 columns) until dy [m, n] gives _TARGET_PROGRAMS programs:
    [8192, 14336] keeps 1024 (448 programs), [8192, 4096] takes 512, [8192, 1024] 128."""
    b = Blocks()
    while (m // b.block_m) * (n // b.span) < _TARGET_PROGRAMS and b.span > 128:
        b = dataclasses.replace(b, span=b.span // 2)
    return b


def supports(m: int, n: int, blocks: Blocks | None = None) -> bool:
    """Whether dy [m, n] divides into the blocks (`default_blocks` when None; no padding: padding would copy dy,
    the very pass this saves)."""
    b = blocks or default_blocks(m, n)
    return m % b.block_m == 0 and n % b.span == 0


def _kernel(g_ref, bt_ref, xat_ref, gb_ref, db_ref, *, block_n: int, steps: int):
    # g_ref [bm, span], bt_ref [span, R], xat_ref [R, bm]; gb_ref [bm, R] (this span's part of gb),
    # db_ref [R, span] (this row block's part of db)
    xat = xat_ref[...]  # [R, bm]

    def body(step, gb):  # gb [bm, R] float32
        cols = pl.ds(pl.multiple_of(step * block_n, block_n), block_n)
        piece = g_ref[:, cols]  # [bm, bn]: read once, used twice
        db_ref[:, cols] = jnp.dot(xat, piece, preferred_element_type=_F32)  # [R, bn]
        return gb + jnp.dot(piece, bt_ref[cols, :], preferred_element_type=_F32)

    gb_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(gb_ref.shape, _F32))


def dy_products(g: jax.Array, bt: jax.Array, xat: jax.Array, *, blocks: Blocks | None = None,
                interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(g @ bt [M, r], xat @ g [r, N]), both float32, reading g [M, N] once; bt [N, r] and xat [r, M] are cast to
    g.dtype. `blocks` defaults to `default_blocks(M, N)`. Raises ValueError naming the shapes when they mismatch or g
    does not divide into the blocks."""
    if g.ndim != 2 or bt.ndim != 2 or bt.shape[0] != g.shape[1] or xat.shape != (bt.shape[1], g.shape[0]):
        raise ValueError(f"dy_products: expected g [M, N], bt [N, r], xat [r, M]; got {g.shape=} {bt.shape=} "
                         f"{xat.shape=}")
    (m, n), r = g.shape, bt.shape[1]
    b = blocks or default_blocks(m, n)
    for name, arr in (("g", g), ("bt", bt), ("xat", xat)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"dy_products: {name} must be floating point; got {name}.dtype={arr.dtype}")
    if not supports(m, n, b):
        raise ValueError(f"dy_products: g [{m}, {n}] does not divide into {b.block_m} rows x {b.span} columns "
                         f"(check supports() first)")
    rp, dt = _pow2_at_least(r), g.dtype  # r zero-padded: Triton's smallest dot dimension is 16
    bt_p = jnp.pad(bt.astype(dt), ((0, 0), (0, rp - r)))  # [N, R]
    xat_p = jnp.pad(xat.astype(dt), ((0, rp - r), (0, 0)))  # [R, M]
    row_blocks, spans = m // b.block_m, n // b.span
    gb_parts, db_parts = pl.pallas_call(
        functools.partial(_kernel, block_n=b.block_n, steps=b.span // b.block_n),
        grid=(row_blocks, spans),
        in_specs=[pl.BlockSpec((b.block_m, b.span), lambda i, j: (i, j)),
                  pl.BlockSpec((b.span, rp), lambda i, j: (j, 0)),
                  pl.BlockSpec((rp, b.block_m), lambda i, j: (0, i))],
        out_specs=[pl.BlockSpec((None, b.block_m, rp), lambda i, j: (j, i, 0)),
                   pl.BlockSpec((None, rp, b.span), lambda i, j: (i, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((spans, m, rp), _F32), jax.ShapeDtypeStruct((row_blocks, rp, n), _F32)],
        interpret=_compat.default_interpret() if interpret is None else interpret,
        compiler_params=_compat.compiler_params(num_warps=b.num_warps, num_stages=b.num_stages),
        name="lora_dy_products",
    )(g, bt_p, xat_p)
    return gb_parts.sum(0)[:, :r], db_parts.sum(0)[:r]  # [M, r], [r, N]
