"""NF4 weights while loading: quantize each decoder linear weight as it streams (load_in_4bit=True), or take a
pre-quantized bitsandbytes checkpoint's NF4 tensors as they are (its 16-bit decoder layers, if any, quantized as
they stream). Never a 16-bit copy of the whole model.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable, Iterator

import numpy as np

from fastlora_jax.converters import bnb
from fastlora_jax.converters.hf_llama import LINEAR_NAMES
from fastlora_jax.nf4 import NF4Array, quantize_nf4, stack_nf4

_LINEAR_KEY = re.compile(r"model\.layers\.(\d+)\.(" + "|".join(re.escape(n) for n in LINEAR_NAMES) + r")\.(.+)")


class NF4Collector:
    """Takes the decoder linear layers' tensors out of a stream and keeps them as per-layer NF4Arrays.

    `filter(tensors)` yields every other tensor unchanged; afterwards `stacked(name)` gives the [L]-stacked
    NF4Array of a linear layer (e.g. "self_attn.q_proj") and `biases(name)` its stacked bias or None.
    """

    def __init__(self, num_layers: int, dtype: np.dtype, hf_config: dict | None = None):
        self.num_layers, self.dtype = num_layers, np.dtype(dtype)
        self.prequantized = hf_config is not None and bnb.is_bnb_checkpoint(hf_config)
        if self.prequantized:
            bnb.check_bnb_config(hf_config)
        self.hf_config = hf_config
        self.weights: dict[str, dict[int, NF4Array]] = {name: {} for name in LINEAR_NAMES}
        self.bias: dict[str, dict[int, np.ndarray]] = {name: {} for name in LINEAR_NAMES}
        self._pending: dict[str, dict[str, np.ndarray]] = {}  # bnb prefix -> its tensors seen so far
        self.quantized_here: dict[str, list[int]] = {name: [] for name in LINEAR_NAMES}  # 16-bit in a bnb checkpoint

    def filter(self, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        for key, tensor in tensors:
            m = _LINEAR_KEY.fullmatch(key)
            if m is None or int(m.group(1)) >= self.num_layers:
                yield key, tensor
                continue
            layer, name, suffix = int(m.group(1)), m.group(2), m.group(3)
            if suffix == "bias":
                self.bias[name][layer] = np.asarray(tensor).astype(self.dtype)
            elif suffix == "weight" and not (self.prequantized and np.asarray(tensor).dtype == np.uint8):
                # A 16-bit weight: cast to the model dtype first (as transformers does before bitsandbytes
                # quantizes), then NF4. In a pre-quantized checkpoint it is a layer kept in 16-bit
                # (llm_int8_skip_modules, as Unsloth's dynamic 4-bit checkpoints): a projection's layers share one
                # format here.
                self.weights[name][layer] = quantize_nf4(np.asarray(tensor).astype(self.dtype))
                if self.prequantized:
                    self.quantized_here[name].append(layer)
            elif self.prequantized and suffix in bnb.BNB_SUFFIXES:
                prefix = f"model.layers.{layer}.{name}"
                group = self._pending.setdefault(prefix, {})
                group[key] = np.asarray(tensor)
                if len(group) == len(bnb.BNB_SUFFIXES):
                    self.weights[name][layer] = bnb.bnb_tensors_to_nf4(None, prefix, self._pending.pop(prefix))
            else:
                yield key, tensor  # let the loader report it as unexpected

    def stacked(self, name: str) -> NF4Array:
        """The [L]-stacked NF4 weight of one linear layer name; raises naming any layer that never arrived."""
        got = self.weights[name]
        missing = [f"model.layers.{i}.{name}.weight" for i in range(self.num_layers) if i not in got]
        if missing:
            raise ValueError(f"checkpoint does not fit the model: missing keys: {', '.join(missing[:20])}")
        if self.quantized_here[name]:
            layers = ", ".join(f"model.layers.{i}.{name}" for i in sorted(self.quantized_here[name]))
            warnings.warn(f"the bitsandbytes checkpoint keeps {layers} in 16-bit (llm_int8_skip_modules); every "
                          f"layer's {name} shares one format here, so these were quantized to NF4 on load, as "
                          "load_in_4bit=True does (their outputs differ from transformers' 16-bit ones by NF4's "
                          "rounding)", stacklevel=4)
        return stack_nf4([got[i] for i in range(self.num_layers)])

    def biases(self, name: str) -> np.ndarray | None:
        got = self.bias[name]
        if not got:
            return None
        missing = [f"model.layers.{i}.{name}.bias" for i in range(self.num_layers) if i not in got]
        if missing:
            raise ValueError(f"checkpoint does not fit the model: missing keys: {', '.join(missing[:20])}")
        return np.stack([got[i] for i in range(self.num_layers)])
