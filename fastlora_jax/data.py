"""Training data: load records, tokenize them with labels, pack them (`fastlora_jax.packing`), and batch them into a
few padded shapes.

Records come as a list of dicts, a JSONL path or a Hugging Face `datasets.Dataset`, each with one of
- a text field (`dataset_text_field`, "text" by default): the whole text is trained on, EOS appended (unless the
  text ends with it); a text that starts with the tokenizer's BOS (a chat rendered with `tokenize=False`) gets no
  second one, as Unsloth's trainer (TRL's would add it);
- "messages": a chat rendered with `tokenizer.apply_chat_template`;
- "prompt" / "completion": strings (prompt + completion + EOS, unless the completion ends with it; each tokenized on
  its own, as generation sees a prompt and then its answer) or message lists (rendered as a chat);
- "input_ids" (and optionally "labels"): already tokenized.
Labels are aligned with input_ids (the loss shifts them); -100 marks tokens the loss ignores. With
`train_on_responses_only` only the assistant answers / completions keep their labels.

Batches are dicts of int32 numpy arrays [B, T]: "input_ids", "labels" and, for packed rows, "segment_ids" (1, 2, ...
per example, 0 on padding), "positions" (restarting at 0 in each segment) and, given their shapes (`ragged_layouts`),
the segments' ragged layout for cuDNN ("segment_offsets" [R, M + 1], "segment_lengths" [R, M];
`fastlora_jax.packed_attention`). Unpacked rows are padded on the right, which needs no attention mask under causal
attention: padding comes after every real token and is never a label.
T is rounded up to one of a few length buckets, so a run compiles the train step a few times at most.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from fastlora_jax.loss import IGNORE_INDEX
from fastlora_jax.packed_attention import layout_fits, layout_plan, padded_blocks, rows_fitting, segment_layout
from fastlora_jax.packing import check_strategy, keeps_long_examples, pack

MIN_BUCKET = 64


# ---------------------------------------------------------------------------------------------- loading records


def load_records(dataset) -> list[dict[str, Any]]:
    """A list of dicts from a list/tuple of dicts, a JSONL file path, or a Hugging Face `datasets.Dataset`."""
    if isinstance(dataset, (str, os.PathLike)):
        return _read_jsonl(os.fspath(dataset))
    if isinstance(dataset, (list, tuple)):
        records = list(dataset)
    elif hasattr(dataset, "to_list") and hasattr(dataset, "column_names"):  # datasets.Dataset
        records = dataset.to_list()
    else:
        raise TypeError(f"dataset of type {type(dataset).__name__}; accepted: a list of dicts, a path to a .jsonl "
                        "file, or a datasets.Dataset")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise TypeError(f"dataset record {i} is a {type(record).__name__}; every record must be a dict")
    if not records:
        raise ValueError("the dataset is empty")
    return records


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: a JSON {type(record).__name__}, expected an object")
            records.append(record)
    if not records:
        raise ValueError(f"dataset file {path!r} holds no records")
    return records


# ---------------------------------------------------------------------------------------------- tokenizing


def record_kind(record: dict, dataset_text_field: str = "text") -> str:
    """Which format a record is in: "input_ids", "text", "messages" or "prompt_completion". A field holding None
    counts as absent (a datasets.Dataset of mixed records gives every row every column, None where it has none)."""
    present = {key for key, value in record.items() if value is not None}
    if "input_ids" in present:
        return "input_ids"
    if dataset_text_field in present:
        return "text"
    if "messages" in present:
        return "messages"
    if "prompt" in present and "completion" in present:
        return "prompt_completion"
    raise ValueError(f"record with fields {sorted(present)}: expected a {dataset_text_field!r} field, 'messages', "
                     "'prompt' and 'completion', or 'input_ids'")


def tokenize_record(record: dict, tokenizer, *, train_on_responses_only: bool | None = None,
                    dataset_text_field: str = "text", eos_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [n], labels [n]) int32 for one record; labels are -100 where the loss ignores a token.

    train_on_responses_only: True keeps labels only on assistant answers / completions; False on every token;
    None (default) is True for prompt/completion records and False otherwise (TRL's defaults).
    eos_token_id: the id appended to a text or a completion (None: the tokenizer's eos_token_id; TRL's eos_token).
    """
    kind = record_kind(record, dataset_text_field)
    if kind == "input_ids":
        ids = np.asarray(record["input_ids"], np.int32)
        labels = np.asarray(record.get("labels", ids), np.int32)
        if labels.shape != ids.shape:
            raise ValueError(f"record labels {labels.shape} and input_ids {ids.shape} differ in length")
        return ids, labels
    if tokenizer is None:
        raise ValueError(f"a {kind!r} record needs a tokenizer; pass tokenizer= or pre-tokenized 'input_ids'")
    responses_only = (kind == "prompt_completion") if train_on_responses_only is None else train_on_responses_only
    if kind == "text":
        if responses_only:
            raise ValueError(f"train_on_responses_only=True needs 'messages' or 'prompt'/'completion' records; "
                             f"this record has only the text field {dataset_text_field!r}")
        text = record[dataset_text_field]
        bos = getattr(tokenizer, "bos_token", None)
        already = isinstance(text, str) and bool(bos) and text.startswith(bos)  # a rendered chat: one BOS, as Unsloth
        ids = _with_eos(tokenizer, _encode(tokenizer, text, special=not already), eos_token_id)
        return _arrays([(ids, True)])
    if kind == "messages":
        return _arrays(_chat_chunks(tokenizer, record["messages"], n_prompt=0, responses_only=responses_only))
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt / completion
        return _arrays(_chat_chunks(tokenizer, prompt + completion, n_prompt=len(prompt),
                                    responses_only=responses_only))
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("'prompt' and 'completion' must both be strings or both be lists of messages; got "
                         f"{type(prompt).__name__} and {type(completion).__name__}")
    prompt_ids = _encode(tokenizer, prompt, special=True)
    completion_ids = _with_eos(tokenizer, _encode(tokenizer, completion, special=False), eos_token_id)
    return _arrays([(prompt_ids, not responses_only), (completion_ids, True)])


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    if not isinstance(text, str):
        raise ValueError(f"expected a string to tokenize, got {type(text).__name__}")
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(tokenizer, ids: list[int], eos: int | None = None) -> list[int]:
    """ids + [EOS] (`eos`, else the tokenizer's), unless they already end with it (a text written with its EOS, as
    Unsloth's notebooks' `text + EOS_TOKEN`): TRL appends the EOS only to a text or completion that does not end
    with it."""
    eos = getattr(tokenizer, "eos_token_id", None) if eos is None else eos
    return ids if eos is None or ids[-1:] == [int(eos)] else ids + [int(eos)]


def _arrays(chunks: Sequence[tuple[list[int], bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates (token ids, trained?) chunks into (input_ids, labels)."""
    ids = np.asarray([t for chunk, _ in chunks for t in chunk], np.int32)
    labels = np.asarray([t if trained else IGNORE_INDEX for chunk, trained in chunks for t in chunk], np.int32)
    return ids, labels


def _chat_chunks(tokenizer, messages: list[dict], *, n_prompt: int, responses_only: bool):
    """The chat split into (token ids, trained?) chunks at the boundaries of each answer.

    An answer is an assistant message at index >= n_prompt: it spans from the end of the conversation before it
    rendered with the generation prompt, to the end of the conversation rendered through it (end-of-turn tokens
    included). Each chunk is tokenized on its own, exactly as generation sees a prompt followed by new tokens.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("'messages' records need a tokenizer with a chat template (tokenizer.chat_template is None)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'; got {m!r}")

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < n_prompt:
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)) or len(before) < cursor:
            raise ValueError(f"the chat template does not render message {i} as an extension of the messages before "
                             "it, so its answer cannot be located; use train_on_responses_only=False or "
                             "'prompt'/'completion' records")
        spans.append((len(before), len(through)))
        cursor = len(through)
    if responses_only and not spans:
        raise ValueError("train_on_responses_only=True but the conversation has no assistant answer to train on")
    cuts = [0] + [c for span in spans for c in span] + [len(full)]
    chunks = []
    for k in range(len(cuts) - 1):
        text = full[cuts[k]: cuts[k + 1]]
        if text:
            chunks.append((_encode(tokenizer, text, special=False), k % 2 == 1 or not responses_only))
    return chunks


def tokenize_dataset(dataset, tokenizer, *, max_seq_length: int | None, train_on_responses_only: bool | None = None,
                     dataset_text_field: str = "text", eos_token_id: int | None = None
                     ) -> list[dict[str, np.ndarray]]:
    """Rows {"input_ids", "labels"} for every record, truncated to max_seq_length (None: not truncated, for packing
    that cuts or wraps long examples, `fastlora_jax.packing`); rows without any label dropped."""
    rows, truncated, dropped = [], 0, 0
    for i, record in enumerate(load_records(dataset)):
        try:
            ids, labels = tokenize_record(record, tokenizer, train_on_responses_only=train_on_responses_only,
                                          dataset_text_field=dataset_text_field, eos_token_id=eos_token_id)
        except ValueError as e:
            raise ValueError(f"dataset record {i}: {e}") from None
        if max_seq_length is not None and len(ids) > max_seq_length:
            ids, labels, truncated = ids[:max_seq_length], labels[:max_seq_length], truncated + 1
        if np.count_nonzero(labels[1:] != IGNORE_INDEX) == 0:  # the first label is never a target
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if truncated:
        warnings.warn(f"{truncated} of the dataset's records were truncated to max_seq_length={max_seq_length}",
                      stacklevel=2)
    if dropped:
        warnings.warn(f"{dropped} records have no token to train on (after truncation) and were dropped", stacklevel=2)
    if not rows:
        raise ValueError("no record of the dataset has a token to train on")
    return rows


# ---------------------------------------------------------------------------------------------- batching


def length_buckets(max_seq_length: int, minimum: int = MIN_BUCKET) -> tuple[int, ...]:
    """Padded lengths: powers of two from `minimum` below max_seq_length, then max_seq_length itself."""
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length={max_seq_length}; accepted: a positive int")
    buckets, n = [], minimum
    while n < max_seq_length:
        buckets.append(n)
        n *= 2
    return (*buckets, max_seq_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    k = bisect.bisect_left(buckets, length)
    if k == len(buckets):
        raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")
    return buckets[k]


def collate(rows: Sequence[dict[str, np.ndarray]], *, batch_size: int, buckets: Sequence[int],
            pad_token_id: int = 0, layouts: dict[int, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Pads `rows` into a batch of `batch_size` rows (missing rows are empty: all labels -100) of a bucketed length.
    Packed rows (with "segment_ids") of a length T in `layouts` ({T: (chunk, slots)}, from `ragged_layouts`) also
    get their ragged layout of that shape where it holds them, "segment_offsets" / "segment_lengths"
    (`fastlora_jax.packed_attention.segment_layout`), with which cuDNN attends within each example only."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    T = bucket_for(max(len(r["input_ids"]) for r in rows), buckets)
    keys = rows[0].keys()
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "segment_ids": 0, "positions": 0}
    batch = {k: np.full((batch_size, T), fill[k], np.int32) for k in keys}  # [B, T]
    for b, row in enumerate(rows):
        for k in keys:
            batch[k][b, : len(row[k])] = row[k]
    if "segment_ids" in batch and layouts and T in layouts and layout_fits(batch["segment_ids"], *layouts[T]):
        chunk, slots = layouts[T]
        batch.update(segment_layout(batch["segment_ids"], chunk=chunk, slots=slots))
    return batch


def ragged_layouts(rows: Sequence[dict[str, np.ndarray]], buckets: Sequence[int], *,
                   slot_limit: Callable[[int], int] | None = None) -> dict[int, tuple[int, int]]:
    """The ragged layout shapes ({T: (chunk, slots)}) for batches of packed `rows` (`packed_attention.layout_plan`,
    slot_limit(T) the most slots a batch may use); {} for rows that are not packed."""
    if not rows or "segment_ids" not in rows[0]:
        return {}
    return layout_plan(rows, buckets, slot_limit=slot_limit)


def layout_misfits(rows: Sequence[dict[str, np.ndarray]], buckets: Sequence[int],
                   layouts: dict[int, tuple[int, int]] | None) -> np.ndarray | None:
    """[rows] bool: the packed rows that the layout of their padded length (`ragged_layouts`) does not hold, which
    `epoch_order` batches apart from the others so that one such row does not send a whole batch to the mask path.
    None where there is no layout, or where every row or none fits (nothing to group)."""
    if not layouts or not rows or "segment_ids" not in rows[0]:
        return None
    misfits = np.ones(len(rows), bool)
    padded = np.array([bucket_for(len(r["segment_ids"]), buckets) for r in rows])  # [rows]
    for T, (chunk, slots) in layouts.items():
        members = np.flatnonzero(padded == T)
        if members.size:
            blocks = padded_blocks([rows[i]["segment_ids"] for i in members], T)
            misfits[members] = ~np.concatenate([rows_fitting(ids, chunk, slots) for ids in blocks])
    return misfits if 0 < misfits.sum() < len(rows) else None


def rows_digest(rows: Sequence[dict[str, np.ndarray]], misfits: np.ndarray | None = None) -> str:
    """sha256 (hex) of tokenized rows in order, every field, and of the rows batched apart (`layout_misfits`): with
    the seed and the rows per step, what decides each step's batch. A checkpoint records it, so that a resumed run
    can tell it is about to train on other rows."""
    digest = hashlib.sha256()
    for row in rows:
        for key in sorted(row):
            value = np.ascontiguousarray(row[key])
            digest.update(f"{key}:{value.dtype.str}:{value.size};".encode())
            digest.update(value.tobytes())
    if misfits is not None:
        digest.update(b"misfits;" + np.packbits(misfits).tobytes())
    return digest.hexdigest()


def num_batches(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)


def epoch_order(n_rows: int, *, seed: int, epoch: int, shuffle: bool = True, batch_size: int = 1,
                misfits: np.ndarray | None = None) -> np.ndarray:
    """The row order of one epoch: a permutation seeded by (seed, epoch), or dataset order.

    misfits [n_rows] bool (`layout_misfits`): the rows the ragged layout does not hold are batched among themselves,
    at most one batch holding both kinds. Shuffled, the batches then come in a shuffled order (the short last batch,
    if any, last); unshuffled (evaluation), the fitting rows come first, each kind in dataset order. Every row still
    comes once an epoch; only which rows share a batch changes."""
    if misfits is not None and len(misfits) != n_rows:
        raise ValueError(f"misfits has {len(misfits)} entries for {n_rows} rows; accepted: one per row")
    if not shuffle:
        order = np.arange(n_rows)
        return order if misfits is None else np.concatenate([order[~misfits], order[misfits]])
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_rows)
    if misfits is None:
        return order
    grouped = np.concatenate([order[~misfits[order]], order[misfits[order]]])  # fitting rows first
    full = n_rows // batch_size
    batches = grouped[: full * batch_size].reshape(full, batch_size)[rng.permutation(full)]  # [full, batch_size]
    return np.concatenate([batches.reshape(-1), grouped[full * batch_size:]])


def iterate_batches(rows: Sequence[dict[str, np.ndarray]], *, batch_size: int, buckets: Sequence[int],
                    pad_token_id: int = 0, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                    start: int = 0, layouts: dict[int, tuple[int, int]] | None = None,
                    misfits: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch, from batch index `start` on (resuming skips without collating); `layouts`: packed
    rows' ragged layout shapes (`ragged_layouts`), or None for none; `misfits`: the rows batched apart
    (`layout_misfits`, `epoch_order`)."""
    order = epoch_order(len(rows), seed=seed, epoch=epoch, shuffle=shuffle, batch_size=batch_size, misfits=misfits)
    for k in range(start, num_batches(len(rows), batch_size)):
        chosen = [rows[i] for i in order[k * batch_size: (k + 1) * batch_size]]
        yield collate(chosen, batch_size=batch_size, buckets=buckets, pad_token_id=pad_token_id, layouts=layouts)


def count_tokens(batch: dict[str, np.ndarray], pad_token_id: int = 0) -> int:
    """Real (non-padding) tokens in a batch, for throughput: segment ids > 0 when packed, else each row's tokens
    before its trailing padding (pad_token_id with label -100)."""
    if "segment_ids" in batch:
        return int(np.count_nonzero(batch["segment_ids"]))
    if "attention_mask" in batch:
        return int(np.count_nonzero(batch["attention_mask"]))
    padding = (batch["input_ids"] == pad_token_id) & (batch["labels"] == IGNORE_INDEX)  # [B, T]
    trailing = np.argmin(padding[:, ::-1], axis=1)  # [B] length of the trailing run of padding
    trailing = np.where(padding.all(axis=1), padding.shape[1], trailing)
    return int(padding.size - trailing.sum())


def check_token_ids(ids, vocab_size: int, *, where: str) -> None:
    """Raises ValueError when an id of `ids` (any int array) is outside [0, vocab_size), naming the largest (or the
    most negative) one: the model would gather past its embeddings, which JAX does without an error (a NaN loss,
    junk tokens). One host-side min / max over the ids."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return
    largest, smallest = int(ids.max()), int(ids.min())
    if largest >= vocab_size:
        raise ValueError(f"{where} holds token id {largest} but the model's vocab_size is {vocab_size} (ids "
                         f"0..{vocab_size - 1}); likely cause: a tokenizer with added tokens the model's embeddings do "
                         "not have; use the model's own tokenizer, or resize the embeddings to the tokenizer's length "
                         "(transformers' resize_token_embeddings) and load that checkpoint")
    if smallest < 0:
        raise ValueError(f"{where} holds token id {smallest}; accepted: ids in [0, {vocab_size})")


def check_rows_vocab(rows: Sequence[dict[str, np.ndarray]], vocab_size: int, *, where: str = "the dataset") -> None:
    """`check_token_ids` over the input_ids and the labels (other than -100) of tokenized rows."""
    ids = [r["input_ids"] for r in rows] + [r["labels"][r["labels"] != IGNORE_INDEX] for r in rows if "labels" in r]
    check_token_ids(np.concatenate(ids) if ids else np.zeros(0, np.int32), vocab_size, where=where)


def prepare_rows(dataset, tokenizer, *, max_seq_length: int, packing: bool = False, packing_strategy: str = "bfd",
                 train_on_responses_only: bool | None = None, dataset_text_field: str = "text"
                 ) -> list[dict[str, np.ndarray]]:
    """Tokenized (and, with packing, packed: TRL's packing_strategy, `fastlora_jax.packing`) rows of a dataset, ready
    for `iterate_batches`. For the rows and batches SFTTrainer(packing=True) makes for a model (cuDNN's ragged
    layout), see `packed_batches`."""
    check_strategy(packing_strategy, name="packing_strategy")  # before tokenizing
    whole = packing and keeps_long_examples(packing_strategy)
    rows = tokenize_dataset(dataset, tokenizer, max_seq_length=None if whole else max_seq_length,
                            train_on_responses_only=train_on_responses_only, dataset_text_field=dataset_text_field)
    return pack(rows, max_seq_length, strategy=packing_strategy) if packing else rows


def distinct_shapes(batches: Iterable[dict[str, np.ndarray]]) -> set[tuple[tuple[int, ...], ...]]:
    """The set of batch shapes (every array's, by key) in a stream of batches (how many compilations a run needs)."""
    return {tuple(b[k].shape for k in sorted(b)) for b in batches}
