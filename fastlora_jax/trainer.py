"""SFTTrainer: supervised fine-tuning of a LoRA model, shaped like TRL's `SFTTrainer(model, tokenizer, ...).train()`.

    trainer = SFTTrainer(model, tokenizer, train_dataset="data.jsonl",
                         args=SFTConfig(output_dir="out", max_steps=60, learning_rate=2e-4))
    result = trainer.train()          # result.loss_history: [(step, loss), ...]

The run: tokenize (and pack) the dataset, AdamW with weight decay under a linear / cosine / constant schedule with
warm-up, a jitted step over the trainable state only (`fastlora_jax.training`), a tqdm bar with loss, learning rate
and tokens/s, eval loss (`eval_strategy`), orbax checkpoints in `output_dir/checkpoints` (`save_strategy`,
`save_steps`), and a loss-curve PNG in `output_dir`; `train()` returns transformers' metrics too. The loop waits for
each step's loss (its logs, the non-finite check and the callbacks see every step), but prepares the next batch while
the device runs the step.
`resume_from_checkpoint=True` continues from the latest checkpoint with the same data order, rng and optimizer state,
so its losses equal those of an uninterrupted run. Checkpoints the run must not mix with its own are moved, never
deleted, into `output_dir/checkpoints.earlier/<UTC time>/`, with a warning: an earlier run's, when a run starts
without resuming, and an abandoned run's later steps, when a run resumes from an earlier checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from fastlora_jax import data as data_lib
from fastlora_jax import packing
from fastlora_jax.checkpointing import Checkpointer, is_step_directory
from fastlora_jax.packed_batches import PackedBatches
from fastlora_jax.precision import check_mixed_precision
from fastlora_jax.sft_config import SFTConfig
from fastlora_jax.training import AdamW, EvalStep, LossFn, TrainStep

PLOT_NAME = "loss_curve.png"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOutput:
    """What `SFTTrainer.train()` returns. Histories hold (step, loss) of the whole run, resumed parts included.

    training_loss and metrics["train_loss"]: the mean loss of the steps this call ran (as transformers).
    metrics, as transformers' Trainer.train(): train_runtime (seconds of the whole call, compilation included),
    train_samples_per_second, train_steps_per_second, total_flos (transformers' estimate: 6 x padded input tokens x
    parameters other than the embedding, over the whole run), train_loss, epoch; and ours: train_steps (this call)
    and train_tokens_per_second (non-padding tokens per second of the steps after the first, compiling, one).
    """

    global_step: int
    training_loss: float
    loss_history: list[tuple[int, float]]
    eval_history: list[tuple[int, float]]
    log_history: list[dict[str, Any]]
    plot_path: str | None
    checkpoint_dir: str
    metrics: dict[str, float]


@dataclasses.dataclass
class TrainerState:
    """`trainer.state`, as transformers' TrainerState: updated after every step. log_history holds transformers'
    entries ({"loss", "grad_norm", "learning_rate", "epoch", "step"} with our "tokens_per_second"; {"eval_loss",
    "epoch", "step"}; and train()'s metrics with "step" at the end). Its learning_rate at step k is what transformers
    logs there: the schedule's rate after k updates, the one step k + 1 uses."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    log_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class SFTTrainer:
    """`SFTTrainer(model, tokenizer, train_dataset, eval_dataset=None, args=SFTConfig(...)).train()`.

    Datasets: a list of dicts, a JSONL path or a `datasets.Dataset` (formats in `fastlora_jax.data`). The datasets
    are tokenized here (`trainer.train_dataset` / `trainer.eval_dataset`: the rows, dicts of "input_ids", "labels"
    and, packed, "segment_ids" / "positions"); `train()` runs the loop. `loss_fn` replaces
    `fastlora_jax.loss.causal_lm_loss`. `formatting_func` (TRL's): record -> the text to train on, applied to each
    record of both datasets before tokenization. `callbacks`: functions `callback(trainer, log)` called after every
    step (and its checkpoint) with log = {"step", "loss", "learning_rate", "grad_norm"}; an exception raised there
    stops training. SFTConfig fields passed as keywords (`max_seq_length=`, `packing=`, `dataset_num_proc=`, ... as
    older TRL / Unsloth notebooks) override those of `args`.
    data_collator: None (the batching here: rows padded on the right, labels with -100), transformers'
      `DataCollatorForSeq2Seq` (label_pad_token_id=-100), which batches the same way, or transformers'
      `DataCollatorForLanguageModeling(mlm=False)`, which trains on every token but those equal to its tokenizer's
      pad_token_id (the labels are set so; it cannot go with train_on_responses_only=True). Others raise TypeError.
    The model's dtype must agree with args.fp16 / args.bf16 (TypeError otherwise; `fastlora_jax.precision`).
    After train(): `trainer.state` (global_step, epoch, log_history, as transformers'), `trainer.optimizer` (the
    AdamW it ran).
    """

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: SFTConfig | None = None,
                 *, processing_class=None, data_collator=None, loss_fn: LossFn | None = None,
                 formatting_func: Callable[[dict], str] | None = None,
                 callbacks: Sequence[Callable[["SFTTrainer", dict], None]] = (), **config_overrides):
        if tokenizer is not None and processing_class is not None:
            raise ValueError("pass the tokenizer once: tokenizer= or processing_class=, not both")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        self.model, self.tokenizer = model, tokenizer if tokenizer is not None else processing_class
        args = args if args is not None else SFTConfig()
        if not isinstance(args, SFTConfig):
            name = type(args).__name__
            hint = (f"; it takes the same keywords: replace {name}(...) by SFTConfig(...)"
                    if name.endswith("TrainingArguments") else "")
            raise TypeError(f"args is a {name}; accepted: fastlora_jax.SFTConfig{hint}")
        fields = {f.name for f in dataclasses.fields(SFTConfig)}
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise TypeError(f"SFTTrainer got unexpected keyword arguments {unknown}; SFTConfig fields (accepted "
                            f"here too, as older TRL): {', '.join(sorted(fields))}")
        self.args = dataclasses.replace(args, **config_overrides) if config_overrides else args
        model_dtype = getattr(model, "dtype", None)
        if model_dtype is not None:
            check_mixed_precision(fp16=self.args.fp16, bf16=self.args.bf16, model_dtype=model_dtype)
        if self.args.eval_strategy in ("steps", "epoch") and eval_dataset is None:
            raise ValueError(f"eval_strategy={self.args.eval_strategy!r} needs an eval_dataset; pass one or set "
                             "eval_strategy='no'")
        collator_labels = _collator_labels(data_collator)
        if collator_labels is not None and self.args.responses_only:
            raise ValueError("DataCollatorForLanguageModeling sets the labels of every token but padding, undoing "
                             "train_on_responses_only=True (or completion_only_loss / assistant_only_loss); pass "
                             "DataCollatorForSeq2Seq or no data_collator")
        self.data_collator = data_collator
        if formatting_func is not None and self.args.responses_only:
            raise ValueError("formatting_func makes each record one text to train on whole, which cannot go with "
                             "train_on_responses_only=True (or completion_only_loss / assistant_only_loss); format "
                             "the dataset as prompt/completion or messages records instead")
        self.formatting_func = formatting_func
        self.loss_fn = loss_fn
        self.callbacks = tuple(callbacks)
        self.max_seq_length = (self.args.max_seq_length or self.args.max_length
                               or getattr(model, "max_seq_length", None) or 1024)
        self.buckets = tuple(self.args.length_buckets or data_lib.length_buckets(self.max_seq_length))
        if self.buckets[-1] < self.max_seq_length:
            raise ValueError(f"length_buckets={self.buckets} must reach max_seq_length={self.max_seq_length}")
        self.eos_token_id = self._token_id(self.args.eos_token, "eos_token")  # None: the tokenizer's
        pad = self._token_id(self.args.pad_token, "pad_token")
        pad = pad if pad is not None else getattr(self.tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(self.tokenizer, "eos_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        args = self.args
        if args.activation_offloading:
            mode = getattr(getattr(model, "model", None), "gradient_checkpointing", None)
            if mode not in ("unsloth", "long_context"):
                raise ValueError(f"activation_offloading=True, but the model's use_gradient_checkpointing={mode!r} "
                                 "keeps its activations on the device; pass use_gradient_checkpointing='unsloth' to "
                                 "get_peft_model (each layer's input goes to host memory)")
        whole = packing.keeps_long_examples(args.packing_strategy)  # then packed rows are tokenized untruncated
        rows = self._rows(train_dataset, "train_dataset", collator_labels, truncate=not (args.packing and whole))
        # train_rows; the ragged layout planned from the config, used where the model runs it; rows batched apart
        self.train_rows, self.layout_plan, self.layouts = rows, {}, None
        self._misfits: dict[str, tuple[list, np.ndarray | None]] = {}  # split -> (its rows, their misfits)
        if self.args.packing:
            packed = PackedBatches(rows, model, batch_size=self.rows_per_step, max_seq_length=self.max_seq_length,
                                   micro_batch_size=self.args.per_device_train_batch_size, buckets=self.buckets,
                                   pad_token_id=self.pad_token_id, strategy=self.args.packing_strategy)
            self.train_rows, self.layout_plan, self.layouts = packed.rows, packed.plan, packed.layouts
            self._misfits["train"] = (packed.rows, packed.misfits)
        # eval_rows; packed (TRL's eval_packing), also their layout plan, runnable layouts and rows batched apart
        self.eval_rows, self.eval_layout_plan, self.eval_layouts = None, {}, None
        if eval_dataset is not None:
            eval_packing = args.packing if args.eval_packing is None else args.eval_packing
            self.eval_rows = self._rows(eval_dataset, "eval_dataset", collator_labels,
                                        truncate=not (eval_packing and whole))
            if eval_packing:  # as the training rows, for batches of the eval batch size
                packed = PackedBatches(self.eval_rows, model, batch_size=self.eval_batch_size,
                                       max_seq_length=self.max_seq_length, buckets=self.buckets,
                                       pad_token_id=self.pad_token_id, strategy=self.args.packing_strategy)
                self.eval_rows, self.eval_layout_plan, self.eval_layouts = packed.rows, packed.plan, packed.layouts
                self._misfits["eval"] = (packed.rows, packed.misfits)
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_size is not None:
            data_lib.check_rows_vocab(self.train_rows, vocab_size, where="train_dataset")
            if self.eval_rows is not None:
                data_lib.check_rows_vocab(self.eval_rows, vocab_size, where="eval_dataset")
        self.log_history: list[dict[str, Any]] = []
        self.state = TrainerState(max_steps=self.total_steps)
        self.optimizer: AdamW | None = None  # the last train()'s

    def _rows(self, dataset, where: str, collator_labels, *, truncate: bool = True) -> list[dict[str, Any]]:
        """The dataset tokenized (truncated to max_seq_length where `truncate`), with the labels `collator_labels`
        makes of the input_ids (if not None)."""
        records = data_lib.load_records(dataset)
        if self.formatting_func is not None and not self.args.skip_prepare_dataset:
            records = self._formatted(records, where)
        if self.args.skip_prepare_dataset:
            for i, record in enumerate(records):
                if data_lib.record_kind(record, self.args.dataset_text_field) != "input_ids":
                    raise ValueError(f"dataset_kwargs={{'skip_prepare_dataset': True}} trains on the records as they "
                                     f"are, which needs 'input_ids' in each, but {where} record {i} has the fields "
                                     f"{sorted(record)}; drop skip_prepare_dataset to have them tokenized")
        rows = data_lib.tokenize_dataset(records, self.tokenizer,
                                         max_seq_length=self.max_seq_length if truncate else None,
                                         train_on_responses_only=self.args.responses_only,
                                         dataset_text_field=self.args.dataset_text_field,
                                         eos_token_id=self.eos_token_id)
        if collator_labels is not None:
            rows = [{**r, "labels": collator_labels(r["input_ids"])} for r in rows]
        if self.args.shuffle_dataset:  # as datasets.Dataset.shuffle(seed), which TRL calls before packing
            rows = [rows[i] for i in np.random.default_rng(self.args.seed).permutation(len(rows))]
        return rows

    def _token_id(self, token: str | None, name: str) -> int | None:
        """The id of TRL's eos_token / pad_token in the tokenizer's vocabulary; None for None."""
        if token is None:
            return None
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else None
        if vocab is None:
            raise ValueError(f"{name}={token!r} needs a tokenizer with a vocabulary (get_vocab()); pass tokenizer=")
        if token not in vocab:
            raise ValueError(f"{name}={token!r} is not in the vocabulary of the tokenizer "
                             f"({type(self.tokenizer).__name__}); accepted: one of its tokens, or None for its own")
        return int(vocab[token])

    def _formatted(self, records: list[dict], where: str) -> list[dict]:
        """TRL's formatting_func: each record becomes the one text it returns (a plain-text record). A dataset
        already tokenized ("input_ids" in its first record) is kept as it is, with a warning, as TRL does."""
        if records and "input_ids" in records[0]:
            warnings.warn(f"{where} is already tokenized ('input_ids'), so formatting_func is not applied to it",
                          stacklevel=3)
            return records
        texts = []
        for i, record in enumerate(records):
            text = self.formatting_func(record)
            if not isinstance(text, str):
                raise TypeError(f"formatting_func returned a {type(text).__name__} for {where} record {i}; "
                                "accepted: one string per record (TRL's formatting_func takes one example; for the "
                                "older batched form, which returned a list, map the dataset with it first)")
            texts.append({self.args.dataset_text_field: text})
        return texts

    @property
    def train_dataset(self) -> list[dict[str, Any]]:
        """The tokenized training rows (TRL's trainer.train_dataset: its prepared dataset)."""
        return self.train_rows

    @property
    def eval_dataset(self) -> list[dict[str, Any]] | None:
        return self.eval_rows

    # ------------------------------------------------------------------ sizes

    @property
    def rows_per_step(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    @property
    def misfits(self) -> np.ndarray | None:
        """[train rows] bool: the packed rows the layout plan does not hold (`data.layout_misfits`), batched apart;
        for the rows as they are now (train_on_responses_only drops rows left with nothing to train on)."""
        return self._current_misfits("train", self.train_rows, self.layout_plan)

    @property
    def eval_misfits(self) -> np.ndarray | None:
        """The same for the eval rows."""
        return self._current_misfits("eval", self.eval_rows, self.eval_layout_plan)

    def _current_misfits(self, split: str, rows, plan) -> np.ndarray | None:
        kept = self._misfits.get(split)
        if kept is None or kept[0] is not rows:  # the rows were replaced since: mark them again
            kept = self._misfits[split] = (rows, data_lib.layout_misfits(rows, self.buckets, plan) if rows else None)
        return kept[1]

    @property
    def eval_batch_size(self) -> int:
        return self.args.per_device_eval_batch_size or self.args.per_device_train_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return data_lib.num_batches(len(self.train_rows), self.rows_per_step)

    @property
    def total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * self.steps_per_epoch))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> float:
        """The token-weighted mean loss of the model on the eval dataset."""
        if self.eval_rows is None:
            raise ValueError("evaluate() needs an eval_dataset")
        if getattr(self, "_eval_step", None) is None:
            self._eval_step = EvalStep(self.model, loss_fn=self.loss_fn)
        batches = data_lib.iterate_batches(self.eval_rows, batch_size=self.eval_batch_size, buckets=self.buckets,
                                           pad_token_id=self.pad_token_id, shuffle=False, layouts=self.eval_layouts,
                                           misfits=self.eval_misfits)
        return self._eval_step.mean_loss(batches)

    # ------------------------------------------------------------------ training

    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Runs the training loop (see the module docstring); returns a TrainOutput."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        args = self.args
        resume = args.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
        total = self.total_steps
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total)
        optimizer = AdamW(lr_scheduler_type=args.lr_scheduler_type, learning_rate=float(args.learning_rate),
                          total_steps=total, warmup_steps=warmup, b1=float(args.adam_beta1), b2=float(args.adam_beta2),
                          eps=float(args.adam_epsilon), weight_decay=float(args.weight_decay), optim=args.optim,
                          embedding_learning_rate=None if args.embedding_learning_rate is None
                          else float(args.embedding_learning_rate))
        self.optimizer = optimizer
        schedule = optimizer.schedule
        step_fn = TrainStep(self.model, optimizer,
                            gradient_accumulation_steps=args.gradient_accumulation_steps,
                            max_grad_norm=args.max_grad_norm or None, seed=args.seed, loss_fn=self.loss_fn)
        eval_strategy = args.eval_strategy or ("steps" if self.eval_rows is not None else "no")
        flops_per_token = _flops_per_token(self.model)
        os.makedirs(args.output_dir, exist_ok=True)
        manager = Checkpointer(args.checkpoint_dir, max_to_keep=args.save_total_limit)
        losses: list[tuple[int, float]] = []
        evals: list[tuple[int, float]] = []
        logs: list[dict[str, Any]] = []
        seed = args.seed
        total_flos = 0.0
        bar = None
        try:
            if resume:
                meta = self._restore(step_fn, manager, resume)
                losses = [(int(s), float(v)) for s, v in meta["loss_history"]]
                evals = [(int(s), float(v)) for s, v in meta["eval_history"]]
                logs = list(meta["log_history"])
                seed = int(meta["seed"])
                total_flos = float(meta.get("total_flos", 0.0))
            elif manager.all_steps():
                stale = manager.all_steps()
                moved = manager.set_aside(stale)
                warnings.warn(f"{manager.directory} held checkpoints of an earlier run (steps {stale}); they were "
                              f"moved to {moved} (pass resume_from_checkpoint=True to continue a run instead)",
                              stacklevel=2)
            bar = tqdm(total=total, initial=step_fn.step, desc="training", dynamic_ncols=True,
                       disable=args.disable_tqdm)
            meter = _Throughput(start)
            upcoming = self._batches_from(step_fn.step, seed)
            batch = next(upcoming) if step_fn.step < total else None
            host = _host_device()
            self.state = TrainerState(global_step=step_fn.step, max_steps=total,
                                      epoch=step_fn.step / self.steps_per_epoch, log_history=logs)
            while batch is not None:
                metrics = step_fn(batch)  # dispatched: the device runs it while the host prepares what follows
                step = step_fn.step
                following = next(upcoming) if step < total else None
                rows = int(np.count_nonzero((batch["labels"] != data_lib.IGNORE_INDEX).any(axis=1)))
                tokens = data_lib.count_tokens(batch, self.pad_token_id)
                with jax.default_device(host):  # the schedule's jnp ops on the host: none wait behind the step
                    lr = float(schedule(step))  # as transformers logs it: the rate of the next step
                fetched = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm", "finite")})  # waits
                loss, grad_norm = float(fetched["loss"]), float(fetched["grad_norm"])
                if not bool(fetched["finite"]):
                    manager.wait()
                    last = manager.latest_step()
                    kept = (f"the last checkpoint is step {last} in {manager.directory}" if last is not None
                            else "no checkpoint was saved")
                    reason = ("not finite" if not (math.isfinite(loss) and math.isfinite(grad_norm)) else
                              "finite, but the updated weights are not: check the learning rate and AdamW settings")
                    raise FloatingPointError(f"training stopped at step {step}: loss={loss}, grad_norm={grad_norm} "
                                             f"({reason}); the model keeps the weights before step {step}; {kept}")
                losses.append((step, loss))
                meter.add(loss, tokens, rows)
                total_flos += (flops_per_token or 0.0) * rows * batch["input_ids"].shape[1]
                self.state.global_step, self.state.epoch = step, step / self.steps_per_epoch
                bar.update(1)
                if step % args.logging_steps == 0 or step == total or (step == 1 and args.logging_first_step):
                    entry = {"step": step, "epoch": step / self.steps_per_epoch, "learning_rate": lr,
                             "grad_norm": grad_norm, **meter.window()}
                    logs.append(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{entry['tokens_per_second']:.0f}")
                    if args.disable_tqdm:  # no bar to show it: a line, as transformers' PrinterCallback
                        print(f"step {step}: loss {entry['loss']:.4f}, learning_rate {lr:.3e}, grad_norm "
                              f"{grad_norm:.4f}, {entry['tokens_per_second']:.0f} tokens/s", flush=True)
                if self._due(eval_strategy, args.eval_steps or args.logging_steps, step, total):
                    with meter.paused():
                        evals.append((step, self.evaluate()))
                        logs.append({"step": step, "epoch": step / self.steps_per_epoch, "eval_loss": evals[-1][1]})
                        line = f"step {step}: eval_loss {evals[-1][1]:.4f}"
                        if args.disable_tqdm:
                            print(line, flush=True)
                        else:
                            bar.write(line)
                if self._due(args.save_strategy, args.save_steps, step, total):
                    with meter.paused():
                        manager.save(step_fn, meta=self._meta(step_fn.step, seed, losses, evals, logs, total_flos))
                for callback in self.callbacks:
                    callback(self, {"step": step, "loss": loss, "learning_rate": lr, "grad_norm": grad_norm})
                batch = following
        finally:
            if bar is not None:
                bar.close()
            manager.close()
        metrics = meter.summary()
        metrics.update(train_loss=meter.mean_loss(), epoch=step_fn.step / self.steps_per_epoch)
        if flops_per_token is not None:
            metrics["total_flos"] = total_flos
        logs.append({**metrics, "step": step_fn.step})
        self.log_history = logs
        self.state = TrainerState(global_step=step_fn.step, max_steps=total, epoch=metrics["epoch"], log_history=logs)
        plot_path = plot_loss_curve(losses, evals, os.path.join(args.output_dir, PLOT_NAME)) if losses else None
        return TrainOutput(
            global_step=step_fn.step, training_loss=metrics["train_loss"], loss_history=losses, eval_history=evals,
            log_history=logs, plot_path=plot_path, checkpoint_dir=manager.directory, metrics=metrics)

    def _batches_from(self, step: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        """The training batches from update `step` on, epoch after epoch (each epoch's order from `seed`)."""
        epoch, start = divmod(step, self.steps_per_epoch)
        while True:
            yield from data_lib.iterate_batches(
                self.train_rows, batch_size=self.rows_per_step, buckets=self.buckets, pad_token_id=self.pad_token_id,
                seed=seed, epoch=epoch, start=start, layouts=self.layouts, misfits=self.misfits)
            epoch, start = epoch + 1, 0

    def _due(self, strategy: str, every: int, step: int, total: int) -> bool:
        """Whether an eval / save strategy ("no", "steps" every `every` steps, "epoch") acts after `step`; "steps"
        and "epoch" also act after the last step (as transformers)."""
        if strategy == "no":
            return False
        if step == total:
            return True
        return step % (self.steps_per_epoch if strategy == "epoch" else every) == 0

    def _meta(self, step: int, seed: int, losses, evals, logs, total_flos: float) -> dict[str, Any]:
        """What a checkpoint records besides arrays: the data position and the histories so far."""
        epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "rows_per_step": self.rows_per_step,
                "n_rows": len(self.train_rows), "rows_digest": self._rows_digest, "seed": seed,
                "loss_history": losses, "eval_history": evals, "log_history": logs, "total_flos": total_flos}

    @functools.cached_property
    def _rows_digest(self) -> str:
        """`data.rows_digest` of the training rows and the rows batched apart, once a run."""
        return data_lib.rows_digest(self.train_rows, self.misfits)

    def _restore(self, step_fn: TrainStep, manager: Checkpointer, resume) -> dict[str, Any]:
        """Restores the checkpoint `resume` names into step_fn; checks that the data order would be the same."""
        step = None
        source = manager
        if not isinstance(resume, bool):
            path = os.path.abspath(os.fspath(resume))
            if not os.path.isdir(path):
                raise FileNotFoundError(f"resume_from_checkpoint={os.fspath(resume)!r} is not a directory")
            if is_step_directory(path):
                path, step = os.path.dirname(path), int(os.path.basename(path))
            if path != manager.directory:
                source = Checkpointer(path)
        try:
            if source.latest_step() is None:
                raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint in {source.directory}")
            meta = source.restore(step_fn, step)
        finally:
            if source is not manager:
                source.close()
        mine = {"rows_per_step": self.rows_per_step, "n_rows": len(self.train_rows)}
        theirs = {k: meta.get(k) for k in mine}
        if mine != theirs:
            raise ValueError(f"the checkpoint of step {step_fn.step} was written with {theirs} (rows per step = "
                             "per_device_train_batch_size x gradient_accumulation_steps; rows of the tokenized "
                             f"dataset); this run has {mine}: the data order would differ")
        if meta.get("rows_digest", self._rows_digest) != self._rows_digest:  # checkpoints before session 26 lack it
            raise ValueError(f"the checkpoint of step {step_fn.step} was written for other training rows (their "
                             f"digest {meta['rows_digest'][:12]}..., this run's {self._rows_digest[:12]}...) of the "
                             "same count: the dataset, its tokenization or, with packing=True, how examples were "
                             "packed and batched (max_seq_length, the model's attention widths, "
                             "per_device_train_batch_size) differ, so the data order would differ")
        later = [s for s in manager.all_steps() if s > step_fn.step]
        if later:
            moved = manager.set_aside(later)
            warnings.warn(f"resuming from step {step_fn.step} while {manager.directory} held the later steps {later} "
                          f"of the run that went on from it: they belong to that abandoned run and were moved to "
                          f"{moved}, so that resume_from_checkpoint=True continues this run", stacklevel=3)
        if int(meta["seed"]) != self.args.seed:
            warnings.warn(f"resuming with seed={meta['seed']} from the checkpoint (args.seed={self.args.seed})",
                          stacklevel=3)
        return meta


def _collator_labels(collator) -> Callable[[np.ndarray], np.ndarray] | None:
    """None when `collator` batches as the trainer does (None, or transformers' DataCollatorForSeq2Seq padding the
    labels with -100); for transformers' DataCollatorForLanguageModeling(mlm=False), the labels it makes of a row's
    input_ids: each token but its tokenizer's pad token. Any other collator raises TypeError."""
    if collator is None:
        return None
    accepted = ("accepted: None (the batching here), transformers.DataCollatorForSeq2Seq(tokenizer) or "
                "transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)")
    name = type(collator).__name__
    if type(collator).__module__.split(".")[0] == "transformers":
        from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

        if isinstance(collator, DataCollatorForSeq2Seq):
            if collator.label_pad_token_id != data_lib.IGNORE_INDEX:
                raise TypeError(f"DataCollatorForSeq2Seq(label_pad_token_id={collator.label_pad_token_id!r}) would "
                                f"train on its padding; accepted: label_pad_token_id={data_lib.IGNORE_INDEX}")
            return None
        if isinstance(collator, DataCollatorForLanguageModeling):
            if collator.mlm:
                raise TypeError("DataCollatorForLanguageModeling(mlm=True) masks tokens for a masked language model; "
                                "accepted: mlm=False (causal language modelling)")
            pad = getattr(collator.tokenizer, "pad_token_id", None)
            if pad is None:
                return lambda ids: ids.copy()
            return lambda ids: np.where(ids == pad, data_lib.IGNORE_INDEX, ids).astype(np.int32)
    raise TypeError(f"data_collator={name}: the trainer batches token rows itself (right padding, labels -100 on "
                    f"padding and ignored tokens); {accepted}")


def _host_device():
    """The CPU device, where the loop evaluates the learning-rate schedule for its logs (a few jnp ops that would
    otherwise queue behind the step on an accelerator); None (the default device) where JAX_PLATFORMS leaves none."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


class _Throughput:
    """Tokens/s of training steps only (evaluation and checkpoint writes are paused out), per logging window and
    for the run after its first (compiling) step; and transformers' speed metrics of the whole call, which began at
    `start` (a time.perf_counter())."""

    def __init__(self, start: float):
        self.start, self.window_start = start, time.perf_counter()
        self.paused_total = self.window_paused = 0.0
        self.losses, self.tokens, self.steps, self.rows, self.loss_sum = [], 0, 0, 0, 0.0
        self.steady_tokens, self.steady_start, self.steady_paused = 0, None, 0.0

    def add(self, loss: float, tokens: int, rows: int) -> None:
        self.steps += 1
        self.rows += rows
        self.loss_sum += loss
        self.losses.append(loss)
        self.tokens += tokens
        if self.steady_start is None:
            self.steady_start, self.steady_paused = time.perf_counter(), self.paused_total
        else:
            self.steady_tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_total += time.perf_counter() - t0
            self.window_paused += time.perf_counter() - t0

    def window(self) -> dict[str, float]:
        """{"loss": mean loss, "tokens_per_second"} since the last window; starts a new window."""
        elapsed = time.perf_counter() - self.window_start - self.window_paused
        out = {"loss": sum(self.losses) / len(self.losses), "tokens_per_second": self.tokens / max(elapsed, 1e-9)}
        self.window_start, self.window_paused, self.losses, self.tokens = time.perf_counter(), 0.0, [], 0
        return out

    def mean_loss(self) -> float:
        """The mean loss of the steps since `start` (transformers' train_loss; 0.0 without a step, as there)."""
        return self.loss_sum / self.steps if self.steps else 0.0

    def summary(self) -> dict[str, float]:
        now = time.perf_counter()
        runtime = now - self.start
        steady = 0.0
        if self.steady_start is not None:
            steady = now - self.steady_start - (self.paused_total - self.steady_paused)
        return {"train_runtime": runtime, "train_samples_per_second": self.rows / runtime,
                "train_steps_per_second": self.steps / runtime, "train_steps": self.steps,
                "train_tokens_per_second": self.steady_tokens / steady if steady > 0 and self.steady_tokens else 0.0}


def _flops_per_token(model) -> float | None:
    """transformers' estimate of a training token's floating-point operations: 6 x the parameters other than the
    embedding (PEFT's count: base, LoRA and modules_to_save copies, 4-bit weights at their unquantized size);
    None for a model without a LlamaConfig and LoRA config."""
    config = getattr(model, "config", None)
    if not hasattr(model, "peft_config") or not hasattr(config, "vocab_size"):
        return None
    from fastlora_jax.lora import get_nb_trainable_parameters, plan

    _, total = get_nb_trainable_parameters(model)
    embeddings = 1 + (model.peft_config is not None and "embed_tokens" in plan(model.peft_config, config).saved)
    return 6.0 * (total - embeddings * config.vocab_size * config.hidden_size)


def plot_loss_curve(losses: list[tuple[int, float]], evals: list[tuple[int, float]], path: str) -> str:
    """Writes a PNG of the training loss per step (and the eval loss) to `path`; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, without touching pyplot state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([s for s, _ in losses], [v for _, v in losses], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


# Unsloth's names for its continued-pretraining cells (`from unsloth import UnslothTrainer, UnslothTrainingArguments`):
# UnslothTrainer is TRL's SFTTrainer with embedding_learning_rate's parameter groups, which this SFTTrainer has.
UnslothTrainer = SFTTrainer
