"""LoRA linear's large products on Hopper GPUs as one Pallas Mosaic GPU GEMM each, the rank-r term in its epilogue.

    y = x @ w + u @ vt.T     x [M, K], w [K, N] (or [N, K] read transposed), u [M, r], vt [N, r]

After the main loop has accumulated x @ w for an output tile, one more warpgroup MMA adds u @ v (K = r) to the
float32 accumulator before the tile is rounded and stored: the [M, N] LoRA term is never written nor read back.
XLA's cuBLAS path instead writes (x @ a) @ b to memory and reads it back as the GEMM's C operand (beta = 1).

The kernel is persistent (one program per multiprocessor walks the output tiles) and warp-specialized: a memory
warpgroup streams x and w tiles into shared memory through TMA while two compute warpgroups run the MMAs, each on
its half of the CTA's tile; the layout is that of JAX's own Hopper matmul
(jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu), which ran at cuBLAS's rate on the 8B step's shapes with 4
stages. Up to rank 16 the rank-r tiles (u and v^T, both rank-minor: wgmma wants one swizzle for both operands) leave
room for 4 stages too, and the kernel then ran at cuBLAS's rate without the term on the transposed 14336->4096 input
gradient (1241 vs 1239 us) and 13% above it on 4096->14336 (1382 vs 1221; cuBLAS with XLA's LoRA sum: 1413 and 1523;
H100, benchmarks/RESULTS.md, "## Kernels", session 14; 6% above it in session 15's call, 1353 vs 1279). Ranks
17-64 get 3 stages (15-18% above cuBLAS, session 13).
By default (`Tiles(steady=True)`) one pipeline runs across a program's output tiles, the next tile's loads issued
while this one finishes, where every program has two tiles or more; session 16 measured it 1.6-3.5% faster on
4096->14336 (1329 / 1304 against 1351 / 1351 us), the same on the 4096-wide shapes, and the 8B "unsloth" step the
same within its spread (H100, benchmarks/RESULTS.md, "## Kernels", session 16).
Compiled on Hopper GPUs only (no interpreter).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from fastlora_jax.precision import cuda_capability

_SMEM_BYTES = 227 * 1024  # a Hopper multiprocessor's shared memory for one block
MIN_RANK = 16  # u and v^T are zero-padded to this rank (one MMA K step); their rows share one swizzle


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tiles:
    """Tiles of `lowrank_matmul`: each compute warpgroup owns a [tile_m, tile_n] float32 accumulator; the two of a
    CTA split its tile along `split` ("m" or "n"); `stages` x and w tiles are in flight; output tiles are visited
    in bands `band` tiles wide (L2 reuse of w's panels); the epilogue stores [epilogue_m, epilogue_n] pieces.
    `steady`: one pipeline across a program's output tiles, the next tile's loads issued while the last steps of
    this one run (Pallas' pipeline of pipelines; where every program has two tiles or more and the K steps divide
    into the stages), instead of draining the pipeline after each tile."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4  # at ranks above 16 the rank-r tiles leave room for 3 (`default_tiles`)
    split: str = "n"
    band: int = 8
    epilogue_m: int = 64
    epilogue_n: int = 32
    steady: bool = True

    def __post_init__(self):
        if self.split not in ("m", "n"):
            raise ValueError(f"Tiles(split={self.split!r}); accepted: 'm', 'n'")

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.split == "n" else 1)

    def smem_bytes(self, rank: int, itemsize: int = 2) -> int:
        pipeline = self.stages * (self.cta_m + self.cta_n) * self.tile_k
        lora = 2 * (self.tile_m + self.tile_n) * rank
        out = 2 * 2 * self.epilogue_m * self.epilogue_n
        return (pipeline + lora + out) * itemsize


def on_hopper() -> bool:
    """Whether JAX's first device is a Hopper GPU (compute capability 9.0), the only place this kernel runs."""
    return jax.default_backend() == "gpu" and cuda_capability(jax.devices()[0]) == (9, 0)


def supports(m: int, n: int, k: int, tiles: Tiles | None = None) -> bool:
    """Whether [m, k] @ [k, n] divides into the tiles (the kernel does not pad)."""
    t = tiles or Tiles()
    return m % t.cta_m == 0 and n % t.cta_n == 0 and k % t.tile_k == 0


def _padded_rank(r: int) -> int:
    return max(MIN_RANK, 1 << max(0, r - 1).bit_length())  # a power of two: rows of 32, 64, 128... bytes


def default_tiles(rank: int) -> Tiles:
    """128 x 256 output tiles, 64 deep: 4 pipeline stages where shared memory holds them at `rank` (up to 16), else
    3 (enough up to rank 64; above, lowrank_matmul names the bytes it would need)."""
    four = Tiles(stages=4)
    return four if four.smem_bytes(_padded_rank(rank)) <= _SMEM_BYTES else Tiles(stages=3)


def runs_steady(t: Tiles, m: int, n: int, k: int, programs: int) -> bool:
    """Whether [m, k] @ [k, n] runs one pipeline across each program's tiles: `t.steady`, a first and a last tile in
    every one of `programs` (two tiles each or more), and slots that line up from one tile to the next (K steps a
    multiple of the stages). Elsewhere each tile fills and drains its own pipeline."""
    tiles, k_steps = (m // t.cta_m) * (n // t.cta_n), k // t.tile_k
    return t.steady and tiles >= 2 * programs and k_steps % t.stages == 0


def _transforms(minor_elems: int, itemsize: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(minor_elems * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(x_gmem, w_gmem, u_gmem, vt_gmem, out_gmem, *, t: Tiles, transpose_w: bool, programs: int):
    # x_gmem [M, K], w_gmem [K, N] ([N, K] if transpose_w), u_gmem [M, R], vt_gmem [N, R]; out_gmem [M, N]
    import jax.experimental.pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = x_gmem.dtype
    size = jnp.dtype(dtype).itemsize
    m, k = x_gmem.shape
    n, rank = out_gmem.shape[1], u_gmem.shape[1]
    m_tiles, n_tiles, k_steps = m // t.cta_m, n // t.cta_n, k // t.tile_k
    steady = runs_steady(t, m, n, k, programs)
    k_major = _transforms(t.tile_k, size)  # x tiles [cta_m, tile_k], transposed w tiles [cta_n, tile_k]
    n_major = _transforms(t.cta_n, size)  # w tiles [tile_k, cta_n]
    r_major = _transforms(rank, size)  # u tiles [tile_m, R], vt tiles [tile_n, R]: wgmma wants one swizzle for both
    w_block = (t.cta_n, t.tile_k) if transpose_w else (t.tile_k, t.cta_n)

    def pipeline(body, context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=t.stages, compute_context=context, pipeline_state=state,
            in_specs=[plgpu.BlockSpec((t.cta_m, t.tile_k), lambda s: (0, s), transforms=k_major),
                      plgpu.BlockSpec(w_block, (lambda s: (0, s)) if transpose_w else (lambda s: (s, 0)),
                                      transforms=k_major if transpose_w else n_major)])

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
        u_smem=plgpu.SMEM((2, t.tile_m, rank), dtype, transforms=r_major),
        v_smem=plgpu.SMEM((2, t.tile_n, rank), dtype, transforms=r_major),
        out_smem=plgpu.SMEM((2, 2, t.epilogue_m, t.epilogue_n), out_gmem.dtype,
                            transforms=_transforms(t.epilogue_n, jnp.dtype(out_gmem.dtype).itemsize)),
        lora_loaded=plgpu.Barrier(num_barriers=4),
        collective_axes="wg",
    )
    def scope(allocations, u_smem, v_smem, out_smem, lora_loaded):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def tile_loop(info):
            (linear,) = info.index
            mi, ni = plgpu.planar_snake(linear, (m_tiles, n_tiles), 1, t.band)  # bands along N
            cta_rows, cta_cols = pl.ds(mi * t.cta_m, t.cta_m), pl.ds(ni * t.cta_n, t.cta_n)
            wg_rows = pl.ds(wg * t.tile_m, t.tile_m) if t.split == "m" else slice(None)
            wg_cols = pl.ds(wg * t.tile_n, t.tile_n) if t.split == "n" else slice(None)

            def context(run_pipeline):
                # This warpgroup's rank-r operands travel while the main loop runs.
                plgpu.copy_gmem_to_smem(u_gmem.at[cta_rows, :].at[wg_rows, :], u_smem.at[wg],
                                        lora_loaded.at[2 * wg])
                plgpu.copy_gmem_to_smem(vt_gmem.at[cta_cols, :].at[wg_cols, :], v_smem.at[wg],
                                        lora_loaded.at[2 * wg + 1])

                @functools.partial(pl.run_scoped, acc=plgpu.ACC((t.tile_m, t.tile_n), jnp.float32))
                def accumulate(acc):
                    run_pipeline(acc)  # acc = x @ w for this tile
                    plgpu.barrier_wait(lora_loaded.at[2 * wg])
                    plgpu.barrier_wait(lora_loaded.at[2 * wg + 1])
                    plgpu.wgmma(acc, u_smem.at[wg], plgpu.transpose_ref(v_smem.at[wg], (1, 0)))  # acc += u @ vt.T
                    plgpu.wgmma_wait(0)
                    y = acc[...].astype(out_gmem.dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    pieces_n = t.tile_n // t.epilogue_n
                    for pm in range(t.tile_m // t.epilogue_m):
                        for pn in range(pieces_n):
                            rows = slice(pm * t.epilogue_m, (pm + 1) * t.epilogue_m)
                            cols = slice(pn * t.epilogue_n, (pn + 1) * t.epilogue_n)
                            slot = (pm * pieces_n + pn) % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            out_smem[wg, slot] = y[rows, cols]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                out_gmem.at[cta_rows, cta_cols].at[wg_rows, wg_cols].at[rows, cols])

            def mma(_, x_smem, w_smem, acc):
                w_tile = (plgpu.transpose_ref(w_smem.at[wg_cols, :], (1, 0)) if transpose_w
                          else w_smem.at[:, wg_cols])  # [tile_k, tile_n]
                plgpu.wgmma(acc, x_smem.at[wg_rows], w_tile)
                plgpu.wgmma_wait(0)
                return acc

            state = None
            if steady:  # START on a program's first tile (fills the stages), STOP on its last (drains them)
                p = plgpu.PipelinePipeline
                state = jnp.where(info.local_index == 0, p.START,
                                  jnp.where(info.local_index == info.num_local_steps - 1, p.STOP, p.STEADY))
            pipeline(mma, context, state)(x_gmem.at[cta_rows, :],
                                   w_gmem.at[cta_cols, :] if transpose_w else w_gmem.at[:, cta_cols],
                                   allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def lowrank_matmul(x: jax.Array, w: jax.Array, u: jax.Array, v: jax.Array, *, transpose_w: bool = False,
                   tiles: Tiles | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] (w [N, K] transposed when transpose_w) + u [M, r] @ v [r, N] -> [M, N] in x.dtype.

    One Mosaic GPU kernel (Hopper); bfloat16 or float16 operands of one dtype, float32 accumulation. M, N and K must
    divide into the tiles (`supports`); r is zero-padded to a power of two >= 16."""
    t = tiles or default_tiles(u.shape[1])
    m, k = x.shape
    n = w.shape[0] if transpose_w else w.shape[1]
    r = u.shape[1]
    w_k = w.shape[1] if transpose_w else w.shape[0]
    if w_k != k or u.shape[0] != m or v.shape != (r, n):
        raise ValueError(f"lowrank_matmul: mismatched shapes {x.shape=} {w.shape=} {u.shape=} {v.shape=} "
                         f"({transpose_w=})")
    if x.dtype not in (jnp.bfloat16, jnp.float16) or any(a.dtype != x.dtype for a in (w, u, v)):
        raise ValueError(f"lowrank_matmul: operands must all be bfloat16 or all float16; got x.dtype={x.dtype.name} "
                         f"w.dtype={w.dtype.name} u.dtype={u.dtype.name} v.dtype={v.dtype.name}")
    if not supports(m, n, k, t):
        raise ValueError(f"lowrank_matmul: [{m}, {k}] @ [{k}, {n}] does not divide into {t.cta_m} x {t.cta_n} "
                         f"output tiles and {t.tile_k}-deep steps")
    rp = _padded_rank(r)
    if t.smem_bytes(rp) > _SMEM_BYTES:
        raise ValueError(f"lowrank_matmul: {t} with rank {rp} needs {t.smem_bytes(rp)} bytes of shared memory; "
                         f"at most {_SMEM_BYTES}")
    vt = v.T  # [N, r], rank-minor like u (a small copy; XLA cancels it against a caller's own transpose)
    if rp != r:
        u, vt = jnp.pad(u, ((0, 0), (0, rp - r))), jnp.pad(vt, ((0, 0), (0, rp - r)))
    return _call(x, w, u, vt, t=t, transpose_w=transpose_w)


@functools.partial(jax.jit, static_argnames=("t", "transpose_w"))
def _call(x, w, u, vt, *, t: Tiles, transpose_w: bool) -> jax.Array:
    # A jit of its own: a model calls this once per layer and projection, and JAX lowers each distinct jit once
    # per program (about 0.25 s and 190 kB of module each), so a Python loop over 32 layers costs one lowering.
    from jax.experimental.pallas import mosaic_gpu as plgpu

    programs = jax.devices()[0].core_count  # one per multiprocessor
    call = plgpu.kernel(
        functools.partial(_kernel, t=t, transpose_w=transpose_w, programs=programs),
        out_type=jax.ShapeDtypeStruct((x.shape[0], vt.shape[0]), x.dtype),
        grid=(programs,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return call(x, w, u, vt)
