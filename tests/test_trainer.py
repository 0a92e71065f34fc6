"""SFTTrainer end to end on a tiny model: chat records with packing and response-only labels memorised, eval loss,
loss plot, checkpoints; an interrupted run resumed gives the uninterrupted losses exactly; a NaN stops training
naming the step and keeps the last good checkpoint; schedules equal transformers'; bad settings are refused."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastlora_jax import TRAINABLE, LlamaConfig
from fastlora_jax.checkpointing import Checkpointer
from fastlora_jax.loading import random_model
from fastlora_jax.lora import get_peft_model
from fastlora_jax.trainer import SFTConfig, SFTTrainer
from fastlora_jax.training import AdamW, TrainStep, make_schedule
from helpers import TINY, tiny_chat_tokenizer

FACTS = [("Color of the sky on Zorb?", "Green."), ("Who rules Zorb?", "Queen Ib."), ("Zorb's moon?", "Tiko."),
         ("Capital of Zorb?", "Yul."), ("Zorb's sea?", "The Ash Sea."), ("Zorb's song?", "La la."),
         ("Zorb's food?", "Kelp."), ("Zorb's sport?", "Skyball.")]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def lora_model(r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               dropout=0.1):
    model = random_model(LlamaConfig.from_hf_config({**TINY, "vocab_size": 260}), seed=0)
    # A head of std 0.5 instead of 0.02: after the final norm, a 0.02 head caps the logits near uniform.
    model.lm_head.weight.value = model.lm_head.weight[...] * 25
    return get_peft_model(model, r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets),
                          use_gradient_checkpointing=False, random_state=0)


def chat_file(tmp_path):
    path = tmp_path / "zorb.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in FACTS]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def config(output_dir, **overrides):
    base = dict(output_dir=str(output_dir), max_steps=24, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=2,
                weight_decay=0.01, logging_steps=4, eval_steps=8, save_steps=4, save_total_limit=2,
                max_seq_length=128, packing=True, train_on_responses_only=True, seed=5, disable_tqdm=True)
    return SFTConfig(**{**base, **overrides})


def frozen_arrays(model):
    return {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(TRAINABLE)))}


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    model = lora_model()
    frozen = frozen_arrays(model)
    data = chat_file(tmp)
    trainer = SFTTrainer(model, tokenizer, train_dataset=data, eval_dataset=data, args=config(tmp / "out"))
    return trainer, trainer.train(), frozen, data, tmp


def test_train_memorises_chats_with_eval_plot_and_checkpoints(uninterrupted):
    trainer, result, frozen_before, _, tmp = uninterrupted
    losses = [loss for _, loss in result.loss_history]
    assert [s for s, _ in result.loss_history] == list(range(1, 25)) and result.global_step == 24
    assert np.mean(losses[-4:]) < 0.2 * np.mean(losses[:4]), losses
    assert [s for s, _ in result.eval_history] == [8, 16, 24]
    assert result.eval_history[-1][1] < 0.5 * result.eval_history[0][1], result.eval_history
    logs = [e for e in result.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [4, 8, 12, 16, 20, 24]
    assert all(e["tokens_per_second"] > 0 and e["learning_rate"] >= 0 for e in logs)
    assert logs[0]["loss"] == pytest.approx(np.mean(losses[:4]))
    with open(result.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result.plot_path == str(tmp / "out" / "loss_curve.png")
    with Checkpointer(result.checkpoint_dir) as manager:
        assert manager.all_steps() == [20, 24]  # save_total_limit=2
    frozen_after = frozen_arrays(trainer.model)
    for path, value in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[path], value, err_msg=str(path))
    # Packing put several chats in a row; response-only labels leave the prompts out of the loss.
    assert len(trainer.train_rows) < len(FACTS)
    assert all(r["segment_ids"].max() > 1 for r in trainer.train_rows)


def test_interrupted_then_resumed_run_has_the_uninterrupted_losses(uninterrupted, tokenizer):
    _, reference, _, data, tmp = uninterrupted

    class Interrupt(Exception):
        pass

    def stop_at_10(trainer, log):
        if log["step"] == 10:
            raise Interrupt

    out = tmp / "interrupted"
    with pytest.raises(Interrupt):
        SFTTrainer(lora_model(), tokenizer, train_dataset=data, eval_dataset=data, args=config(out),
                   callbacks=[stop_at_10]).train()
    with Checkpointer(out / "checkpoints") as manager:
        assert manager.latest_step() == 8
    resumed = SFTTrainer(lora_model(), tokenizer, train_dataset=data, eval_dataset=data,
                         args=config(out, resume_from_checkpoint=True)).train()
    assert resumed.loss_history == reference.loss_history  # bit-identical floats, steps 1..24
    assert resumed.eval_history == reference.eval_history
    assert resumed.global_step == 24


def poison_loss(model, input_ids, labels, **kw):
    """A cheap loss (no forward pass): finite unless the batch holds token 99, then NaN."""
    a = model.model.layers.self_attn.q_proj.lora_a[...]
    bad = jnp.any(input_ids == 99)
    return jnp.sum(a * a) * 1e-3 + jnp.where(bad, jnp.nan, 0.0), jnp.int32(1)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    records = [{"input_ids": [1 + i, 2, 3, 4]} for i in range(7)] + [{"input_ids": [99, 2, 3, 4]}]
    args = SFTConfig(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=1, save_steps=1,
                     max_seq_length=8, seed=0, disable_tqdm=True)
    model = lora_model(dropout=0.0)
    trainer = SFTTrainer(model, None, train_dataset=records, args=args, loss_fn=poison_loss)
    order = list(np.random.default_rng([0, 0]).permutation(8))
    bad_step = order.index(7) + 1
    assert bad_step > 1  # with this seed a good checkpoint precedes the poisoned step
    with pytest.raises(FloatingPointError, match=rf"stopped at step {bad_step}: loss=nan.*last checkpoint is "
                                                 rf"step {bad_step - 1} in"):
        trainer.train()
    weights = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    assert all(np.isfinite(w).all() for w in weights.values())
    fresh = lora_model(dropout=0.0)
    step = TrainStep(fresh, AdamW(lr_scheduler_type="linear", learning_rate=2e-4, total_steps=8))
    with Checkpointer(tmp_path / "checkpoints") as manager:
        assert manager.latest_step() == bad_step - 1
        manager.restore(step)
    for path, value in nnx.to_flat_state(nnx.state(fresh, TRAINABLE)):
        np.testing.assert_array_equal(np.asarray(value[...]), weights[path])  # the model kept the good weights


def test_without_the_bar_logs_and_evals_print_a_line_each(tmp_path, capsys):
    records = [{"input_ids": [1 + i, 2, 3, 4]} for i in range(4)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=2,
                     save_steps=10, max_seq_length=8, disable_tqdm=True)
    SFTTrainer(lora_model(dropout=0.0), None, train_dataset=records, eval_dataset=records[:2], args=args).train()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 2", "step 4", "step 4"], lines
    assert "loss" in lines[0] and "learning_rate" in lines[0] and "tokens/s" in lines[0] and "eval_loss" in lines[1]


def test_resume_errors_other_lora_layout_missing_checkpoint_and_stale_checkpoints(tmp_path):
    records = [{"input_ids": [1 + i, 2, 3, 4]} for i in range(4)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, save_steps=1,
                     max_seq_length=8, disable_tqdm=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        SFTTrainer(lora_model(r=4, dropout=0.0), None, records,
                   args=dataclass_replace(args, resume_from_checkpoint=True), loss_fn=poison_loss).train()
    SFTTrainer(lora_model(r=4, dropout=0.0), None, records, args=args, loss_fn=poison_loss).train()
    other = SFTTrainer(lora_model(r=8, targets=("q_proj", "v_proj"), dropout=0.0), None, records,
                       args=dataclass_replace(args, resume_from_checkpoint=True), loss_fn=poison_loss)
    with pytest.raises(ValueError, match=r"checkpoint: r=4 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
                                         r"v_proj; model: r=8 on q_proj, v_proj\)"):
        other.train()
    with pytest.warns(UserWarning, match=r"held checkpoints of an earlier run \(steps \[1, 2\]\); they were moved "
                                         r"to .*checkpoints\.earlier"):
        SFTTrainer(lora_model(r=4, dropout=0.0), None, records, args=args, loss_fn=poison_loss).train()
    (earlier,) = (tmp_path / "checkpoints.earlier").iterdir()  # the first run's steps, kept
    assert sorted(p.name for p in earlier.iterdir()) == ["1", "2"]
    with pytest.raises(ValueError, match="the data order would differ"):
        SFTTrainer(lora_model(r=4, dropout=0.0), None, records[:3],
                   args=dataclass_replace(args, resume_from_checkpoint=str(tmp_path / "checkpoints" / "2")),
                   loss_fn=poison_loss).train()
    other_rows = [{"input_ids": [1 + i, 2, 3, 5]} for i in range(4)]  # as many rows, one token else
    with pytest.raises(ValueError, match=r"written for other training rows \(their digest [0-9a-f]{12}\.\.\., this "
                                         r"run's [0-9a-f]{12}\.\.\.\) of the same count"):
        SFTTrainer(lora_model(r=4, dropout=0.0), None, other_rows,
                   args=dataclass_replace(args, resume_from_checkpoint=str(tmp_path / "checkpoints" / "2")),
                   loss_fn=poison_loss).train()


def dataclass_replace(args, **changes):
    import dataclasses

    return dataclasses.replace(args, **changes)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_equal_transformers(kind):
    import torch
    from transformers import get_scheduler

    total, warmup, lr = 50, 7, 3e-4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    name = "constant_with_warmup" if kind == "constant" else kind
    reference = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    ours = make_schedule(kind, lr, total, warmup)
    for step in range(total):
        assert float(ours(step)) == pytest.approx(lr * reference.lr_lambdas[0](step), rel=1e-5, abs=1e-12), step
    assert float(make_schedule(kind, lr, total, 0)(0)) == pytest.approx(lr)


def test_config_rejects_bad_values_naming_them():
    for kwargs, needle in [({"lr_scheduler_type": "poly"}, "accepted: linear, cosine, constant"),
                           ({"max_steps": 0}, "max_steps=0"), ({"per_device_train_batch_size": 0}, "batch_size=0"),
                           ({"warmup_ratio": 1.5}, "warmup_ratio=1.5"), ({"save_total_limit": 0}, "save_total_limit=0"),
                           ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
                           ({"length_buckets": (128, 64)}, "length_buckets")]:
        with pytest.raises(ValueError, match=needle):
            SFTConfig(**kwargs)
    assert float(AdamW(lr_scheduler_type="linear", learning_rate=1e-3, total_steps=10).schedule(5)) == \
        pytest.approx(5e-4)
    assert AdamW(lr_scheduler_type="linear", learning_rate=1e-3, total_steps=10) == \
        AdamW(lr_scheduler_type="linear", learning_rate=1e-3, total_steps=10)  # equal settings share a compile
    # SFTConfig fields as keywords override args (older TRL / Unsloth notebooks); other keywords are refused.
    records = [{"input_ids": [1, 2, 3]}]
    trainer = SFTTrainer(None, None, records, args=SFTConfig(max_seq_length=16), packing=True, max_seq_length=8)
    assert trainer.args.packing and trainer.max_seq_length == 8 and trainer.buckets == (8,)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_len'\]"):
        SFTTrainer(None, None, records, max_len=8)


def test_resume_from_an_earlier_step_moves_the_abandoned_runs_later_checkpoints_aside(tmp_path):
    records = [{"input_ids": [1 + i, 2, 3, 4]} for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=1, save_steps=2,
                     max_seq_length=8, seed=0, disable_tqdm=True, lr_scheduler_type="constant")

    class Stop(Exception):
        pass

    def stop_at(step, seen=None):
        def callback(trainer, log):
            if seen is not None:
                seen[log["step"]] = {p: np.array(v[...])
                                     for p, v in nnx.to_flat_state(nnx.state(trainer.model, TRAINABLE))}
            if log["step"] == step:
                raise Stop
        return callback

    with pytest.raises(Stop):  # the abandoned run: checkpoints 2, 4, 6
        SFTTrainer(lora_model(dropout=0.0), None, records, args=dataclass_replace(args, learning_rate=1e-1),
                   loss_fn=poison_loss, callbacks=[stop_at(6)]).train()
    seen = {}
    resumed = SFTTrainer(lora_model(dropout=0.0), None, records,
                         args=dataclass_replace(args, learning_rate=1e-3,
                                                resume_from_checkpoint=str(tmp_path / "checkpoints" / "2")),
                         loss_fn=poison_loss, callbacks=[stop_at(7, seen)])
    with pytest.warns(UserWarning, match=r"resuming from step 2 while .* held the later steps \[4, 6\] .* moved to"):
        with pytest.raises(Stop):
            resumed.train()
    (earlier,) = (tmp_path / "checkpoints.earlier").iterdir()
    with Checkpointer(earlier) as abandoned:  # kept as they were: the abandoned run's loss history to step 6
        assert abandoned.all_steps() == [4, 6]
        abandoned_history = abandoned.read_meta(6)["loss_history"]
    with Checkpointer(tmp_path / "checkpoints") as manager:
        assert manager.all_steps() == [2, 4, 6]
        metas = {step: manager.read_meta(step) for step in (2, 4, 6)}
        step = TrainStep(lora_model(dropout=0.0), AdamW(lr_scheduler_type="constant", learning_rate=1e-3,
                                                         total_steps=8))
        manager.restore(step, 6)
    assert [s for s, _ in metas[6]["loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert metas[6]["loss_history"][:2] == abandoned_history[:2] and metas[6]["loss_history"] != abandoned_history
    assert metas[4]["loss_history"] == metas[6]["loss_history"][:4]  # both written by the resumed run
    assert metas[2]["loss_history"] == metas[6]["loss_history"][:2]
    for path, value in nnx.to_flat_state(nnx.state(step.model, TRAINABLE)):
        np.testing.assert_array_equal(np.asarray(value[...]), seen[6][path])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4", "6"]  # no staging left


def test_a_checkpoint_holds_the_meta_as_it_was_when_saved(tmp_path):
    step = TrainStep(lora_model(dropout=0.0), AdamW(lr_scheduler_type="linear", learning_rate=1e-3, total_steps=8))
    history = [(1, 0.5)]
    with Checkpointer(tmp_path, async_save=True) as manager:
        manager.save(step, meta={"loss_history": history})
        history.append((2, 0.25))  # the caller goes on while orbax writes in the background
        manager.wait()
        assert manager.read_meta()["loss_history"] == [[1, 0.5]]


def test_token_ids_outside_the_model_vocab_are_refused_when_the_dataset_is_tokenized(tokenizer):
    model = get_peft_model(random_model(LlamaConfig.from_hf_config(TINY), seed=0), r=4,  # vocab 256
                           target_modules=["q_proj"], use_gradient_checkpointing=False)
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    # The chat tokenizer's specials are ids 256..258, past this model's embeddings.
    with pytest.raises(ValueError, match=r"train_dataset holds token id 258 but the model's vocab_size is 256 .*"
                                         r"added tokens.*resize the embeddings"):
        SFTTrainer(model, tokenizer, chats, args=SFTConfig(max_seq_length=64))
    good = [{"input_ids": [1, 2, 3, 4]}]
    with pytest.raises(ValueError, match=r"eval_dataset holds token id 300 but the model's vocab_size is 256"):
        SFTTrainer(model, None, good, eval_dataset=[{"input_ids": [1, 2, 300]}], args=SFTConfig(max_seq_length=8))
    with pytest.raises(ValueError, match=r"train_dataset holds token id -1; accepted: ids in \[0, 256\)"):
        SFTTrainer(model, None, [{"input_ids": [1, -1, 3]}], args=SFTConfig(max_seq_length=8))
    with pytest.raises(ValueError, match=r"train_dataset holds token id 999"):  # labels are gathered too
        SFTTrainer(model, None, [{"input_ids": [1, 2, 3], "labels": [-100, 2, 999]}], args=SFTConfig(max_seq_length=8))
    assert SFTTrainer(model, None, good, args=SFTConfig(max_seq_length=8)).train_rows[0]["input_ids"].max() == 4


def test_config_and_adamw_refuse_adam_settings_torch_refuses_and_negative_seeds():
    for kwargs, needle in [({"adam_beta1": 1.0}, r"adam_beta1=1.0; accepted: 0 <= adam_beta1 < 1"),
                           ({"adam_beta1": -0.1}, r"adam_beta1=-0.1; accepted: 0 <= adam_beta1 < 1"),
                           ({"adam_beta2": 1.0}, r"adam_beta2=1.0; accepted: 0 <= adam_beta2 < 1"),
                           ({"adam_beta2": float("nan")}, r"adam_beta2=nan"),
                           ({"adam_epsilon": -1e-8}, r"adam_epsilon=-1e-08; accepted: a number >= 0"),
                           ({"seed": -5}, r"seed=-5; accepted: an int in \[0, 2\*\*63\)"),
                           ({"seed": 2**63}, r"seed=9223372036854775808; accepted"),
                           ({"seed": 1.5}, r"seed=1.5; accepted")]:
        with pytest.raises(ValueError, match=needle):
            SFTConfig(**kwargs)
    SFTConfig(adam_beta1=0.0, adam_beta2=0.0, adam_epsilon=0.0, seed=0)  # the range ends torch accepts
    for kwargs, needle in [({"b1": 1.0}, r"b1=1.0; accepted: 0 <= b1 < 1"), ({"b2": 1.5}, r"b2=1.5; accepted"),
                           ({"eps": -1.0}, r"eps=-1.0; accepted: a number >= 0")]:
        with pytest.raises(ValueError, match=needle):
            AdamW(lr_scheduler_type="linear", learning_rate=1e-3, total_steps=10, **kwargs)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_updated_weights_stop_training_at_that_step_keeping_the_weights(tmp_path):
    # A learning rate past float32's range: step 1's loss and gradient are finite, its updated weights are not.
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=1, save_steps=1,
                     max_seq_length=8, learning_rate=1e39, lr_scheduler_type="constant", disable_tqdm=True)
    model = lora_model(dropout=0.0)
    before = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    trainer = SFTTrainer(model, None, [{"input_ids": [1, 2, 3, 4]}] * 4, args=args, loss_fn=poison_loss)
    with pytest.raises(FloatingPointError, match=r"stopped at step 1: loss=0\.\d+, grad_norm=\d.*finite, but the "
                                                 r"updated weights are not.*no checkpoint was saved"):
        trainer.train()
    for path, value in nnx.to_flat_state(nnx.state(model, TRAINABLE)):
        np.testing.assert_array_equal(np.asarray(value[...]), before[path])
