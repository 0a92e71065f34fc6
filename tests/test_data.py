"""Dataset loading and formatting: text / messages / prompt-completion records, response-only labels, packing with
segment ids (packed loss == unpacked loss), and length buckets bounding the distinct batch shapes."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fastlora_jax import data, packed_attention, packing
from fastlora_jax.packed_attention import layout_fits
from helpers import TINY, rel_err, tiny_chat_tokenizer

IGNORE = data.IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]


def test_load_records_list_jsonl_and_datasets(tmp_path):
    import datasets

    records = [{"text": "a"}, {"text": "b c"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert data.load_records(records) == records
    assert data.load_records(str(path)) == records
    assert data.load_records(datasets.Dataset.from_list(records)) == records
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.load_records(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        data.load_records(str(bad))
    with pytest.raises(TypeError, match="list of dicts"):
        data.load_records(42)
    with pytest.raises(ValueError, match="expected a 'text' field"):
        data.tokenize_record({"body": "x"}, None)


def test_mixed_dataset_rows_take_the_format_of_their_non_null_fields(tokenizer):
    """A datasets.Dataset of text and chat records gives every row both columns, None where a record had none:
    each row is read as the record it was."""
    import datasets

    rows = data.load_records(datasets.Dataset.from_dict({"text": ["hello world", None], "messages": [None, CHAT]}))
    assert rows[1]["text"] is None
    assert [data.record_kind(r) for r in rows] == ["text", "messages"]
    np.testing.assert_array_equal(data.tokenize_record(rows[1], tokenizer)[0],
                                  data.tokenize_record({"messages": CHAT}, tokenizer)[0])
    with pytest.raises(ValueError, match=r"record with fields \[\]"):
        data.record_kind({"text": None, "messages": None})


def test_text_record_trains_on_every_token_and_ends_with_eos(tokenizer):
    ids, labels = data.tokenize_record({"text": "hello world"}, tokenizer)
    expected = tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]
    assert ids.tolist() == expected and labels.tolist() == expected
    with pytest.raises(ValueError, match="train_on_responses_only=True needs"):
        data.tokenize_record({"text": "x"}, tokenizer, train_on_responses_only=True)
    ids, _ = data.tokenize_record({"content": "abc"}, tokenizer, dataset_text_field="content")
    assert tokenizer.decode(ids) == "abc<|im_end|>"


def test_a_text_or_completion_that_ends_with_eos_gets_no_second_eos(tokenizer):
    """As TRL: the EOS is appended only where the text does not end with it (Unsloth's notebooks write
    `text + EOS_TOKEN`); a second EOS would teach the model to emit EOS after EOS."""
    eos = tokenizer.eos_token
    for record in ({"text": "hello world"}, {"text": "hello world" + eos}):
        ids, labels = data.tokenize_record(record, tokenizer)
        assert tokenizer.decode(ids) == "hello world" + eos and labels.tolist() == ids.tolist()
    for completion in (" 4", " 4" + eos):
        ids, labels = data.tokenize_record({"prompt": "2+2=", "completion": completion}, tokenizer)
        assert tokenizer.decode(ids) == "2+2= 4" + eos and tokenizer.decode(ids[labels != IGNORE]) == " 4" + eos
    ids, labels = data.tokenize_record({"prompt": "2+2=", "completion": ""}, tokenizer)  # still trains the EOS
    assert tokenizer.decode(ids[labels != IGNORE]) == eos


def test_messages_use_the_chat_template_and_mask_exactly_the_prompts(tokenizer):
    ids, labels = data.tokenize_record({"messages": CHAT}, tokenizer, train_on_responses_only=True)
    # The tokens are the template's, tokenized as transformers does.
    full = tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert ids.tolist() == list(full)
    # Labelled: exactly the assistant answers with their end-of-turn; everything else (the prompts) is -100.
    first = len(tokenizer.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True)["input_ids"])
    first_end = len(tokenizer.apply_chat_template(CHAT[:3], tokenize=True)["input_ids"])
    second = len(tokenizer.apply_chat_template(CHAT[:4], tokenize=True, add_generation_prompt=True)["input_ids"])
    expected = np.full(len(ids), IGNORE)
    expected[first:first_end] = ids[first:first_end]
    expected[second:] = ids[second:]
    np.testing.assert_array_equal(labels, expected)
    assert tokenizer.decode(ids[first:first_end]) == "Paris.<|im_end|>\n"
    assert tokenizer.decode(ids[second:]) == "Rome.<|im_end|>\n"
    # Without the flag every token is a label.
    _, all_labels = data.tokenize_record({"messages": CHAT}, tokenizer)
    np.testing.assert_array_equal(all_labels, ids)


def test_prompt_completion_strings_and_conversations(tokenizer):
    record = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    ids, labels = data.tokenize_record(record, tokenizer)  # default: completion only (TRL)
    n_prompt = len(tokenizer(record["prompt"])["input_ids"])
    assert tokenizer.decode(ids) == "Q: 2+2?\nA: 4<|im_end|>"
    assert (labels[:n_prompt] == IGNORE).all() and (labels[n_prompt:] == ids[n_prompt:]).all()
    _, labels = data.tokenize_record(record, tokenizer, train_on_responses_only=False)
    np.testing.assert_array_equal(labels, ids)
    conv = {"prompt": CHAT[:2], "completion": CHAT[2:3]}
    ids, labels = data.tokenize_record(conv, tokenizer)
    assert tokenizer.decode(ids[labels != IGNORE]) == "Paris.<|im_end|>\n"
    with pytest.raises(ValueError, match="both be strings or both be lists"):
        data.tokenize_record({"prompt": "x", "completion": CHAT[2:3]}, tokenizer)


def test_tokenize_dataset_truncates_and_drops_rows_without_labels(tokenizer):
    records = [{"text": "x" * 50}, {"prompt": "p" * 40, "completion": "c"}, {"text": "ok"}]
    with pytest.warns(UserWarning) as caught:
        rows = data.tokenize_dataset(records, tokenizer, max_seq_length=20)
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated" in messages and "dropped" in messages
    assert [len(r["input_ids"]) for r in rows] == [20, 3]


def _random_rows(rng, n, lo, hi, vocab=256):
    rows = []
    for _ in range(n):
        ids = rng.integers(0, vocab, rng.integers(lo, hi + 1)).astype(np.int32)
        labels = ids.copy()
        labels[: rng.integers(0, len(ids) // 2 + 1)] = IGNORE  # a masked prompt of random length
        labels[-1] = ids[-1]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_packing_segment_ids_positions_and_contents():
    rng = np.random.default_rng(0)
    rows = _random_rows(rng, 40, 2, 30)
    packed = packing.pack_rows(rows, max_seq_length=64)
    assert len(packed) < len(rows)
    seen = []
    for row in packed:
        n = len(row["input_ids"])
        assert n <= 64 and all(len(row[k]) == n for k in row)
        seg, pos = row["segment_ids"], row["positions"]
        assert seg[0] == 1 and (np.diff(seg) >= 0).all() and (np.diff(seg) <= 1).all()  # 1, 1, 2, 2, 2, 3, ...
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            seen.append((row["input_ids"][where].tobytes(), row["labels"][where][1:].tobytes()))
            assert row["labels"][where[0]] == IGNORE
    expected = sorted((r["input_ids"].tobytes(), r["labels"][1:].tobytes()) for r in rows)
    assert sorted(seen) == expected  # every example exactly once, unsplit, labels kept
    batch = data.collate(packed[:3], batch_size=4, buckets=(32, 64))
    assert batch["segment_ids"].shape == (4, 64) and (batch["segment_ids"][3] == 0).all()
    assert data.count_tokens(batch) == sum(len(r["input_ids"]) for r in packed[:3])
    with pytest.raises(ValueError, match="max_seq_length=8"):
        packing.pack_rows(rows, max_seq_length=8)


def _examples_of(packed):
    """Each example of packed rows as (input_ids bytes, labels after the first bytes), sorted."""
    seen = []
    for row in packed:
        for s in range(1, row["segment_ids"].max() + 1):
            where = np.flatnonzero(row["segment_ids"] == s)
            assert (np.diff(where) == 1).all() and (row["positions"][where] == np.arange(len(where))).all()
            seen.append((row["input_ids"][where].tobytes(), row["labels"][where][1:].tobytes()))
    return sorted(seen)


def _short_examples(rng, n, median, T):
    """Chat-like lengths: lognormal around `median` tokens (most short, a long tail), 1..T."""
    lengths = np.clip(rng.lognormal(np.log(median), 0.8, n).astype(int), 1, T)
    return [{"input_ids": rng.integers(0, 256, k).astype(np.int32), "labels": rng.integers(0, 256, k).astype(np.int32)}
            for k in lengths]


def _share_fitting(packed, T, chunk, slots):
    """The share of packed rows, padded to T, that the ragged layout of (chunk, slots) holds."""
    return np.mean([layout_fits(np.pad(r["segment_ids"], (0, T - len(r["segment_ids"])))[None], chunk, slots)
                    for r in packed])


def test_packing_spreads_examples_over_rows_for_the_ragged_layout():
    rng = np.random.default_rng(7)
    rows = _short_examples(rng, 1500, 240, 2048)
    best_fit = packing.pack_rows(rows, 2048)
    spread = packing.pack_rows(rows, 2048, max_examples=7)
    assert len(spread) == len(best_fit)  # no row added
    assert _examples_of(spread) == _examples_of(best_fit) == sorted(
        (r["input_ids"].tobytes(), r["labels"][1:].tobytes()) for r in rows)  # each example once, whole
    assert all(len(r["input_ids"]) <= 2048 for r in spread)
    counts = lambda packed: np.array([r["segment_ids"].max() for r in packed])  # noqa: E731
    assert (counts(best_fit) > 7).mean() > 0.15  # best fit ends with rows of many short examples
    assert (counts(spread) > 7).mean() < 0.03
    # What it is for: a row of <= 7 examples and its padding fit one 2048-token chunk of 8 slots (8B, 4 x 2048).
    assert _share_fitting(best_fit, 2048, 2048, 8) < 0.9 and _share_fitting(spread, 2048, 2048, 8) > 0.97
    again = packing.pack_rows(rows, 2048, max_examples=7)
    assert all((a["input_ids"] == b["input_ids"]).all() and (a["segment_ids"] == b["segment_ids"]).all()
               for a, b in zip(spread, again))  # deterministic


def test_spread_rows_fit_smaller_chunks_where_they_hold_more_examples():
    rng = np.random.default_rng(8)
    rows = _short_examples(rng, 3000, 60, 1024)  # about 12 a row: more than 7, so a row's chunks share them
    best_fit = packing.pack_rows(rows, 1024)
    spread = packing.pack_rows(rows, 1024, max_examples=7)
    assert -(-len(rows) // len(best_fit)) > 7  # the average: one chunk of 8 slots a row cannot hold it; two can
    assert len(spread) == len(best_fit) and max(r["segment_ids"].max() for r in spread) <= 2 * 8 - 1
    fitting = []
    for packed in (best_fit, spread):
        chunk, slots = data.ragged_layouts(packed, (1024,), slot_limit=lambda T: 8)[1024]
        assert chunk < 1024
        fitting.append(_share_fitting(packed, 1024, chunk, slots))
    assert fitting[1] > fitting[0] + 0.1 and fitting[1] > 0.92  # `_chunk_order`: 0.93; 8 shuffles 0.914, none 0.86
    with pytest.raises(ValueError, match="max_examples=0"):
        packing.pack_rows(rows, 1024, max_examples=0)


def test_rows_the_layout_does_not_hold_are_batched_apart(monkeypatch):
    """Short examples (about 15 a 2048-token row): the rows holding an example longer than the plan's chunk, or too
    many pieces in one, are batched among themselves, so the other batches all get the layout (1B widths, 8 x 2048:
    8 slots)."""
    rng = np.random.default_rng(13)
    packed = packing.pack_rows(_short_examples(rng, 6000, 100, 2048), 2048, max_examples=7)
    layouts = data.ragged_layouts(packed, (2048,), slot_limit=lambda T: 8)
    misfits = data.layout_misfits(packed, (2048,), layouts)
    chunk, slots = layouts[2048]
    assert misfits.tolist() == [_share_fitting([r], 2048, chunk, slots) == 0 for r in packed]
    assert 0.03 < misfits.mean() < 0.2
    shares = {}
    for name, apart in (("shuffled", None), ("apart", misfits)):
        batches = list(data.iterate_batches(packed, batch_size=8, buckets=(2048,), seed=4, layouts=layouts,
                                            misfits=apart))
        shares[name] = np.mean(["segment_offsets" in b for b in batches])
        assert len(batches) == data.num_batches(len(packed), 8)
    assert shares["shuffled"] < 0.7 and shares["apart"] >= (len(packed) - misfits.sum()) // 8 / len(batches) > 0.8
    monkeypatch.setattr(packed_attention, "BLOCK_ROWS", 7)  # the same plan and rows, a few rows at a time
    assert data.ragged_layouts(packed, (2048,), slot_limit=lambda T: 8) == layouts
    np.testing.assert_array_equal(data.layout_misfits(packed, (2048,), layouts), misfits)
    assert data.layout_misfits(packed, (2048,), {}) is None
    assert data.layout_misfits(packed, (2048,), {2048: (2048, 64)}) is None  # every row fits: nothing to group


def test_the_chunk_order_counts_pieces_as_the_layout_does():
    """`packing._fullest_chunk` (which order `pack_rows` keeps) gives the fullest chunk's pieces as `packed_attention`'s
    layout counts them (examples, the padding, and the padding again at each chunk edge, which it leaves out)."""
    from fastlora_jax.packed_attention import _Runs

    rng = np.random.default_rng(9)
    for _ in range(200):
        T, chunk = 1024, int(rng.choice([128, 256, 512, 1024]))
        lengths = rng.integers(1, 300, rng.integers(1, 12))
        lengths = lengths[np.cumsum(lengths) <= T]
        if not len(lengths):
            continue
        ids = np.zeros((1, T), np.int32)
        ids[0, :lengths.sum()] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
        assert packing._fullest_chunk(lengths, T, chunk) == _Runs(ids).pieces_per_chunk(chunk)[0]


def test_packed_loss_equals_unpacked_loss():
    from fastlora_jax import LlamaConfig
    from fastlora_jax.loading import random_model
    from fastlora_jax.training import batch_loss

    model = random_model(LlamaConfig.from_hf_config(dict(TINY)), seed=1)
    rng = np.random.default_rng(1)
    rows = _random_rows(rng, 6, 5, 24)
    packed = packing.pack_rows(rows, max_seq_length=64)
    assert len(packed) < len(rows)
    loss = jax.jit(lambda batch: batch_loss(model, batch))
    packed_sum, packed_n = loss(data.collate(packed, batch_size=len(packed), buckets=(64,)))
    plain_sum, plain_n = loss(data.collate(rows, batch_size=len(rows), buckets=(32,)))
    assert int(packed_n) == int(plain_n) == sum(int((r["labels"][1:] != IGNORE).sum()) for r in rows)
    assert rel_err(packed_sum, plain_sum) < 1e-5


def test_buckets_bound_the_distinct_shapes():
    assert data.length_buckets(512) == (64, 128, 256, 512)
    assert data.length_buckets(300) == (64, 128, 256, 300)
    assert data.length_buckets(40) == (40,)
    rng = np.random.default_rng(2)
    rows = _random_rows(rng, 200, 2, 300)
    buckets = data.length_buckets(300)
    shapes = set()
    for epoch in range(2):
        for batch in data.iterate_batches(rows, batch_size=3, buckets=buckets, seed=0, epoch=epoch):
            T = batch["input_ids"].shape[1]
            lengths = [data.count_tokens({k: v[i: i + 1] for k, v in batch.items()}) for i in range(3)]
            assert T == data.bucket_for(max(lengths), buckets)  # the smallest bucket holding the longest row
            shapes.add(batch["input_ids"].shape)
    assert len(shapes) <= len(buckets) and {s[0] for s in shapes} == {3}
    # The last batch of an epoch is filled with empty rows (all labels ignored), keeping the batch size.
    last = list(data.iterate_batches(rows[:7], batch_size=3, buckets=buckets, shuffle=False))[-1]
    assert last["input_ids"].shape[0] == 3 and (last["labels"][1:] == IGNORE).all()


def test_epoch_order_is_deterministic_and_resumable():
    rows = [{"input_ids": np.full(3, i, np.int32), "labels": np.full(3, i, np.int32)} for i in range(10)]
    full = [b["input_ids"][:, 0].tolist() for b in data.iterate_batches(rows, batch_size=2, buckets=(4,), seed=5,
                                                                         epoch=1)]
    tail = [b["input_ids"][:, 0].tolist() for b in data.iterate_batches(rows, batch_size=2, buckets=(4,), seed=5,
                                                                         epoch=1, start=3)]
    assert tail == full[3:]
    assert sorted(sum(full, [])) == list(range(10))
    other = [b["input_ids"][:, 0].tolist() for b in data.iterate_batches(rows, batch_size=2, buckets=(4,), seed=5,
                                                                          epoch=2)]
    assert other != full


def test_an_epoch_with_misfits_batched_apart_is_a_shuffled_grouping():
    n, B = 23, 4
    misfits = np.zeros(n, bool)
    misfits[[1, 5, 6, 11, 17, 20, 22]] = True
    orders = [data.epoch_order(n, seed=5, epoch=e, batch_size=B, misfits=misfits) for e in range(6)]
    for order in orders:
        assert sorted(order) == list(range(n))  # every row once
        kinds = [set(misfits[order[k:k + B]]) for k in range(0, n, B)]
        assert sum(len(kind) == 2 for kind in kinds) <= 1  # at most one batch holds both
        assert len(order[(n // B) * B:]) == n % B  # the short batch stays last
    assert len({tuple(o) for o in orders}) == 6  # each epoch its own order
    np.testing.assert_array_equal(orders[0], data.epoch_order(n, seed=5, epoch=0, batch_size=B, misfits=misfits))
    first_misfit_batch = [min(k for k in range(0, n - B + 1, B) if misfits[o[k:k + B]].all()) for o in orders]
    assert min(first_misfit_batch) == 0 and len(set(first_misfit_batch)) > 1  # the batches come shuffled too
    plain = data.epoch_order(n, seed=5, epoch=0)
    np.testing.assert_array_equal(plain, data.epoch_order(n, seed=5, epoch=0, batch_size=B, misfits=None))
    unshuffled = data.epoch_order(n, seed=5, epoch=0, shuffle=False, batch_size=B, misfits=misfits)  # evaluation
    np.testing.assert_array_equal(unshuffled, [*np.flatnonzero(~misfits), *np.flatnonzero(misfits)])
    np.testing.assert_array_equal(data.epoch_order(n, seed=5, epoch=0, shuffle=False), np.arange(n))
    with pytest.raises(ValueError, match="misfits has 3 entries for 23 rows"):
        data.epoch_order(n, seed=5, epoch=0, batch_size=B, misfits=misfits[:3])


def test_rows_digest_changes_with_any_token_the_order_or_the_rows_batched_apart():
    rng = np.random.default_rng(15)
    rows = packing.pack_rows(_short_examples(rng, 60, 30, 256), 256)
    digest = data.rows_digest(rows)
    assert digest == data.rows_digest([{k: v.copy() for k, v in r.items()} for r in rows])
    changed = [dict(r) for r in rows]
    changed[3] = {**changed[3], "labels": changed[3]["labels"].copy()}
    changed[3]["labels"][-1] += 1
    assert data.rows_digest(changed) != digest
    assert data.rows_digest(rows[::-1]) != digest
    misfits = np.zeros(len(rows), bool)
    misfits[1] = True
    assert len({digest, data.rows_digest(rows, misfits), data.rows_digest(rows, ~misfits)}) == 3


def test_a_text_that_starts_with_bos_gets_no_second_one():
    """A chat rendered with tokenize=False starts with BOS; a tokenizer that adds BOS must not add another (Unsloth's
    has_bos_token_already), while a plain text still gets the tokenizer's BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.add_special_tokens(["<s>", "</s>"])
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>")
    plain, rendered = (data.tokenize_record({"text": t}, tokenizer)[0].tolist() for t in ("hi", "<s>hi"))
    assert plain == rendered == [256, vocab["h"], vocab["i"], 257]
