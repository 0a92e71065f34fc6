"""XLA compiler options for jitted LoRA training steps, passed per jit (`jax.jit(..., compiler_options=...)`).

One option, measured on an NVIDIA H200 (JAX 0.11.2, benchmarks/RESULTS.md "Session 5"): with Triton GEMM fusions
off, XLA hands every matmul to cuBLAS through its GEMM rewriter, which folds an addend into the GEMM (cuBLAS beta = 1).
A LoRA layer's sum `x @ w + (s * x @ a) @ b` then costs no separate pass over the [tokens, out] output: the rank-r
product is written once and the base GEMM reads it back as its C operand. With Triton GEMMs on (XLA's default),
the bf16 matmuls become Triton fusions or autotuned cuBLAS calls after the rewriter ran, and every LoRA sum is a
separate add (two [tokens, out] reads and one write). The 8B training step ("dots", 4 x 2048) ran 3.5% faster
with the option (16,913 against 16,338 tokens/s in one call), held 0.36 GiB less and compiled in 33 s instead of 44
(no autotuning of Triton tiles).

The second option is for the modes that offload to host memory ("unsloth", "long_context"). By default the backward
scan fetches each layer's input from pinned host memory at the top of that layer's iteration, on the compute
stream, so every transfer (64 MiB per 8B layer at 4 x 2048 tokens, 1.2 ms) stalls the GPU; with pipelined host
offloading XLA fetches it one iteration ahead on a copy stream, behind the previous layer's backward pass. 8B
"unsloth" ran 3.0% faster with it (12,282 against 11,924 tokens/s in one call; QLoRA 12,122 against 11,756), for
0.12 GiB more device memory (presumably the buffers fetched ahead).

Both are GPU debug options; other backends ignore them. Use them in your own loop as `fastlora_jax.make_train_step`
does::

    step = jax.jit(train_step, compiler_options=fastlora_jax.compiler_options())
"""

from __future__ import annotations

from typing import Any

# Triton GEMM fusions off: cuBLAS for every matmul, so the LoRA additions fuse into the GEMMs (see above).
# Pipelined host offloading: the offloading modes' layer inputs come back one scan iteration ahead (see above).
_TRAINING_OPTIONS = (("xla_gpu_enable_triton_gemm", False), ("xla_gpu_enable_pipelined_host_offloading", True))


def compiler_options(*overrides: str) -> dict[str, Any]:
    """A fresh dict of the XLA options fastlora_jax compiles its train and eval steps with (safe on any backend),
    updated by `overrides`, each "NAME=VALUE" (VALUE "true" / "false" become booleans, anything else stays text)."""
    options: dict[str, Any] = dict(_TRAINING_OPTIONS)
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"XLA option {item!r}: expected NAME=VALUE, e.g. 'xla_gpu_enable_triton_gemm=true'")
        options[name] = {"true": True, "false": False}.get(value.lower(), value)
    return options
