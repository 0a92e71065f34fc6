"""fastlora-jax: fast LoRA and QLoRA fine-tuning of Llama models in JAX / Flax NNX."""

from fastlora_jax.config import LlamaConfig, preset
from fastlora_jax.fast_language_model import FastLanguageModel
from fastlora_jax.model import Llama
from fastlora_jax.variables import TRAINABLE, Frozen, TrainableBias, TrainableCopy, trainable_mask

__all__ = ["FastLanguageModel", "LlamaConfig", "preset", "Llama", "TRAINABLE", "Frozen", "TrainableBias", "TrainableCopy",
           "trainable_mask"]
