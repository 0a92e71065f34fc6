"""Mixed precision as Unsloth's trainer means it: `is_bfloat16_supported()`, and the `fp16` / `bf16` training
arguments checked against the dtype the model computes in.

fastlora-jax keeps the trainable weights (LoRA A/B, trained biases, modules_to_save copies) in float32 and computes
in the model's dtype (`from_pretrained(dtype=...)`): a bfloat16 model trains as torch's bf16 autocast over float32
LoRA weights does, a float16 model as fp16 autocast (without its loss scaling), a float32 model in float32. So the
flags select nothing; they must agree with the model, as Unsloth's SFTTrainer requires.
"""

from __future__ import annotations

import re

import numpy as np


def is_bfloat16_supported() -> bool:
    """Whether the default JAX device computes bfloat16 natively, as Unsloth's `is_bfloat16_supported()` (notebooks
    pass `bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported()`): True on NVIDIA GPUs of compute
    capability 8.0 or newer (Ampere, Ada, Hopper, ...: torch.cuda.is_bf16_supported's test), on other GPUs (ROCm)
    and on TPUs; False on older NVIDIA GPUs (T4, V100) and on the CPU (Unsloth without a GPU says False too).
    Asks the device when called (it starts JAX's backend), never at import."""
    import jax

    return bfloat16_supported_on(jax.devices()[0])


def bfloat16_supported_on(device) -> bool:
    """`is_bfloat16_supported()` for one device (a jax Device: its platform and compute_capability)."""
    if device.platform == "cpu":
        return False
    if device.platform != "gpu":
        return True
    capability = cuda_capability(device)
    return capability is None or capability >= (8, 0)  # None: not a CUDA device (ROCm)


def cuda_capability(device) -> tuple[int, int] | None:
    """(major, minor) compute capability of an NVIDIA GPU (a jax Device, whose compute_capability reads "9.0"); None
    for any other device (CPU, TPU, and ROCm GPUs, which report gfx names)."""
    if device.platform != "gpu":
        return None
    match = re.fullmatch(r"(\d+)\.(\d+)", str(getattr(device, "compute_capability", "")))
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def check_mixed_precision(*, fp16: bool, bf16: bool, model_dtype) -> None:
    """Raises TypeError unless the flags agree with the model's compute dtype (see the module docstring): bf16=True
    needs a bfloat16 model, fp16=True a float16 one; both False trains in the model's dtype. Unsloth raises the
    same TypeError for a float16 model with bf16=True and a bfloat16 one with fp16=True; for a float32 model it
    would autocast, which fastlora-jax does by loading the model in 16 bits instead."""
    name = np.dtype(model_dtype).name
    asked = "bfloat16" if bf16 else "float16" if fp16 else None
    if asked is None or asked == name:
        return
    flag = "bf16" if bf16 else "fp16"
    other = {"bfloat16": "bf16=True, fp16=False", "float16": "fp16=True, bf16=False"}.get(name)
    instead = (f"set {other}" if other else
               f"load the model with from_pretrained(dtype={asked!r}) to train in {asked} (the LoRA weights stay "
               f"float32, as under autocast)")
    cpu = (" (on a CPU, dtype=None loads float32 and is_bfloat16_supported() is False, so the notebooks' "
           "`fp16=not is_bfloat16_supported()` asks for float16 there: pass fp16=False, bf16=False)"
           if name == "float32" else "")
    raise TypeError(f"{flag}=True asks for {asked} mixed precision, but the model computes in {name} (its "
                    f"from_pretrained dtype): {instead}, or set fp16=False, bf16=False to train in the model's "
                    f"dtype{cpu}")
