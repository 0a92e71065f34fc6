"""GGUF (llama.cpp) <-> Hugging Face Llama: read a file's config, dequantized tensors and tokenizer; write one.

Reading follows transformers' GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`): the same config
fields, the same tensors (dequantized with `gguf.quants.dequantize`, llama.cpp's Q/K row permutation undone), so
what we load equals what transformers loads from the same file. Tensors stream one at a time from the memory-mapped
file. Writing is the inverse, with the `gguf` package's `GGUFWriter`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from fastlora_jax.converters.gguf_tokenizer import (  # noqa: F401  re-exported: the tokenizer half of GGUF
    LLAMA3_PRE, LLAMA3_SPLIT, TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_UNUSED, TOKEN_USER_DEFINED,
    _OTHER_SPLIT_PRE, _add_tokenizer, _byte_alphabet, _byte_level_tokenizer, _field_value, _tokenizer_from_reader,
    _tokenizer_metadata, load_gguf_tokenizer)

SUPPORTED_ARCHITECTURES = ("llama",)
QUANTIZATION_METHODS = ("f32", "f16", "bf16", "q8_0")

# GGUF tensor names (llama.cpp's `blk.N.*`) <-> Hugging Face Llama names; the data both directions read.
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_LAYER_NAMES = {hf: gg for gg, hf in LAYER_NAMES.items()}
_HF_GLOBAL_NAMES = {hf: gg for gg, hf in GLOBAL_NAMES.items()}
# Tensors that describe no weight of the HF model: RoPE frequency factors (read into the config) and the
# precomputed rotary tables some old conversions carry.
_NON_WEIGHT = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight")
# Metadata arrays only the tokenizer needs; parsed on demand.
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.merges")


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for a non-weight tensor."""
    if _NON_WEIGHT.fullmatch(name):
        return None
    base, _, suffix = name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        if m[2] in LAYER_NAMES:
            return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.{suffix}"
    elif base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(
        f"GGUF tensor {name!r} has no Hugging Face Llama counterpart; known tensors: "
        f"{', '.join(GLOBAL_NAMES)}, blk.N.{{{', '.join(LAYER_NAMES)}}}"
    )


def hf_to_gguf_name(key: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    base, _, suffix = key.rpartition(".")
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base):
        if m[2] in _HF_LAYER_NAMES:
            return f"blk.{m[1]}.{_HF_LAYER_NAMES[m[2]]}.{suffix}"
    elif base in _HF_GLOBAL_NAMES:
        return f"{_HF_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(
        f"Hugging Face key {key!r} has no GGUF counterpart; known modules: {', '.join(_HF_GLOBAL_NAMES)}, "
        f"model.layers.N.{{{', '.join(_HF_LAYER_NAMES)}}}"
    )


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (as convert_hf_to_gguf.py); w is [n_heads*hd, ...]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_qk`: llama.cpp rows -> HF rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(*, head_dim: int, rope_theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """[head_dim // 2] float32 frequency divisors of llama3 RoPE scaling: llama.cpp's `rope_freqs.weight`."""
    inv = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)  # float32, as llama.cpp
    wavelen = 2 * math.pi / inv.astype(np.float64)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0,
                   np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, medium))
    return out.astype(np.float32)


def _llama3_from_factors(factors: np.ndarray, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
    """Recovers transformers' llama3 `rope_scaling` from llama.cpp's `rope_freqs.weight` (None if all ones).

    The factors depend on (original_max, low, high) only through original_max / (high - low) and
    low / (high - low), so low_freq_factor is fixed at 1 and the rest solved from the smoothed band
    (with high_freq_factor = 4, Llama 3's value, when that band has fewer than two frequencies).
    """
    f = factors.astype(np.float64)
    factor = float(f.max())
    if np.allclose(f, 1.0):
        return None
    inv = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * math.pi / inv.astype(np.float64)
    medium = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    smooth = (1 / f - 1 / factor) / (1 - 1 / factor)  # = original_max / wavelen / span - 1 / span in the band
    if medium.sum() >= 2:
        slope, offset = np.polyfit(1 / wavelen[medium], smooth[medium], 1)
        span = -1.0 / offset
        original = slope * span
    elif medium.sum() == 1:
        span = 3.0
        original = (smooth[medium][0] * span + 1) * wavelen[medium][0]
    else:  # a step from 1 to `factor` between two frequencies: any band between them reproduces it
        first = int(np.argmax(f > 1))
        original = math.ceil(wavelen[first]) - 1
        span = math.sqrt(original / wavelen[first - 1]) - 1 if first > 0 else 3.0  # band clear of both
    rope = dict(rope_type="llama3", factor=round(factor, 6), low_freq_factor=1.0,
                high_freq_factor=round(1.0 + float(span), 6), original_max_position_embeddings=int(round(original)))
    again = llama3_rope_factors(head_dim=head_dim, rope_theta=rope_theta,
                                **{k: v for k, v in rope.items() if k != "rope_type"})
    if not np.allclose(again, factors, rtol=1e-4, atol=0):
        raise ValueError(f"rope_freqs.weight {np.round(f, 4).tolist()} is not a llama3 RoPE scaling; "
                         f"the closest, {rope}, gives {np.round(again, 4).tolist()}")
    return rope


class GGUFCheckpoint:
    """A llama GGUF file opened for reading (memory-mapped; tensors are dequantized only when asked for).

    `hf_config` is the transformers config.json dict; `tensors()` streams `(hf_key, float32 [out, in] array)`.
    """

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        self._reader = gguf.GGUFReader(self.path, "r")
        self.metadata: dict[str, Any] = {
            key: _field_value(field) for key, field in self._reader.fields.items()
            if key not in _TOKENIZER_ARRAYS
        }
        self.architecture = self.metadata.get("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self._by_hf_key = {}
        for t in self._reader.tensors:
            if (key := gguf_to_hf_name(t.name)) is not None:
                self._by_hf_key[key] = t
        self.hf_config = self._build_hf_config()

    def _build_hf_config(self) -> dict[str, Any]:
        md, arch = self.metadata, self.architecture
        get = lambda name, default=None: md.get(f"{arch}.{name}", default)  # noqa: E731
        required = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
        if missing := [f"{arch}.{name}" for name in required if get(name) is None]:
            raise ValueError(f"{self.path}: GGUF metadata lacks {', '.join(missing)}; a llama file states "
                             f"{', '.join(f'{arch}.{name}' for name in required)}")
        hidden, heads = get("embedding_length"), get("attention.head_count")
        vocab_size = get("vocab_size")
        if vocab_size is None and "tokenizer.ggml.tokens" in self._reader.fields:
            vocab_size = len(self._reader.fields["tokenizer.ggml.tokens"].data)
        if vocab_size is None:
            vocab_size = self.shapes()["model.embed_tokens.weight"][0]
        head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
        rope_theta = float(get("rope.freq_base", 10000.0))
        config: dict[str, Any] = dict(
            architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size,
            hidden_size=hidden, intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"), num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=rope_theta,
            max_position_embeddings=get("context_length", 2048),
            tie_word_embeddings="lm_head.weight" not in self._by_hf_key,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._by_hf_key,
            mlp_bias="model.layers.0.mlp.up_proj.bias" in self._by_hf_key,
            hidden_act="silu",
        )
        for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
            if f"tokenizer.ggml.{key}" in md:
                config[name] = md[f"tokenizer.ggml.{key}"]
        if (rope_scaling := self._rope_scaling(head_dim, rope_theta)) is not None:
            config["rope_scaling"] = rope_scaling
        return config

    def _rope_scaling(self, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
        get = lambda name, default=None: self.metadata.get(f"{self.architecture}.{name}", default)  # noqa: E731
        kind = get("rope.scaling.type") or ("linear" if get("rope.scale_linear") else None)
        freqs = next((t for t in self._reader.tensors if t.name == "rope_freqs.weight"), None)
        if freqs is not None:
            import gguf

            factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1)
            return _llama3_from_factors(factors, head_dim, rope_theta)
        if kind in (None, "none"):
            return None
        factor = float(get("rope.scaling.factor") or get("rope.scale_linear") or 1.0)
        rope: dict[str, Any] = dict(rope_type=kind, factor=factor)
        if (original := get("rope.scaling.original_context_length")) is not None:
            rope["original_max_position_embeddings"] = original
        return rope

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """HF key -> HF shape ([out, in] for linear weights), without reading any tensor data."""
        return {key: tuple(int(d) for d in reversed(t.shape)) for key, t in self._by_hf_key.items()}

    def tensor(self, key: str) -> np.ndarray:
        """One tensor by HF key: dequantized float32, in HF layout, Q/K permutation undone."""
        import gguf

        if key not in self._by_hf_key:
            raise KeyError(f"{self.path} has no tensor {key!r}; it has {len(self._by_hf_key)} tensors, e.g. "
                           f"{', '.join(list(self._by_hf_key)[:4])}")
        t = self._by_hf_key[key]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        w = np.array(w, dtype=np.float32, order="C", copy=True)  # detach from the memory map
        if ".self_attn.q_proj." in key:
            w = unpermute_qk(w, self.hf_config["num_attention_heads"])
        elif ".self_attn.k_proj." in key:
            w = unpermute_qk(w, self.hf_config["num_key_value_heads"])
        return w

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Streams `(hf_key, float32 array in HF layout)` one tensor at a time, in file order."""
        for key in self._by_hf_key:
            yield key, self.tensor(key)

    def tokenizer(self):
        """The transformers tokenizer this file describes (see `load_gguf_tokenizer`)."""
        return _tokenizer_from_reader(self._reader, self.path)

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {len(self._by_hf_key)} tensors)"


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Opens a llama GGUF file; raises ValueError for other architectures, FileNotFoundError if absent."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    return GGUFCheckpoint(path)


# --- writing ----------------------------------------------------------------------------------------------------


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of every tensor a llama config implies (lm_head only when untied)."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    q, kv = heads * hd, (cfg.get("num_key_value_heads") or heads) * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    linears = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
               "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
        for name, shape in linears.items():
            shapes[p + name + ".weight"] = shape
            if cfg.get("attention_bias") and name.startswith("self_attn") or cfg.get("mlp_bias") and name.startswith("mlp"):
                shapes[p + name + ".bias"] = shape[:1]
    return shapes


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    rope.setdefault("rope_type", rope.get("type", "default"))
    return float(theta), rope


def _encode(w: np.ndarray, key: str, method: str) -> tuple[np.ndarray, Any]:
    """(array to store, ggml type) for one HF-layout float32 tensor under a quantization method."""
    import gguf

    T = gguf.GGMLQuantizationType
    if w.ndim == 1 or method == "f32":
        return w.astype(np.float32), T.F32  # norms and biases stay float32, as llama.cpp writes them
    if method == "bf16":
        return gguf.quants.quantize(w, T.BF16), T.BF16
    if method == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return gguf.quants.quantize(w, T.Q8_0), T.Q8_0
    with np.errstate(over="ignore"):
        half = w.astype(np.float16)  # f16, and q8_0's fallback for rows that are not whole blocks (as llama.cpp)
    if not np.isfinite(half).all():
        raise ValueError(f"{key}: values up to {np.abs(w).max():.4g} overflow float16; use quantization_method='bf16'")
    return half, T.F16




def write_gguf(path: str | os.PathLike, hf_config: dict[str, Any], tensors: Iterable[tuple[str, np.ndarray]],
               tokenizer: Any = None, quantization_method: str = "f16") -> Path:
    """Writes a llama GGUF from HF-layout tensors; transformers' GGUF loader and llama.cpp read it.

    `tensors` yields `(hf_key, array [out, in])` one at a time (streamed through a spooled temporary file);
    `lm_head.weight` is dropped when the config ties it. Linear weights are stored as `quantization_method`
    ("f32", "f16", "bf16" or "q8_0"), norms and biases as float32. Written to a temporary name, then renamed.
    """
    import gguf

    if quantization_method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization_method={quantization_method!r} is not supported; supported: "
                         f"{', '.join(QUANTIZATION_METHODS)}")
    cfg = hf_config
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type={cfg.get('model_type')!r} cannot be written to GGUF; supported: llama")
    theta, rope = _rope(cfg)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type={rope['rope_type']!r} cannot be written to GGUF; supported: default, linear, llama3")
    path = Path(path)
    expected = _expected_shapes(cfg)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization_method]

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama", use_temp_file=True)
    try:
        writer.add_name(str(cfg.get("_name_or_path") or "fastlora-jax export"))
        writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(cfg["hidden_size"])
        writer.add_block_count(cfg["num_hidden_layers"])
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_rope_dimension_count(head_dim)
        if head_dim != cfg["hidden_size"] // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        if tokenizer is not None:
            _add_tokenizer(writer, tokenizer, cfg["vocab_size"], cfg)
        if rope["rope_type"] == "llama3":
            writer.add_tensor("rope_freqs.weight", llama3_rope_factors(
                head_dim=head_dim, rope_theta=theta, factor=float(rope.get("factor", 8.0)),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192))))
        written = set()
        for key, w in tensors:
            if key == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
                continue
            if key not in expected:
                raise ValueError(f"unexpected tensor {key!r} for this config (hf_to_gguf: {hf_to_gguf_name(key)!r})")
            w = np.asarray(w, dtype=np.float32)
            if w.shape != expected[key]:
                raise ValueError(f"{key}: shape {w.shape} does not match the config's {expected[key]}")
            if ".self_attn.q_proj." in key:
                w = permute_qk(w, heads)
            elif ".self_attn.k_proj." in key:
                w = permute_qk(w, kv_heads)
            data, qtype = _encode(np.ascontiguousarray(w), key, quantization_method)
            writer.add_tensor(hf_to_gguf_name(key), data, raw_dtype=qtype)
            written.add(key)
        if missing := [k for k in expected if k not in written]:
            raise ValueError(f"missing tensors: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if writer.temp_file is not None:
            writer.temp_file.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
