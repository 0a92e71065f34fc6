"""SFTTrainer: supervised fine-tuning of a LoRA model, shaped like TRL's `SFTTrainer(model, tokenizer, ...).train()`.

    trainer = SFTTrainer(model, tokenizer, train_dataset="data.jsonl",
                         args=SFTConfig(output_dir="out", max_steps=60, learning_rate=2e-4))
    result = trainer.train()          # result.loss_history: [(step, loss), ...]

The run: tokenize (and pack) the dataset, AdamW with weight decay under a linear / cosine / constant schedule with
warm-up, a jitted step over the trainable state only (`fastlora_jax.training`), a tqdm bar with loss, learning rate
and tokens/s, periodic eval loss, orbax checkpoints every `save_steps` in `output_dir/checkpoints`, and a loss-curve
PNG in `output_dir`. `resume_from_checkpoint=True` continues from the latest checkpoint with the same data order,
rng and optimizer state, so its losses equal those of an uninterrupted run. Resuming from an earlier checkpoint
warns about the later ones (of the abandoned run), and the new run replaces each as it saves that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from typing import Any, Callable, Sequence

from fastlora_jax import data as data_lib
from fastlora_jax.checkpointing import Checkpointer, is_step_directory
from fastlora_jax.training import SCHEDULES, AdamW, EvalStep, LossFn, TrainStep, check_adam_settings

CHECKPOINT_DIRNAME = "checkpoints"
PLOT_NAME = "loss_curve.png"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Training arguments (field names and defaults as TRL's SFTConfig / transformers' TrainingArguments).

    max_steps > 0 overrides num_train_epochs. warmup_steps > 0 overrides warmup_ratio. eval_steps None evaluates
    every logging_steps (with an eval_dataset). save_total_limit is orbax's max_to_keep (None keeps all).
    max_seq_length None takes the model's `max_seq_length` (from from_pretrained), else 1024.
    train_on_responses_only: True trains on assistant answers / completions only; None does so for
    prompt/completion records only (TRL's default). resume_from_checkpoint: True (the latest checkpoint in
    output_dir/checkpoints), a checkpoints directory or one step directory in it, or False.
    length_buckets: padded sequence lengths (default: powers of two from 64, then max_seq_length).
    """

    output_dir: str = "outputs"
    max_steps: int = -1
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = None
    max_seq_length: int | None = None
    packing: bool = False
    train_on_responses_only: bool | None = None
    seed: int = 42
    dataset_text_field: str = "text"
    resume_from_checkpoint: bool | str = False
    length_buckets: tuple[int, ...] | None = None
    disable_tqdm: bool = False

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}; accepted: an int >= 1")
        for name in ("per_device_eval_batch_size", "eval_steps", "save_total_limit", "max_seq_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r}; accepted: an int >= 1 or None")
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps={self.max_steps!r}; accepted: an int >= 1, or -1 to use num_train_epochs")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs={self.num_train_epochs!r}; accepted: a number > 0")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r}; accepted: {', '.join(SCHEDULES)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r}; accepted: a number > 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}; accepted: an int >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r}; accepted: 0 <= warmup_ratio < 1")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r}; accepted: a number >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r}; accepted: a number > 0, or None (no clipping)")
        check_adam_settings(self.adam_beta1, self.adam_beta2, self.adam_epsilon,
                            names=("adam_beta1", "adam_beta2", "adam_epsilon"))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r}; accepted: an int in [0, 2**63) (it seeds numpy's data order and "
                             "JAX's dropout key)")
        if not isinstance(self.resume_from_checkpoint, (bool, str, os.PathLike)):
            raise ValueError(f"resume_from_checkpoint={self.resume_from_checkpoint!r}; accepted: True, False or a "
                             "checkpoint directory")
        if self.length_buckets is not None and (
                not self.length_buckets or list(self.length_buckets) != sorted(set(self.length_buckets))
                or self.length_buckets[0] < 1):
            raise ValueError(f"length_buckets={self.length_buckets!r}; accepted: increasing positive ints, or None")

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT_DIRNAME)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOutput:
    """What `SFTTrainer.train()` returns. Histories hold (step, loss) of the whole run, resumed parts included."""

    global_step: int
    training_loss: float
    loss_history: list[tuple[int, float]]
    eval_history: list[tuple[int, float]]
    log_history: list[dict[str, Any]]
    plot_path: str | None
    checkpoint_dir: str
    metrics: dict[str, float]


class SFTTrainer:
    """`SFTTrainer(model, tokenizer, train_dataset, eval_dataset=None, args=SFTConfig(...)).train()`.

    Datasets: a list of dicts, a JSONL path or a `datasets.Dataset` (formats in `fastlora_jax.data`). The datasets
    are tokenized here; `train()` runs the loop. `loss_fn` replaces `fastlora_jax.loss.causal_lm_loss`.
    `callbacks`: functions `callback(trainer, log)` called after every step (and its checkpoint) with
    log = {"step", "loss", "learning_rate", "grad_norm"}; an exception raised there stops training.
    SFTConfig fields passed as keywords (`max_seq_length=`, `packing=`, ... as older TRL / Unsloth notebooks)
    override those of `args`.
    """

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: SFTConfig | None = None,
                 *, processing_class=None, loss_fn: LossFn | None = None,
                 callbacks: Sequence[Callable[["SFTTrainer", dict], None]] = (), **config_overrides):
        if tokenizer is not None and processing_class is not None:
            raise ValueError("pass the tokenizer once: tokenizer= or processing_class=, not both")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        self.model, self.tokenizer = model, tokenizer if tokenizer is not None else processing_class
        args = args if args is not None else SFTConfig()
        if not isinstance(args, SFTConfig):
            raise TypeError(f"args is a {type(args).__name__}; accepted: fastlora_jax.SFTConfig")
        fields = {f.name for f in dataclasses.fields(SFTConfig)}
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise TypeError(f"SFTTrainer got unexpected keyword arguments {unknown}; SFTConfig fields (accepted "
                            f"here too, as older TRL): {', '.join(sorted(fields))}")
        self.args = dataclasses.replace(args, **config_overrides) if config_overrides else args
        self.loss_fn = loss_fn
        self.callbacks = tuple(callbacks)
        self.max_seq_length = self.args.max_seq_length or getattr(model, "max_seq_length", None) or 1024
        self.buckets = tuple(self.args.length_buckets or data_lib.length_buckets(self.max_seq_length))
        if self.buckets[-1] < self.max_seq_length:
            raise ValueError(f"length_buckets={self.buckets} must reach max_seq_length={self.max_seq_length}")
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(self.tokenizer, "eos_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        common = dict(max_seq_length=self.max_seq_length, train_on_responses_only=self.args.train_on_responses_only,
                      dataset_text_field=self.args.dataset_text_field)
        self.train_rows = data_lib.prepare_rows(train_dataset, self.tokenizer, packing=self.args.packing, **common)
        self.eval_rows = (None if eval_dataset is None else
                          data_lib.prepare_rows(eval_dataset, self.tokenizer, packing=False, **common))
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_size is not None:
            data_lib.check_rows_vocab(self.train_rows, vocab_size, where="train_dataset")
            if self.eval_rows is not None:
                data_lib.check_rows_vocab(self.eval_rows, vocab_size, where="eval_dataset")
        self.log_history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ sizes

    @property
    def rows_per_step(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

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
        batch_size = self.args.per_device_eval_batch_size or self.args.per_device_train_batch_size
        batches = data_lib.iterate_batches(self.eval_rows, batch_size=batch_size, buckets=self.buckets,
                                           pad_token_id=self.pad_token_id, shuffle=False)
        return self._eval_step.mean_loss(batches)

    # ------------------------------------------------------------------ training

    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Runs the training loop (see the module docstring); returns a TrainOutput."""
        from tqdm.auto import tqdm

        args = self.args
        resume = args.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
        total = self.total_steps
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total)
        optimizer = AdamW(lr_scheduler_type=args.lr_scheduler_type, learning_rate=float(args.learning_rate),
                          total_steps=total, warmup_steps=warmup, b1=float(args.adam_beta1), b2=float(args.adam_beta2),
                          eps=float(args.adam_epsilon), weight_decay=float(args.weight_decay))
        schedule = optimizer.schedule
        step_fn = TrainStep(self.model, optimizer,
                            gradient_accumulation_steps=args.gradient_accumulation_steps,
                            max_grad_norm=args.max_grad_norm, seed=args.seed, loss_fn=self.loss_fn)
        os.makedirs(args.output_dir, exist_ok=True)
        manager = Checkpointer(args.checkpoint_dir, max_to_keep=args.save_total_limit)
        losses: list[tuple[int, float]] = []
        evals: list[tuple[int, float]] = []
        logs: list[dict[str, Any]] = []
        seed = args.seed
        bar = None
        try:
            if resume:
                meta = self._restore(step_fn, manager, resume)
                losses = [(int(s), float(v)) for s, v in meta["loss_history"]]
                evals = [(int(s), float(v)) for s, v in meta["eval_history"]]
                logs = list(meta["log_history"])
                seed = int(meta["seed"])
            elif manager.all_steps():
                stale = manager.delete_all()
                warnings.warn(f"{manager.directory} held checkpoints of an earlier run (steps {stale}); they were "
                              "deleted (pass resume_from_checkpoint=True to continue a run instead)", stacklevel=2)
            bar = tqdm(total=total, initial=step_fn.step, desc="training", dynamic_ncols=True,
                       disable=args.disable_tqdm)
            meter = _Throughput()
            epoch, batches = None, None
            eval_every = args.eval_steps or args.logging_steps
            while step_fn.step < total:
                e, k = divmod(step_fn.step, self.steps_per_epoch)
                if e != epoch:
                    epoch, batches = e, data_lib.iterate_batches(
                        self.train_rows, batch_size=self.rows_per_step, buckets=self.buckets,
                        pad_token_id=self.pad_token_id, seed=seed, epoch=e, start=k)
                batch = next(batches)
                lr = float(schedule(step_fn.step))
                metrics = step_fn(batch)
                step = step_fn.step
                loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                if not bool(metrics["finite"]):
                    manager.wait()
                    last = manager.latest_step()
                    kept = (f"the last checkpoint is step {last} in {manager.directory}" if last is not None
                            else "no checkpoint was saved")
                    reason = ("not finite" if not (math.isfinite(loss) and math.isfinite(grad_norm)) else
                              "finite, but the updated weights are not: check the learning rate and AdamW settings")
                    raise FloatingPointError(f"training stopped at step {step}: loss={loss}, grad_norm={grad_norm} "
                                             f"({reason}); the model keeps the weights before step {step}; {kept}")
                losses.append((step, loss))
                meter.add(loss, data_lib.count_tokens(batch, self.pad_token_id))
                bar.update(1)
                if step % args.logging_steps == 0 or step == total:
                    entry = {"step": step, "epoch": step / self.steps_per_epoch, "learning_rate": lr,
                             "grad_norm": grad_norm, **meter.window()}
                    logs.append(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{entry['tokens_per_second']:.0f}")
                    if args.disable_tqdm:  # no bar to show it: a line, as transformers' PrinterCallback
                        print(f"step {step}: loss {entry['loss']:.4f}, learning_rate {lr:.3e}, grad_norm "
                              f"{grad_norm:.4f}, {entry['tokens_per_second']:.0f} tokens/s", flush=True)
                if self.eval_rows is not None and (step % eval_every == 0 or step == total):
                    with meter.paused():
                        evals.append((step, self.evaluate()))
                        logs.append({"step": step, "eval_loss": evals[-1][1]})
                        line = f"step {step}: eval_loss {evals[-1][1]:.4f}"
                        if args.disable_tqdm:
                            print(line, flush=True)
                        else:
                            bar.write(line)
                if step % args.save_steps == 0 or step == total:
                    with meter.paused():
                        manager.save(step_fn, meta=self._meta(step_fn.step, seed, losses, evals, logs))
                for callback in self.callbacks:
                    callback(self, {"step": step, "loss": loss, "learning_rate": lr, "grad_norm": grad_norm})
        finally:
            if bar is not None:
                bar.close()
            manager.close()
        self.log_history = logs
        plot_path = plot_loss_curve(losses, evals, os.path.join(args.output_dir, PLOT_NAME)) if losses else None
        return TrainOutput(
            global_step=step_fn.step, training_loss=sum(v for _, v in losses) / max(1, len(losses)),
            loss_history=losses, eval_history=evals, log_history=logs, plot_path=plot_path,
            checkpoint_dir=manager.directory, metrics=meter.summary())

    def _meta(self, step: int, seed: int, losses, evals, logs) -> dict[str, Any]:
        """What a checkpoint records besides arrays: the data position and the histories so far."""
        epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "rows_per_step": self.rows_per_step,
                "n_rows": len(self.train_rows), "seed": seed, "loss_history": losses, "eval_history": evals,
                "log_history": logs}

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
        later = [s for s in manager.all_steps() if s > step_fn.step]
        if later:
            warnings.warn(f"resuming from step {step_fn.step} while {manager.directory} holds the later steps {later} "
                          "of the run that went on from it: they belong to that abandoned run, and each is replaced "
                          "when this run saves that step", stacklevel=3)
        if int(meta["seed"]) != self.args.seed:
            warnings.warn(f"resuming with seed={meta['seed']} from the checkpoint (args.seed={self.args.seed})",
                          stacklevel=3)
        return meta


class _Throughput:
    """Tokens/s of training steps only (evaluation and checkpoint writes are paused out), per logging window and
    for the run after its first (compiling) step."""

    def __init__(self):
        self.start = self.window_start = time.perf_counter()
        self.paused_total = self.window_paused = 0.0
        self.losses, self.tokens, self.steps = [], 0, 0
        self.steady_tokens, self.steady_start, self.steady_paused = 0, None, 0.0

    def add(self, loss: float, tokens: int) -> None:
        self.steps += 1
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

    def summary(self) -> dict[str, float]:
        now = time.perf_counter()
        steady = 0.0
        if self.steady_start is not None:
            steady = now - self.steady_start - (self.paused_total - self.steady_paused)
        return {"train_runtime": now - self.start, "train_steps": self.steps,
                "train_tokens_per_second": self.steady_tokens / steady if steady > 0 and self.steady_tokens else 0.0}


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
