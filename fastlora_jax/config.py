"""LlamaConfig: the frozen description of a Llama-family model, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `rope_scaling` / `rope_parameters`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters of a Llama model (field names follow transformers' LlamaConfig)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every decoder linear layer, keyed by its path inside a decoder layer."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (d, self.q_size),
            "self_attn.k_proj": (d, self.kv_size),
            "self_attn.v_proj": (d, self.kv_size),
            "self_attn.o_proj": (self.q_size, d),
            "mlp.gate_proj": (d, f),
            "mlp.up_proj": (d, f),
            "mlp.down_proj": (f, d),
        }

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Builds a config from a transformers config.json dict; raises on unsupported model types."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        rope_theta = hf.get("rope_theta")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope.get("rope_theta", 10000.0)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling(rope),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers config.json dict for this config."""
        rope = self.rope_scaling
        rope_scaling = None
        if rope.rope_type == "llama3":
            rope_scaling = dict(rope_type="llama3", factor=rope.factor, low_freq_factor=rope.low_freq_factor,
                                high_freq_factor=rope.high_freq_factor,
                                original_max_position_embeddings=rope.original_max_position_embeddings)
        elif rope.rope_type == "linear":
            rope_scaling = dict(rope_type="linear", factor=rope.factor)
        return dict(
            architectures=["LlamaForCausalLM"], model_type="llama",
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=rope_scaling, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias, hidden_act="silu", bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )


# The benchmark shapes of PERFORMANCE.md, and the main job's SmolLM2-135M (random weights; no checkpoint needed).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_scaling=RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """A benchmark-shaped config by name ("llama-3.2-1b", "llama-3.1-8b", "smollm2-135m"), with optional field
    overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
