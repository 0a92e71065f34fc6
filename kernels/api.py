"""The one dispatch point the model calls for every linear layer: implementation "auto" | "xla" | "pallas" | "mosaic".

"xla" is the plain-XLA formulation (with its own custom_vjp), "pallas" the Pallas kernels (Triton; compiled on a GPU,
interpreted elsewhere), "mosaic" LoRA's GEMMs with the rank-r term in their epilogue (Pallas Mosaic GPU, Hopper
only, kernels/lora_mosaic.py; NF4 layers take it only with LoRA factors, after XLA dequantizes the weight). "auto"
picks "mosaic" for LoRA and NF4 + LoRA on a single Hopper GPU wherever its tiles fit, Pallas only on a GPU and only
for the (op, in, out, tokens) where the benchmark (benchmarks/kernels.py, recorded in benchmarks/RESULTS.md)
measured it faster than XLA, and for NF4 at one token on a GPU XLA's multiply-and-sum form ("reduce"); XLA
everywhere else.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from fastlora_jax.kernels import _compat, lora, lora_mosaic, nf4, reference

if TYPE_CHECKING:
    from fastlora_jax.nf4 import NF4Array

IMPLEMENTATIONS = ("auto", "xla", "pallas", "mosaic")  # "mosaic": LoRA on Hopper only (kernels/lora_mosaic.py)

_ANY_RANK = 1 << 30

# Where Pallas was measured faster than XLA on an NVIDIA H200 (JAX 0.11.2, benchmarks/kernels.py, 2026-11-29; NF4's
# rows on an H100, 2026-12-06; the figures are in benchmarks/RESULTS.md, "## Kernels"), per op: (in, out,
# min_tokens, max_tokens, min_rank, max_rank).
# A call matches when its token count and LoRA rank lie in those ranges, whose ends were all measured (tokens 1, 2,
# 16, 8192; ranks 16, 64). "Faster": the median by >= 5%, or all three timed batches below XLA's fastest. Anything
# else runs XLA. At 8192 tokens the LoRA kernel alone still wins on 4096->4096 and 4096->1024 (2026-11-30), but
# the whole 8B training step is faster with XLA everywhere (15,869 vs 15,752 tokens/s, same call): XLA merges the
# q/k/v matmuls into one GEMM, which a custom call in their place prevents.
# These XLA timings used XLA's default Triton GEMMs; the train step now compiles with cuBLAS for every matmul
# (fastlora_jax.compiler_options(), 2026-12-02), under which the 16-token rows were not re-measured.
PALLAS_FASTER_ON_GPU: dict[str, tuple[tuple[int, int, int, int, int, int], ...]] = {
    "lora": (
        (4096, 1024, 16, 16, 16, 64),  # 62 / 60 vs 78 / 76 us (r16 / r64)
        (4096, 4096, 16, 16, 64, 64),  # 62 vs 76 (r16: 59 vs 55, not faster)
    ),
    # NF4 (rank: the LoRA branch is XLA either way): the fused dequant-matmul with the PTX decode, measured on an
    # NVIDIA H100 (2026-12-06, session 9; no H200 could be had), us per layer, Pallas vs XLA: forward alone under
    # XLA's default options (as generation compiles), 16 tokens: 4096->4096 22.1 vs 42.5 (rerun 23.9 vs 44.7),
    # 4096->14336 62.7 vs 132.6 (59.5 vs 137.6), 14336->4096 61.4 vs 134.0 (58.1 vs 137.6); 2 tokens 24.3 vs 44.0,
    # 62.9 vs 137.9, 58.7 vs 134.0. Forward + input gradient under the training options, 16 tokens: 43.1 vs 71.0,
    # 116.4 vs 184.0, 117.5 vs 199.2. 4096->1024 is not listed: 13.8 vs 15.2 in one call, 17.7 vs 16.0 (16 tokens)
    # and 26.6 vs 17.1 (2 tokens) in the rerun. The kernel pads the tokens to 16 rows. One token on the 14336-wide
    # shapes: against "reduce" (below), H100s, session 12, forward, us per layer, rounding dequantize_4bit /
    # gemv_4bit: 4096->14336 54.5 vs 74.5 / 42.5 vs 45.5, 14336->4096 57.2 vs 68.2 / 42.1 vs 52.0 (with the decode of
    # session 11: 64.4 vs 75.3 / 49.1 vs 51.0 and 63.2 vs 71.8 / 48.6 vs 56.3). On the H200 (2026-12-02) "reduce" had
    # beaten the select-tree kernel there (58.9 vs 105.2, 52.9 vs 113.0); the PTX kernel was not measured on it.
    "nf4": (
        (4096, 4096, 2, 16, 0, _ANY_RANK),
        (4096, 14336, 1, 16, 0, _ANY_RANK),
        (14336, 4096, 1, 16, 0, _ANY_RANK),
    ),
}
# NF4 at one token on a GPU: the forward as a multiply-and-sum that reads only the 4-bit codes ("reduce") against
# dequantize-then-matmul (benchmarks/kernels.py --forward-only, 2026-12-02, us per layer under XLA's default options /
# the training options): 4096->4096 28.0 vs 43.1 / 22.5 vs 44.0, 4096->14336 61.4 vs 126.8 / 50.9 vs 130.0,
# 14336->4096 53.8 vs 120.7 / 49.2 vs 131.2, but 4096->1024 16.2 vs 13.3 / 15.7 vs 22.3 (not faster under the
# defaults generation compiles with). At 16 tokens it was 2-5x slower (each token decodes the weight again).
# 4096->4096 stays here: against the fused kernel on H100s it won once (23.8 vs 27.5 us, session 12 call 1, the
# earlier decode) and lost once (26.8 vs 24.7, call 6). (in, out) where "auto" runs it, for NF4_REDUCE_MAX_TOKENS
# tokens at most (the PALLAS_FASTER_ON_GPU rows come first):
NF4_REDUCE_FASTER_ON_GPU = ((4096, 4096),)
NF4_REDUCE_MAX_TOKENS = 1


# LoRA and NF4 + LoRA on a Hopper GPU wherever the Mosaic GEMM's tiles divide the token count and both feature sizes, at
# ranks up to MOSAIC_MAX_RANK (kernels/lora_mosaic.py: 4 pipeline stages; at rank 64 it has room for 3 and lost to XLA
# on three of the four 8B shapes). Measured on an NVIDIA H100 (JAX 0.11.2, 2026-12-06, benchmarks/RESULTS.md, session
# 14): the 8B "unsloth" step 12,716 / 12,643 vs 12,000 / 12,084 tokens/s with XLA, at 17.05 vs 17.27 GiB; the layer's
# forward + backward at 8192 tokens, r16, per 8B shape 1.12-1.27x the bf16 matmul vs 1.13-1.51x with XLA. Through "auto"
# (session 15, H100, tokens/s against --implementation xla in the same call): 8B "dots" with the layer loop 16,627 /
# 16,554 vs 16,092 / 16,149 (compiles in 37-55 s vs 29-31 s), 8B "unsloth" 12,434 vs 11,895, 1B "dots" 82,667 vs 79,238;
# 8B QLoRA "unsloth" (NF4 + LoRA, --implementation mosaic) 11,780 / 11,820 / 11,811 vs 11,612 / 11,549 / 11,596 at 7.50
# vs 7.68 GiB.
MOSAIC_MAX_RANK = 16


def _mosaic_fits(in_features: int, out_features: int, tokens: int, rank: int, dtype) -> bool:
    # One device only: XLA's SPMD partitioner cannot split a custom call, so sharded programs keep XLA's dots.
    return (dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and rank <= MOSAIC_MAX_RANK
            and lora_mosaic.on_hopper() and jax.device_count() == 1
            and lora_mosaic.supports(tokens, out_features, in_features)  # the forward's GEMM
            and lora_mosaic.supports(tokens, in_features, out_features))  # the input gradient's


def _check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; accepted: {', '.join(IMPLEMENTATIONS)}")
    return implementation


def resolve(op: str, implementation: str, in_features: int, out_features: int, tokens: int, rank: int = 0,
            dtype=None) -> str:
    """The implementation that runs: "auto" becomes "mosaic" for LoRA and NF4 + LoRA (rank > 0) on a Hopper GPU
    where its tiles fit (16-bit `dtype`, rank <= MOSAIC_MAX_RANK), "pallas" only on a Hopper GPU and where
    PALLAS_FASTER_ON_GPU lists the shape, token count and rank, and NF4's "reduce" (kernels/nf4.py) on a Hopper GPU
    for the NF4_REDUCE_FASTER_ON_GPU shapes at up to NF4_REDUCE_MAX_TOKENS tokens; XLA elsewhere. Hopper (compute
    capability 9.0: H100, H200) is where the tables were measured; other GPUs run XLA, which was never timed against
    the kernels there."""
    if _check_implementation(implementation) != "auto":
        return implementation
    if not _compat.on_gpu() or not lora_mosaic.on_hopper():
        return "xla"
    if rank > 0 and _mosaic_fits(in_features, out_features, tokens, rank, dtype):
        return "mosaic"  # LoRA, or NF4 + LoRA (an NF4 layer without LoRA has no rank-r term for the epilogue)
    for k, n, lo, hi, min_rank, max_rank in PALLAS_FASTER_ON_GPU[op]:
        if (k, n) == (in_features, out_features) and lo <= tokens <= hi and min_rank <= rank <= max_rank:
            return "pallas"
    if op == "nf4" and tokens <= NF4_REDUCE_MAX_TOKENS and (in_features, out_features) in NF4_REDUCE_FASTER_ON_GPU:
        return "reduce"
    return "xla"


def linear(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, implementation: str = "auto") -> jax.Array:
    """Frozen linear layer: x [..., in] @ w [in, out] (+ bias) -> [..., out]. One XLA matmul on every backend."""
    _check_implementation(implementation)
    return reference.linear_reference(x, w, bias)


def lora_linear(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scaling: float | jax.Array,
                bias: jax.Array | None = None, *, implementation: str = "auto") -> jax.Array:
    """x @ w + bias + scaling * (x @ a) @ b with w frozen: x [..., in], w [in, out], a [in, r], b [r, out].

    Gradients flow to x, a, b, scaling and bias; w's cotangent is a symbolic zero (no weight gradient is computed).
    """
    lora.check_lora_shapes(x, w, a, b, scaling, bias)
    impl = resolve("lora", implementation, w.shape[0], w.shape[1], math.prod(x.shape[:-1]), a.shape[1], x.dtype)
    return lora.lora_linear(x, w, a, b, scaling, bias, implementation=impl)


def nf4_linear(x: jax.Array, w: NF4Array, bias: jax.Array | None = None, a: jax.Array | None = None,
               b: jax.Array | None = None, scaling: float | jax.Array = 0.0, *,
               implementation: str = "auto", rounding: str = "dequantize_4bit",
               dequantized: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ dequantize(w).T + bias (+ scaling * (x @ a) @ b) with w ONE NF4 weight [out, in] (HF layout).

    The 16-bit weight exists only inside the call (the backward pass dequantizes again), unless `dequantized` is
    `nf4_weight_for_calls`'s array for this call's token count; gradients flow to x, bias and the LoRA factors
    a [in, r], b [r, out]; none to w. `rounding`: fastlora_jax.nf4.LAYER_ROUNDINGS, the same on every
    implementation ("bitsandbytes": gemv_4bit's weights for a one-token call that nothing differentiates).
    """
    nf4.check_nf4_shapes(x, w, bias, a, b, scaling)
    out_features, in_features = w.shape
    impl = resolve("nf4", implementation, in_features, out_features, math.prod(x.shape[:-1]),
                   0 if a is None else a.shape[1], x.dtype)
    return nf4.nf4_linear(x, w, bias, a, b, scaling, implementation=impl, rounding=rounding, dequantized=dequantized)


def nf4_weight_for_calls(w: NF4Array, tokens: int, dtype, *, implementation: str = "auto",
                         rounding: str = "dequantize_4bit") -> jax.Array | None:
    """ONE NF4 weight dequantized once for many `nf4_linear` calls of `tokens` tokens in dtype (the MLP's token
    chunks): [out, in], the bits each call would dequantize in each pass, to pass as their `dequantized`. None where
    such calls read the NF4 codes themselves (Pallas, "reduce": nothing to share) or where their rounding depends on
    whether they are differentiated ("bitsandbytes" at one token)."""
    from fastlora_jax.nf4 import dequantize_nf4, rounding_of_call

    out_features, in_features = w.shape
    if resolve("nf4", implementation, in_features, out_features, tokens, 0, dtype) in ("pallas", "reduce"):
        return None  # rank 0: "mosaic" (which needs LoRA factors) resolves to "xla" here; both dequantize with XLA
    call_rounding = rounding_of_call(rounding, tokens, in_features, differentiated=True)
    if call_rounding != rounding_of_call(rounding, tokens, in_features, differentiated=False):
        return None
    return dequantize_nf4(w, dtype, call_rounding)
