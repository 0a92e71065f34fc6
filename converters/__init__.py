"""Hugging Face <-> fastlora_jax: safetensors weights, GGUF, PEFT adapters, merged exports, bitsandbytes 4-bit.

Import as `fastlora_jax.converters`.
"""
