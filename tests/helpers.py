"""Test helpers shared by the test files (tests/ is on sys.path through pytest's `pythonpath`)."""

from __future__ import annotations

import numpy as np

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)


def make_hf_llama(path, seed: int = 0, torch_dtype=None, **overrides):
    """Writes a random transformers LlamaForCausalLM to `path`; returns the torch model (float32, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so loading mistakes show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    if torch_dtype is not None:
        model.to(torch_dtype).save_pretrained(path)
        model.float()
    else:
        model.save_pretrained(path)
    return model


def all_eqns(jaxpr):
    """Every equation of a jaxpr, including those inside sub-jaxprs (jit, scan, custom_vjp, checkpoint, Pallas)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)


def dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr and its sub-jaxprs."""
    return [tuple(e.outvars[0].aval.shape) for e in all_eqns(jaxpr) if e.primitive.name == "dot_general"]


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges; vocab 259) with ChatML specials and template, as
    SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab.update({s: 256 + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf
