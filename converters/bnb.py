"""bitsandbytes 4-bit checkpoints (Unsloth's `-bnb-4bit` repositories, transformers' `save_pretrained`) <-> NF4Array.

A bnb-4bit linear layer `<prefix>` is stored as six tensors (`BNB_SUFFIXES`): the packed codes `weight` uint8
[ceil(n / 2), 1], `weight.absmax` uint8 [nblocks], `weight.quant_map` float32 [16] (the NF4 table),
`weight.nested_absmax` float32 [ceil(nblocks / 256)], `weight.nested_quant_map` float32 [256] (the dynamic map) and
`weight.quant_state.bitsandbytes__nf4`, the UTF-8 JSON of the rest (quant_type, blocksize, dtype, shape,
nested_blocksize, nested_dtype, nested_offset) as a uint8 tensor. Only 4-bit NF4 with double quantization
(`bnb_4bit_use_double_quant=True`, blocks of 64 and 256, uint8 storage) is supported; anything else is a ValueError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import numpy as np

from fastlora_jax.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, NF4_CODE, NF4Array, dynamic_map, nf4_sizes

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
BNB_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                QUANT_STATE_KEY)
"""The HF key suffixes of one bnb-4bit NF4 linear layer, `f"{prefix}.{suffix}"` (its bias, if any, is separate)."""

SUPPORTED = "bitsandbytes 4-bit NF4 with double quantization (load_in_4bit=True, bnb_4bit_quant_type='nf4', " \
            "bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage='uint8')"
_DTYPES = ("bfloat16", "float16", "float32")
# The nested map is bnb's create_dynamic_map() as torch computes it; builds without FMA differ in the last bit.
_MAP_ATOL = 1e-6


def is_bnb_checkpoint(config: Mapping) -> bool:
    """True if a HF config.json dict declares a bitsandbytes quantization (any variant)."""
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes"


def check_bnb_config(config: Mapping) -> None:
    """Raises ValueError unless the HF config.json dict declares a checkpoint this module can load."""
    qc = config.get("quantization_config")
    if not qc:
        raise ValueError(f"config has no quantization_config; a pre-quantized checkpoint must be {SUPPORTED}")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"quantization_config.quant_method={method!r}; supported: {SUPPORTED}")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"8-bit bitsandbytes checkpoint (load_in_8bit=True, LLM.int8) is not supported; "
                         f"supported: {SUPPORTED}")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"quantization_config has load_in_4bit={qc.get('load_in_4bit')!r}; supported: {SUPPORTED}")
    found = {"bnb_4bit_quant_type": qc.get("bnb_4bit_quant_type", "fp4"),
             "bnb_4bit_use_double_quant": qc.get("bnb_4bit_use_double_quant", False),
             "bnb_4bit_quant_storage": qc.get("bnb_4bit_quant_storage", "uint8")}
    wanted = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "uint8"}
    bad = [f"{k}={v!r}" for k, v in found.items() if v != wanted[k]]
    if bad:
        raise ValueError(f"bitsandbytes checkpoint with {', '.join(bad)} is not supported; supported: {SUPPORTED}")


def quantization_config(compute_dtype: str = "bfloat16") -> dict:
    """The `quantization_config` of config.json for a checkpoint written with `nf4_to_bnb_tensors`, as transformers
    writes it for `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`.
    """
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def bnb_linear_prefixes(keys: Iterable[str]) -> list[str]:
    """The prefixes of the bnb-quantized linear layers among a checkpoint's keys (sorted); raises on fp4 / 8-bit.

    The loader groups `f"{prefix}.{suffix}"` for suffix in BNB_SUFFIXES and calls `bnb_tensors_to_nf4` per prefix.
    """
    prefixes = []
    for key in keys:
        if key.endswith(".weight.quant_state.bitsandbytes__fp4"):
            raise ValueError(f"{key}: an fp4-quantized layer; supported: {SUPPORTED}")
        if key.endswith(".SCB") or key.endswith(".weight_format"):
            raise ValueError(f"{key}: an 8-bit (LLM.int8) layer; supported: {SUPPORTED}")
        if key.endswith("." + QUANT_STATE_KEY):
            prefixes.append(key[:-len(QUANT_STATE_KEY) - 1])
    return sorted(prefixes)


def _quant_state(prefix: str, raw: np.ndarray) -> dict:
    try:
        state = json.loads(bytes(np.asarray(raw, np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{prefix}.{QUANT_STATE_KEY}: not a UTF-8 JSON quant state ({e})") from None
    expected = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "nested_blocksize": NESTED_BLOCKSIZE,
                "nested_dtype": "float32"}
    bad = [f"{k}={state.get(k)!r}" for k, v in expected.items() if state.get(k) != v]
    if bad:
        raise ValueError(f"{prefix}: quant state has {', '.join(bad)}; supported: {SUPPORTED} "
                         f"(blocksize {BLOCKSIZE}, nested blocksize {NESTED_BLOCKSIZE}, float32 nested absmax)")
    if state.get("dtype") not in _DTYPES:
        raise ValueError(f"{prefix}: quant state dtype={state.get('dtype')!r}; accepted: {', '.join(_DTYPES)}")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{prefix}: quant state shape={shape!r}; expected [out, in]")
    return state


def bnb_tensors_to_nf4(config: Mapping | None, prefix: str, tensors: Mapping[str, np.ndarray]) -> NF4Array:
    """One bnb-4bit linear layer -> NF4Array (numpy arrays, bytes unchanged).

    config: the HF config.json dict (its quantization_config is checked; None skips that check).
    tensors: at least the six `f"{prefix}.{suffix}"` keys of BNB_SUFFIXES (others are ignored).
    """
    if config is not None:
        check_bnb_config(config)
    fp4_key = f"{prefix}.weight.quant_state.bitsandbytes__fp4"
    if fp4_key in tensors:
        raise ValueError(f"{fp4_key}: an fp4-quantized layer; supported: {SUPPORTED}")
    missing = [f"{prefix}.{s}" for s in BNB_SUFFIXES if f"{prefix}.{s}" not in tensors]
    if missing:
        raise ValueError(f"{prefix}: bnb-4bit tensors missing: {', '.join(missing)} (a bnb NF4 layer has "
                         f"{', '.join(BNB_SUFFIXES)})")
    get = {s: np.asarray(tensors[f"{prefix}.{s}"]) for s in BNB_SUFFIXES}
    state = _quant_state(prefix, get[QUANT_STATE_KEY])
    shape = tuple(state["shape"])
    nbytes, nblocks, nnested = nf4_sizes(shape)
    want = {"weight": ((nbytes, 1), np.uint8), "weight.absmax": ((nblocks,), np.uint8),
            "weight.quant_map": ((16,), np.float32), "weight.nested_absmax": ((nnested,), np.float32),
            "weight.nested_quant_map": ((256,), np.float32)}
    for suffix, (wshape, wdtype) in want.items():
        got = get[suffix]
        if got.dtype != wdtype or (got.shape != wshape and not (suffix == "weight" and got.shape == (nbytes,))):
            raise ValueError(f"{prefix}.{suffix}: {got.dtype} {got.shape}; a bnb NF4 weight of shape {shape} "
                             f"stores {np.dtype(wdtype)} {wshape}")
    if not np.array_equal(get["weight.quant_map"], NF4_CODE):
        raise ValueError(f"{prefix}.weight.quant_map is not the NF4 table (an fp4 or custom 4-bit map?): "
                         f"{get['weight.quant_map'].tolist()}; supported: {SUPPORTED}")
    if not np.allclose(get["weight.nested_quant_map"], dynamic_map(), rtol=0, atol=_MAP_ATOL):
        raise ValueError(f"{prefix}.weight.nested_quant_map is not bitsandbytes' 8-bit dynamic map; "
                         f"supported: {SUPPORTED}")
    offset = np.asarray(state.get("nested_offset"), np.float32)
    if offset.shape != () or not np.isfinite(offset):
        raise ValueError(f"{prefix}: quant state nested_offset={state.get('nested_offset')!r}; expected a float")
    return NF4Array(get["weight"].reshape(-1), get["weight.absmax"], get["weight.nested_absmax"], offset,
                    shape=shape, dtype=state["dtype"])


def nf4_to_bnb_tensors(prefix: str, t: NF4Array) -> dict[str, np.ndarray]:
    """One NF4Array (a single weight, no stack axes) -> the six bnb-4bit tensors, as transformers saves them."""
    if t.stack:
        raise ValueError(f"nf4_to_bnb_tensors({prefix!r}): expected one weight, got stack axes {t.stack}; "
                         "index the stack first (t[i])")
    state = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "dtype": np.dtype(t.dtype).name, "shape": list(t.shape),
             "nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
             "nested_offset": float(np.asarray(t.offset, np.float32))}
    return {
        f"{prefix}.weight": np.asarray(t.packed, np.uint8).reshape(-1, 1),
        f"{prefix}.weight.absmax": np.asarray(t.absmax_q, np.uint8),
        f"{prefix}.weight.quant_map": NF4_CODE.copy(),
        f"{prefix}.weight.nested_absmax": np.asarray(t.nested_absmax, np.float32),
        f"{prefix}.weight.nested_quant_map": dynamic_map().copy(),
        f"{prefix}.{QUANT_STATE_KEY}": np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy(),
    }
