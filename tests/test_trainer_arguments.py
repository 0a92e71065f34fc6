"""Unsloth notebooks' trainer cells run as written (TRL / transformers keywords with their meaning), and the values we
cannot honour are refused naming what to pass: fp16 / bf16 against the model's dtype, report_to, optim, collators,
eval / save strategies, TRL's newer names."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from fastlora_jax import TRAINABLE, LlamaConfig, SFTConfig, SFTTrainer, is_bfloat16_supported
from fastlora_jax import data as data_lib
from fastlora_jax.checkpointing import Checkpointer
from fastlora_jax.loading import random_model
from fastlora_jax.lora import get_peft_model
from fastlora_jax.training import OPTIMIZERS, AdamW
from helpers import TINY, tiny_chat_tokenizer

CONFIG = LlamaConfig.from_hf_config({**TINY, "vocab_size": 260})  # the chat tokenizer's ids reach 258
TEXTS = [f"### Instruction: say {w}.\n### Response: {w}!" for w in
         ["hi", "yes", "no", "blue", "green", "seven", "zorb", "kelp", "tiko", "yul", "ash", "la la"]]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def tiny_lora(dtype=jnp.float32, **kwargs):
    model = random_model(CONFIG, dtype=dtype, seed=0)
    model.max_seq_length = 64  # as from_pretrained(max_seq_length=64) sets it
    return get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          use_gradient_checkpointing=False, random_state=3407, **kwargs)


def cheap_loss(model, input_ids, labels, **kw):
    """A loss without a forward pass (for tests of the loop's bookkeeping)."""
    a = model.model.layers.self_attn.q_proj.lora_a[...]
    return jnp.sum(a * a) * 1e-3 + 0.0 * jnp.sum(input_ids), jnp.int32(1)


def unsloth_dtype():
    """What Unsloth's from_pretrained(dtype=None) loads: bfloat16 where supported, else float16."""
    return jnp.bfloat16 if is_bfloat16_supported() else jnp.float16


# ---------------------------------------------------------------------------------------------- the notebook cells


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_the_older_notebook_cell_runs_as_written(optim, tokenizer, tmp_path, monkeypatch, capsys):
    from transformers import DataCollatorForSeq2Seq

    monkeypatch.chdir(tmp_path)  # output_dir = "outputs", as the notebook writes it
    model, max_seq_length = tiny_lora(unsloth_dtype()), 64
    dataset = [{"text": t} for t in TEXTS]  # the notebooks' datasets.Dataset of a "text" column, as a list
    # ---- the cell (but max_steps = 3 and the optimizer), with fastlora_jax's imports
    trainer = SFTTrainer(
        model = model, tokenizer = tokenizer, train_dataset = dataset,
        dataset_text_field = "text", max_seq_length = max_seq_length,
        data_collator = DataCollatorForSeq2Seq(tokenizer = tokenizer),
        dataset_num_proc = 2, packing = False,
        args = SFTConfig(
            per_device_train_batch_size = 2, gradient_accumulation_steps = 4,
            warmup_steps = 5, max_steps = 3, learning_rate = 2e-4,
            fp16 = not is_bfloat16_supported(), bf16 = is_bfloat16_supported(),
            logging_steps = 1, optim = optim, weight_decay = 0.01,
            lr_scheduler_type = "linear", seed = 3407, output_dir = "outputs", report_to = "none"),
    )
    trainer_stats = trainer.train()
    print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.")
    print(f"{round(trainer_stats.metrics['train_runtime']/60, 2)} minutes used for training.")
    # ----
    assert "seconds used for training." in capsys.readouterr().out
    assert trainer.optimizer.optim == optim and trainer.args.dataset_num_proc == 2
    metrics = trainer_stats.metrics
    assert set(metrics) == {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
                            "train_loss", "epoch", "train_steps", "train_tokens_per_second"}
    losses = [loss for _, loss in trainer_stats.loss_history]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert metrics["train_loss"] == pytest.approx(np.mean(losses)) == trainer_stats.training_loss
    # 12 rows, 8 a step: the steps took 8, 4 (the end of epoch 0) and 8 rows
    assert metrics["train_samples_per_second"] == pytest.approx(20 / metrics["train_runtime"], rel=1e-6)
    assert metrics["train_steps_per_second"] == pytest.approx(3 / metrics["train_runtime"], rel=1e-6)
    assert metrics["epoch"] == pytest.approx(3 / 2)
    assert metrics["total_flos"] > 0
    history = trainer.state.log_history
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]  # logging_steps = 1
    # transformers logs the scheduler's rate after the step (the next step's): base rate x lr_lambda(k) at step k
    import torch
    from transformers import get_scheduler

    scheduler = get_scheduler("linear", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4),
                              num_warmup_steps=5, num_training_steps=3)
    expected = [2e-4 * scheduler.lr_lambdas[0](k) for k in (1, 2, 3)]
    assert [e["learning_rate"] for e in history if "loss" in e] == pytest.approx(expected, rel=1e-6)
    assert expected[0] > 0  # the step before it ran at rate 0 (warm-up from 0), which is not what is logged
    assert history[-1] == {**metrics, "step": 3} and trainer.state.global_step == 3
    assert (tmp_path / "outputs" / "loss_curve.png").is_file()
    # What the notebooks print after train_on_responses_only: the tokenized rows.
    row = trainer.train_dataset[5]
    assert tokenizer.decode(row["input_ids"]) == TEXTS[5] + tokenizer.eos_token
    assert [x for x in row["labels"] if x != -100] == list(row["input_ids"])


def test_newer_notebook_cells_with_an_eval_dataset_and_trls_names(tokenizer, tmp_path):
    train = [{"text": t} for t in TEXTS[:8]]
    # Qwen3 / Gemma-3 notebooks: the data arguments inside SFTConfig, TRL's max_length, padding_free, no precision
    # flags (both False: the model's dtype); FunctionGemma's eval_dataset with eval_strategy = "steps".
    trainer = SFTTrainer(
        model = tiny_lora(), tokenizer = tokenizer, train_dataset = train, eval_dataset = train[:4],
        args = SFTConfig(
            dataset_text_field = "text", per_device_train_batch_size = 2, gradient_accumulation_steps = 2,
            warmup_steps = 1, max_steps = 4, eval_steps = 2, eval_strategy = "steps", learning_rate = 2e-4,
            logging_steps = 1, optim = "adamw_torch_fused", weight_decay = 0.001, lr_scheduler_type = "linear",
            seed = 3407, report_to = "none", padding_free = False, max_length = 56, max_grad_norm = 0.3,
            output_dir = str(tmp_path), loss_type = "nll", gradient_checkpointing = True,
            remove_unused_columns = False, disable_tqdm = True),
    )
    result = trainer.train()
    assert trainer.max_seq_length == 56 and trainer.buckets == (56,)
    assert [s for s, _ in result.eval_history] == [2, 4]
    assert [e["step"] for e in result.log_history if "eval_loss" in e] == [2, 4]
    assert all("epoch" in e for e in result.log_history)
    assert trainer.model.model.gradient_checkpointing is False  # get_peft_model's mode stays
    assert trainer.optimizer.optim == "adamw_torch_fused"


# ---------------------------------------------------------------------------------------------- fp16 / bf16


def test_is_bfloat16_supported_asks_the_device_as_torch_does():
    device = jax.devices()[0]
    if device.platform == "cpu":
        assert is_bfloat16_supported() is False  # Unsloth without a GPU says False too
    elif device.platform == "gpu" and getattr(device, "compute_capability", None):
        assert is_bfloat16_supported() is (int(device.compute_capability.split(".")[0]) >= 8)


@pytest.mark.parametrize("dtype, flags, needle", [
    (jnp.bfloat16, dict(fp16=True), r"fp16=True asks for float16 mixed precision, but the model computes in "
                                    r"bfloat16 .*set bf16=True, fp16=False, or set fp16=False, bf16=False"),
    (jnp.float16, dict(bf16=True), r"bf16=True asks for bfloat16 .* computes in float16 .*set fp16=True, bf16=False"),
    (jnp.float32, dict(bf16=True), r"computes in float32 .*from_pretrained\(dtype='bfloat16'\)"),
    (jnp.float32, dict(fp16=True), r"computes in float32 .*from_pretrained\(dtype='float16'\).* \(on a CPU, "
                                   r"dtype=None loads float32 .*pass fp16=False, bf16=False\)"),
])
def test_precision_flags_that_disagree_with_the_models_dtype_raise_typeerror(dtype, flags, needle):
    model = random_model(CONFIG, dtype=dtype)
    records = [{"input_ids": [1, 2, 3]}]
    with pytest.raises(TypeError, match=needle):
        SFTTrainer(model, None, records, args=SFTConfig(max_seq_length=8, **flags))


def test_precision_flags_that_agree_or_both_false_are_accepted():
    records = [{"input_ids": [1, 2, 3]}]
    for dtype, flags in [(jnp.bfloat16, dict(bf16=True)), (jnp.float16, dict(fp16=True)), (jnp.float32, {}),
                         (jnp.bfloat16, {}), (jnp.float16, {})]:
        SFTTrainer(random_model(CONFIG, dtype=dtype), None, records, args=SFTConfig(max_seq_length=8, **flags))
    with pytest.raises(ValueError, match="at most one of them"):
        SFTConfig(fp16=True, bf16=True)


# ---------------------------------------------------------------------------------------------- data collators


def hf_batch(collator, rows, keys=("input_ids", "labels")):
    """What a transformers collator makes of the rows' `keys`, as int32 numpy arrays."""
    out = collator([{k: [int(x) for x in r[k]] for k in keys} for r in rows])
    return {k: np.asarray(out[k], np.int32) for k in ("input_ids", "labels")}


def test_transformers_collators_batch_as_the_trainer_does(tokenizer):
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    chats = [{"messages": [{"role": "user", "content": f"q{i}" * (i + 1)}, {"role": "assistant", "content": "a"}]}
             for i in range(4)]
    args = SFTConfig(max_seq_length=64, train_on_responses_only=True)
    plain = SFTTrainer(None, tokenizer, chats, args=args)
    seq2seq = DataCollatorForSeq2Seq(tokenizer=tokenizer)
    with_collator = SFTTrainer(None, tokenizer, chats, args=args, data_collator=seq2seq)
    for a, b in zip(plain.train_rows, with_collator.train_rows):
        np.testing.assert_array_equal(a["labels"], b["labels"])
    rows = plain.train_rows
    T = max(len(r["input_ids"]) for r in rows)
    ours = data_lib.collate(rows, batch_size=len(rows), buckets=(T,), pad_token_id=plain.pad_token_id)
    theirs = hf_batch(seq2seq, rows)  # labels padded with -100, right padding
    for key in ("input_ids", "labels"):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)

    # DataCollatorForLanguageModeling(mlm=False) trains every token but the pad token: the labels are set so.
    lm = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    texts = [{"text": "ab"}, {"text": "abc<|endoftext|>d"}]  # the pad token inside a text loses its label too
    relabelled = SFTTrainer(None, tokenizer, texts, args=SFTConfig(max_seq_length=16), data_collator=lm).train_rows
    T = max(len(r["input_ids"]) for r in relabelled)
    ours = data_lib.collate(relabelled, batch_size=2, buckets=(T,), pad_token_id=tokenizer.pad_token_id)
    theirs = hf_batch(lm, relabelled, keys=("input_ids",))  # it makes the labels itself
    for key in ("input_ids", "labels"):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert (relabelled[1]["labels"] == -100).sum() == 1
    with pytest.raises(ValueError, match="DataCollatorForLanguageModeling sets the labels of every token"):
        SFTTrainer(None, tokenizer, chats, args=args, data_collator=lm)


def test_other_collators_are_refused_naming_the_accepted_ones(tokenizer):
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    records = [{"input_ids": [1, 2, 3]}]
    masked_lm = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    masked_lm.mlm = True  # (the tiny tokenizer has no mask token to build it with)
    for collator, needle in [
            (DataCollatorForSeq2Seq(tokenizer=tokenizer, label_pad_token_id=0), r"label_pad_token_id=0\) would train "
                                                                                r"on its padding"),
            (masked_lm, r"mlm=True\) masks tokens"),
            (DataCollatorWithPadding(tokenizer=tokenizer), r"data_collator=DataCollatorWithPadding: .*accepted: None"),
            (lambda features: features, r"data_collator=function: .*DataCollatorForSeq2Seq")]:
        with pytest.raises(TypeError, match=needle):
            SFTTrainer(None, tokenizer, records, args=SFTConfig(max_seq_length=8), data_collator=collator)


# ---------------------------------------------------------------------------------------------- other arguments


def test_report_to_takes_only_no_integration():
    for value in ("none", None, [], ["none"]):
        SFTConfig(report_to=value)
    for value in ("wandb", "tensorboard", ["tensorboard"], "all", "trackio"):
        with pytest.raises(NotImplementedError, match=re.escape(f"report_to={value!r}: fastlora-jax reports to no "
                                                                "tracking integration") + r".*accepted: 'none', None "
                                                      r"or \[\]\. The logs are in trainer.state.log_history"):
            SFTConfig(report_to=value)


def test_optim_and_trls_newer_names_are_checked():
    with pytest.raises(ValueError, match=r"optim='adamw_hf'; accepted: " + ", ".join(OPTIMIZERS)):
        SFTConfig(optim="adamw_hf")
    assert SFTConfig().optim == "adamw_torch"  # transformers' default (numerically the same as its fused one)
    with pytest.raises(ValueError, match=r"max_seq_length=16 and max_length=32 name one length"):
        SFTConfig(max_seq_length=16, max_length=32)
    records = [{"input_ids": [1, 2, 3]}]
    assert SFTTrainer(None, None, records, args=SFTConfig(max_length=16)).max_seq_length == 16
    assert SFTTrainer(None, None, records, args=SFTConfig(max_length=16), max_seq_length=16).max_seq_length == 16
    # completion_only_loss / assistant_only_loss set train_on_responses_only.
    assert SFTConfig().responses_only is None
    assert SFTConfig(completion_only_loss=True).responses_only is True
    assert SFTConfig(assistant_only_loss=True).responses_only is True
    assert SFTConfig(completion_only_loss=False).responses_only is False
    assert SFTConfig(train_on_responses_only=True, assistant_only_loss=True).responses_only is True
    with pytest.raises(ValueError, match=r"train_on_responses_only=False disagrees with completion_only_loss=True"):
        SFTConfig(train_on_responses_only=False, completion_only_loss=True)
    for kwargs, error, needle in [
            (dict(loss_type="dft"), NotImplementedError, r"loss_type='dft'; accepted: None, 'nll' or 'chunked_nll'"),
            (dict(logging_strategy="epoch"), NotImplementedError, r"logging_strategy='epoch'; accepted: 'steps'"),
            (dict(save_strategy="best"), ValueError, r"save_strategy='best'; accepted: 'no', 'steps', 'epoch' "
                                                     r"\(keeping the best"),
            (dict(eval_strategy="always"), ValueError, r"eval_strategy='always'; accepted: None, 'no'"),
            (dict(dataset_kwargs={"add_special_tokens": False}), ValueError, r"accepted: None or \{'skip_prepare"),
            (dict(dataset_num_proc=0), ValueError, r"dataset_num_proc=0; accepted: an int >= 1 or None"),
            (dict(embedding_learning_rate=-1.0), ValueError, r"embedding_learning_rate=-1.0"),
            (dict(max_grad_norm=-0.5), ValueError, r"max_grad_norm=-0.5; accepted: a number > 0, or 0 or None")]:
        with pytest.raises(error, match=needle):
            SFTConfig(**kwargs)
    SFTConfig(max_grad_norm=0, padding_free=True, gradient_checkpointing=False, dataloader_num_workers=2,
              dataloader_pin_memory=False, run_name="x", gradient_checkpointing_kwargs={"use_reentrant": False})


def test_skip_prepare_dataset_needs_tokenized_records(tokenizer):
    args = SFTConfig(max_seq_length=8, dataset_kwargs={"skip_prepare_dataset": True})
    rows = SFTTrainer(None, None, [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}], args=args).train_rows
    np.testing.assert_array_equal(rows[0]["labels"], [-100, 2, 3])
    with pytest.raises(ValueError, match=r"skip_prepare_dataset': True\}.*train_dataset record 1 has the fields "
                                         r"\['text'\]; drop skip_prepare_dataset"):
        SFTTrainer(None, tokenizer, [{"input_ids": [1, 2]}, {"text": "hi"}], args=args)


def test_embedding_learning_rate_is_unsloths_second_parameter_group(tmp_path):
    """AdamW(embedding_learning_rate=...) against torch's AdamW with UnslothTrainer's two groups (the modules_to_save
    copies at the embedding rate, the rest at learning_rate, both under transformers' schedule): four steps."""
    import optax
    import torch
    from transformers import get_scheduler

    from fastlora_jax.variables import TrainableCopy

    model = tiny_lora(modules_to_save=["embed_tokens", "lm_head"])
    params = nnx.state(model, TRAINABLE)
    flat = nnx.to_flat_state(params)
    copies = {path for path, v in flat if isinstance(v, TrainableCopy)}
    assert len(copies) == 2 and len(flat) > 2
    rng = np.random.default_rng(0)
    grads = [{path: rng.standard_normal(v[...].shape).astype(np.float32) * 1e-2 for path, v in flat} for _ in range(4)]
    kw = dict(lr_scheduler_type="linear", learning_rate=1e-3, total_steps=6, warmup_steps=2, weight_decay=0.01)
    tx = AdamW(**kw, embedding_learning_rate=1e-4)
    state, ours = tx.init(params), params
    for g in grads:
        g_state = nnx.from_flat_state([(path, v.replace(jnp.asarray(g[path]))) for path, v in flat])
        updates, state = tx.update(g_state, state, ours)
        ours = optax.apply_updates(ours, updates)
    tensors = {path: torch.nn.Parameter(torch.tensor(np.asarray(v[...]))) for path, v in flat}
    groups = [{"params": [t for p, t in tensors.items() if p not in copies], "lr": 1e-3, "weight_decay": 0.01},
              {"params": [t for p, t in tensors.items() if p in copies], "lr": 1e-4, "weight_decay": 0.01}]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=6)
    for g in grads:
        for path, t in tensors.items():
            t.grad = torch.tensor(g[path])
        optimizer.step()
        schedule.step()
    moved = {}
    for path, v in nnx.to_flat_state(ours):
        want, start = tensors[path].detach().numpy(), np.asarray(dict(flat)[path][...])
        moved[path] = np.abs(want - start).max()
        np.testing.assert_allclose(np.asarray(v[...]), want, rtol=1e-6, atol=1e-4 * moved[path], err_msg=str(path))
    assert max(moved[p] for p in copies) < 0.2 * min(m for p, m in moved.items() if p not in copies)
    # The 8-bit optimizer takes the same groups; without copies the embedding group is empty, as Unsloth's.
    tx8 = AdamW(**{**kw, "warmup_steps": 0}, optim="adamw_8bit", embedding_learning_rate=1e-4)  # lr > 0 at step 0
    updates, _ = tx8.update(g_state, tx8.init(params), params)
    step = {path: np.abs(np.asarray(v[...])).max() for path, v in nnx.to_flat_state(updates)}
    assert max(step[p] for p in copies) < 0.2 * min(m for p, m in step.items() if p not in copies)
    records = [{"input_ids": [1, 2, 3]}]
    args = SFTConfig(output_dir=str(tmp_path), max_seq_length=8, max_steps=1, embedding_learning_rate=1e-5,
                     disable_tqdm=True)
    assert SFTTrainer(tiny_lora(), None, records, args=args, loss_fn=cheap_loss).train().global_step == 1
    with pytest.raises(ValueError, match="embedding_learning_rate=0; accepted: a number > 0 or None"):
        AdamW(**kw, embedding_learning_rate=0)


def test_the_continued_pretraining_cell_runs_as_written(tokenizer, tmp_path, monkeypatch):
    """Unsloth's continued-pretraining cell: embed_tokens and lm_head in target_modules, UnslothTrainer with
    UnslothTrainingArguments(embedding_learning_rate=...); the embedding copy moves ~10x less than LoRA weights."""
    from fastlora_jax import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments
    from fastlora_jax.variables import TrainableCopy

    monkeypatch.chdir(tmp_path)
    model = FastLanguageModel.get_peft_model(
        random_model(CONFIG, dtype=jnp.float32, seed=0), r=4, lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "embed_tokens", "lm_head"], use_gradient_checkpointing=False, random_state=3407)
    before = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    dataset = [{"text": t} for t in TEXTS]
    # ---- the cell (max_steps = 2, bf16 / fp16 off: a float32 model), with fastlora_jax's imports
    trainer = UnslothTrainer(
        model = model, tokenizer = tokenizer, train_dataset = dataset,
        dataset_text_field = "text", max_seq_length = 64, dataset_num_proc = 2,
        args = UnslothTrainingArguments(
            per_device_train_batch_size = 2, gradient_accumulation_steps = 2,
            max_steps = 2, warmup_steps = 0,
            learning_rate = 5e-4, embedding_learning_rate = 5e-5,
            fp16 = False, bf16 = False,
            logging_steps = 1, optim = "adamw_8bit", weight_decay = 0.01,
            lr_scheduler_type = "linear", seed = 3407, output_dir = "outputs", report_to = "none"),
    )
    trainer_stats = trainer.train()
    # ----
    assert trainer_stats.global_step == 2 and trainer.optimizer.embedding_learning_rate == 5e-5
    flat = nnx.to_flat_state(nnx.state(model, TRAINABLE))
    moved = {p: np.abs(np.asarray(v[...]) - before[p]).max() for p, v in flat}
    copies = [p for p, v in flat if isinstance(v, TrainableCopy)]
    assert [str(p[-2]) for p in copies] == ["embed_tokens"]  # lm_head gets LoRA, as Unsloth's target_modules
    lora_b = [m for p, m in moved.items() if str(p[-1]) == "lora_b"]  # (lora_a gets no gradient at step 1: B = 0)
    assert 0 < moved[copies[0]] < 0.2 * min(lora_b)


def test_training_arguments_are_refused_with_the_replacement():
    class TrainingArguments:  # transformers' class, as far as the check sees it
        pass

    with pytest.raises(TypeError, match=r"args is a TrainingArguments; accepted: fastlora_jax.SFTConfig; it takes the "
                                        r"same keywords"):
        SFTTrainer(None, None, [{"input_ids": [1, 2]}], args=TrainingArguments())


def test_eval_save_and_logging_strategies(tmp_path):
    records = [{"input_ids": [1 + i, 2, 3, 4]} for i in range(4)]  # 2 steps an epoch
    base = dict(max_steps=5, per_device_train_batch_size=2, logging_steps=2, save_steps=2, max_seq_length=8,
                disable_tqdm=True)

    def run(name, eval_dataset=records[:2], **kw):
        args = SFTConfig(output_dir=str(tmp_path / name), **{**base, **kw})
        return SFTTrainer(tiny_lora(), None, records, eval_dataset=eval_dataset, args=args, loss_fn=cheap_loss).train()

    default = run("default")  # None: "steps" with an eval_dataset (every eval_steps, else logging_steps, and the end)
    assert [s for s, _ in default.eval_history] == [2, 4, 5]
    with Checkpointer(default.checkpoint_dir) as manager:
        assert manager.all_steps() == [2, 4, 5]
    assert [s for s, _ in run("no", eval_strategy="no").eval_history] == []
    by_epoch = run("epoch", eval_strategy="epoch", save_strategy="epoch", logging_steps=1, save_steps=1)
    assert [s for s, _ in by_epoch.eval_history] == [2, 4, 5]  # "steps" would evaluate and save every step
    with Checkpointer(by_epoch.checkpoint_dir) as manager:
        assert manager.all_steps() == [2, 4, 5]
    first = run("first", logging_first_step=True, eval_dataset=None)
    assert [e["step"] for e in first.log_history if "loss" in e] == [1, 2, 4, 5]
    unsaved = run("unsaved", save_strategy="no", eval_dataset=None)
    with Checkpointer(unsaved.checkpoint_dir) as manager:
        assert manager.all_steps() == []
    with pytest.raises(ValueError, match=r"eval_strategy='steps' needs an eval_dataset"):
        SFTTrainer(None, None, records, args=SFTConfig(eval_strategy="steps", max_seq_length=8))


def test_dtype_none_is_bfloat16_on_ampere_float16_on_older_gpus_float32_on_cpu():
    import types

    import jax.numpy as jnp

    from fastlora_jax.loading import default_dtype

    gpu = lambda capability: types.SimpleNamespace(platform="gpu", compute_capability=capability)  # noqa: E731
    assert default_dtype(gpu("9.0")) == jnp.bfloat16 and default_dtype(gpu("8.0")) == jnp.bfloat16
    assert default_dtype(gpu("7.5")) == jnp.float16 and default_dtype(gpu("7.0")) == jnp.float16  # T4, V100
    assert default_dtype(types.SimpleNamespace(platform="cpu")) == jnp.float32


def test_trls_dataset_options_shuffle_eval_packing_and_offloading(tokenizer, tmp_path):
    """shuffle_dataset orders the tokenized rows as datasets.Dataset.shuffle(seed) (what TRL calls before packing);
    eval_packing packs the eval rows, which leaves the token-weighted eval loss as it is for "bfd";
    activation_offloading needs a model that offloads; TRL's other options are checked or accepted."""
    from datasets import Dataset

    from fastlora_jax import packing

    rng = np.random.default_rng(0)
    records = [{"input_ids": rng.integers(1, 256, int(n)).tolist()} for n in rng.integers(5, 40, 30)]
    base = dict(output_dir=str(tmp_path), max_seq_length=64, save_strategy="no", seed=11)
    model = tiny_lora()
    rows = SFTTrainer(model, None, records, args=SFTConfig(**base, shuffle_dataset=True)).train_rows
    theirs = Dataset.from_dict({"input_ids": [r["input_ids"] for r in records]}).shuffle(seed=11)["input_ids"]
    assert [r["input_ids"].tolist() for r in rows] == theirs
    wrapped = SFTTrainer(model, None, records, args=SFTConfig(**base, shuffle_dataset=True, packing=True,
                                                              packing_strategy="wrapped")).train_rows
    assert [r["input_ids"].tolist() for r in wrapped] == [r["input_ids"].tolist()
                                                          for r in packing.wrap_rows(rows, 64)]

    losses = {}
    for eval_packing in (None, False):
        trainer = SFTTrainer(model, None, records[:4], eval_dataset=records,
                             args=SFTConfig(**base, packing=True, eval_packing=eval_packing))
        assert ("segment_ids" in trainer.eval_rows[0]) == (eval_packing is None)  # None: as packing
        losses[eval_packing] = trainer.evaluate()
    assert len(SFTTrainer(model, None, records[:4], eval_dataset=records,
                          args=SFTConfig(**base, packing=True)).eval_rows) < len(records)
    assert abs(losses[None] - losses[False]) < 1e-5 * abs(losses[False])

    with pytest.raises(ValueError, match=r"activation_offloading=True, but the model's "
                                         r"use_gradient_checkpointing=False .*'unsloth'"):
        SFTTrainer(model, None, records, args=SFTConfig(**base, activation_offloading=True))
    offloading = random_model(CONFIG, dtype=jnp.float32, seed=0)
    offloading = get_peft_model(offloading, r=4, target_modules=["q_proj"], use_gradient_checkpointing="unsloth")
    SFTTrainer(offloading, None, records, args=SFTConfig(**base, activation_offloading=True))
    for bad, match in [(dict(truncation_mode="keep_end"), "truncation_mode='keep_end'; accepted: 'keep_start'"),
                       (dict(eval_packing="yes"), "eval_packing='yes'; accepted: True, False or None"),
                       (dict(shuffle_dataset=1), "shuffle_dataset=1; accepted: True or False"),
                       (dict(pad_to_multiple_of=0), "pad_to_multiple_of=0; accepted: 'auto', None or an int")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            SFTConfig(**bad)
    SFTConfig(pad_to_multiple_of=64, truncation_mode="keep_start")  # accepted: padding changes no result


def test_formatting_func_trains_on_the_text_it_returns(tokenizer, tmp_path):
    records = [{"instruction": f"say {w}", "output": w} for w in ("hi", "blue", "zorb")]
    alpaca = lambda e: f"### Instruction: {e['instruction']}\n### Response: {e['output']}"  # noqa: E731
    args = SFTConfig(output_dir=str(tmp_path), max_seq_length=64, save_strategy="no")
    trainer = SFTTrainer(tiny_lora(), tokenizer, records, eval_dataset=records[:1], args=args,
                         formatting_func=alpaca)
    expected = data_lib.tokenize_dataset([{"text": alpaca(e)} for e in records], tokenizer, max_seq_length=64)
    assert len(trainer.train_rows) == 3 and all(
        np.array_equal(a[k], b[k]) for a, b in zip(trainer.train_rows, expected) for k in a)
    np.testing.assert_array_equal(trainer.eval_rows[0]["input_ids"], expected[0]["input_ids"])
    with pytest.raises(TypeError, match=r"formatting_func returned a list for train_dataset record 0; accepted: one "
                                        r"string per record"):
        SFTTrainer(tiny_lora(), tokenizer, records, args=args, formatting_func=lambda e: [alpaca(e)])
    with pytest.raises(ValueError, match="formatting_func .* cannot go with train_on_responses_only=True"):
        SFTTrainer(tiny_lora(), tokenizer, records, args=args, formatting_func=alpaca, train_on_responses_only=True)
    tokenized = [{"input_ids": [1, 2, 3, 4]}]
    with pytest.warns(UserWarning, match="already tokenized .* formatting_func is not applied"):
        kept = SFTTrainer(tiny_lora(), tokenizer, tokenized, args=args, formatting_func=alpaca).train_rows
    assert kept[0]["input_ids"].tolist() == [1, 2, 3, 4]


def test_trls_eos_token_and_pad_token_tokenize_as_trl(tmp_path):
    """eos_token ends each text / completion record (unless it ends with it) and pad_token pads, as TRL's SFTTrainer
    prepares them (TRL 1.16 on a tiny transformers Llama, CPU); tokens outside the vocabulary raise ValueError."""
    import transformers
    from datasets import Dataset
    from trl import SFTConfig as TrlConfig
    from trl import SFTTrainer as TrlTrainer

    from helpers import TINY

    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "vocab_size": 260}))
    tokens = dict(eos_token="<|im_start|>", pad_token="<|im_end|>")
    for records in ([{"text": "hello there"}, {"text": "bye<|im_start|>"}],
                    [{"prompt": "Q?", "completion": " A."}, {"prompt": "Why?", "completion": " So."}]):
        theirs = TrlTrainer(model=torch_model, processing_class=tiny_chat_tokenizer(),
                            train_dataset=Dataset.from_list(records),
                            args=TrlConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False,
                                           use_cpu=True, **tokens))
        ours = SFTTrainer(tiny_lora(), tiny_chat_tokenizer(), records,
                          args=SFTConfig(output_dir=str(tmp_path), max_seq_length=64, save_strategy="no", **tokens))
        assert [r["input_ids"].tolist() for r in ours.train_rows] == theirs.train_dataset["input_ids"]
        assert ours.pad_token_id == theirs.processing_class.pad_token_id == 258
    plain = SFTTrainer(tiny_lora(), tiny_chat_tokenizer(), [{"text": "hello there"}],
                       args=SFTConfig(output_dir=str(tmp_path), max_seq_length=64, save_strategy="no"))
    assert plain.train_rows[0]["input_ids"][-1] == tiny_chat_tokenizer().eos_token_id != 257
    with pytest.raises(ValueError, match=r"eos_token='<\|eot\|>' is not in the vocabulary of the tokenizer"):
        SFTTrainer(tiny_lora(), tiny_chat_tokenizer(), [{"text": "hi"}],
                   args=SFTConfig(output_dir=str(tmp_path), eos_token="<|eot|>"))
    with pytest.raises(ValueError, match=r"pad_token=0; accepted: None \(the tokenizer's\) or a token"):
        SFTConfig(pad_token=0)
