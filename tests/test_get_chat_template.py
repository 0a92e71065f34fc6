"""Unsloth's `get_chat_template` (fastlora_jax.chat_templates), following unsloth/chat_templates.py.

Each format's expected text is written out by hand below, from the format itself (Llama 3's header tokens, ChatML's
<|im_start|> / <|im_end|>, Alpaca's "### Instruction:" ...) in the variant Unsloth's template writes (e.g. its
Llama 3.1 system turn with "Today Date: 26 July 2024" and unstripped texts).
"""

from __future__ import annotations

import re

import jinja2
import numpy as np
import pytest

from fastlora_jax import get_chat_template as exported
from fastlora_jax.chat_templates import get_chat_template, get_chat_template_parts, train_on_responses_only
from helpers import tiny_chat_tokenizer

SHAREGPT = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def byte_tokenizer(specials, merges=(), **special_tokens):
    """A byte-level BPE tokenizer (one token per byte plus `merges` of two byte symbols) with `specials` as added
    special tokens, and bos_token= / eos_token= / pad_token= as given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)


def llama3_tokenizer():
    """Llama 3's specials ("\\n\\n" one token, as its 271), EOS <|eot_id|>, no chat template of its own."""
    return byte_tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                           "<|finetune_right_pad_id|>"], merges=[("Ċ", "Ċ")], bos_token="<|begin_of_text|>",
                          eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")


def sentencepiece_style_tokenizer():
    """BOS <s>, EOS </s> (Llama 2's / Mistral's), and the ChatML / Phi tokens."""
    return byte_tokenizer(["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|end|>"], bos_token="<s>",
                          eos_token="</s>")


def render(tokenizer, messages, generation_prompt, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def as_sharegpt(messages):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]

# name -> (CONVO with the generation prompt, SHORT without), by hand. BOS / EOS: <|begin_of_text|> / <|eot_id|> for
# the Llama 3 names, <s> / </s> for the others.
EXPECTED = {
    "llama-3": (
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")),
    "llama-3.1": (
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
         "Cutting Knowledge Date: December 2023\nToday Date: 26 July 2024\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\n What is 2+2? <|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
         "Cutting Knowledge Date: December 2023\nToday Date: 26 July 2024\n\n<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")),
    "chatml": (
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n What is 2+2? <|im_end|>\n"
         "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"),
    "zephyr": (
        ("<|system|>\nBe brief.</s>\n<|user|>\n What is 2+2? </s>\n<|assistant|>\n4</s>\n<|user|>\nAnd 3+3?</s>\n"
         "<|assistant|>\n"),
        "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"),
    "mistral": (
        "<s>[INST] Be brief.  What is 2+2?  [/INST]4</s>[INST] And 3+3? [/INST]",
        "<s>[INST] Hi [/INST]Hello!</s>"),
    "llama": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n What is 2+2?  [/INST] 4 </s><s>[INST] And 3+3? [/INST]",
        "<s>[INST] Hi [/INST] Hello! </s>"),
    "alpaca": (
        ("<s>Be brief.\n\n### Instruction:\n What is 2+2? \n\n### Response:\n4</s>\n\n### Instruction:\nAnd 3+3?\n\n"
         "### Response:\n"),
        ("<s>Below are some instructions that describe some tasks. Write responses that appropriately complete each "
         "request.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n")),
    "vicuna": (
        "<s>Be brief. USER:  What is 2+2?  ASSISTANT: 4</s>USER: And 3+3? ASSISTANT:",
        ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello!</s>")),
    "vicuna_old": (
        "<s>Be brief.\n### Human:  What is 2+2? \n### Assistant: 4</s>\n### Human: And 3+3?\n### Assistant:",
        ("<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions.\n### Human: Hi\n### Assistant: Hello!</s>\n")),
    "unsloth": (
        "<s>Be brief.\n>>> User:  What is 2+2? \n>>> Assistant: 4</s>\n>>> User: And 3+3?\n>>> Assistant: ",
        "<s>You are a helpful assistant to the user\n>>> User: Hi\n>>> Assistant: Hello!</s>\n"),
    "phi-3": (
        ("<|system|>\nBe brief.<|end|>\n<|user|>\n What is 2+2? <|end|>\n<|assistant|>\n4<|end|>\n<|user|>\n"
         "And 3+3?<|end|>\n<|assistant|>\n"),
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"),
    "phi-4": (
        ("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|> What is 2+2? <|im_end|>"
         "<|im_start|>assistant<|im_sep|>4<|im_end|><|im_start|>user<|im_sep|>And 3+3?<|im_end|>"
         "<|im_start|>assistant<|im_sep|>"),
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>"),
}
ALIASES = {"llama3": "llama-3", "llama-31": "llama-3.1", "llama-3.2": "llama-3.1", "llama-3.3": "llama-3.1",
           "llama-32": "llama-3.1", "llama-33": "llama-3.1", "phi-35": "phi-3", "phi-3.5": "phi-3",
           "vicuna old": "vicuna_old"}
NAMES = sorted(EXPECTED) + sorted(ALIASES)


def tokenizer_for(name):
    return llama3_tokenizer() if ALIASES.get(name, name).startswith("llama-3") else sentencepiece_style_tokenizer()


# ---------------------------------------------------------------------------------------------- the formats


@pytest.mark.parametrize("name", NAMES)
def test_each_template_renders_its_format(name):
    """Changed in place and returned, but for chatml's EOS mapping (a copy; as Unsloth)."""
    tokenizer = get_chat_template(given := tokenizer_for(name), chat_template=name)
    assert (tokenizer is given) == (name != "chatml")
    with_prompt, without = EXPECTED[ALIASES.get(name, name)]
    assert render(tokenizer, CONVO, True) == with_prompt
    assert render(tokenizer, SHORT, False) == without


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_prompt_is_the_assistant_header(name):
    """add_generation_prompt appends the text an assistant turn starts with (nothing for the [INST] formats)."""
    tokenizer = get_chat_template(tokenizer_for(name), chat_template=name)
    prompt = render(tokenizer, SHORT[:1], True)
    without = render(tokenizer, SHORT[:1], False)
    full = render(tokenizer, SHORT, False)
    assert prompt.startswith(without)
    if name in ("mistral", "llama"):
        assert prompt == without
    else:
        assert len(prompt) > len(without)
    answer = full[len(prompt):]  # the answer follows the prompt: the prompt is a prefix of the full conversation
    assert full.startswith(prompt) and answer.lstrip().startswith("Hello!")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sharegpt_rows_render_as_role_content_rows(name):
    """mapping: {"from": "human", "value": ...} rows give the same text as {"role": "user", "content": ...} rows, and
    role / content rows still render (Unsloth picks by the "role" key of the first message)."""
    plain = get_chat_template(tokenizer_for(name), chat_template=name)
    mapped = get_chat_template(tokenizer_for(name), chat_template=name, mapping=SHAREGPT, map_eos_token=False)
    for messages, prompt in ((CONVO, True), (CONVO, False), (SHORT, False)):
        expected = render(plain, messages, prompt)
        assert render(mapped, as_sharegpt(messages), prompt) == expected
        assert render(mapped, messages, prompt) == expected


def test_mapping_with_other_field_names():
    tokenizer = get_chat_template(llama3_tokenizer(), chat_template="llama-3.1",
                                  mapping={"role": "speaker", "content": "text", "user": "q", "assistant": "a"})
    rows = [{"speaker": "q", "text": "Hi"}, {"speaker": "a", "text": "Hello!"}]
    assert render(tokenizer, rows, False) == EXPECTED["llama-3.1"][1]
    with pytest.raises(ValueError, match=r"lacks \['assistant'\]"):
        get_chat_template(llama3_tokenizer(), "llama-3", mapping={"role": "from", "content": "value", "user": "human"})


def test_llama31_date_string_system_message_and_tools():
    tokenizer = get_chat_template(llama3_tokenizer(), chat_template="llama-3.1", system_message="You are terse.")
    assert render(tokenizer, SHORT[:1], True, date_string="01 January 2025") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 01 January 2025\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render(tokenizer, CONVO, True) == EXPECTED["llama-3.1"][0]  # the conversation's own system message wins
    tool = {"type": "function", "function": {"name": "add", "description": "Adds.", "parameters": {}}}
    with pytest.raises(jinja2.exceptions.TemplateError, match="tools are not implemented"):
        render(tokenizer, SHORT, False, tools=[tool])


def test_system_message_replaces_the_default_verbatim():
    odd = "Don't \\ {{ x }} {% if %}\n'quoted' \"too\" é"
    tokenizer = get_chat_template(sentencepiece_style_tokenizer(), chat_template="alpaca", system_message=odd)
    assert render(tokenizer, SHORT, False) == (
        "<s>" + odd + "\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n")
    with pytest.warns(UserWarning, match="no default system message"):
        tokenizer = get_chat_template(sentencepiece_style_tokenizer(), chat_template="chatml", system_message="Hi")
    assert render(tokenizer, SHORT, False) == EXPECTED["chatml"][1]


def test_roles_a_format_cannot_write_raise():
    tokenizer = get_chat_template(sentencepiece_style_tokenizer(), chat_template="alpaca")
    with pytest.raises(jinja2.exceptions.TemplateError, match="role tool is not accepted"):
        render(tokenizer, SHORT + [{"role": "tool", "content": "5"}], False)


# ---------------------------------------------------------------------------------------------- names and arguments


@pytest.mark.parametrize("name", ["gemma-3", "qwen-2.5", "Llama-3.1", "llama-3.4", ""])
def test_unknown_or_unimplemented_names_raise(name):
    with pytest.raises(ValueError, match=re.escape(f"chat_template={name!r}")) as error:
        get_chat_template(llama3_tokenizer(), chat_template=name)
    accepted = str(error.value).split("accepted: ")[1]
    assert all(repr(n) in accepted for n in NAMES)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="map_eos_token='yes'"):
        get_chat_template(llama3_tokenizer(), "llama-3", map_eos_token="yes")
    with pytest.raises(TypeError, match="chat_template of type int"):
        get_chat_template(llama3_tokenizer(), 3)
    with pytest.raises(ValueError, match="tuple of two strings"):
        get_chat_template(llama3_tokenizer(), ("{{ x }}",))


def test_custom_template_tuple():
    """(template, stop_word): "{system_message}" filled verbatim (required), map_eos_token ignored (as Unsloth)."""
    template = "{% for m in messages %}{{ '{system_message}|' + m['role'] + ':' + m['content'] + '\\n' }}{% endfor %}"
    tokenizer = llama3_tokenizer()
    with pytest.raises(ValueError, match="pass system_message"):
        get_chat_template(tokenizer, (template, "<|not_a_token|>"))
    out = get_chat_template(tokenizer, (template, "<|not_a_token|>"), mapping=SHAREGPT, system_message="S")
    assert out is tokenizer and out.eos_token == "<|eot_id|>"
    assert render(out, as_sharegpt(SHORT), False) == "S|user:Hi\nS|assistant:Hello!\n"


# ---------------------------------------------------------------------------------------------- map_eos_token


def test_chatml_swaps_its_end_of_turn_with_the_eos_when_it_is_a_token():
    """Unsloth keeps the EOS id (its trained embedding) and spells it <|im_end|>; the old <|im_end|> id takes the
    old EOS spelling. A copy is returned; ids, size and the tokenizer passed stay as they were."""
    tokenizer = byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>")
    vocab = tokenizer.get_vocab()
    out = get_chat_template(tokenizer, chat_template="chatml", mapping=SHAREGPT, map_eos_token=True)
    assert out is not tokenizer
    eos_id, im_end_id = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    assert (out.eos_token, out.eos_token_id, out.pad_token, out.pad_token_id) == ("<|im_end|>", eos_id,
                                                                                  "<|im_end|>", eos_id)
    assert out.get_vocab() == {**vocab, "<|im_end|>": eos_id, "<|endoftext|>": im_end_id}
    assert out.convert_ids_to_tokens([eos_id, im_end_id]) == ["<|im_end|>", "<|endoftext|>"]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.chat_template) == ("<|endoftext|>", "<|endoftext|>",
                                                                                   None)
    assert tokenizer.get_vocab() == vocab
    ids = out.apply_chat_template(as_sharegpt(SHORT), tokenize=True, add_generation_prompt=False, return_dict=False)
    assert ids.count(eos_id) == 2 and im_end_id not in ids and ids[-2] == out.eos_token_id
    kept = get_chat_template(tokenizer, chat_template="chatml", map_eos_token=False)
    assert kept is tokenizer and kept.eos_token == "<|endoftext|>"


def test_chatml_renames_the_eos_where_im_end_is_not_a_token():
    """Llama 3 has no <|im_end|>: its EOS <|eot_id|> (id kept) is renamed <|im_end|>, so every ChatML turn ends on
    the id the model already ends turns with; <|im_start|> stays text. The pad and BOS keep their ids."""
    tokenizer = llama3_tokenizer()
    vocab = tokenizer.get_vocab()
    eot = vocab["<|eot_id|>"]
    out = get_chat_template(tokenizer, chat_template="chatml", map_eos_token=True)
    assert (out.eos_token, out.eos_token_id, len(out)) == ("<|im_end|>", eot, len(tokenizer))
    assert (out.bos_token_id, out.pad_token_id) == (tokenizer.bos_token_id, tokenizer.pad_token_id)
    assert "<|eot_id|>" not in out.get_vocab() and tokenizer.eos_token == "<|eot_id|>"
    text = render(out, SHORT, False)
    assert text == EXPECTED["chatml"][1]
    ids = out(text, add_special_tokens=False)["input_ids"]
    assert ids.count(eot) == 2 and out.decode(ids) == text
    out = get_chat_template(tokenizer, chat_template="chatml", map_eos_token=False)
    assert out.eos_token == "<|eot_id|>" and render(out, SHORT, False) == EXPECTED["chatml"][1]


def test_map_eos_token_needs_a_fast_tokenizer_with_an_eos():
    tokenizer = byte_tokenizer(["<|im_start|>", "<|im_end|>"])
    with pytest.raises(ValueError, match=r"map_eos_token=True renames the EOS.*EOS None.*map_eos_token=False"):
        get_chat_template(tokenizer, chat_template="chatml", map_eos_token=True)


@pytest.mark.parametrize("name", ["llama-3.1", "phi-3", "phi-4", "zephyr"])
def test_map_eos_token_has_no_effect_where_unsloth_ignores_it(name):
    tokenizer = tokenizer_for(name)
    eos = tokenizer.eos_token
    assert get_chat_template(tokenizer, chat_template=name, map_eos_token=True) is tokenizer
    assert tokenizer.eos_token == eos


# ---------------------------------------------------------------------------------------------- with the trainer


@pytest.mark.parametrize("name, make, user, assistant, answers", [
    ("llama-3.1", llama3_tokenizer, LLAMA3_USER, LLAMA3_ASSISTANT, "Hello!<|eot_id|>See you.<|eot_id|>"),
    ("chatml", tiny_chat_tokenizer, "<|im_start|>user\n", "<|im_start|>assistant\n",
     "Hello!<|im_end|>\nSee you.<|im_end|>\n")])
def test_train_on_responses_only_reads_the_installed_template(name, make, user, assistant, answers):
    tokenizer = get_chat_template(make(), chat_template=name, mapping=SHAREGPT)
    assert get_chat_template_parts(tokenizer) == (user, assistant)
    convo = SHORT + [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    ids = tokenizer(render(tokenizer, as_sharegpt(convo), False), add_special_tokens=False)["input_ids"]
    mask = train_on_responses_only(None, tokenizer=tokenizer, return_function=True)
    labels = np.asarray(mask({"input_ids": [ids]})["labels"][0])
    assert tokenizer.decode(labels[labels != -100]) == answers


def test_smollm2_chatml_matches_its_own_template():
    """The notebooks' ShareGPT + ChatML call on SmolLM2's tokenizer (its EOS already <|im_end|>): the text and ids
    are those of SmolLM2's own template (given a system message: SmolLM2's adds a default one)."""
    from fastlora_jax.converters.gguf_tokenizer import load_gguf_tokenizer
    from fastlora_jax.converters.resolve import smollm2_gguf

    smollm2 = load_gguf_tokenizer(smollm2_gguf())
    tokenizer = get_chat_template(smollm2, chat_template="chatml", mapping=SHAREGPT, map_eos_token=True)
    assert tokenizer is not smollm2 and (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    for prompt in (True, False):
        ours = tokenizer.apply_chat_template(as_sharegpt(CONVO), add_generation_prompt=prompt, return_dict=False)
        own = smollm2.apply_chat_template(CONVO, add_generation_prompt=prompt, return_dict=False)
        assert ours == own


def test_exported_from_the_package():
    assert exported is get_chat_template
