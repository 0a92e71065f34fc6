"""Unsloth's `to_sharegpt` and dataset-level `apply_chat_template` (fastlora_jax.sharegpt, importable from
fastlora_jax.chat_templates as from unsloth.chat_templates).

Expectations follow unsloth/chat_templates.py at unslothai/unsloth commit 015bdef0d94a241bcd94eec7a405b1700632180d
(`_parse_combined_prompt`, `_create_formatter`, `to_sharegpt`, `construct_chat_template`, `apply_chat_template`):
the expected texts of `TEXTS` are what that commit's apply_chat_template returned for these tokenizers, templates and
conversations, and `conversation_extension` picks rows in `datasets.Dataset.shuffle(seed=random_state + j)`'s order,
which the test reads off datasets itself.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from fastlora_jax import SFTConfig, SFTTrainer, LlamaConfig
from fastlora_jax.chat_templates import apply_chat_template, standardize_sharegpt, to_sharegpt
from fastlora_jax.loading import random_model
from fastlora_jax.lora import get_peft_model
from helpers import TINY, tiny_chat_tokenizer

datasets.disable_progress_bars()

TITANIC = [dict(Embarked="S", Sex="male", Pclass=3, Age=22.0, Fare=7.25, Name="Ann", Title="Dr", Survived=0),
           dict(Embarked=None, Sex="female", Pclass=1, Age=None, Fare=71.2833, Name="Bo", Title=None, Survived=1),
           dict(Embarked="C", Sex="", Pclass=2, Age=0.0, Fare=None, Name="", Title="Sir", Survived=1)]
TITANIC_PROMPT = ("[[The passenger embarked from {Embarked}.]][[\nThey are {Sex}.]][[\nThey are in {Pclass} class.]]"
                  "[[\nTheir age is {Age}.]][[\nTheir fare is ${Fare}.]][[\nName: {Name} ({Title}).]] Survived?")
# Optional blocks go when their FIRST column is "" or None (later ones fill in as ""); the rest is kept.
TITANIC_HUMAN = ["The passenger embarked from S.\nThey are male.\nThey are in 3 class.\nTheir age is 22.0.\nTheir "
                 "fare is $7.25.\nName: Ann (Dr). Survived?",
                 "\nThey are female.\nThey are in 1 class.\nTheir fare is $71.2833.\nName: Bo (). Survived?",
                 "The passenger embarked from C.\nThey are in 2 class.\nTheir age is 0.0. Survived?"]


def turns(*pairs):
    return [turn for human, gpt in pairs for turn in ({"from": "human", "value": human}, {"from": "gpt", "value": gpt})]


@pytest.mark.parametrize("as_dataset", [False, True], ids=["list", "Dataset"])
def test_merged_prompt_fills_columns_and_drops_optional_blocks(as_dataset):
    data = datasets.Dataset.from_list(TITANIC) if as_dataset else TITANIC
    out = to_sharegpt(data, merged_prompt=TITANIC_PROMPT, output_column_name="Survived")
    rows = out.to_list() if as_dataset else out
    assert isinstance(out, datasets.Dataset if as_dataset else list)
    assert rows == [{"conversations": turns((h, str(r["Survived"])))} for h, r in zip(TITANIC_HUMAN, TITANIC)]
    # Required text: None fills in as "", values as str(); the default merged_prompt "" gives an empty human turn.
    records = [{"q": None, "n": 3, "output": None}]
    out = to_sharegpt(records, merged_prompt="Q: {q} n={n}[[ x{q}]][[ y{n}]]")
    assert out[0]["conversations"] == turns(("Q:  n=3 y3", "None"))
    assert to_sharegpt(records)[0]["conversations"] == turns(("", "None"))


def test_column_errors():
    with pytest.raises(KeyError, match=r"'Cabin'.*\['Embarked', 'Sex'"):
        to_sharegpt(TITANIC, merged_prompt="{Embarked} {Cabin}", output_column_name="Survived")
    with pytest.raises(KeyError, match="output_column_name='output'"):
        to_sharegpt(TITANIC, merged_prompt="{Embarked}")
    with pytest.raises(IndexError, match=r"\[\[ no column \]\]"):
        to_sharegpt(TITANIC, merged_prompt="{Sex}[[ no column ]]", output_column_name="Survived")
    with pytest.raises(TypeError, match="ShareGPT format already"):
        to_sharegpt([{"conversations": turns(("a", "b")), "output": "x"}])
    with pytest.raises(TypeError, match="accepted: a list of dicts or a datasets.Dataset"):
        to_sharegpt({"instruction": ["a"], "output": ["b"]})
    # The output column may be the merged one (read after merging, as Unsloth's second map does).
    out = to_sharegpt([{"a": "x"}], merged_prompt="<{a}>", merged_column_name="m", output_column_name="m")
    assert out[0]["conversations"] == turns(("<x>", "<x>"))


@pytest.mark.parametrize("as_dataset", [False, True], ids=["list", "Dataset"])
def test_remove_unused_columns(as_dataset):
    records = [{"instruction": "Add", "input": "1 2", "output": "3", "id": 7}]
    data = datasets.Dataset.from_list(records) if as_dataset else records
    prompt = "{instruction}[[\nYour input is:\n{input}]]"
    kept = to_sharegpt(data, merged_prompt=prompt, remove_unused_columns=False)
    kept = kept.to_list() if as_dataset else kept
    # The merged text overwrites "instruction"; the other columns stay, "conversations" is added.
    assert kept == [{"instruction": "Add\nYour input is:\n1 2", "input": "1 2", "output": "3", "id": 7,
                     "conversations": turns(("Add\nYour input is:\n1 2", "3"))}]
    removed = to_sharegpt(data, merged_prompt=prompt)
    assert (removed.column_names if as_dataset else list(removed[0])) == ["conversations"]
    with pytest.raises(ValueError, match="remove_unused_columns=False"):  # Unsloth's concatenation fails there
        to_sharegpt(data, merged_prompt=prompt, remove_unused_columns=False, conversation_extension=2)


def test_conversation_extension_concatenates_shuffled_rows_per_random_state():
    n = 11
    records = [{"q": f"q{i}", "a": f"a{i}"} for i in range(n)]

    def extended(random_state, extension, as_dataset=False):
        data = datasets.Dataset.from_list(records) if as_dataset else records
        out = to_sharegpt(data, merged_prompt="{q}", output_column_name="a", conversation_extension=extension,
                          random_state=random_state)
        return [r["conversations"] for r in (out.to_list() if as_dataset else out)]

    got = extended(7, 3)
    index = datasets.Dataset.from_dict({"i": list(range(n))})
    orders = [list(range(n))] + [list(index.shuffle(seed=7 + j)["i"]) for j in (1, 2)]
    assert got == [turns(*[(f"q{order[i]}", f"a{order[i]}") for order in orders]) for i in range(n)]
    assert extended(7, 3, as_dataset=True) == got
    assert extended(7, 3) == got and extended(8, 3) != got
    assert [len(c) for c in extended(0, 5)] == [10] * n
    assert extended(7, 1) == extended(7, 0) == [turns((f"q{i}", f"a{i}")) for i in range(n)]


# ---------------------------------------------------------------------------------------------- apply_chat_template


def llama3_bos_tokenizer(eos_token="<|eot_id|>"):
    """Byte-level with Llama 3's specials, adding BOS by itself (as Llama 3's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
    vocab.update({s: 256 + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token=eos_token)


ALPACA = ("Below are some instructions that describe some tasks. Write responses that appropriately complete each "
          "request.\n\n### Instruction:\n{INPUT}\n\n### Response:\n{OUTPUT}")  # the notebooks' template
LLAMA3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|><|start_header_id|>user"
          "<|end_header_id|>\n\n{INPUT}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{OUTPUT}<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\n{INPUT}<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
          "\n\n{OUTPUT}<|eot_id|>")  # Unsloth's default
TWO = "{SYSTEM}\nUSER: {INPUT}\nASSISTANT: {OUTPUT}\nUSER: {INPUT}\nASSISTANT: {OUTPUT}\n"
DEFAULT = ("Below are some instructions that describe some tasks. Write responses that appropriately complete each "
           "request.")
CONVO = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
SYSTEM = [{"role": "system", "content": "Be kind."}]
H, U, A, E = "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant" \
    "<|end_header_id|>\n\n", "<|eot_id|>"
L3SYS = "<|start_header_id|>system<|end_header_id|>\n\n"
ALPACA_TEXT = (DEFAULT + "\n\n### Instruction:\nQ1\n\n### Response:\nA1<|im_end|>\n\n### Instruction:\nQ2\n\n### "
               "Response:\nA2<|im_end|>")
# (tokenizer, eos, template, default_system_message, extra_eos_tokens, conversation, Unsloth's text)
TEXTS = {
    "alpaca": ("chatml", None, ALPACA, DEFAULT, None, CONVO, ALPACA_TEXT),  # one example; EOS appended
    "alpaca-trailing-newline": ("chatml", None, ALPACA + "\n", DEFAULT, None, CONVO, ALPACA_TEXT),  # read rstripped
    "alpaca-leading-space": ("chatml", None, "  " + ALPACA, DEFAULT, None, CONVO, ALPACA_TEXT),
    "llama3-default-system": ("llama3", E, LLAMA3, DEFAULT, None, CONVO,
                              H + L3SYS + DEFAULT + E + U + "Q1" + E + A + "A1" + E + U + "Q2" + E + A + "A2" + E),
    "llama3-system-message": ("llama3", E, LLAMA3, DEFAULT, None, SYSTEM + CONVO,
                              H + L3SYS + "Be kind." + E + U + "Q1" + E + A + "A1" + E + U + "Q2" + E + A + "A2" + E),
    "llama3-no-default": ("llama3", E, LLAMA3, None, None, CONVO,
                          H + U + "Q1" + E + A + "A1" + E + U + "Q2" + E + A + "A2" + E),
    "llama3-other-eos": ("llama3", "<|end_of_text|>", LLAMA3, DEFAULT, None, CONVO[:2],
                         H + L3SYS + DEFAULT + E + U + "Q1" + E + A + "A1" + E + "<|end_of_text|>"),
    "llama3-extra-eos": ("llama3", "<|end_of_text|>", LLAMA3, DEFAULT, "<|eot_id|>", CONVO[:2],
                         H + L3SYS + DEFAULT + E + U + "Q1" + E + A + "A1" + E),
    "two-examples": ("chatml", None, TWO, "Custom sys", None, CONVO,
                     "Custom sys\nUSER: Q1\nASSISTANT: A1\n<|im_end|>USER: Q2\nASSISTANT: A2\n<|im_end|>"),
    "two-examples-system": ("chatml", None, TWO, "Custom sys", None, SYSTEM + CONVO,
                            "Be kind.\nUSER: Q1\nASSISTANT: A1\n<|im_end|>USER: Q2\nASSISTANT: A2\n<|im_end|>"),
    "two-examples-eos": ("chatml", None, TWO.replace("{OUTPUT}\n", "{OUTPUT}<|im_end|>\n"), "Custom sys", None,
                         CONVO, "Custom sys\nUSER: Q1\nASSISTANT: A1<|im_end|>\nUSER: Q2\nASSISTANT: A2<|im_end|>\n"),
    # The input part opens with the longest start of the output part found before an {INPUT}, a character apart.
    "separator": ("chatml", None, "S>>{INPUT}>{OUTPUT}", DEFAULT, None, CONVO, "S>>Q1>A1<|im_end|>>Q2>A2<|im_end|>"),
}

# The texts before {INPUT} / {OUTPUT} (an EOS after {INPUT} ends the input part; another EOS opens the output part)
PARTS = {"llama3-default-system": (U, A), "llama3-other-eos": (U, E + A), "llama3-extra-eos": (U, A)}


def make_tokenizer(kind, eos):
    return tiny_chat_tokenizer() if kind == "chatml" else llama3_bos_tokenizer(eos)


@pytest.mark.parametrize("case", sorted(TEXTS))
def test_texts_are_unsloths(case):
    kind, eos, template, default, extra, convo, expected = TEXTS[case]
    tokenizer = make_tokenizer(kind, eos)
    out = apply_chat_template([{"conversations": convo, "id": 1}], tokenizer=tokenizer, chat_template=template,
                              default_system_message=default, extra_eos_tokens=extra)
    assert out == [{"conversations": convo, "id": 1, "text": expected}]
    # The tokenizer now holds the same format as Jinja: for the conversation, and for a generation prompt.
    assert tokenizer.apply_chat_template(convo, tokenize=False) == expected
    if case in PARTS:
        assert (tokenizer._unsloth_input_part, tokenizer._unsloth_output_part) == PARTS[case]
    asked = convo[: [m["role"] for m in convo].index("user") + 1]
    prompt = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.apply_chat_template(asked, tokenize=False) + tokenizer._unsloth_output_part
    assert expected.startswith(prompt + "A1")


def test_notebook_cells_on_a_dataset_and_the_parts():
    rows = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Hi", "input": "", "output": "Yo"}]
    dataset = to_sharegpt(datasets.Dataset.from_list(rows), merged_prompt="{instruction}[[\nYour input is:\n{input}]]",
                          output_column_name="output", conversation_extension=2)
    dataset = standardize_sharegpt(dataset)
    tokenizer = tiny_chat_tokenizer()
    out = apply_chat_template(dataset, tokenizer=tokenizer, chat_template=ALPACA)
    assert isinstance(out, datasets.Dataset) and out.column_names == ["conversations", "text"]
    first = DEFAULT + "\n\n### Instruction:\nAdd\nYour input is:\n1 2\n\n### Response:\n3<|im_end|>"
    assert out[0]["text"].startswith(first) and out[0]["text"].count("<|im_end|>") == 2
    assert (tokenizer._unsloth_input_part, tokenizer._unsloth_output_part) == ("\n\n### Instruction:\n",
                                                                               "\n\n### Response:\n")


def test_apply_chat_template_errors():
    convos = [{"conversations": CONVO}]
    with pytest.raises(TypeError, match="tokenizer=None"):
        apply_chat_template(convos, chat_template=ALPACA)
    with pytest.raises(KeyError, match=r"'conversations' column; the dataset has \['messages'\]"):
        apply_chat_template([{"messages": CONVO}], tokenizer=tiny_chat_tokenizer(), chat_template=ALPACA)
    with pytest.raises(ValueError, match="role 'human'.*standardize_sharegpt"):
        apply_chat_template([{"conversations": turns(("a", "b"))}], tokenizer=tiny_chat_tokenizer(),
                            chat_template=ALPACA)
    with pytest.raises(ValueError, match=r"role 'system'.*no \{SYSTEM\}"):  # Unsloth's template raises there too
        apply_chat_template([{"conversations": SYSTEM + CONVO}], tokenizer=tiny_chat_tokenizer(), chat_template=ALPACA)
    with pytest.raises(ValueError, match="'<|nope|>', which is not a single token"):
        apply_chat_template(convos, tokenizer=tiny_chat_tokenizer(), chat_template=ALPACA, extra_eos_tokens="<|nope|>")
    with pytest.raises(RuntimeError, match=r"lacks \{OUTPUT\}"):
        apply_chat_template(convos, tokenizer=tiny_chat_tokenizer(), chat_template="Q: {INPUT}")
    with pytest.raises(RuntimeError, match="no text before {INPUT} separates"):  # Unsloth's error too
        apply_chat_template(convos, tokenizer=tiny_chat_tokenizer(), chat_template="S>{INPUT}>{OUTPUT}")


def test_the_text_dataset_trains_a_step(tmp_path):
    rows = [{"q": f"What is {i} + {i}?", "extra": "" if i % 2 else f"hint {i}", "a": str(2 * i)} for i in range(6)]
    dataset = to_sharegpt(datasets.Dataset.from_list(rows), merged_prompt="{q}[[ ({extra})]]",
                          output_column_name="a", conversation_extension=2)
    tokenizer = tiny_chat_tokenizer()
    dataset = apply_chat_template(standardize_sharegpt(dataset), tokenizer=tokenizer, chat_template=ALPACA)
    model = random_model(LlamaConfig.from_hf_config({**TINY, "vocab_size": 260}), seed=0)
    model = get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           use_gradient_checkpointing=False, random_state=0)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, max_seq_length=512,
                     save_steps=10, disable_tqdm=True, report_to="none")
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text", args=args)
    texts = sorted(tokenizer.decode(row["input_ids"]) for row in trainer.train_rows)
    assert texts == sorted(dataset["text"])  # each text is one row, its EOS already there
    trainer.train()
    assert trainer.state.global_step == 1 and np.isfinite(trainer.state.log_history[-1]["train_loss"])
