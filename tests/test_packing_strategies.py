"""TRL's packing strategies (SFTConfig.packing_strategy): "bfd", "bfd_split" and "wrapped", in `packing`,
PackedBatches and SFTTrainer."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from fastlora_jax import packing
from fastlora_jax.loss import IGNORE_INDEX
from fastlora_jax.packed_batches import PackedBatches


def _rows(*token_lists, labels=None):
    """Tokenized examples; labels = input_ids (every token trained on) unless given."""
    return [{"input_ids": np.array(ids, np.int32),
             "labels": np.array(ids if labels is None or labels[k] is None else labels[k], np.int32)}
            for k, ids in enumerate(token_lists)]


def _segments(row) -> frozenset[tuple[int, ...]]:
    """A packed row as the set of its examples' token tuples."""
    seg = row["segment_ids"]
    return frozenset(tuple(map(int, row["input_ids"][seg == s])) for s in range(1, seg.max() + 1))


def _examples(seed: int, n: int, median: int, longest: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.9, n).astype(int), 2, longest)
    return _rows(*(rng.integers(1, 1000, k) for k in lengths))


def test_bfd_and_wrapped_give_trls_documented_rows():
    """trl.pack_dataset's docstring example (seq_length 4): "bfd" truncates [1..5] to [1, 2, 3, 4] and packs
    [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]]; "wrapped" cuts the concatenation every 4 tokens."""
    examples = _rows([1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11])
    truncated = [{k: v[:4] for k, v in r.items()} for r in examples]
    bfd = packing.pack_rows(truncated, 4)
    assert len(bfd) == 3 and set(map(_segments, bfd)) == {
        frozenset({(1, 2, 3, 4)}), frozenset({(8, 9, 10), (11,)}), frozenset({(6, 7)})}
    wrapped = packing.wrap_rows(examples, 4)
    assert [r["input_ids"].tolist() for r in wrapped] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert all(r.keys() == {"input_ids", "labels"} for r in wrapped)  # no segments: attention crosses examples
    assert [r["labels"].tolist() for r in wrapped] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]


def test_split_long_cuts_only_the_long_examples_and_keeps_every_target():
    examples = _rows(list(range(1, 11)), [20, 21, 22], list(range(30, 55)),
                     labels=[None, None, [IGNORE_INDEX] * 12 + list(range(42, 55))])
    pieces = packing.split_long(examples, 8)
    lengths = [len(p["input_ids"]) for p in pieces]
    # 10 -> 8 + 2; 3 stays; 25 -> 8 + 8 + 8 + 1: its first piece is all prompt and the last has only the label
    # at its first position, which packing never trains on, so both go.
    assert lengths == [8, 2, 3, 8, 8]
    assert pieces[2] is examples[1]
    np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in pieces[:2]]), examples[0]["input_ids"])
    np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in pieces[3:]]), np.arange(38, 54))
    packed = packing.pack_rows(pieces, 8)
    assert max(len(r["input_ids"]) for r in packed) <= 8
    assert sorted(s for r in packed for s in _segments(r)) == sorted(tuple(map(int, p["input_ids"])) for p in pieces)
    with pytest.raises(ValueError, match=r"row 0 has 10 tokens > max_seq_length=8.*'bfd_split'"):
        packing.pack_rows(examples, 8)


def _model():
    """A stand-in with only what PackedBatches reads (1B widths: 32 heads of 64)."""
    return SimpleNamespace(config=SimpleNamespace(num_attention_heads=32, head_dim=64))


def test_packed_batches_with_each_strategy():
    examples = _examples(3, 600, 300, 5000)  # some longer than max_seq_length
    assert max(len(r["input_ids"]) for r in examples) > 2048
    split = PackedBatches(examples, _model(), batch_size=4, max_seq_length=2048, strategy="bfd_split")
    pieces = packing.split_long(examples, 2048)
    assert split.max_examples is not None and split.plan  # packed for the ragged layout as "bfd"
    assert sorted(s for r in split.rows for s in _segments(r)) == sorted(tuple(map(int, p["input_ids"]))
                                                                      for p in pieces)
    wrapped = PackedBatches(examples, _model(), batch_size=4, max_seq_length=2048, strategy="wrapped")
    assert (wrapped.max_examples, wrapped.plan, wrapped.layouts, wrapped.misfits) == (None, {}, None, None)
    assert all(len(r["input_ids"]) == 2048 for r in wrapped.rows[:-1])
    total = sum(len(r["input_ids"]) for r in examples)
    assert len(wrapped.rows) == -(-total // 2048)
    batches = list(wrapped.epoch(0, seed=1))
    assert len(batches) == len(wrapped) and all("segment_ids" not in b for b in batches)
    with pytest.raises(ValueError, match=r"strategy='wrap'; accepted: 'bfd', 'bfd_split', 'wrapped'"):
        PackedBatches(examples, _model(), batch_size=4, max_seq_length=2048, strategy="wrap")
    with pytest.raises(ValueError, match="max_seq_length=2048"):  # "bfd" takes examples that fit, as TRL truncates
        PackedBatches(examples, _model(), batch_size=4, max_seq_length=2048)


def test_sft_trainer_packs_whole_examples_for_bfd_split_and_wrapped(tmp_path):
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    examples = _examples(5, 300, 200, 1500)
    records = [{"input_ids": r["input_ids"].tolist()} for r in examples]
    for strategy in ("bfd_split", "wrapped"):
        args = SFTConfig(output_dir=str(tmp_path), max_steps=1, max_seq_length=512, per_device_train_batch_size=4,
                         packing=True, packing_strategy=strategy, save_strategy="no")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing truncated
            trainer = SFTTrainer(_model(), None, train_dataset=records, args=args)
        expected = PackedBatches(examples, _model(), batch_size=4, max_seq_length=512, buckets=trainer.buckets,
                                 strategy=strategy)
        assert len(trainer.train_rows) == len(expected.rows)
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(trainer.train_rows, expected.rows) for k in a)
    with pytest.warns(UserWarning, match="truncated to max_seq_length=512"):  # "bfd" truncates, as TRL
        SFTTrainer(_model(), None, train_dataset=records,
                   args=SFTConfig(output_dir=str(tmp_path), max_seq_length=512, packing=True, save_strategy="no"))
    with pytest.raises(ValueError, match=r"packing_strategy='bfd-requeue'; accepted: 'bfd', 'bfd_split', 'wrapped'"):
        SFTConfig(packing=True, packing_strategy="bfd-requeue")


def test_prepare_rows_packs_by_the_strategy():
    from helpers import tiny_chat_tokenizer

    from fastlora_jax import data

    tokenizer = tiny_chat_tokenizer()
    records = [{"text": "word " * n} for n in (3, 9, 20, 5, 2)]
    truncated = data.tokenize_dataset(records, tokenizer, max_seq_length=32)
    whole = data.tokenize_dataset(records, tokenizer, max_seq_length=None)
    assert max(len(r["input_ids"]) for r in whole) > 64
    for strategy in packing.STRATEGIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "bfd" warns of the truncation
            got = data.prepare_rows(records, tokenizer, max_seq_length=32, packing=True, packing_strategy=strategy)
        expected = packing.pack(truncated if strategy == "bfd" else whole, 32, strategy=strategy)
        assert len(got) == len(expected) and all(np.array_equal(a[k], b[k]) for a, b in zip(got, expected) for k in a)
    with pytest.raises(ValueError, match=r"packing_strategy='bfd-requeue'; accepted: 'bfd', 'bfd_split', 'wrapped'"):
        data.prepare_rows(records, tokenizer, max_seq_length=32, packing=True, packing_strategy="bfd-requeue")


def test_each_strategy_packs_as_trls_pack_dataset():
    """Against trl.data_utils.pack_dataset (the peer): "bfd" and "wrapped" give TRL's rows; "bfd_split" the same
    pieces in no more rows (best fit's ties among equal lengths are broken otherwise, so which short pieces share
    a row may differ). TRL keeps one-token pieces, which train on nothing (its collator masks position 0); we drop
    them."""
    from collections import Counter

    from datasets import Dataset
    from trl.data_utils import pack_dataset

    T = 64
    examples = _examples(0, 400, 40, 300)
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in examples]})

    def trl_rows(strategy, source=dataset):
        packed = pack_dataset(source, T, strategy=strategy)[:]
        if strategy == "wrapped":
            return packed["input_ids"]
        rows = []
        for ids, lengths in zip(packed["input_ids"], packed["seq_lengths"]):
            ends = np.cumsum(lengths)
            rows.append(frozenset(tuple(ids[e - n: e]) for e, n in zip(ends, lengths)))
        return rows

    truncated = [{k: v[:T] for k, v in r.items()} for r in examples]
    theirs = trl_rows("bfd", Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in truncated]}))
    ours = packing.pack(truncated, T, strategy="bfd")
    assert Counter(map(_segments, ours)) == Counter(theirs)

    wrapped = packing.pack(examples, T, strategy="wrapped")
    assert [r["input_ids"].tolist() for r in wrapped] == trl_rows("wrapped")

    theirs = trl_rows("bfd_split")
    ours = packing.pack(examples, T, strategy="bfd_split")
    their_pieces = Counter(s for row in theirs for s in row if len(s) > 1)
    assert Counter(s for row in ours for s in _segments(row)) == their_pieces
    assert sum(len(s) == 1 for row in theirs for s in row) > 0  # the case the docstring names occurs
    assert len(ours) <= len(theirs)
