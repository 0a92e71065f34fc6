"""Packed rows on cuDNN's ragged layout: each example attends only itself, and costs only its own length.

A packed row [B, T] holds several examples (segment ids 1, 2, ..., 0 on padding). As a [B, 1, T, S] mask, cuDNN
flash attention computes every causal block of the row and the gradient of the bias the mask becomes. cuDNN's ragged
layout (Hopper or newer, cuDNN >= 9.6) instead takes each example as a sequence of its own, starting at an offset
into the flattened tokens. 8B shapes, 4 x 2048, four examples a row, forward + backward per layer on an H100: mask
2.44 ms, ragged 0.96 ms, one causal 2048-token row 1.39 ms (benchmarks/RESULTS.md, session 23).

The layout is built on the host with each batch (`segment_layout`, from `data.collate`). The B * T tokens are cut
into R = B * T / C chunks of C tokens (C divides T and holds the longest example), and chunk row r lists the pieces
that start in it: offsets [R, M + 1] (from the chunk's start) and lengths [R, M], -1 past the last piece. An example
is one piece; a padding run is cut at chunk edges (no real token and no loss term reads a padding output). cuDNN
sizes its work and its float32 dq workspace by R * M sequences of C tokens (8 * B * T * M * N * H bytes), so C and M
are kept small, each a power of two. SFTTrainer (`packed_batches.PackedBatches`) fixes one (C, M) per padded length
for the whole run (`layout_plan` over the packed dataset, from the model's config: the same on any machine), the one
under the workspace limit that most rows fit. Where the path runs (`ragged_supported`), batches whose rows all fit
get the layout, the others (rows of many short examples) the mask path, so a length compiles at most twice. The rows
that do not fit are batched among themselves (`data.layout_misfits`), so that one of them does not send a whole
batch to the mask path. Its packing (`packing.pack_rows`' max_examples) puts at most M - 1 examples in a row where the
lengths allow, so that a row and its padding fit one chunk of T tokens: on chat-like lengths around 240 tokens,
97-100% of 8B's 4 x 2048 batches get the layout instead of 38% (benchmarks/RESULTS.md, session 25).
`ragged_applies` says where this path runs; elsewhere the model uses the segment-id mask, with the same results on
every real token.

The ragged call goes through `jax._src.cudnn.fused_attention_stablehlo`: jax.nn.dot_product_attention (0.10-0.11)
has no argument for it. Where that module or its function is missing, the mask path runs.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.precision import cuda_capability

SEGMENT_KEYS = ("segment_offsets", "segment_lengths")
# Largest float32 dq workspace (8 * B * T * M * N * H bytes) the ragged path may ask cuDNN for; above it the mask
# path runs (8B, 4 x 2048: M <= 8).
WORKSPACE_LIMIT_BYTES = 2 << 30
MIN_CHUNK = 128  # tokens: cuDNN's query tile, so that short examples share a chunk row rather than fill one each
BLOCK_ROWS = 1024  # packed rows planned at a time (`padded_blocks`): the host memory stays ~40 bytes a token of them
_CUDNN_MODULE = "jax._src.cudnn.fused_attention_stablehlo"
_MIN_CUDNN = 90600


def segment_layout(segment_ids: np.ndarray, *, chunk: int | None = None,
                   slots: int | None = None) -> dict[str, np.ndarray] | None:
    """{"segment_offsets" [R, M + 1], "segment_lengths" [R, M]} int32 for segment_ids [B, T] (0 = padding), or None
    when an example id comes back after another one (a segment that is not one run has no ragged layout).

    chunk (C) and slots (M) fix the shape (a run's `layout_plan`, so that every batch of a length compiles once);
    None: the smallest that hold this batch. ValueError where a given C or M does not hold it (`layout_fits`)."""
    runs = _Runs(segment_ids)
    if not runs.contiguous:
        return None
    T = runs.T
    longest = int(runs.longest().max())
    if chunk is None:
        chunk = _chunk_length(T, longest)
    elif T % chunk or chunk < longest:
        raise ValueError(f"chunk={chunk} for rows of {T} tokens whose longest example has {longest}; accepted: a "
                         f"divisor of {T} >= {longest}")
    starts = runs.pieces(chunk)
    lengths = np.diff(np.append(starts, runs.flat.size))
    rows = starts // chunk
    rank = np.arange(len(starts)) - np.searchsorted(rows, rows)  # [pieces] place within its chunk row
    R = runs.flat.size // chunk
    needed = int(np.bincount(rows, minlength=R).max())
    if slots is None:
        slots = 1 << (needed - 1).bit_length()
    elif slots < needed:
        raise ValueError(f"slots={slots}, but a chunk of {chunk} tokens starts {needed} pieces; accepted: >= {needed}")
    offsets = np.full((R, slots + 1), -1, np.int32)
    sizes = np.full((R, slots), -1, np.int32)
    offsets[rows, rank] = starts - rows * chunk
    sizes[rows, rank] = lengths
    return {"segment_offsets": offsets, "segment_lengths": sizes}


def layout_fits(segment_ids: np.ndarray, chunk: int, slots: int) -> bool:
    """Whether `segment_layout(segment_ids, chunk=chunk, slots=slots)` holds these rows [B, T]."""
    return bool(rows_fitting(segment_ids, chunk, slots).all())


def rows_fitting(segment_ids: np.ndarray, chunk: int, slots: int) -> np.ndarray:
    """[B] bool: which rows of segment_ids [B, T] the layout of shape (chunk, slots) holds: each example one run of
    at most `chunk` tokens, and at most `slots` pieces starting in each chunk. A batch of such rows has the layout."""
    runs = _Runs(segment_ids)
    if runs.T % chunk:
        return np.zeros(runs.B, bool)
    return ~runs.broken & (runs.longest() <= chunk) & (runs.pieces_per_chunk(chunk) <= slots)


class _Runs:
    """The runs of equal segment ids of rows [B, T] (each row's first token starts one), flattened."""

    def __init__(self, segment_ids: np.ndarray):
        ids = np.asarray(segment_ids)
        if ids.ndim != 2 or ids.size == 0:
            raise ValueError(f"segment_ids of shape {ids.shape}; accepted: [B, T] with B, T >= 1")
        self.B, self.T = ids.shape
        self.flat = ids.reshape(-1)
        index = np.arange(self.flat.size)
        self.run_start = (index % self.T == 0) | np.concatenate([[True], self.flat[1:] != self.flat[:-1]])
        self.starts = np.flatnonzero(self.run_start)  # [runs]
        self.real = self.flat[self.starts] > 0
        row_ids = np.stack([self.starts // self.T, self.flat[self.starts]], axis=1)[self.real]
        pairs, runs_of = np.unique(row_ids, axis=0, return_counts=True)
        self.broken = np.zeros(self.B, bool)  # [B] rows where an example id comes back after another one
        self.broken[pairs[runs_of > 1, 0]] = True
        self.contiguous = not self.broken.any()

    def longest(self) -> np.ndarray:
        """[B] each row's longest example (1 for a row of padding)."""
        lengths = np.diff(np.append(self.starts, self.flat.size))
        out = np.ones(self.B, np.int64)
        np.maximum.at(out, self.starts[self.real] // self.T, lengths[self.real])
        return out

    def pieces(self, chunk: int) -> np.ndarray:
        """[pieces] sorted starts: the runs, with padding runs also cut at every chunk edge."""
        cuts = np.arange(0, self.flat.size, chunk)
        return np.union1d(self.starts, cuts[(self.flat[cuts] == 0) & ~self.run_start[cuts]])

    def pieces_per_chunk(self, chunk: int) -> np.ndarray:
        """[B] the most pieces a chunk of each row starts."""
        counts = np.bincount(self.pieces(chunk) // chunk, minlength=self.flat.size // chunk)
        return counts.reshape(self.B, self.T // chunk).max(axis=1)


def max_slots(batch_size: int, T: int, width: int) -> int:
    """The most slots M (a power of two) whose workspace stays within WORKSPACE_LIMIT_BYTES for batch_size rows of
    T tokens and width = N * H query features; 0 where not even one does."""
    M = 1
    while workspace_bytes((batch_size, T, 1, width), (1, M)) <= WORKSPACE_LIMIT_BYTES:
        M *= 2
    return M // 2


def layout_plan(rows: Sequence[dict[str, np.ndarray]], buckets: Sequence[int], *,
                slot_limit: Callable[[int], int] | None = None) -> dict[int, tuple[int, int]]:
    """{padded length T: (chunk C, slots M)} for packed `rows` (with "segment_ids") padded to T: one layout shape per
    length. slot_limit(T): the most slots a batch may use (`max_slots`), None: no limit. C is the one that lets the
    most rows fit within that limit (then the smallest); M holds every row that fits at C. Batches whose rows all
    fit get the layout (`layout_fits`); the others run the segment mask (a second shape). Lengths at which no row
    fits are left out."""
    plan = {}
    for T in buckets:
        fitting = [r["segment_ids"] for r in rows if len(r["segment_ids"]) <= T]
        if not fitting:
            continue
        powers = (MIN_CHUNK << k for k in range(T.bit_length()))
        chunks = [c for c in powers if c < T and T % c == 0] + [T]  # `_chunk_length`'s candidates, ascending
        longest, needed, contiguous = [], {chunk: [] for chunk in chunks}, True  # [rows], {chunk: [rows]}, blocks
        for ids in padded_blocks(fitting, T):
            runs = _Runs(ids)
            contiguous &= runs.contiguous
            longest.append(runs.longest())
            for chunk in chunks:
                needed[chunk].append(runs.pieces_per_chunk(chunk))
        if not contiguous:
            continue
        limit = slot_limit(T) if slot_limit is not None else np.inf
        longest, best = np.concatenate(longest), None  # [rows]
        for chunk in chunks:
            most = np.concatenate(needed[chunk])  # [rows]
            ok = (longest <= chunk) & (most <= limit)
            if ok.any() and (best is None or ok.sum() > best[0]):
                best = (int(ok.sum()), chunk, int(most[ok].max()))
        if best is not None:
            plan[T] = (best[1], 1 << (best[2] - 1).bit_length())
    return plan


def padded_blocks(segment_rows: Sequence[np.ndarray], T: int) -> Iterator[np.ndarray]:
    """segment_rows (each at most T long) padded to T with 0, BLOCK_ROWS at a time: [<= BLOCK_ROWS, T] int32."""
    for start in range(0, len(segment_rows), BLOCK_ROWS):
        block = segment_rows[start:start + BLOCK_ROWS]
        ids = np.zeros((len(block), T), np.int32)
        for i, row in enumerate(block):
            ids[i, :len(row)] = row
        yield ids


def _chunk_length(T: int, longest: int) -> int:
    """The smallest power of two >= MIN_CHUNK dividing T that holds `longest` tokens; T itself where none does."""
    c = max(1 << max(longest - 1, 0).bit_length(), MIN_CHUNK)
    return c if T % c == 0 else T


def ragged_applies(q: jax.Array, offsets: jax.Array, lengths: jax.Array) -> bool:
    """Whether the ragged cuDNN path takes q [B, T, N, H] with this layout: `ragged_supported`, 16-bit q, H <= 256
    and a multiple of 8, and a dq workspace within WORKSPACE_LIMIT_BYTES."""
    B, T, N, H = q.shape
    R, M = lengths.shape
    if offsets.shape != (R, M + 1) or (B * T) % R:
        raise ValueError(f"segment_offsets {offsets.shape} / segment_lengths {lengths.shape} do not describe "
                         f"{B} x {T} tokens; accepted: [R, M + 1] / [R, M] with R dividing {B * T}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or H > 256 or H % 8:
        return False
    return workspace_bytes(q.shape, lengths.shape) <= WORKSPACE_LIMIT_BYTES and ragged_supported()


def ragged_supported() -> bool:
    """Whether JAX's first device runs the ragged path at all: an NVIDIA GPU of compute capability >= 9.0 with
    cuDNN >= 9.6, and JAX's private cuDNN attention module in place. Elsewhere a layout would go unused."""
    capability = cuda_capability(jax.devices()[0])
    if capability is None or capability < (9, 0):
        return False
    fa = _cudnn_module()
    return fa is not None and fa.check_cudnn_version() >= _MIN_CUDNN


def workspace_bytes(q_shape: tuple[int, ...], lengths_shape: tuple[int, ...]) -> int:
    """cuDNN's float32 dq workspace for the ragged path: 8 bytes for each of N * H values of every token slot
    (R * M sequences of C = B * T / R tokens). At B 1, T 16384, M 64, N 32, H 128 this gives 32.0 GiB; the
    allocation that failed on an H100 there was 32.25 GiB."""
    B, T, N, H = q_shape
    return 8 * B * T * lengths_shape[1] * N * H


def _cudnn_module():
    """JAX's private cuDNN attention module where it has the ragged entry point, else None."""
    try:
        module = importlib.import_module(_CUDNN_MODULE)
    except ImportError:
        return None
    needed = ("dot_product_attention", "MaskType", "check_cudnn_version")
    return module if all(hasattr(module, name) for name in needed) else None


def ragged_attention(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array,
                     lengths: jax.Array) -> jax.Array:
    """Causal attention within each piece of the layout -> [B, T, N, H]. q [B, T, N, H]; k, v [B, T, K, H]."""
    B, T, N, H = q.shape
    R = lengths.shape[0]
    chunk = B * T // R
    fa = _cudnn_module()
    as_chunks = lambda t: t.reshape(R, chunk, *t.shape[2:])  # noqa: E731  [R, C, heads, H], the same memory
    out = fa.dot_product_attention(as_chunks(q), as_chunks(k), as_chunks(v), None, None, lengths, lengths, offsets,
                                   offsets, scale=1.0 / math.sqrt(H), mask_type=fa.MaskType.CAUSAL)
    return out.reshape(B, T, N, H)


def layout_pieces(offsets: np.ndarray, lengths: np.ndarray, B: int, T: int) -> np.ndarray:
    """[B, T] the piece of the layout each token belongs to (-1: none), as cuDNN reads it; ValueError where two
    pieces overlap. For tests and for reading a layout."""
    R, M = lengths.shape
    chunk = B * T // R
    piece = np.full(B * T, -1)
    for r, m in zip(*np.nonzero(lengths >= 0)):
        start = r * chunk + offsets[r, m]
        if (piece[start:start + lengths[r, m]] >= 0).any():
            raise ValueError(f"piece ({r}, {m}) of the layout overlaps another at tokens {start}..")
        piece[start:start + lengths[r, m]] = r * M + m
    return piece.reshape(B, T)


def layout_mask(offsets: np.ndarray, lengths: np.ndarray, B: int, T: int) -> np.ndarray:
    """[B, 1, T, T] bool: which tokens share a piece (causality not included): the attention the layout allows."""
    piece = layout_pieces(offsets, lengths, B, T)
    return (piece[:, None, :, None] == piece[:, None, None, :]) & (piece[:, None, :, None] >= 0)
