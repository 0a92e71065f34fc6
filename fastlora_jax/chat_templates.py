"""Unsloth's chat-dataset helpers, as its notebooks call them after building the trainer / before formatting:

    from fastlora_jax.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")   # installs a chat format's template
    dataset = standardize_sharegpt(dataset)          # ShareGPT "from"/"value" turns -> "role"/"content"
    trainer = train_on_responses_only(trainer,       # labels -100 but on the assistant answers
        instruction_part="<|start_header_id|>user<|end_header_id|>\\n\\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\\n\\n")

The semantics are unsloth_zoo's (`unsloth_zoo/dataset_utils.py`: `train_on_responses_only`,
`get_chat_template_parts`, `standardize_data_formats`, which `unsloth.chat_templates` re-exports, the latter also as
`standardize_sharegpt`); `get_chat_template` (`unsloth/chat_templates.py`'s) lives with its templates in
`fastlora_jax.chat_template_formats` and is importable from here, as from Unsloth's module.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from fastlora_jax.chat_template_formats import get_chat_template  # noqa: F401  (Unsloth's import path)
from fastlora_jax.data import IGNORE_INDEX
from fastlora_jax.sharegpt import apply_chat_template, to_sharegpt  # noqa: F401  (Unsloth's import path)

# ---------------------------------------------------------------------------------------------- markers


def _ids(tokenizer, text: str) -> list[int]:
    """The token ids of `text` without BOS / EOS (as Unsloth tokenizes the parts)."""
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _occurrences(ids: np.ndarray, marker: list[int]) -> np.ndarray:
    """Sorted start positions of every (possibly overlapping) occurrence of `marker` in `ids`."""
    n, m = len(ids), len(marker)
    if m > n:
        return np.zeros(0, np.int64)
    hits = np.ones(n - m + 1, bool)
    for t, token in enumerate(marker):
        hits &= ids[t: n - m + 1 + t] == token
    return np.flatnonzero(hits)


def response_spans(ids, instruction_ids: list[int], response_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans trained by unsloth_zoo's `_train_on_responses_only`, for one sequence of token ids.

    Scanning left to right: each occurrence of the response part opens a span right after it; the span runs up to
    the next occurrence of the instruction part (excluded) at or after its start, else to the end of the sequence
    (an instruction part starting at the last token counts as the end). The scan for the next response part resumes
    one token after the end of that instruction part. A response part that ends the sequence opens no span.
    """
    ids = np.asarray(ids)
    n = len(ids)
    answers = _occurrences(ids, response_ids).tolist()
    questions = [q for q in _occurrences(ids, instruction_ids).tolist() if q < n - 1]
    spans, j = [], 0
    while True:
        a = bisect.bisect_left(answers, j)
        if a == len(answers):
            break
        start = answers[a] + len(response_ids)
        if start >= n:
            break
        q = bisect.bisect_left(questions, start)
        if q == len(questions):
            spans.append((start, n))
            break
        spans.append((start, questions[q]))
        j = questions[q] + len(instruction_ids) + 1
    return spans


def _masked(input_ids: np.ndarray, labels: np.ndarray, instruction_ids, response_ids, last_response_only: bool,
            segment_ids: np.ndarray | None = None) -> np.ndarray:
    """Labels -100 outside the response spans (found in each packed segment on its own), the old ones inside."""
    out = np.full(len(input_ids), IGNORE_INDEX, np.int32)
    if segment_ids is None:
        bounds = [(0, len(input_ids))]
    else:
        cuts = [0, *(np.flatnonzero(np.diff(segment_ids)) + 1).tolist(), len(input_ids)]
        bounds = [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo and segment_ids[lo] > 0]
    for lo, hi in bounds:
        spans = response_spans(input_ids[lo:hi], instruction_ids, response_ids)
        for start, end in spans[-1:] if last_response_only else spans:
            out[lo + start: lo + end] = labels[lo + start: lo + end]
    return out


# ---------------------------------------------------------------------------------------------- guessing the parts

_USER_PROBE, _ASSISTANT_PROBE = "\u2060USERPROBE7q\u2060", "\u2060ASSTPROBE4z\u2060"  # survive Jinja's |trim


def get_chat_template_parts(tokenizer) -> tuple[str, str]:
    """(instruction_part, response_part) read off the tokenizer's chat template, as unsloth_zoo's
    `get_chat_template_parts` (for plain string message contents): a 3-turn user / assistant probe is rendered, the
    parts are the most common texts between the turns, less the end-of-turn text the generation prompt does not
    repeat; each must then occur at least twice, as tokens, in the tokenized probe (else with a leading space or
    newline). Raises ValueError when the template gives no usable parts."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("train_on_responses_only: the tokenizer has no chat_template to read the parts from; pass "
                         "instruction_part and response_part")
    U, A = _USER_PROBE, _ASSISTANT_PROBE

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    convo = [{"role": "user", "content": U}, {"role": "assistant", "content": A}] * 3
    full = render(convo, False)
    if U not in full or A not in full:
        raise ValueError("train_on_responses_only: the chat template does not render plain user / assistant "
                         "messages, so the parts cannot be read off it; pass instruction_part and response_part")
    eos, bos = getattr(tokenizer, "eos_token", None) or "", getattr(tokenizer, "bos_token", None) or ""
    try:
        added = set(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):
        added = set()
    specials = sorted({str(s) for s in set(getattr(tokenizer, "all_special_tokens", None) or ()) | added if s},
                      key=len, reverse=True)

    def gap(after: str, before: str) -> str:  # the most common text from the end of `after` to the next `before`
        ends = [m.end() for m in re.finditer(re.escape(after), full)]
        starts = [m.start() for m in re.finditer(re.escape(before), full)]
        gaps = [full[e: min(s for s in starts if s >= e)] for e in ends if any(s >= e for s in starts)]
        return collections.Counter(gaps).most_common(1)[0][0] if gaps else ""

    instruction_gap, response_gap = gap(A, U), gap(U, A)
    on, off = render(convo[:-1], True), render(convo[:-1], False)
    header = "" if on == off else _strip_shared(on[on.rfind(U) + len(U):], off[off.rfind(U) + len(U):], specials)[0]
    if header and response_gap.endswith(header) and len(header) < len(response_gap):  # Llama 3, ChatML, Gemma
        response_part = header
        instruction_part = _strip_lead(instruction_gap, response_gap[: -len(header)])
    elif header and header == response_gap:  # the end of turn leaks into the generation prompt (Phi-3)
        response_part, instruction_part = _strip_shared(header, instruction_gap, specials)
        instruction_part = _strip_lead(instruction_part, " ", "\t", eos, bos)
    else:  # no assistant header (Mistral's [INST] ... [/INST])
        response_part = _strip_lead(response_gap, " ", "\t", eos, bos)
        instruction_part = _strip_lead(instruction_gap, " ", "\t", eos, bos)
    response_part = _without_thinking_scaffold(response_part, render)
    instruction_part = _strip_lead(instruction_part, " ", "\t").rstrip(" \t")
    response_part = _strip_lead(response_part, " ", "\t").rstrip(" \t")
    if not instruction_part or not response_part:
        raise ValueError(f"train_on_responses_only: the chat template gives instruction_part={instruction_part!r} "
                         f"and response_part={response_part!r}; pass both")
    probe = np.asarray(_ids(tokenizer, full))

    def checked(part: str, name: str) -> str:
        counts = []
        for candidate in (part, " " + part, "\n" + part):
            ids = _ids(tokenizer, candidate)
            counts.append((candidate, len(_occurrences(probe, ids)) if ids else 0))
        for candidate, count in counts:
            if count >= 2:
                return candidate
        for candidate, count in counts[:2]:
            if count >= 1:
                return candidate
        raise ValueError(f"train_on_responses_only: the chat template gives {name}={part!r}, whose tokens do not "
                         f"occur in the tokenized template; pass instruction_part and response_part")

    return checked(instruction_part, "instruction_part"), checked(response_part, "response_part")


def _strip_lead(text: str, *prefixes: str) -> str:
    """`text` without any of the (non-empty) `prefixes` at its start, repeatedly."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if p and text.startswith(p):
                text, changed = text[len(p):], True
    return text


def _strip_shared(a: str, b: str, specials: list[str]) -> tuple[str, str]:
    """a and b without the leading whitespace runs and special tokens they share."""
    while True:
        wa, wb = re.match(r"\s+", a), re.match(r"\s+", b)
        if wa and wb and wa.group() == wb.group():
            a, b = a[wa.end():], b[wb.end():]
            continue
        token = next((s for s in specials if a.startswith(s)), None)
        if token and b.startswith(token):
            a, b = a[len(token):], b[len(token):]
            continue
        return a, b


def _without_thinking_scaffold(response_part: str, render) -> str:
    """A reasoning template's generation prompt ends with an empty thinking block ("<think></think>") or a closing
    tag that a real assistant turn does not carry right after its header: drop it when a rendered turn with
    reasoning confirms so."""
    found = (re.search(r"<([^\s/>]+)>\s*</\1>\s*$", response_part) or re.search(r"</([^\s/>]+)>\s*$", response_part))
    if not found or found.start() == 0:
        return response_part
    tag, scaffold, header = found.group(1), response_part[found.start():], response_part[: found.start()]
    filled = render([{"role": "user", "content": _USER_PROBE},
                     {"role": "assistant", "content": f"<{tag}>rZ9</{tag}>{_ASSISTANT_PROBE}"}], False)
    at = filled.rfind(header)
    return header if at != -1 and not filled[at + len(header):].startswith(scaffold) else response_part


# ---------------------------------------------------------------------------------------------- the trainer


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None,
                            force_match: bool = True, tokenizer=None, return_function: bool = False,
                            num_proc: int | None = None, last_response_only: bool = False):
    """Unsloth's `train_on_responses_only`: sets the labels of `trainer.train_dataset` / `eval_dataset` to -100
    everywhere but the assistant answers; returns the trainer (input_ids unchanged).

    The parts are tokenized as they are, without special tokens (Unsloth's default force_match=True), and matched
    as token sequences in each row (`response_spans`): trained are the tokens from after each response_part up to
    the next instruction_part (excluded) or the end of the row, so an answer's end-of-turn / EOS tokens are trained,
    and a row truncated inside an answer trains up to its end. Inside those spans the rows keep their labels (as
    Unsloth with a "labels" column). Packed rows are matched per packed example (as if masked before packing;
    Unsloth's scan would run across examples). Rows left without a label are dropped with a warning, as Unsloth;
    ValueError when none is left. Both parts None: guessed from the chat template (`get_chat_template_parts`).
    tokenizer: overrides trainer.tokenizer. last_response_only: train only each row's last answer.
    return_function=True returns the masking function instead, for `datasets.map(..., batched=True)`: a batch
    {"input_ids": [...], optional "labels": [...]} -> {"labels": lists}; trainer may then be None.
    num_proc: accepted, no effect (rows are masked in this process). force_match=False (Unsloth's fuzzy matching
    of whitespace around the parts) raises NotImplementedError.
    """
    if force_match is not True:
        raise NotImplementedError(f"force_match={force_match!r}: only exact matching of the parts' tokens is "
                                  "implemented; accepted: force_match=True (Unsloth's default)")
    if tokenizer is None:
        tokenizer = getattr(trainer, "tokenizer", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer, as Unsloth
    if tokenizer is None:
        raise ValueError("train_on_responses_only needs a tokenizer to tokenize the parts: the trainer has none; "
                         "pass tokenizer=")
    if instruction_part is None and response_part is None:
        instruction_part, response_part = get_chat_template_parts(tokenizer)
    elif instruction_part is None or response_part is None:
        raise ValueError(f"instruction_part={instruction_part!r}, response_part={response_part!r}: pass both, or "
                         "neither to read them off the chat template")
    instruction_ids, response_ids = _ids(tokenizer, instruction_part), _ids(tokenizer, response_part)
    for name, part, ids in (("instruction_part", instruction_part, instruction_ids),
                            ("response_part", response_part, response_ids)):
        if not ids:
            raise ValueError(f"{name}={part!r} tokenizes to no token, so it cannot be matched; pass the text that "
                             "opens a user / assistant turn in the chat template")

    def mask(row: dict) -> np.ndarray:
        ids = np.asarray(row["input_ids"])
        labels = np.asarray(row["labels"]) if row.get("labels") is not None else ids
        if labels.shape != ids.shape:
            raise ValueError(f"labels {labels.shape} and input_ids {ids.shape} differ in length")
        segments = row.get("segment_ids")
        return _masked(ids, labels, instruction_ids, response_ids, last_response_only,
                       None if segments is None else np.asarray(segments))

    if return_function:
        return _batch_function(mask)
    if not hasattr(trainer, "train_rows"):
        raise TypeError(f"trainer is a {type(trainer).__name__}; accepted: a fastlora_jax.SFTTrainer (or trainer=None "
                        "with tokenizer= and return_function=True)")
    _check_collator(getattr(trainer, "data_collator", None))
    max_len = getattr(trainer, "max_seq_length", None)
    n_train = len(trainer.train_rows)
    trainer.train_rows = _mask_rows(trainer.train_rows, mask, "train_dataset", response_part, max_len, tokenizer)
    if trainer.eval_rows is not None:
        trainer.eval_rows = _mask_rows(trainer.eval_rows, mask, "eval_dataset", response_part, max_len, tokenizer)
    if len(trainer.train_rows) != n_train and hasattr(trainer, "state"):
        trainer.state.max_steps = trainer.total_steps
    return trainer


def _batch_function(mask: Callable[[dict], np.ndarray]) -> Callable[[dict], dict]:
    def train_on_responses_only_batch(examples: dict[str, Any]) -> dict[str, list[list[int]]]:
        input_ids = examples["input_ids"]
        labels = examples.get("labels")
        if labels is None:
            labels = [None] * len(input_ids)
        if len(labels) != len(input_ids):
            raise ValueError(f"{len(labels)} rows of labels for {len(input_ids)} rows of input_ids")
        return {"labels": [mask({"input_ids": ids, "labels": lab}).tolist() for ids, lab in zip(input_ids, labels)]}

    return train_on_responses_only_batch


def _mask_rows(rows: list[dict], mask, where: str, response_part: str, max_len: int | None,
               tokenizer) -> list[dict]:
    """The rows with masked labels, those left without a label dropped (with a warning; ValueError if all are)."""
    masked = [{**row, "labels": mask(row)} for row in rows]
    kept = [row for row in masked if np.any(row["labels"] != IGNORE_INDEX)]
    dropped = [row for row in masked if not np.any(row["labels"] != IGNORE_INDEX)]
    if not dropped:
        return kept
    at_cap = sum(max_len is not None and len(row["input_ids"]) >= max_len for row in dropped)
    why = (f"; {at_cap} of them fill max_seq_length={max_len}: truncation may have cut off the response part, "
           "raise max_seq_length" if at_cap else "")
    if not kept:
        in_text = sum(response_part in tokenizer.decode(row["input_ids"]) for row in dropped[:100])
        hint = (f"the text of {in_text} of the first {min(len(dropped), 100)} rows holds response_part, but not its "
                f"tokens {_ids(tokenizer, response_part)}: in the text this tokenizer joins its first or last "
                "characters with their neighbours' (a chat template written for another vocabulary, such as "
                "llama-3.1's header markers where they are not single tokens); use the model's own chat template, or "
                "parts that start and end where the text's tokens do" if in_text else
                "check that instruction_part and response_part are the chat template's")
        raise ValueError(f"train_on_responses_only: no row of {where} has a token to train on: response_part="
                         f"{response_part!r} was never found (followed by a token) in its {len(rows)} rows{why}; "
                         + hint)
    warnings.warn(f"train_on_responses_only: {len(dropped)} of the {len(rows)} rows of {where} have no answer to "
                  f"train on (response_part {response_part!r} not found) and were dropped{why}", stacklevel=3)
    return kept


def _check_collator(collator) -> None:
    """Refuses DataCollatorForLanguageModeling: the trainer made its labels (every token but the pad token), which
    Unsloth replaces by DataCollatorForSeq2Seq's (the dataset's), so masking them would differ from Unsloth's."""
    if collator is not None and any(c.__name__ == "DataCollatorForLanguageModeling" for c in type(collator).__mro__):
        raise ValueError("train_on_responses_only: the trainer was built with DataCollatorForLanguageModeling, whose "
                         "labels ignore every pad token (Unsloth swaps it for DataCollatorForSeq2Seq here); build "
                         "the trainer with data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer) or none")


# ---------------------------------------------------------------------------------------------- ShareGPT


def standardize_sharegpt(dataset, tokenizer=None, aliases_for_system=("system",),
                         aliases_for_user=("user", "human", "input"),
                         aliases_for_assistant=("gpt", "assistant", "output"), batch_size: int = 1000,
                         num_proc: int | None = None):
    """Unsloth's `standardize_sharegpt` (unsloth_zoo's `standardize_data_formats`): the "conversations" of each
    record as {"role", "content"} messages, the roles mapped through the aliases to "system" / "user" /
    "assistant"; other fields kept.

    dataset: a list of dicts (a new list is returned) or a `datasets.Dataset` / `IterableDataset` (mapped, with
    batch_size and num_proc). Without a "conversations" field in the first record it is returned as it is. As
    Unsloth, the message keys are read off the first 10 records: there must be exactly two, holding strings; the
    role key is the one with fewer distinct values (a tie goes to the second key, or to the first where only its
    values are all aliases). ValueError names an unknown role or other message keys, TypeError a non-string value. With a
    processor (a tokenizer holding `.tokenizer` or `.image_processor`), contents become [{"type": "text", ...}].
    """
    is_list = isinstance(dataset, (list, tuple))
    if not is_list and not hasattr(dataset, "map"):
        raise TypeError(f"dataset of type {type(dataset).__name__}; accepted: a list of dicts or a datasets.Dataset")
    first = next(iter(dataset), None)
    if not isinstance(first, dict) or "conversations" not in first:
        return list(dataset) if is_list else dataset
    mapping = {**{a: "system" for a in aliases_for_system}, **{a: "user" for a in aliases_for_user},
               **{a: "assistant" for a in aliases_for_assistant}}
    sample = [record["conversations"] for record in _first(dataset, 10)]
    role_key, content_key = _sharegpt_keys(sample, set(mapping))
    vlm = tokenizer is not None and (hasattr(tokenizer, "image_processor") or hasattr(tokenizer, "tokenizer"))

    def role(message: dict) -> str:
        if message[role_key] not in mapping:
            raise ValueError(f"standardize_sharegpt: role {message[role_key]!r} (field {role_key!r}) is in no alias "
                             f"list; known: {sorted(mapping)}; add it to aliases_for_user / aliases_for_assistant / "
                             "aliases_for_system")
        return mapping[message[role_key]]

    def convert(convo: list[dict]) -> list[dict]:
        return [{"role": role(m), "content": [{"type": "text", "text": m[content_key]}] if vlm else m[content_key]}
                for m in convo]

    for convo in sample:  # unknown roles fail here, before any mapping (as Unsloth)
        convert(convo)
    if is_list:
        return [{**record, "conversations": convert(record["conversations"])} for record in dataset]
    kwargs = {"batched": True, "batch_size": batch_size}
    if type(dataset).__name__ != "IterableDataset":
        kwargs["num_proc"] = num_proc
    return dataset.map(lambda batch: {"conversations": [convert(c) for c in batch["conversations"]]}, **kwargs)


standardize_data_formats = standardize_sharegpt


def _first(dataset, n: int) -> list[dict]:
    out = []
    for record in dataset:
        if len(out) == n:
            break
        out.append(record)
    return out


def _sharegpt_keys(convos: list[list[dict]], aliases: set[str]) -> tuple[str, str]:
    """(role key, content key) of ShareGPT messages, as Unsloth: the key with fewer distinct values is the role."""
    values: dict[str, set[str]] = {}
    for convo in convos:
        for message in convo:
            for key, value in message.items():
                if not isinstance(value, str):
                    raise TypeError(f"standardize_sharegpt: message field {key!r} holds a {type(value).__name__} "
                                     f"({value!r}); accepted: text messages (strings only)")
                values.setdefault(key, set()).add(value)
    if len(values) != 2:
        raise ValueError(f"standardize_sharegpt: the messages have the fields {list(values)}; accepted: exactly two "
                         "(a role such as 'from' and a text such as 'value')")
    (k0, v0), (k1, v1) = values.items()
    if len(v0) < len(v1) or (len(v0) == len(v1) and v0 <= aliases and not v1 <= aliases):
        return k0, k1
    return k1, k0

