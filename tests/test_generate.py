"""KV-cache generation: greedy tokens equal argmax decoding by full forward passes (16-bit, LoRA, NF4 base), and
transformers' greedy `generate` on the same checkpoint; end tokens, sampling, buckets, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastlora_jax import generate as gen
from fastlora_jax.config import LlamaConfig
from fastlora_jax.linear import LoraLinear
from fastlora_jax.loading import random_model

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=None)
PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def _model(seed: int = 1):
    model = random_model(CONFIG, seed=seed)
    # Random weights of scale 0.02 give nearly flat logits; larger ones give clear argmax margins.
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] == "weight" and var[...].ndim >= 2:
            var.value = var[...] * 25.0
    return model


def _prompts(seed: int = 0):
    """Three prompts of lengths 7, 4 and 6, left-padded to [3, 7]: (ids, mask)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (3, 7))
    mask = np.ones((3, 7), np.int32)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return np.where(mask == 1, ids, 0), mask


def _reference_greedy(model, ids, mask, new: int, repetition_penalty: float | None = None) -> np.ndarray:
    """Argmax decoding by full forward passes without cache or mask: each row unpadded, starting at slot 0; with a
    penalty, transformers' RepetitionPenaltyLogitsProcessor sees each row's tokens so far (padding aside)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    lengths = mask.sum(axis=1)
    buffer = np.zeros((len(ids), ids.shape[1] + new), np.int32)  # later slots never reach earlier ones (causal)
    for b, (row, m) in enumerate(zip(ids, mask)):
        buffer[b, :lengths[b]] = row[m.astype(bool)]
    for step in range(new):
        logits = np.asarray(forward(state, jnp.asarray(buffer)))  # [B, S, V]
        for b in range(len(ids)):
            scores = logits[b, lengths[b] + step - 1]  # [V]
            if repetition_penalty is not None:
                import torch
                from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

                so_far = torch.tensor(buffer[None, b, :lengths[b] + step], dtype=torch.long)  # [1, n]
                scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(so_far, torch.tensor(scores[None]))
                scores = scores.numpy()[0]
            buffer[b, lengths[b] + step] = np.argmax(scores)
    return np.stack([buffer[b, lengths[b]:lengths[b] + new] for b in range(len(ids))])


def _add_lora(model, r: int = 4, seed: int = 0):
    """Unmerged LoRA with random non-zero A and B on every projection."""
    L = CONFIG.num_hidden_layers
    keys = iter(jax.random.split(jax.random.key(seed), 20))
    for group, names in PROJECTIONS:
        parent = getattr(model.model.layers, group)
        for name in names:
            base = getattr(parent, name)
            a = jax.random.normal(next(keys), (L, base.in_features, r)) * 0.3
            b = jax.random.normal(next(keys), (L, r, base.out_features)) * 0.3
            setattr(parent, name, LoraLinear(base, r=r, scaling=2.0, dropout=0.1, lora_a=a, lora_b=b,
                                             layer_scale=jnp.array([2.0, 0.5])))
    return model


def _to_nf4(model):
    """Replaces every projection with an NF4Linear holding its quantized weight."""
    from fastlora_jax import nf4

    for group, names in PROJECTIONS:
        parent = getattr(model.model.layers, group)
        for name in names:
            w = np.asarray(getattr(parent, name).weight[...])  # [L, in, out]
            stacked = nf4.stack_nf4([nf4.quantize_nf4(w[i].T) for i in range(w.shape[0])])
            setattr(parent, name, nf4.NF4Linear.from_nf4(stacked))
    return model


@pytest.mark.parametrize("variant", ["16bit", "lora", "nf4", "nf4_lora"])
def test_greedy_with_cache_equals_full_forward_argmax(variant):
    model = _model()
    if variant.startswith("nf4"):
        model = _to_nf4(model)
    if variant.endswith("lora"):
        model = _add_lora(model)
    ids, mask = _prompts()
    out = gen.generate(model, ids, max_new_tokens=9, attention_mask=mask, eos_token_id=[])
    assert out.shape == (3, 7 + 9) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out[:, :7]), ids)
    np.testing.assert_array_equal(np.asarray(out[:, 7:]), _reference_greedy(model, ids, mask, 9))


def test_right_padding_gives_the_same_tokens():
    model = _model()
    ids, mask = _prompts()
    left = gen.generate(model, ids, max_new_tokens=5, attention_mask=mask, eos_token_id=[])
    right_ids = np.zeros_like(ids)
    right_mask = np.zeros_like(mask)
    for b in range(3):
        n = mask[b].sum()
        right_ids[b, :n], right_mask[b, :n] = ids[b, 7 - n:], 1
    right = gen.generate(model, right_ids, max_new_tokens=5, attention_mask=right_mask, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(right[:, 7:]), np.asarray(left[:, 7:]))


def _sharp_pair(hf_llama):
    """(our model, the transformers Llama) with the same weights, 2-D weights scaled by 25 for clear argmax margins
    (as in _model)."""
    import torch

    from fastlora_jax import FastLanguageModel

    directory, torch_model = hf_llama(seed=3)
    with torch.no_grad():
        for p in torch_model.parameters():
            if p.ndim == 2:
                p.mul_(25.0)
    torch_model.save_pretrained(directory)
    model, _ = FastLanguageModel.from_pretrained(directory, dtype="float32")
    return model, torch_model


def test_equals_transformers_greedy_generate(hf_llama):
    import torch

    model, torch_model = _sharp_pair(hf_llama)
    ids, mask = _prompts(seed=5)
    out = gen.generate(model, ids, max_new_tokens=8, attention_mask=mask, eos_token_id=[])
    torch_model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                                   do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out), ref.numpy())


def test_rows_stop_at_their_end_token():
    model = _model()
    ids, mask = _prompts()
    free = np.asarray(gen.generate(model, ids, max_new_tokens=8, attention_mask=mask, eos_token_id=[]))[:, 7:]
    eos = int(free[0, 2])  # row 0 ends at its third new token; others end where they first produce it, if at all
    out = np.asarray(gen.generate(model, ids, max_new_tokens=8, attention_mask=mask, eos_token_id=eos,
                                  pad_token_id=255))[:, 7:]
    for row, ref in zip(out, free):
        stop = list(ref).index(eos) if eos in ref else len(ref)
        np.testing.assert_array_equal(row[:stop + 1], ref[:stop + 1])
        assert (row[stop + 1:] == 255).all()
    # When every row has ended the output stops early (as transformers' generate does).
    single = np.asarray(gen.generate(model, ids[:1], max_new_tokens=8, eos_token_id=[eos, 254]))
    assert single.shape == (1, 7 + 3)
    np.testing.assert_array_equal(single[0, 7:], free[0, :3])


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy():
    model = _model()
    ids, mask = _prompts()
    greedy = gen.generate(model, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    nucleus = gen.generate(model, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[], temperature=1.0,
                           top_p=1e-6, seed=4)
    np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))
    kw = dict(max_new_tokens=12, attention_mask=mask, eos_token_id=[], temperature=5.0)
    a = gen.generate(model, ids, seed=1, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(gen.generate(model, ids, seed=1, **kw)))
    assert (np.asarray(a) != np.asarray(gen.generate(model, ids, seed=2, **kw))).any()
    np.testing.assert_array_equal(np.asarray(a)[:, :7], ids)


def test_lengths_within_a_bucket_reuse_the_compiled_program():
    if not hasattr(gen._generate_jit, "_cache_size"):
        pytest.skip("this JAX's jitted functions have no _cache_size()")
    model = _model(seed=2)
    ids, mask = _prompts()
    gen.generate(model, ids, max_new_tokens=5, attention_mask=mask, eos_token_id=[])
    before = gen._generate_jit._cache_size()
    gen.generate(model, ids[:, 2:], max_new_tokens=9, attention_mask=mask[:, 2:], eos_token_id=[])
    gen.generate(model, ids[:, 1:], max_new_tokens=16, attention_mask=mask[:, 1:], eos_token_id=[])
    assert gen._generate_jit._cache_size() == before
    assert [gen.bucket(n) for n in (1, 16, 17, 200, 256, 257, 600)] == [16, 16, 32, 256, 256, 512, 768]


def test_for_inference_and_for_training_switch_the_flag_and_the_nf4_rounding():
    from fastlora_jax.nf4 import NF4Linear

    model = _to_nf4(_model())
    layers = [module for _, module in nnx.iter_graph(model) if isinstance(module, NF4Linear)]
    layers[0].rounding = "gemv_4bit"  # chosen by the user: neither switch touches it
    others = len(layers) - 1
    assert gen.for_inference(model) is model and model.training is False
    assert [layer.rounding for layer in layers] == ["gemv_4bit"] + ["bitsandbytes"] * others
    assert gen.for_training(model) is model and model.training is True
    assert [layer.rounding for layer in layers] == ["gemv_4bit"] + ["dequantize_4bit"] * others


def test_prompt_ids_outside_the_vocab_are_refused_and_padding_slots_are_not_checked():
    model = _model()
    ids, mask = _prompts()
    bad = ids.copy()
    bad[0, -1] = CONFIG.vocab_size + 2
    with pytest.raises(ValueError, match=r"input_ids holds token id 258 but the model's vocab_size is 256 .*added "
                                         r"tokens.*resize the embeddings"):
        gen.generate(model, bad, attention_mask=mask, max_new_tokens=2)
    bad[0, -1] = -1
    with pytest.raises(ValueError, match=r"input_ids holds token id -1; accepted: ids in \[0, 256\)"):
        gen.generate(model, bad, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"pad_token_id=256; accepted: an id < the model's vocab_size 256"):
        gen.generate(model, ids, attention_mask=mask, max_new_tokens=2, pad_token_id=256)
    reference = gen.generate(model, ids, attention_mask=mask, max_new_tokens=2)
    junk_padding = np.where(mask == 1, ids, 10_000)  # never fed to the model: generate pads with its own id
    out = gen.generate(model, junk_padding, attention_mask=mask, max_new_tokens=2)
    np.testing.assert_array_equal(np.asarray(out)[:, 7:], np.asarray(reference)[:, 7:])


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(attention_mask=np.array([[1, 0, 1, 1, 1, 1, 1]] * 3)), "holes"),
    (dict(attention_mask=np.zeros((3, 7))), "hold no token"),
    (dict(eos_token_id=-3), "eos_token_id"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    model = _model()
    ids, _ = _prompts()
    with pytest.raises(ValueError, match=match):
        gen.generate(model, ids, **kwargs)


# --------------------------------------------------------------- Unsloth's inference cell: min_p, use_cache, streamer

@pytest.mark.parametrize("temperature, top_p, min_p", [(1.0, 1.0, 0.05), (1.0, 1.0, 0.3), (1.5, 1.0, 0.1),
                                                     (1.5, 0.9, 0.1), (0.7, 0.5, 0.02), (1.0, 1.0, 1.0)])
def test_min_p_keeps_the_same_tokens_as_transformers_warpers(temperature, top_p, min_p):
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopPLogitsWarper)

    logits = np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32) * 3.0
    ref = torch.tensor(logits)
    for warper in (TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p), MinPLogitsWarper(min_p)):
        ref = warper(None, ref)  # transformers' default order
    ours = gen._warp(jnp.asarray(logits), temperature, 0, top_p, min_p, use_top_k=False, use_top_p=top_p < 1.0,
                     use_min_p=True)
    kept = np.isfinite(np.asarray(ours))
    np.testing.assert_array_equal(kept, np.isfinite(ref.numpy()))
    np.testing.assert_allclose(np.asarray(ours)[kept], ref.numpy()[kept], rtol=1e-6)


def _new_token_logits(model, out, mask) -> np.ndarray:
    """The logits [B, N, V] each new token of out [B, T + N] was drawn from (prompt mask [B, T]), by a full forward."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x, m: nnx.merge(graphdef, state)(x, attention_mask=m))
    T, N = mask.shape[1], out.shape[1] - mask.shape[1]
    full_mask = np.concatenate([mask, np.ones((len(out), N), mask.dtype)], axis=1)
    logits = np.asarray(forward(state, jnp.asarray(np.where(full_mask == 1, out, 0)), jnp.asarray(full_mask)))
    return logits[:, T - 1:-1]


def test_sampling_with_min_p_never_picks_a_filtered_token_and_min_p_1_is_greedy():
    model = _model()
    ids, mask = _prompts()
    greedy = gen.generate(model, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    top = gen.generate(model, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[], temperature=1.5,
                       min_p=1.0, seed=3)
    np.testing.assert_array_equal(np.asarray(top), np.asarray(greedy))
    out = np.asarray(gen.generate(model, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[],
                                  temperature=1.5, min_p=0.3, seed=5))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(_new_token_logits(model, out, mask)) / 1.5, axis=-1))
    chosen = np.take_along_axis(probs, out[:, 7:, None], axis=-1)[..., 0]
    assert (chosen >= 0.3 * probs.max(axis=-1) * (1 - 1e-4)).all()


def test_use_cache_is_accepted_and_a_tokenizer_output_mapping_is_unpacked():
    model = _model()
    ids, mask = _prompts()
    ref = gen.generate(model, ids, max_new_tokens=4, attention_mask=mask, eos_token_id=[])
    for use_cache in (True, False):
        out = model.generate(input_ids={"input_ids": ids, "attention_mask": mask}, max_new_tokens=4,
                             eos_token_id=[], use_cache=use_cache)
        np.testing.assert_array_equal(out, ref)
        assert isinstance(out, np.ndarray) and out.dtype == np.int32  # what tokenizer.batch_decode reads


class _Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", np.asarray(value).copy()))

    def end(self):
        self.calls.append(("end", None))


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.5, min_p=0.1, seed=2), dict(repetition_penalty=1.5),
                                      dict(temperature=1.5, top_k=8, top_p=0.9, repetition_penalty=1.3, seed=2)])
def test_streamer_gets_the_prompt_then_each_returned_token_then_end(sampling):
    model = _model()
    ids, _ = _prompts()
    prompt = ids[:1]
    free = np.asarray(gen.generate(model, prompt, max_new_tokens=8, eos_token_id=[], **sampling))
    eos = int(free[0, 7 + 4])  # ends at the fifth new token (or earlier, where the token came before)
    recorder = _Recorder()
    out = np.asarray(model.generate(input_ids=prompt, max_new_tokens=8, eos_token_id=eos, streamer=recorder,
                                    use_cache=True, **sampling))
    stop = list(free[0, 7:]).index(eos)
    np.testing.assert_array_equal(out, free[:, :7 + stop + 1])  # the same tokens as without a streamer
    assert [kind for kind, _ in recorder.calls] == ["put"] * (2 + stop) + ["end"]
    np.testing.assert_array_equal(recorder.calls[0][1], prompt)
    streamed = [value for _, value in recorder.calls[1:-1]]
    assert all(v.shape == (1,) for v in streamed)
    np.testing.assert_array_equal(np.concatenate(streamed), out[0, 7:])
    assert streamed[-1][0] == eos  # the end token is streamed, nothing after it


def test_transformers_text_streamer_prints_the_decoded_new_tokens(capsys):
    from transformers import TextStreamer

    class Tokenizer:  # the one method TextStreamer calls
        def decode(self, tokens, **kwargs):
            return "".join(f"<{t}>" for t in tokens)

    model = _model()
    ids, _ = _prompts()
    out = np.asarray(model.generate(input_ids=ids[:1], max_new_tokens=5, eos_token_id=[],
                                    streamer=TextStreamer(Tokenizer(), skip_prompt=True)))
    assert capsys.readouterr().out == "".join(f"<{t}>" for t in out[0, 7:]) + "\n"


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_p=1.5), r"min_p=1.5; accepted: None or a float in \[0, 1\]"),
    (dict(min_p=-0.1), "min_p=-0.1"),
    (dict(use_cache="yes"), "use_cache='yes'"),
    (dict(streamer=object()), "object with put"),
    (dict(streamer=_Recorder()), "batch size 3; streaming accepts batch size 1 only"),
])
def test_bad_inference_cell_arguments_name_the_value(kwargs, match):
    model = _model()
    ids, _ = _prompts()
    with pytest.raises(ValueError, match=match):
        gen.generate(model, ids, max_new_tokens=2, **kwargs)


# ------------------------------------------------ transformers' generate arguments: top_k, repetition_penalty, ...

@pytest.mark.parametrize("penalty, temperature, top_k, top_p, min_p, ties", [
    (1.3, 1.0, 10, 1.0, None, False),
    (1.0, 0.7, 5, 1.0, None, False),
    (1.0, 1.0, 1, 1.0, None, False),
    (1.0, 1.0, 300, 1.0, None, False),  # more than the vocabulary: keeps everything
    (1.0, 1.0, 7, 1.0, None, True),  # tokens tied with the 7th stay
    (2.0, 1.5, 8, 0.8, None, False),  # top_p then sees the top_k survivors only
    (1.0, 0.8, 12, 0.9, 0.2, False),
    (0.7, 1.0, 0, 1.0, None, False),  # a penalty < 1 favours the seen tokens
    (1.5, 1.2, 0, 0.7, 0.05, False),
])
def test_processors_equal_transformers_in_its_order(penalty, temperature, top_k, top_p, min_p, ties):
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 256)).astype(np.float32) * 3.0
    if ties:
        logits = np.round(logits)
    seen_ids = rng.integers(0, 256, (4, 40))
    processors = [RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []
    processors.append(TemperatureLogitsWarper(temperature))
    processors += [TopKLogitsWarper(top_k)] if top_k else []
    processors += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    processors += [MinPLogitsWarper(min_p)] if min_p else []
    ref = LogitsProcessorList(processors)(torch.tensor(seen_ids), torch.tensor(logits)).numpy()

    seen = np.zeros((4, 256), bool)
    np.put_along_axis(seen, seen_ids, True, axis=1)
    ours = gen._penalize(jnp.asarray(logits), jnp.asarray(seen), jnp.float32(penalty))
    ours = np.asarray(gen._warp(ours, temperature, top_k, top_p, min_p or 0.0, use_top_k=bool(top_k),
                                use_top_p=top_p < 1.0, use_min_p=bool(min_p)))
    kept = np.isfinite(ours)
    np.testing.assert_array_equal(kept, np.isfinite(ref))
    assert kept.sum() < kept.size or top_k in (0, 300)  # the filters do remove tokens
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


@pytest.mark.parametrize("penalty", [2.0, 0.5])
def test_greedy_with_repetition_penalty_equals_transformers_processor_on_full_forwards(penalty):
    model = _model(seed=2)  # its greedy tokens come back: a penalty > 1 changes them
    ids, mask = _prompts()
    out = gen.generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=[],
                       repetition_penalty=penalty)
    ref = _reference_greedy(model, ids, mask, 10, repetition_penalty=penalty)
    np.testing.assert_array_equal(out[:, 7:], ref)
    assert (ref != _reference_greedy(model, ids, mask, 10)).any()  # the penalty changes the tokens


def test_greedy_with_repetition_penalty_equals_transformers_generate(hf_llama):
    import torch

    model, torch_model = _sharp_pair(hf_llama)
    ids = np.random.default_rng(5).integers(0, 256, (2, 6))  # no padding: transformers would count pad tokens
    out = model.generate(ids, max_new_tokens=10, eos_token_id=[], repetition_penalty=1.6)
    torch_model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(ids), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                   repetition_penalty=1.6).numpy()
        plain = torch_model.generate(torch.tensor(ids), max_new_tokens=10, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(out, ref)
    assert (ref != plain).any()


def test_repetition_penalty_does_not_count_padding():
    model = _model()
    ids, mask = _prompts()
    alone = gen.generate(model, ids[1:2, 3:], max_new_tokens=6, eos_token_id=[], repetition_penalty=3.0)
    pad = int(alone[0, 4])  # the padding holds the token this row picks first: counting it would change that pick
    out = gen.generate(model, np.where(mask == 1, ids, pad), max_new_tokens=6, attention_mask=mask, eos_token_id=[],
                       repetition_penalty=3.0, pad_token_id=pad)
    np.testing.assert_array_equal(out[1, 7:], alone[0, 4:])


def test_sampling_with_top_k_picks_only_the_k_best_tokens_and_top_k_1_is_greedy():
    model = _model()
    ids, mask = _prompts()
    kw = dict(max_new_tokens=8, attention_mask=mask, eos_token_id=[])
    greedy = gen.generate(model, ids, **kw)
    np.testing.assert_array_equal(gen.generate(model, ids, temperature=3.0, top_k=1, seed=3, **kw), greedy)
    out = gen.generate(model, ids, temperature=3.0, top_k=3, seed=5, **kw)
    logits = _new_token_logits(model, out, mask)  # [B, 8, V]
    third = np.sort(logits, axis=-1)[..., -3]
    assert (np.take_along_axis(logits, out[:, 7:, None], axis=-1)[..., 0] >= third).all()
    assert (out != greedy).any() and (out != gen.generate(model, ids, temperature=3.0, seed=5, **kw)).any()


def test_unseeded_sampling_differs_per_call_and_a_seed_repeats():
    model = _model()
    ids, mask = _prompts()
    kw = dict(max_new_tokens=8, attention_mask=mask, eos_token_id=[], temperature=5.0)
    unseeded = [gen.generate(model, ids, **kw) for _ in range(3)]  # 3 x [4, 7 + 8] tokens of a flat distribution
    assert all((unseeded[i] != unseeded[j]).any() for i, j in ((0, 1), (0, 2), (1, 2)))
    np.testing.assert_array_equal(gen.generate(model, ids, seed=7, **kw), gen.generate(model, ids, seed=7, **kw))


def test_max_length_counts_the_prompt_width_and_max_new_tokens_wins():
    model = _model()
    ids, mask = _prompts()
    ref = gen.generate(model, ids, max_new_tokens=5, attention_mask=mask, eos_token_id=[])
    np.testing.assert_array_equal(gen.generate(model, ids, max_length=12, attention_mask=mask, eos_token_id=[]), ref)
    np.testing.assert_array_equal(model.generate(ids, max_length=40, max_new_tokens=5, attention_mask=mask,
                                                 eos_token_id=[]), ref)
    assert model.generate(ids[:1], eos_token_id=[]).shape == (1, 7 + 32)
    with pytest.raises(ValueError, match=r"max_length=7 leaves no room after the 7 prompt tokens"):
        model.generate(ids, max_length=7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=-1), r"top_k=-1; accepted: None or an int >= 0"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0; accepted: a float > 0"),
    (dict(repetition_penalty=-1.2), "repetition_penalty=-1.2"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty=nan"),
    (dict(repetition_penalty="1.2"), "repetition_penalty='1.2'"),
    (dict(max_new_tokens=None, max_length=5), r"max_length=5 .* 7 prompt tokens"),
    (dict(max_new_tokens=None, max_length=0), r"max_length=0; accepted: None or an int >= 1"),
    (dict(max_new_tokens=None, max_length=9.0), "max_length=9.0"),
    (dict(max_new_tokens=2.0), r"max_new_tokens=2.0; accepted: None or an int >= 1"),
    (dict(seed=1.5), r"seed=1.5; accepted: None .* or an int"),
    (dict(seed="0"), "seed='0'"),
])
def test_bad_generate_arguments_name_the_value(kwargs, match):
    model = _model()
    ids, _ = _prompts()
    with pytest.raises(ValueError, match=match):
        gen.generate(model, ids, **{"max_new_tokens": 2, **kwargs})
