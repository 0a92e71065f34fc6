"""LoRA linear, x @ w + bias + s * (x @ a) @ b with w frozen: a Pallas fused kernel and the XLA formulation.

Both implementations share one `jax.custom_vjp`; they differ only in how the two large products are done:
  forward  y  = x  @ w   + (s * x @ a) @ b   + bias
  backward dx = dy @ w.T + (s * dy @ b.T) @ a.T
Each is "a full matmul plus a rank-r correction", which the Pallas kernel `lowrank_matmul` computes in one pass (the
rank-r product extends the contraction of the same output tile, so the correction costs r/K more FLOPs and no extra
trip through memory); XLA does it as two matmuls and an add. The skinny products (x @ a, dy @ b.T, da = x.T @ dxa,
db = xa_s.T @ dy) are plain XLA dots in both, unless `dy_pass="pallas"` computes the two that read dy in one
pass (kernels/lora_dy.py). The w cotangent is a symbolic zero (None): no weight gradient is ever computed. The
residuals are x, the [M, r] product x @ a, and the inputs themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from fastlora_jax.kernels import _compat

_F32 = jnp.float32
# The checkpoint_name of the [M, r] product x @ a, in both this module's custom_vjp and nf4_linear's LoRA branch: a
# jax.checkpoint policy that saves it spares the backward pass a recomputation that reads all of x again.
XA_NAME = "lora_xa"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiles of `lowrank_matmul` (powers of two, >= 16: Triton's smallest dot) and its Triton launch settings."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8  # output tiles are visited in groups of group_m rows, so w's column panels stay in L2
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def for_shape(cls, m: int, n: int, k: int) -> BlockSizes:
        """Defaults for an [m, k] @ [k, n] product: weight-streaming tiles for few tokens, MMA tiles otherwise."""
        if m <= 64:
            base = cls(block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4, num_stages=3)
        else:
            base = cls()
        return dataclasses.replace(base, block_m=min(base.block_m, _pow2_at_least(m)),
                                   block_n=min(base.block_n, _pow2_at_least(n)),
                                   block_k=min(base.block_k, _pow2_at_least(k)))


def _pow2_at_least(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    if x.shape == (rows, cols):
        return x
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _dot(a: jax.Array, b: jax.Array, transpose_b: bool, out_dtype=_F32) -> jax.Array:
    """a [m, k] @ b [k, n] (or b [n, k] transposed) -> [m, n] in out_dtype, without materializing a transpose."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)


def _lowrank_matmul_kernel(x_ref, w_ref, u_ref, v_ref, *rest, block_k: int, k_steps: int, transpose: bool,
                           has_bias: bool):
    # x_ref [bm, Kp], w_ref [Kp, bn] ([bn, Kp] if transpose), u_ref [bm, R], v_ref [R, bn] ([bn, R] if transpose),
    # bias_ref [bn] (if has_bias), o_ref [bm, bn]
    *bias_ref, o_ref = rest

    def body(step, acc):  # acc [bm, bn] float32
        cols = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
        w_tile = w_ref[:, cols] if transpose else w_ref[cols, :]  # [bn, bk] | [bk, bn]
        return acc + _dot(x_ref[:, cols], w_tile, transpose)

    acc = jax.lax.fori_loop(0, k_steps, body, jnp.zeros(o_ref.shape, _F32))
    acc = acc + _dot(u_ref[...], v_ref[...], transpose)  # the rank-R correction: one more K step of width R
    if has_bias:
        acc = acc + bias_ref[0][...].astype(_F32)[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _tile_index(pid, grid_m: int, grid_n: int, group_m: int):
    """Grouped ("super-tile") order of the 1-D program id: group_m row tiles sweep the columns together."""
    width = group_m * grid_n
    first_m = (pid // width) * group_m
    size_m = jnp.minimum(grid_m - first_m, group_m)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


def lowrank_matmul(x: jax.Array, w: jax.Array, u: jax.Array, v: jax.Array, bias: jax.Array | None = None, *,
                   transpose: bool = False, block_sizes: BlockSizes | None = None,
                   interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] + u [M, R] @ v [R, N] (+ bias [N]) -> [M, N] in x.dtype, one Pallas kernel.

    With transpose=True, w is [N, K] and v is [N, R] (the products use their transposes). Operands are cast to
    x.dtype; accumulation is float32. Shapes need not be multiples of the tiles (inputs are zero-padded).
    """
    if x.ndim != 2 or w.ndim != 2 or u.ndim != 2 or v.ndim != 2:
        raise ValueError(f"lowrank_matmul needs 2-D operands; got {x.shape=} {w.shape=} {u.shape=} {v.shape=}")
    m, k = x.shape
    n = w.shape[0] if transpose else w.shape[1]
    r = u.shape[1]
    w_k, v_r = (w.shape[1], v.shape[1]) if transpose else (w.shape[0], v.shape[0])
    v_n = v.shape[0] if transpose else v.shape[1]
    if w_k != k or u.shape[0] != m or v_r != r or v_n != n or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"lowrank_matmul: mismatched shapes {x.shape=} {w.shape=} {u.shape=} {v.shape=} "
                         f"{None if bias is None else bias.shape}=bias.shape ({transpose=})")
    for name, arr in (("x", x), ("w", w), ("u", u), ("v", v), ("bias", bias)):
        if arr is not None and not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"lowrank_matmul: {name} must be floating point; got {name}.dtype={arr.dtype}")
    bs = block_sizes or BlockSizes.for_shape(m, n, k)
    interpret = _compat.default_interpret() if interpret is None else interpret
    dt = x.dtype
    mp, np_, kp, rp = _round_up(m, bs.block_m), _round_up(n, bs.block_n), _round_up(k, bs.block_k), _pow2_at_least(r)
    grid_m, grid_n = mp // bs.block_m, np_ // bs.block_n
    x_p, u_p = _pad2(x, mp, kp), _pad2(u.astype(dt), mp, rp)
    w_p = _pad2(w.astype(dt), np_, kp) if transpose else _pad2(w.astype(dt), kp, np_)
    v_p = _pad2(v.astype(dt), np_, rp) if transpose else _pad2(v.astype(dt), rp, np_)
    tile = functools.partial(_tile_index, grid_m=grid_m, grid_n=grid_n, group_m=max(1, min(bs.group_m, grid_m)))

    def rows(cols):  # a [bm, cols] panel of the row tile
        return pl.BlockSpec((bs.block_m, cols), lambda pid: (tile(pid)[0], 0))

    def cols(depth):  # a [depth, bn] (or transposed [bn, depth]) panel of the column tile
        if transpose:
            return pl.BlockSpec((bs.block_n, depth), lambda pid: (tile(pid)[1], 0))
        return pl.BlockSpec((depth, bs.block_n), lambda pid: (0, tile(pid)[1]))

    in_specs = [rows(kp), cols(kp), rows(rp), cols(rp)]
    operands = [x_p, w_p, u_p, v_p]
    if bias is not None:
        in_specs.append(pl.BlockSpec((bs.block_n,), lambda pid: (tile(pid)[1],)))
        operands.append(jnp.pad(bias, (0, np_ - n)) if np_ != n else bias)
    kernel = functools.partial(_lowrank_matmul_kernel, block_k=bs.block_k, k_steps=kp // bs.block_k,
                               transpose=transpose, has_bias=bias is not None)
    out = pl.pallas_call(
        kernel,
        grid=(grid_m * grid_n,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda pid: tile(pid)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), dt),
        interpret=interpret,
        compiler_params=_compat.compiler_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        name="lowrank_matmul",
    )(*operands)
    return out[:m, :n] if (mp, np_) != (m, n) else out


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config:
    implementation: str  # "xla" | "pallas" | "mosaic"
    block_sizes: BlockSizes | None
    interpret: bool | None
    weight_out_in: bool = False  # w is [out, in] (HF layout: an NF4 weight, or one dequantized by the caller)
    nf4_rounding: str | None = None  # w is one NF4 weight [out, in], dequantized with this rounding in each pass
    nf4_dequantize: str = "xla"  # "pallas": by kernels/nf4_dequant.py, where the weight divides into its blocks
    dy_pass: str = "xla"  # "pallas": dy @ b.T and xa_s.T @ dy in one read of dy (kernels/lora_dy.py)


def _dequantize(w, dt, cfg: _Config) -> jax.Array:
    """One NF4 weight [out, in] in dt, by kernels/nf4_dequant.py where cfg asks for it and it applies (the same bits),
    else by XLA."""
    from fastlora_jax.nf4 import dequantize_nf4

    if cfg.nf4_dequantize == "pallas" and dt != _F32:
        from fastlora_jax.kernels import nf4_dequant

        if nf4_dequant.supports(w.shape):
            return nf4_dequant.dequantize(w, dt, cfg.nf4_rounding, interpret=cfg.interpret)
    return dequantize_nf4(w, dt, cfg.nf4_rounding)


def _fused(x, w, u, v, bias, transpose: bool, cfg: _Config) -> jax.Array:
    """x @ w + u @ v (+ bias), w and v transposed when `transpose`; all operands in x.dtype. With cfg.weight_out_in,
    w is [out, in] (w.T in these terms); with cfg.nf4_rounding, an NF4 weight dequantized here and alive only inside
    this pass."""
    dt = x.dtype
    if cfg.nf4_rounding is not None:
        w = _dequantize(w, dt, cfg)  # [out, in]
    transpose_w = transpose != cfg.weight_out_in
    if cfg.implementation == "mosaic":  # the rank-r term in the GEMM's epilogue (Hopper); v is small: transpose it
        from fastlora_jax.kernels import lora_mosaic

        y = lora_mosaic.lowrank_matmul(x, w.astype(dt), u, (v.T if transpose else v).astype(dt),
                                       transpose_w=transpose_w)
        return y if bias is None else y + bias.astype(dt)
    if cfg.implementation == "pallas":
        return lowrank_matmul(x, w, u, v, bias, transpose=transpose, block_sizes=cfg.block_sizes,
                              interpret=cfg.interpret)
    # XLA: two dots written straight in x.dtype (float32 accumulation inside the GEMM; a float32 output would cost
    # a [M, N] float32 write and a separate convert pass), then one add.
    y = _dot(x, w.astype(dt), transpose_w, out_dtype=dt)
    if bias is not None:
        y = y + bias.astype(dt)
    return y + _dot(u, v.astype(dt), transpose, out_dtype=dt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lora(x, w, a, b, s, bias, cfg: _Config):
    return _lora_fwd(x, w, a, b, s, bias, cfg)[0]


def _lora_fwd(x, w, a, b, s, bias, cfg: _Config):
    # x [M, K], w [K, N], a [K, r], b [r, N], s [], bias [N] | None
    dt = x.dtype
    xa = _dot(x, a.astype(dt), False).astype(dt)  # [M, r], rounded to x.dtype as PEFT's branch is
    xa = checkpoint_name(xa, XA_NAME)  # [M, r]: a residual small enough for a remat policy to keep
    xa_s = (s * xa.astype(_F32)).astype(dt)  # [M, r]
    y = _fused(x, w, xa_s, b.astype(dt), bias, False, cfg)  # [M, N]
    return y, (x, w, a, b, s, bias, xa)


def _dy_products(g, b, xa_s, cfg: _Config):
    """(dy @ b.T [M, r], xa_s.T @ dy [r, N]), float32: in one pass over dy (kernels/lora_dy.py) where cfg asks for
    it and it applies, else two XLA dots."""
    if cfg.dy_pass == "pallas":
        from fastlora_jax.kernels import lora_dy  # imports this module's helpers: here, not at the top

        if lora_dy.supports(*g.shape):
            return lora_dy.dy_products(g, b.T, xa_s.T, interpret=cfg.interpret)
    return (_dot(g, b.astype(g.dtype), True),
            jax.lax.dot_general(xa_s, g, (((0,), (0,)), ((), ())), preferred_element_type=_F32))


def _lora_bwd(cfg: _Config, residuals, g):
    x, w, a, b, s, bias, xa = residuals  # g [M, N]
    dt = x.dtype
    g = g.astype(dt)
    xa_s = (s * xa.astype(_F32)).astype(dt)  # [M, r]
    dyb, db = _dy_products(g, b, xa_s, cfg)  # [M, r], [r, N] float32: dy @ b.T, xa_s.T @ dy
    ds = jnp.sum(xa.astype(_F32) * dyb)  # d/ds of sum(dy * s * xa @ b)
    dxa = (s * dyb).astype(dt)  # [M, r]
    dx = _fused(g, w, dxa, a.astype(dt), None, True, cfg)  # [M, K] = dy @ w.T + dxa @ a.T
    da = jax.lax.dot_general(x, dxa, (((0,), (0,)), ((), ())), preferred_element_type=_F32)  # [K, r]
    dbias = None if bias is None else jnp.sum(g.astype(_F32), axis=0).astype(bias.dtype)
    return dx, None, da.astype(a.dtype), db.astype(b.dtype), ds.astype(s.dtype), dbias


_lora.defvjp(_lora_fwd, _lora_bwd)


def check_arrays_and_scaling(where: str, arrays, scaling) -> None:
    """Raises ValueError unless each of `arrays` ((name, value) pairs; None skipped) is an array and `scaling` is
    real: a Python or numpy number, or an integer or float array (traced too; the shape checks want it 0-d)."""
    for name, arr in arrays:
        if arr is not None and not (hasattr(arr, "ndim") and hasattr(arr, "dtype")):
            raise ValueError(f"{where}: {name} must be an array; got a {type(arr).__name__}")
    real = (isinstance(scaling, (int, float)) and not isinstance(scaling, bool)) or (
        hasattr(scaling, "dtype")
        and (jnp.issubdtype(scaling.dtype, jnp.floating) or jnp.issubdtype(scaling.dtype, jnp.integer)))
    if not real:
        raise ValueError(f"{where}: scaling must be a real scalar (a number or a 0-d array); got "
                         f"{type(scaling).__name__} {str(scaling)[:60]}")


def check_lora_shapes(x, w, a, b, scaling, bias) -> None:
    """Raises ValueError naming the shapes unless x [..., in], w [in, out], a [in, r], b [r, out], bias [out]."""
    arrays = (("x", x), ("w", w), ("a", a), ("b", b), ("bias", bias))
    check_arrays_and_scaling("lora_linear", arrays, scaling)
    for name, arr in arrays:
        if arr is not None and not jnp.issubdtype(jnp.asarray(arr).dtype, jnp.floating):
            raise ValueError(f"lora_linear: {name} must be floating point; got {name}.dtype={arr.dtype} "
                             f"({x.shape=} {w.shape=} {a.shape=} {b.shape=})")
    ok = (x.ndim >= 1 and w.ndim == 2 and a.ndim == 2 and b.ndim == 2 and x.shape[-1] == w.shape[0] == a.shape[0]
          and a.shape[1] == b.shape[0] and b.shape[1] == w.shape[1]
          and (bias is None or bias.shape == (w.shape[1],)) and jnp.ndim(scaling) == 0)
    if not ok:
        raise ValueError(f"lora_linear: expected x [..., in], w [in, out], a [in, r], b [r, out], bias [out], "
                         f"scalar scaling; got {x.shape=} {w.shape=} {a.shape=} {b.shape=} "
                         f"bias.shape={None if bias is None else bias.shape} scaling.shape={jnp.shape(scaling)}")


def lora_linear(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scaling: float | jax.Array,
                bias: jax.Array | None = None, *, implementation: str = "xla", block_sizes: BlockSizes | None = None,
                interpret: bool | None = None, dy_pass: str = "xla") -> jax.Array:
    """x [..., in] @ w [in, out] + bias + scaling * (x @ a [in, r]) @ b [r, out] -> [..., out] in x.dtype.

    Differentiable in x, a, b, scaling and bias; w gets a symbolic-zero cotangent (it is frozen). Reverse mode only
    (a custom_vjp), and once on the kernel paths: their backward pass runs kernels JAX does not differentiate again
    ("xla" takes higher derivatives).
    `implementation` is "xla", "pallas" (Triton; interpreted off a GPU) or "mosaic" (kernels/lora_mosaic.py: Hopper
    GPUs, token counts and features that divide into its tiles); the dispatch in `api` resolves "auto".
    `interpret` defaults to "not on a GPU". `dy_pass` "pallas" computes the backward's dy @ b.T and xa.T @ dy in
    one read of dy (kernels/lora_dy.py; opt-in: slower on the 8B step) where [M, out] divides into its blocks, else as
    "xla" does, in two dots: the same sums in another order.
    """
    check_lora_shapes(x, w, a, b, scaling, bias)
    if implementation not in ("xla", "pallas", "mosaic"):
        raise ValueError(f"implementation={implementation!r}; accepted here: 'xla', 'pallas', 'mosaic'")
    if dy_pass not in ("xla", "pallas"):
        raise ValueError(f"dy_pass={dy_pass!r}; accepted: 'xla', 'pallas'")
    lead, n = x.shape[:-1], w.shape[1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # [M, in] (-1 cannot be inferred when in is 0)
    if 0 in (*x2.shape, n):  # nothing for a kernel to tile
        implementation = "xla"
    cfg = _Config(implementation=implementation, block_sizes=block_sizes, interpret=interpret, dy_pass=dy_pass)
    y = _lora(x2, w, a, b, jnp.asarray(scaling, _F32), bias, cfg)
    return y.reshape(*lead, n)


def nf4_lora_linear(x: jax.Array, w, a: jax.Array, b: jax.Array, scaling: float | jax.Array,
                    bias: jax.Array | None = None, *, rounding: str, implementation: str = "mosaic",
                    dequantize: str = "xla") -> jax.Array:
    """x [M, in] @ dequantize(w, rounding).T + bias + scaling * (x @ a) @ b through this module's custom_vjp, w ONE NF4
    weight [out, in] dequantized in the forward and again in the backward pass (never kept), or that weight already
    dequantized to x.dtype by the caller (a [out, in] array, used as is: `rounding` and `dequantize` then do nothing).
    `rounding` is one of fastlora_jax.nf4.ROUNDINGS (the caller resolves "bitsandbytes"); `implementation` "mosaic"
    or "xla" (not "pallas": its kernel reads w in one orientation only). `dequantize` "pallas" dequantizes 16-bit
    weights with kernels/nf4_dequant.py (opt-in: no faster on the 8B step; the same bits) where w divides into its
    blocks, else as "xla" does (`fastlora_jax.nf4.dequantize_nf4`)."""
    if implementation not in ("xla", "mosaic"):
        raise ValueError(f"nf4_lora_linear: implementation={implementation!r}; accepted: 'xla', 'mosaic'")
    if dequantize not in ("xla", "pallas"):
        raise ValueError(f"nf4_lora_linear: dequantize={dequantize!r}; accepted: 'xla', 'pallas'")
    dense = isinstance(w, jax.Array)
    if dense and (w.shape != (b.shape[1], a.shape[0]) or w.dtype != x.dtype):
        raise ValueError(f"nf4_lora_linear: a dequantized w must be [out, in] in x.dtype; got w {w.shape} {w.dtype}, "
                         f"x {x.shape} {x.dtype}, a {a.shape}, b {b.shape}")
    cfg = _Config(implementation=implementation, block_sizes=None, interpret=None, weight_out_in=True,
                  nf4_rounding=None if dense else rounding, nf4_dequantize=dequantize)
    return _lora(x, w, a, b, jnp.asarray(scaling, _F32), bias, cfg)
