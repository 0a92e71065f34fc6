"""Linear-layer kernels for fastlora_jax: one dispatch point (`api`), pure-jnp references, Pallas kernels.

Import as `fastlora_jax.kernels`; this package never imports the model. Modules: `api` (dispatch, "auto" table),
`lora` (LoRA linear: Pallas fused kernel + XLA, one custom_vjp), `lora_mosaic` (its Hopper GEMM with the rank-r
term in the epilogue), `lora_dy` (the backward's two products of dy in one pass; opt-in), `nf4` (NF4 linear: fused
dequant-matmul + XLA), `nf4_ptx` (the PTX NF4 decodes), `nf4_dequant` (NF4 to 16-bit in one pass; opt-in),
`reference` (the pure-jnp statements of the maths), `_compat` (the Pallas-version corner).
"""

import sys

if __name__ == "kernels":
    # Imported as a top-level `kernels`: Python was started in the repository root, whose `kernels/` folder (this
    # package, installed as fastlora_jax.kernels) then shadows Hugging Face's `kernels` package, which transformers
    # and peft import. Load that package in this module's place, as if the root were not on the path.
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (Hugging Face's; the repository's kernels/ folder is "
                                  "fastlora_jax.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from fastlora_jax.kernels.api import (IMPLEMENTATIONS, PALLAS_FASTER_ON_GPU, linear, lora_linear, nf4_linear,
                                          nf4_weight_for_calls)

    __all__ = ["IMPLEMENTATIONS", "PALLAS_FASTER_ON_GPU", "linear", "lora_linear", "nf4_linear",
               "nf4_weight_for_calls"]
