"""Hugging Face Llama checkpoints <-> fastlora_jax parameter paths.

The mapping is data (`KEY_TABLE`): a HF key pattern, our path, and the transform between the two layouts. One
function, `load_into`, streams tensors one at a time into preallocated stacked host buffers and raises on missing,
unexpected or mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Iterator

import numpy as np

LAYER = r"model\.layers\.(\d+)\."


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One row of the mapping: HF key regex -> our flat state path; `transpose` HF [out, in] <-> our [in, out]."""

    hf_pattern: str  # regex; a layer rule has one group, the layer index
    path: tuple[str, ...]  # our state path (the stacked one for layer rules)
    transpose: bool = False

    @property
    def per_layer(self) -> bool:
        return self.hf_pattern.startswith(LAYER)

    def hf_key(self, layer: int | None = None) -> str:
        key = self.hf_pattern.replace("\\.", ".")
        return key.replace("(\\d+)", str(layer)) if self.per_layer else key


def _linear_rules(hf_name: str, our: tuple[str, ...]) -> list[KeyRule]:
    return [KeyRule(LAYER + re.escape(hf_name) + r"\.weight", our + ("weight",), transpose=True),
            KeyRule(LAYER + re.escape(hf_name) + r"\.bias", our + ("bias",))]


LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"model\.embed_tokens\.weight", ("model", "embed_tokens", "weight")),
    KeyRule(r"model\.norm\.weight", ("model", "norm", "weight")),
    KeyRule(r"lm_head\.weight", ("lm_head", "weight"), transpose=True),
    KeyRule(LAYER + r"input_layernorm\.weight", ("model", "layers", "input_layernorm", "weight")),
    KeyRule(LAYER + r"post_attention_layernorm\.weight", ("model", "layers", "post_attention_layernorm", "weight")),
    *[rule for name in LINEAR_NAMES
      for rule in _linear_rules(name, ("model", "layers", *name.split(".")))],
)

# Keys some checkpoints carry that the model does not use.
IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|lm_head\.weight)$")


def match(hf_key: str) -> tuple[KeyRule, int | None] | None:
    """The rule for a HF key and its layer index (None for non-layer keys), or None if no rule matches."""
    for rule in KEY_TABLE:
        m = re.fullmatch(rule.hf_pattern, hf_key)
        if m:
            return rule, (int(m.group(1)) if rule.per_layer else None)
    return None


def to_ours(rule: KeyRule, tensor: np.ndarray) -> np.ndarray:
    """HF layout -> our layout (a transpose for linear weights)."""
    return tensor.T if rule.transpose else tensor


def to_hf(rule: KeyRule, tensor: np.ndarray) -> np.ndarray:
    """Our layout -> HF layout."""
    return tensor.T if rule.transpose else tensor


# --------------------------------------------------------------------------------------------- safetensors I/O

def safetensors_files(directory: str) -> list[str]:
    """The safetensors shards of a HF checkpoint directory (single file or sharded with an index)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(
        f"{directory!r} holds no model.safetensors nor model.safetensors.index.json "
        f"(files: {', '.join(sorted(os.listdir(directory))[:12])})")


def iter_safetensors(directory: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, numpy array) one tensor at a time from every shard (memory-mapped, no full copy)."""
    from safetensors import safe_open

    for path in safetensors_files(directory):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


# --------------------------------------------------------------------------------------------- loading

def load_into(expected: dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]],
              tensors: Iterable[tuple[str, np.ndarray]],
              num_layers: int,
              *,
              tie_word_embeddings: bool,
              put: Callable[[tuple[str, ...], np.ndarray], object] = lambda path, array: array,
              convert: Callable[[tuple[str, ...], list[np.ndarray]], object] | None = None,
              ) -> dict[tuple[str, ...], object]:
    """Streams HF tensors into our flat state.

    expected: our path -> (shape, dtype) of every leaf the model has (stacked leaves have a leading [L] axis).
    tensors: (HF key, array in HF layout), one at a time.
    put: called once per completed leaf with the host buffer; returns what goes into the state (e.g. a device array),
      so the host copy can be dropped as soon as a leaf is complete.
    Raises ValueError naming every missing, unexpected or mis-shaped key.
    """
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], set[int]] = {}
    out: dict[tuple[str, ...], object] = {}
    unexpected, misshaped = [], []
    for hf_key, tensor in tensors:
        found = match(hf_key)
        if found is None or found[0].path not in expected:
            if not (IGNORED.fullmatch(hf_key) and (found is None or tie_word_embeddings)):
                unexpected.append(hf_key)
            continue
        rule, layer = found
        shape, dtype = expected[rule.path]
        value = to_ours(rule, tensor)
        want = shape[1:] if rule.per_layer else shape
        if tuple(value.shape) != tuple(want):
            hf_want = tuple(reversed(want)) if rule.transpose else tuple(want)
            misshaped.append(f"{hf_key}: checkpoint has {tuple(tensor.shape)}, model expects {hf_want}")
            continue
        if rule.per_layer:
            if layer >= num_layers:
                unexpected.append(hf_key)
                continue
            if rule.path not in buffers:
                buffers[rule.path] = np.empty(shape, dtype)
                filled[rule.path] = set()
            buffers[rule.path][layer] = value.astype(dtype)
            filled[rule.path].add(layer)
            if len(filled[rule.path]) == num_layers:
                out[rule.path] = put(rule.path, buffers.pop(rule.path))
        else:
            out[rule.path] = put(rule.path, np.ascontiguousarray(value.astype(dtype)))
            filled[rule.path] = {0}
    missing = []
    for path, (shape, _) in expected.items():
        if path in out:
            continue
        rule = next(r for r in KEY_TABLE if r.path == path)
        if rule.per_layer:
            done = filled.get(path, set())
            missing += [rule.hf_key(i) for i in range(num_layers) if i not in done]
        else:
            missing.append(rule.hf_key())
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if misshaped:
        problems.append("mis-shaped tensors: " + "; ".join(misshaped[:20]))
    if problems:
        raise ValueError("checkpoint does not fit the model: " + " | ".join(problems))
    return out


def our_path_to_hf(path: tuple[str, ...], layer: int | None = None) -> tuple[str, KeyRule]:
    """The HF key of one of our leaves (a layer index for stacked leaves) and its rule."""
    for rule in KEY_TABLE:
        if rule.path == path:
            return rule.hf_key(layer), rule
    raise KeyError(f"no HF key for our path {'.'.join(path)}")


def read_config(directory: str) -> dict:
    """config.json of a HF checkpoint directory."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} has no config.json")
    with open(path) as f:
        return json.load(f)
