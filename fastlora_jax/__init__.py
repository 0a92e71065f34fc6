"""fastlora-jax: fast LoRA and QLoRA fine-tuning of Llama models in JAX / Flax NNX."""

from fastlora_jax.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only
from fastlora_jax.config import LlamaConfig, preset
from fastlora_jax.fast_language_model import FastLanguageModel
from fastlora_jax.lora import LoraConfig, get_peft_model
from fastlora_jax.loss import causal_lm_loss, chunked_cross_entropy
from fastlora_jax.model import Llama
from fastlora_jax.precision import is_bfloat16_supported
from fastlora_jax.sft_config import UnslothTrainingArguments
from fastlora_jax.trainer import SFTConfig, SFTTrainer, UnslothTrainer
from fastlora_jax.training import AdamW, make_eval_step, make_train_step
from fastlora_jax.variables import TRAINABLE, Frozen, TrainableBias, TrainableCopy, trainable_mask
from fastlora_jax.xla_options import compiler_options

__all__ = ["FastLanguageModel", "LlamaConfig", "preset", "Llama", "LoraConfig", "get_peft_model", "SFTConfig",
           "SFTTrainer", "UnslothTrainer", "UnslothTrainingArguments", "AdamW", "make_train_step", "make_eval_step",
           "causal_lm_loss", "chunked_cross_entropy", "TRAINABLE", "Frozen", "TrainableBias", "TrainableCopy",
           "trainable_mask", "compiler_options", "is_bfloat16_supported", "train_on_responses_only",
           "standardize_sharegpt", "get_chat_template"]
