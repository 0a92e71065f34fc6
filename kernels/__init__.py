"""Linear-layer kernels for fastlora_jax: one dispatch point (`api`), pure-jnp references, Pallas kernels.

Import as `fastlora_jax.kernels`; this package never imports the model. Modules: `api` (dispatch, "auto" table),
`lora` (LoRA linear: Pallas fused kernel + XLA, one custom_vjp), `lora_mosaic` (its Hopper GEMM with the rank-r
term in the epilogue), `lora_dy` (the backward's two products of dy in one pass; opt-in), `nf4` (NF4 linear: fused
dequant-matmul + XLA), `nf4_ptx` (the PTX NF4 decodes), `nf4_dequant` (NF4 to 16-bit in one pass; opt-in),
`reference` (the pure-jnp statements of the maths), `_compat` (the Pallas-version corner).
"""

from fastlora_jax.kernels.api import (IMPLEMENTATIONS, PALLAS_FASTER_ON_GPU, linear, lora_linear, nf4_linear,
                                      nf4_weight_for_calls)

__all__ = ["IMPLEMENTATIONS", "PALLAS_FASTER_ON_GPU", "linear", "lora_linear", "nf4_linear", "nf4_weight_for_calls"]
