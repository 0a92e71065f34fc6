"""PackedBatches: SFTTrainer(packing=True)'s rows and batches, for a loop of one's own."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fastlora_jax import data, packed_attention, packing
from fastlora_jax.packed_batches import PackedBatches


def _examples(seed: int, n: int, median: int) -> list[dict[str, np.ndarray]]:
    """n tokenized examples, lengths lognormal around `median` (sigma 0.8), 2..2048 tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.8, n).astype(int), 2, 2048)
    rows = []
    for k in lengths:
        ids = rng.integers(1, 1000, k).astype(np.int32)
        rows.append({"input_ids": ids, "labels": ids.copy()})
    return rows


def _model(head_dim: int):
    """A stand-in with only what PackedBatches reads: a config of 32 query heads (1B: head_dim 64, 8B: 128)."""
    return SimpleNamespace(config=SimpleNamespace(num_attention_heads=32, head_dim=head_dim))


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_packed_batches_are_the_batches_sft_trainer_trains_on(tmp_path):
    """Same rows, plan, rows batched apart and batches as SFTTrainer(packing=True), gradient accumulation included
    (the layout's workspace sized for the micro-batch)."""
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    examples, model = _examples(14, 1500, 100), _model(64)
    trainer = SFTTrainer(model, None, train_dataset=[{"input_ids": r["input_ids"].tolist()} for r in examples],
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, max_seq_length=2048,
                                        per_device_train_batch_size=4, gradient_accumulation_steps=2, packing=True,
                                        save_strategy="no"))
    packed = PackedBatches(examples, model, batch_size=8, micro_batch_size=4, max_seq_length=2048,
                           buckets=trainer.buckets)
    slot_limit = lambda T: packed_attention.max_slots(4, T, 32 * 64)  # noqa: E731  (the micro-batch's rows)
    assert packed.max_examples == slot_limit(2048) - 1
    assert _same_batches(packed.rows, packing.pack_rows(examples, 2048, max_examples=slot_limit(2048) - 1))
    assert _same_batches(packed.rows, trainer.train_rows)
    plan = data.ragged_layouts(packed.rows, trainer.buckets, slot_limit=slot_limit)
    assert packed.plan == plan == trainer.layout_plan and 2048 in plan
    misfits = data.layout_misfits(packed.rows, trainer.buckets, packed.plan)
    assert misfits is not None and misfits.any()
    np.testing.assert_array_equal(packed.misfits, misfits)
    np.testing.assert_array_equal(trainer.misfits, misfits)
    assert len(packed) == trainer.steps_per_epoch
    upcoming = trainer._batches_from(0, seed=3)
    assert _same_batches(list(packed.epoch(0, seed=3)), [next(upcoming) for _ in range(len(packed))])
    # the micro-batch sizes the layout: 8 rows a pass would allow fewer slots, so fewer examples a row
    assert PackedBatches(examples, model, batch_size=8, max_seq_length=2048).max_examples <= packed.max_examples


def test_packed_batches_cover_every_row_once_an_epoch_and_resume_mid_epoch():
    examples = _examples(3, 400, 120)
    packed = PackedBatches(examples, _model(128), batch_size=4, max_seq_length=2048)
    epoch = list(packed.epoch(1, seed=0))
    assert len(epoch) == len(packed) == data.num_batches(len(packed.rows), 4)
    tokens = sorted(int(np.count_nonzero(b["segment_ids"])) for b in epoch)
    assert sum(tokens) == sum(len(r["input_ids"]) for r in examples)
    assert _same_batches(list(packed.epoch(1, seed=0, start=5)), epoch[5:])
    assert not _same_batches(list(packed.epoch(2, seed=0)), epoch)


def test_packed_batches_attach_the_layout_only_where_the_model_runs_it(monkeypatch):
    examples = _examples(5, 300, 240)
    packed = PackedBatches(examples, _model(128), batch_size=4, max_seq_length=2048)
    assert packed.plan  # planned from the config on every machine
    assert (packed.layouts is not None) == packed_attention.ragged_supported()
    monkeypatch.setattr(packed_attention, "ragged_supported", lambda: True)  # as on a Hopper GPU
    on_gpu = PackedBatches(examples, _model(128), batch_size=4, max_seq_length=2048)
    assert on_gpu.layouts == packed.plan
    with_layout = [set(packed_attention.SEGMENT_KEYS) <= set(b) for b in on_gpu.epoch(0, seed=0)]
    assert np.mean(with_layout) > 0.9 and not any(set(packed_attention.SEGMENT_KEYS) & set(b)
                                                  for b in packed.epoch(0, seed=0) if packed.layouts is None)
    meshed = SimpleNamespace(config=_model(128).config, model=SimpleNamespace(mesh=object()))  # sharded: the mask
    assert PackedBatches(examples, meshed, batch_size=4, max_seq_length=2048).layouts is None


def test_packed_batches_without_a_config_pack_best_fit_with_no_layout():
    examples = _examples(7, 200, 240)
    packed = PackedBatches(examples, None, batch_size=4, max_seq_length=2048)
    assert packed.max_examples is None and packed.plan == {} and packed.layouts is None and packed.misfits is None
    assert _same_batches(packed.rows, packing.pack_rows(examples, 2048))


@pytest.mark.parametrize("kwargs", [dict(batch_size=6, micro_batch_size=4), dict(batch_size=0),
                                    dict(batch_size=4, micro_batch_size=0)])
def test_packed_batches_refuse_batch_sizes_that_do_not_divide(kwargs):
    with pytest.raises(ValueError, match=f"batch_size={kwargs['batch_size']}"):
        PackedBatches(_examples(1, 20, 50), None, max_seq_length=256, **kwargs)


def test_packed_batches_refuse_buckets_short_of_max_seq_length():
    with pytest.raises(ValueError, match=r"buckets=\(128,\) must reach max_seq_length=256"):
        PackedBatches(_examples(1, 20, 50), None, batch_size=2, max_seq_length=256, buckets=(128,))


def test_sft_trainer_evaluates_packed_rows_on_their_layout(monkeypatch, tmp_path):
    """eval_packing: the eval rows are packed, planned and batched apart as PackedBatches does for the eval batch
    size, and evaluate() hands their layout to the eval step where the model runs it, the fitting rows first."""
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    monkeypatch.setattr(packed_attention, "ragged_supported", lambda: True)  # as on a Hopper GPU
    train, model = _examples(2, 40, 100), _model(64)
    held_out = _examples(9, 600, 60) + _examples(4, 5, 1400)  # examples longer than the chunk: rows that misfit
    trainer = SFTTrainer(model, None, train_dataset=[{"input_ids": r["input_ids"].tolist()} for r in train],
                         eval_dataset=[{"input_ids": r["input_ids"].tolist()} for r in held_out],
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, max_seq_length=2048, packing=True,
                                        per_device_train_batch_size=2, per_device_eval_batch_size=4,
                                        save_strategy="no"))
    packed = PackedBatches(held_out, model, batch_size=4, max_seq_length=2048, buckets=trainer.buckets)
    assert _same_batches(trainer.eval_rows, packed.rows) and trainer.eval_layout_plan == packed.plan
    assert trainer.eval_layouts == packed.plan and packed.misfits is not None
    np.testing.assert_array_equal(trainer.eval_misfits, packed.misfits)

    seen = []
    trainer._eval_step = SimpleNamespace(mean_loss=lambda batches: seen.extend(batches) or 0.0)
    trainer.evaluate()
    assert _same_batches(seen, list(packed.epoch(0, seed=0, shuffle=False)))
    with_layout = [set(packed_attention.SEGMENT_KEYS) <= set(b) for b in seen]
    fitting, apart = int(np.count_nonzero(~packed.misfits)), int(np.count_nonzero(packed.misfits))
    assert fitting % 4 == 0 and apart == 4  # this data: whole batches of each kind
    assert with_layout == [True] * (fitting // 4) + [False]  # the fitting rows first
    assert sum(int(np.count_nonzero(b["segment_ids"])) for b in seen) == sum(len(r["input_ids"]) for r in held_out)


def test_rows_dropped_by_train_on_responses_only_leave_the_misfits_aligned(tmp_path):
    """train_on_responses_only drops packed rows left with nothing to train on; the rows batched apart then follow
    the rows that remain (before: one entry per original row, and the first epoch raised ValueError)."""
    from fastlora_jax.chat_templates import train_on_responses_only
    from fastlora_jax.trainer import SFTConfig, SFTTrainer
    from helpers import tiny_chat_tokenizer

    tokenizer, rng = tiny_chat_tokenizer(), np.random.default_rng(0)
    user, answer = (tokenizer(part, add_special_tokens=False)["input_ids"]
                    for part in ("<|im_start|>user\n", "<|im_start|>assistant\n"))

    def record(n: int, answered: bool) -> dict:
        body = rng.integers(0, 200, n).tolist()
        return {"input_ids": user + body[: n // 2] + answer + body[n // 2:] if answered else user + body}

    lengths = np.clip(rng.lognormal(np.log(60), 0.8, 600), 4, 900).astype(int)
    records = [record(n, True) for n in lengths] + [record(2040, False) for _ in range(3)]  # rows of their own
    trainer = SFTTrainer(_model(64), tokenizer, records, eval_dataset=records[-40:],
                         args=SFTConfig(output_dir=str(tmp_path), max_seq_length=2048, packing=True,
                                        per_device_train_batch_size=4, save_strategy="no"))
    before = len(trainer.train_rows)
    assert trainer.misfits is not None and len(trainer.misfits) == before
    with pytest.warns(UserWarning, match="have no answer to train on"):
        train_on_responses_only(trainer, "<|im_start|>user\n", "<|im_start|>assistant\n")
    assert len(trainer.train_rows) == before - 3
    np.testing.assert_array_equal(trainer.misfits, data.layout_misfits(trainer.train_rows, trainer.buckets,
                                                                         trainer.layout_plan))
    assert trainer.eval_misfits is None or len(trainer.eval_misfits) == len(trainer.eval_rows)
    upcoming = trainer._batches_from(0, seed=1)
    epoch = [next(upcoming) for _ in range(trainer.steps_per_epoch)]
    assert sum(int(np.count_nonzero(b["segment_ids"])) for b in epoch) == sum(
        len(r["input_ids"]) for r in trainer.train_rows)
