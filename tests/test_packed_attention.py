"""Packed rows' ragged layout for cuDNN: it describes exactly the segments, and the ragged path equals the mask path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastlora_jax import data, packed_attention, packing
from fastlora_jax.attention import attention, attention_reference
from fastlora_jax.config import LlamaConfig
from fastlora_jax.loss import IGNORE_INDEX, causal_lm_loss
from fastlora_jax.model import Llama
from fastlora_jax.training import _microbatches, batch_loss

from helpers import rel_err


def _packed_batch(seed: int, *, batch_size: int = 4, max_len: int = 512, n_rows: int = 40, longest: int = 200):
    rng = np.random.default_rng(seed)
    rows = [{"input_ids": rng.integers(1, 50, n).astype(np.int32), "labels": rng.integers(1, 50, n).astype(np.int32)}
            for n in rng.integers(1, longest, n_rows)]
    packed = packing.pack_rows(rows, max_len)
    buckets = data.length_buckets(max_len)
    return data.collate(packed[:batch_size], batch_size=batch_size, buckets=buckets,
                        layouts=data.ragged_layouts(packed, buckets))


def _segment_mask(segment_ids: np.ndarray) -> np.ndarray:
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, T]


@pytest.mark.parametrize("seed,longest", [(0, 200), (1, 60), (2, 500), (3, 2)])
def test_layout_covers_every_token_once_and_each_example_whole(seed, longest):
    batch = _packed_batch(seed, longest=longest)
    ids = batch["segment_ids"]
    B, T = ids.shape
    offsets, lengths = batch["segment_offsets"], batch["segment_lengths"]
    R, M = lengths.shape
    chunk = B * T // R
    assert offsets.shape == (R, M + 1) and offsets.dtype == lengths.dtype == np.int32
    assert M & (M - 1) == 0 and (chunk & (chunk - 1) == 0 or chunk == T)  # powers of two: few distinct shapes
    assert chunk >= min(T, packed_attention.MIN_CHUNK)
    valid = lengths >= 0
    assert (valid == (offsets[:, :M] >= 0)).all() and (offsets[:, M] == -1).all()
    assert (lengths[valid] >= 1).all() and (lengths[valid] <= chunk).all()  # cuDNN's sequences are <= C tokens
    assert (offsets[:, :M][valid] < chunk).all()  # each piece starts in its own chunk row
    assert valid[:, 0].any() and (np.diff(valid.astype(int), axis=1) <= 0).all()  # -1 only after the last piece
    piece = packed_attention.layout_pieces(offsets, lengths, B, T)  # raises where pieces overlap
    assert (piece >= 0).all()  # padding too: no output left unwritten
    for b in range(B):
        for s in np.unique(ids[b][ids[b] > 0]):
            assert len(np.unique(piece[b][ids[b] == s])) == 1  # an example is one piece
            assert not np.isin(piece[b][ids[b] == s], piece[b][ids[b] != s]).any()  # and holds nothing else
    mask = packed_attention.layout_mask(offsets, lengths, B, T)
    real = np.broadcast_to((ids > 0)[:, None, :, None], mask.shape)
    np.testing.assert_array_equal(mask[real], _segment_mask(ids)[real])


def test_layout_chunk_holds_the_longest_example_and_m_counts_pieces():
    ids = np.zeros((2, 512), np.int32)
    ids[0, :300], ids[0, 300:400], ids[1, :50] = 1, 2, 1
    layout = packed_attention.segment_layout(ids)
    np.testing.assert_array_equal(layout["segment_offsets"], [[0, 300, 400, -1, -1], [0, 50, -1, -1, -1]])
    np.testing.assert_array_equal(layout["segment_lengths"], [[300, 100, 112, -1], [50, 462, -1, -1]])
    ids = np.zeros((1, 512), np.int32)
    ids[0, :100], ids[0, 100:200] = 1, 2  # longest 100: chunks of 128; example 2 crosses one, padding is cut there
    layout = packed_attention.segment_layout(ids)
    np.testing.assert_array_equal(layout["segment_offsets"], [[0, 100, -1], [72, -1, -1], [0, -1, -1], [0, -1, -1]])
    np.testing.assert_array_equal(layout["segment_lengths"], [[100, 100], [56, -1], [128, -1], [128, -1]])


def test_a_run_has_one_layout_shape_per_length_and_it_holds_every_batch():
    rng = np.random.default_rng(8)
    rows = [{"input_ids": np.ones(n, np.int32), "labels": np.ones(n, np.int32)} for n in rng.integers(1, 300, 300)]
    packed = packing.pack_rows(rows, 512) + packing.pack_rows(rows[:3], 512)  # and a short row, for a smaller length
    buckets = data.length_buckets(512)
    layouts = data.ragged_layouts(packed, buckets)
    assert set(layouts) >= {512}
    shapes = {}
    for epoch in range(3):
        for batch in data.iterate_batches(packed, batch_size=3, buckets=buckets, epoch=epoch, layouts=layouts):
            T = batch["input_ids"].shape[1]
            chunk, slots = layouts[T]
            assert batch["segment_lengths"].shape == (3 * T // chunk, slots)
            shapes.setdefault(T, set()).add(tuple(batch[k].shape for k in sorted(batch)))
            assert (packed_attention.segment_layout(batch["segment_ids"])["segment_lengths"].shape[1] <= slots)
    assert all(len(s) == 1 for s in shapes.values())  # one compile per padded length, as without the layout
    assert data.ragged_layouts(rows, buckets) == {}  # rows that are not packed
    unpacked = next(data.iterate_batches(rows, batch_size=3, buckets=buckets, layouts=layouts))
    assert not set(packed_attention.SEGMENT_KEYS) & set(unpacked)


def test_a_slot_limit_gives_the_layout_to_the_batches_that_fit_and_the_mask_to_the_rest():
    rng = np.random.default_rng(9)
    lengths = np.concatenate([rng.integers(100, 500, 150), rng.integers(2, 12, 150)])  # gap fillers: many in a row
    rows = [{"input_ids": np.ones(n, np.int32), "labels": np.ones(n, np.int32)} for n in lengths]
    packed = packing.pack_rows(rows, 1024)
    buckets = data.length_buckets(1024)
    unlimited = data.ragged_layouts(packed, buckets)
    limit = unlimited[1024][1] // 4
    layouts = data.ragged_layouts(packed, buckets, slot_limit=lambda T: limit)
    chunk, slots = layouts[1024]
    assert slots <= limit and (chunk, slots) != unlimited[1024]
    shapes, with_layout = set(), 0
    for batch in data.iterate_batches(packed, batch_size=2, buckets=buckets, layouts=layouts):
        ids = batch["segment_ids"]
        fits = packed_attention.layout_fits(ids, chunk, slots)
        assert (set(packed_attention.SEGMENT_KEYS) <= set(batch)) == fits
        with_layout += fits
        shapes.add(tuple(batch[k].shape for k in sorted(batch)))
        if fits:
            B, T = ids.shape
            mask = packed_attention.layout_mask(batch["segment_offsets"], batch["segment_lengths"], B, T)
            real = np.broadcast_to((ids > 0)[:, None, :, None], mask.shape)
            np.testing.assert_array_equal(mask[real], _segment_mask(ids)[real])
    assert 0 < with_layout < data.num_batches(len(packed), 2) and len(shapes) == 2  # with and without the layout
    assert data.ragged_layouts(packed, buckets, slot_limit=lambda T: 0) == {}


def test_max_slots_keeps_the_workspace_within_the_limit():
    assert packed_attention.max_slots(4, 2048, 32 * 128) == 8  # 8B, 4 x 2048: 2 GiB at M 8
    assert packed_attention.max_slots(1, 16384, 32 * 128) == 4
    assert packed_attention.max_slots(64, 16384, 64 * 128) == 0
    for args in ((4, 2048, 4096), (2, 512, 2048), (1, 100, 64)):
        M = packed_attention.max_slots(*args)
        B, T, width = args
        assert packed_attention.workspace_bytes((B, T, 1, width), (1, M)) <= packed_attention.WORKSPACE_LIMIT_BYTES
        assert packed_attention.workspace_bytes((B, T, 1, width), (1, 2 * M)) > packed_attention.WORKSPACE_LIMIT_BYTES


def test_layout_refuses_what_it_cannot_describe():
    assert packed_attention.segment_layout(np.array([[1, 1, 2, 2, 1, 1]])) is None  # example 1 in two runs
    ids = np.repeat(np.arange(1, 9, dtype=np.int32), 64)[None]  # eight 64-token examples in one row of 512
    with pytest.raises(ValueError, match="chunk=32 for rows of 512 tokens whose longest example has 64"):
        packed_attention.segment_layout(ids, chunk=32)
    with pytest.raises(ValueError, match="slots=1, but a chunk of 128 tokens starts 2 pieces"):
        packed_attention.segment_layout(ids, chunk=128, slots=1)
    with pytest.raises(ValueError, match=r"piece \(0, 1\) of the layout overlaps another at tokens 3"):
        packed_attention.layout_pieces(np.array([[0, 3, -1]]), np.array([[4, 4]]), 1, 8)
    with pytest.raises(ValueError, match=r"segment_ids of shape \(6,\)"):
        packed_attention.segment_layout(np.array([1, 1, 2, 2, 0, 0]))
    batch = _packed_batch(0)
    q = jnp.zeros((4, 512, 4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="do not describe 4 x 256 tokens"):
        packed_attention.ragged_applies(q[:, :256], batch["segment_offsets"][:3], batch["segment_lengths"][:3])


def test_ragged_path_does_not_apply_on_cpu_or_in_float32():
    batch = _packed_batch(0)
    offsets, lengths = jnp.asarray(batch["segment_offsets"]), jnp.asarray(batch["segment_lengths"])
    assert not packed_attention.ragged_applies(jnp.zeros((4, 512, 4, 64), jnp.float32), offsets, lengths)
    assert not packed_attention.ragged_applies(jnp.zeros((4, 512, 4, 260), jnp.bfloat16), offsets, lengths)
    if jax.default_backend() == "cpu":
        assert not packed_attention.ragged_applies(jnp.zeros((4, 512, 4, 64), jnp.bfloat16), offsets, lengths)


def test_the_workspace_limit_allows_the_8b_packed_step_and_refuses_long_rows_of_many_examples():
    limit = packed_attention.WORKSPACE_LIMIT_BYTES
    assert packed_attention.workspace_bytes((4, 2048, 32, 128), (16, 8)) <= limit  # 8B, 4 x 2048, M 8
    assert packed_attention.workspace_bytes((4, 2048, 32, 128), (16, 16)) > limit
    assert packed_attention.workspace_bytes((1, 16384, 32, 128), (32, 64)) == 32 << 30  # the measured request


def test_microbatches_split_the_layout_with_their_rows():
    batch = _packed_batch(4)
    micro = _microbatches(batch, 2)
    for i in range(2):
        one = {k: v[i] for k, v in micro.items()}
        B, T = one["segment_ids"].shape
        mask = packed_attention.layout_mask(one["segment_offsets"], one["segment_lengths"], B, T)
        real = np.broadcast_to((one["segment_ids"] > 0)[:, None, :, None], mask.shape)
        np.testing.assert_array_equal(mask[real], _segment_mask(one["segment_ids"])[real])


CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, rope_theta=10000.0)


def test_batch_loss_passes_the_layout_only_to_losses_that_take_it():
    model = Llama(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in _packed_batch(5, max_len=256).items()}
    seen = {}

    def named(model, input_ids, labels, *, segment_ids=None, positions=None, dropout_rng=None):
        seen["named"] = True
        return causal_lm_loss(model, input_ids, labels, segment_ids=segment_ids, positions=positions)

    def any_keywords(model, input_ids, labels, **kw):
        seen["any"] = sorted(kw)
        return causal_lm_loss(model, input_ids, labels, **kw)

    plain = batch_loss(model, batch, loss_fn=named)
    with_layout = batch_loss(model, batch, loss_fn=any_keywords)
    assert seen == {"named": True, "any": sorted(["dropout_rng", "positions", "segment_ids",
                                                   *packed_attention.SEGMENT_KEYS])}
    assert float(plain[0]) == float(with_layout[0]) and int(plain[1]) == int(with_layout[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_ragged_attention_equals_the_reference(dtype):
    """cuDNN's ragged path against the float32 reference with the segment mask, forward and every gradient, on the
    real tokens (B 4, T 512, GQA 8/2 heads of 64)."""
    batch = _packed_batch(6)
    ids = jnp.asarray(batch["segment_ids"])
    B, T = ids.shape
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, 8, 64), dtype)
    k, v = (jax.random.normal(key, (B, T, 2, 64), dtype) for key in keys[1:3])
    g = jax.random.normal(keys[3], (B, T, 8, 64), jnp.float32)
    segments = (jnp.asarray(batch["segment_offsets"]), jnp.asarray(batch["segment_lengths"]))
    assert packed_attention.ragged_applies(q, *segments)
    real = (ids > 0)[:, :, None, None]

    def loss(attend, q, k, v):
        return jnp.sum(jnp.where(real, attend(q, k, v).astype(jnp.float32) * g, 0.0))

    ragged = lambda q, k, v: attention(q, k, v, None, segments=segments)  # noqa: E731
    ref = lambda q, k, v: attention_reference(q, k, v, _segment_mask(ids))  # noqa: E731
    out = jnp.where(real, ragged(q, k, v).astype(jnp.float32), 0)
    out_ref = jnp.where(real, ref(*(t.astype(jnp.float32) for t in (q, k, v))), 0)
    assert rel_err(out, out_ref) < 1e-2
    assert bool(jnp.isfinite(ragged(q, k, v)).all())  # padding outputs too
    grads = jax.grad(lambda *t: loss(ragged, *t), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(lambda *t: loss(ref, *t), argnums=(0, 1, 2))(*(t.astype(jnp.float32) for t in (q, k, v)))
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [False, "dots", "unsloth"])
def test_model_loss_and_gradients_with_the_layout_equal_the_mask_path(mode):
    model = Llama(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    model.model.gradient_checkpointing = mode
    batch = {k: jnp.asarray(v) for k, v in _packed_batch(7, max_len=256).items()}
    batch["input_ids"] = batch["input_ids"] % CONFIG.vocab_size
    batch["labels"] = jnp.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["labels"] % CONFIG.vocab_size)
    without = {k: v for k, v in batch.items() if k not in packed_attention.SEGMENT_KEYS}
    graphdef, state = nnx.split(model)

    def loss(state, batch):
        s, n = batch_loss(nnx.merge(graphdef, state), batch)
        return s / n

    (value, grads), (value_ref, grads_ref) = (jax.jit(jax.value_and_grad(loss))(state, b) for b in (batch, without))
    assert abs(float(value) - float(value_ref)) < 1e-2 * abs(float(value_ref))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert rel_err(a, b) < 3e-2
    # The ragged path ran, and the [B, 1, T, S] mask it does not need was not computed (B 4, T 256).
    compiled = {name: jax.jit(jax.grad(loss)).lower(state, b).compile().as_text() for name, b in
                (("ragged", batch), ("mask", without))}
    assert "[4,1,256,256]" in compiled["mask"] and "[4,1,256,256]" not in compiled["ragged"]


def test_sft_trainer_plans_a_layout_only_where_the_ragged_path_runs(tmp_path):
    """No layout where the model cannot use one (CPU, GPUs before Hopper): it would only add a compile per length."""
    from fastlora_jax.loading import random_model
    from fastlora_jax.lora import get_peft_model
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    rng = np.random.default_rng(11)
    records = [{"input_ids": rng.integers(1, CONFIG.vocab_size, n).tolist()} for n in rng.integers(20, 120, 16)]
    model = get_peft_model(random_model(CONFIG, dtype=jnp.bfloat16), r=8, target_modules=["q_proj"])
    trainer = SFTTrainer(model, None, train_dataset=records, args=SFTConfig(
        output_dir=str(tmp_path), max_steps=1, max_seq_length=256, packing=True, bf16=True, save_strategy="no"))
    assert (trainer.layouts is not None) == packed_attention.ragged_supported()
    if jax.default_backend() == "cpu":
        assert trainer.layouts is None and not packed_attention.ragged_supported()


def _chat_like_trainer(tmp_path, *, seed: int, median: int, n: int, head_dim: int, batch_size: int):
    """(model, records, SFTTrainer(packing=True)) for n examples lognormal around `median` tokens (sigma 0.8) at
    max_seq_length 2048; the model is only a config of 32 query heads of head_dim (8B: 128, 1B: 64)."""
    from types import SimpleNamespace

    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.8, n).astype(int), 2, 2048)
    records = [{"input_ids": rng.integers(1, 1000, k).tolist()} for k in lengths]
    model = SimpleNamespace(config=SimpleNamespace(num_attention_heads=32, head_dim=head_dim))
    trainer = SFTTrainer(model, None, train_dataset=records, args=SFTConfig(
        output_dir=str(tmp_path), max_steps=1, max_seq_length=2048, per_device_train_batch_size=batch_size,
        packing=True, save_strategy="no"))
    return model, records, trainer


def test_sft_trainer_packs_at_most_the_slots_of_a_chunk_less_one_to_a_row(tmp_path):
    """SFTTrainer(packing=True) spreads examples over rows by the model's config on every machine: for the 8B
    widths at 4 x 2048, 8 slots (`max_slots`), so at most 7 examples and the padding a row."""
    from fastlora_jax.packed_batches import PackedBatches

    model, records, trainer = _chat_like_trainer(tmp_path, seed=12, median=240, n=600, head_dim=128, batch_size=4)
    rows = [{"input_ids": np.asarray(r["input_ids"], np.int32), "labels": np.asarray(r["input_ids"], np.int32)}
            for r in records]
    assert PackedBatches(rows, model, batch_size=4, max_seq_length=2048).max_examples == 7
    assert packed_attention.max_slots(4, 2048, 32 * 128) - 1 == 7
    expected = packing.pack_rows(rows, 2048, max_examples=7)
    assert [r["segment_ids"].tolist() for r in trainer.train_rows] == [r["segment_ids"].tolist() for r in expected]
    assert np.mean([r["segment_ids"].max() <= 7 for r in trainer.train_rows]) > 0.97
    assert PackedBatches(rows, None, batch_size=4, max_seq_length=2048).max_examples is None


def test_sft_trainer_batches_the_rows_the_layout_does_not_hold_apart_on_every_machine(tmp_path):
    """Short examples (1B widths, 8 x 2048): SFTTrainer plans the layout from the config on any machine and batches
    the rows it does not hold among themselves, so the batches are the same with or without a GPU."""
    _, _, trainer = _chat_like_trainer(tmp_path, seed=14, median=100, n=3000, head_dim=64, batch_size=8)
    plan = data.ragged_layouts(trainer.train_rows, trainer.buckets,
                               slot_limit=lambda T: packed_attention.max_slots(8, T, 32 * 64))
    assert trainer.layout_plan == plan and 2048 in plan
    misfits = data.layout_misfits(trainer.train_rows, trainer.buckets, plan)
    assert misfits is not None and misfits.any()
    np.testing.assert_array_equal(trainer.misfits, misfits)
    fitting_ids = {r["input_ids"].tobytes() for r, m in zip(trainer.train_rows, misfits) if not m}
    upcoming = trainer._batches_from(0, seed=3)
    mixed = 0
    for _ in range(trainer.steps_per_epoch):
        batch = next(upcoming)
        kinds = {row[:np.count_nonzero(r)].tobytes() in fitting_ids
                 for row, r in zip(batch["input_ids"], batch["segment_ids"]) if r.any()}
        mixed += len(kinds) == 2
    assert mixed <= 1


@pytest.mark.gpu
def test_sft_trainer_packs_with_the_layout_on_a_gpu(tmp_path):
    """SFTTrainer(packing=True) on a GPU plans the layout and trains and evaluates with it, to the losses of the mask
    path."""
    from fastlora_jax.loading import random_model
    from fastlora_jax.lora import get_peft_model
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    rng = np.random.default_rng(10)
    records = [{"input_ids": rng.integers(1, CONFIG.vocab_size, n).tolist()} for n in rng.integers(20, 120, 64)]
    losses, eval_losses = {}, {}
    for name in ("ragged", "mask"):
        model = random_model(CONFIG, dtype=jnp.bfloat16)
        model = get_peft_model(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], random_state=0)
        args = SFTConfig(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2,
                         learning_rate=1e-3, max_seq_length=256, packing=True, bf16=True, logging_steps=1,
                         save_strategy="no", disable_tqdm=True)
        trainer = SFTTrainer(model, None, train_dataset=records, eval_dataset=records[:24], args=args)
        assert trainer.layouts and 256 in trainer.layouts and trainer.eval_layouts
        if name == "mask":
            trainer.layouts = trainer.eval_layouts = None
        losses[name] = [log["loss"] for log in trainer.train().log_history if "loss" in log]
        eval_losses[name] = trainer.evaluate()
    assert len(losses["ragged"]) == 3 and np.allclose(losses["ragged"], losses["mask"], rtol=2e-2)
    assert np.isclose(eval_losses["ragged"], eval_losses["mask"], rtol=2e-2)
