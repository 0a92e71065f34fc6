"""SFTConfig: the training arguments of `SFTTrainer`, with TRL's SFTConfig / transformers' TrainingArguments names,
defaults and checks, and the keywords Unsloth's notebooks pass (each honoured, accepted where it changes nothing, or
refused naming what to pass instead)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from fastlora_jax.packing import check_strategy
from fastlora_jax.training import OPTIMIZERS, SCHEDULES, check_adam_settings

CHECKPOINT_DIRNAME = "checkpoints"
STRATEGIES = ("no", "steps", "epoch")
LOSS_TYPES = (None, "nll", "chunked_nll")  # both are the token-mean cross-entropy fastlora_jax.loss computes



@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Training arguments (field names and defaults as TRL's SFTConfig / transformers' TrainingArguments).

    max_steps > 0 overrides num_train_epochs. warmup_steps > 0 overrides warmup_ratio. save_total_limit is orbax's
    max_to_keep (None keeps all). max_grad_norm 0 or None: no clipping (as transformers).
    max_seq_length (or TRL's newer name max_length; passing both, they must agree) None takes the model's
    `max_seq_length` (from from_pretrained), else 1024. truncation_mode: "keep_start" only (TRL deprecates
    "keep_end"). shuffle_dataset: the tokenized rows shuffled with `seed` before packing (TRL's; what "wrapped"
    concatenates then comes in that order); the batches are shuffled each epoch either way.
    train_on_responses_only: True trains on assistant answers / completions only; None does so for
    prompt/completion records only (TRL's default); False on every token. TRL's completion_only_loss=True or
    assistant_only_loss=True mean True here, completion_only_loss=False means False.
    resume_from_checkpoint: True (the latest checkpoint in output_dir/checkpoints), a checkpoints directory or one
    step directory in it, or False. length_buckets: padded sequence lengths (default: powers of two from 64, then
    max_seq_length).
    packing: True packs examples into rows of max_seq_length (each attends only to itself), spread so that a row
    fits cuDNN's ragged layout for the model (`packing.pack_rows`); the rows that layout does not hold are batched among
    themselves (`data.layout_misfits`). Both follow from the data, the model's config and the micro-batch, so the
    batches are the same on any machine. packing_strategy (TRL's, used with packing=True): "bfd" (best fit
    decreasing, examples truncated to max_seq_length), "bfd_split" (longer examples cut into pieces of
    max_seq_length, each packed as an example of its own: no token dropped) or "wrapped" (every example concatenated
    and cut into rows of max_seq_length, attending across examples as TRL's; no ragged layout). eval_packing:
    whether the eval_dataset is packed the same way, for batches of the eval batch size on the same ragged layout
    (None: as packing); for "bfd" the eval loss is the same either way (a token-weighted mean, each example attending
    to itself), packed rows only take fewer batches.
    activation_offloading=True (TRL's) asks for activations in host memory: the model must offload its layer inputs
    (get_peft_model's use_gradient_checkpointing="unsloth" or "long_context"), else ValueError.
    optim: one of `fastlora_jax.training.OPTIMIZERS` ("adamw_torch" and "adamw_torch_fused" are torch's AdamW,
    "adamw_8bit", "adamw_bnb_8bit" and "paged_adamw_8bit" bitsandbytes' 8-bit one).
    fp16 / bf16: the model computes in its own dtype (from_pretrained's `dtype`) with float32 trainable weights;
    bf16=True needs a bfloat16 model, fp16=True a float16 one (else TypeError, as Unsloth's trainer), both False
    trains in the model's dtype (`fastlora_jax.precision`). Pass both as the notebooks do:
    `bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported()`.
    eval_strategy: "steps" evaluates every eval_steps (None: logging_steps) and at the end, "epoch" at the end of
    each epoch, "no" never during training; None (the default here, "no" in transformers) is "steps" when an
    eval_dataset is given. save_strategy: "steps" saves a checkpoint every save_steps and at the end, "epoch" at the
    end of each epoch, "no" never. logging_first_step: also log step 1.
    report_to: only "none", None or [] (no tracking service: the logs are in `trainer.state.log_history`, the
    TrainOutput and output_dir/loss_curve.png). loss_type: None, "nll" or "chunked_nll" (the same cross-entropy).
    dataset_kwargs: None or {"skip_prepare_dataset": bool}; True needs every record pre-tokenized ("input_ids").
    eos_token / pad_token (TRL's): a token of the tokenizer's vocabulary (ValueError otherwise, as TRL) that ends
    each text or completion record / pads the batches, in place of the tokenizer's own (None). Unlike TRL, neither
    the tokenizer nor the model's config is changed: generation stops at the config's end ids unless given
    `eos_token_id=`.
    embedding_learning_rate (UnslothTrainingArguments): the modules_to_save copies (embed_tokens, lm_head) train at
    this rate under the same schedule, the rest at learning_rate (Unsloth's two parameter groups; `AdamW`).
    Accepted with no effect: dataset_num_proc (tokenization runs in this process), padding_free and
    pad_to_multiple_of (batches are padded to a few length buckets; packing=True packs rows), gradient_checkpointing
    and gradient_checkpointing_kwargs (the model's mode from get_peft_model / for_training decides, as Unsloth's
    trainer keeps it), remove_unused_columns, dataloader_num_workers, dataloader_pin_memory, run_name,
    logging_strategy="steps". push_to_hub: False only (True raises NotImplementedError; save, then upload).
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
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    fp16: bool = False
    bf16: bool = False
    logging_steps: int = 10
    logging_first_step: bool = False
    eval_strategy: str | None = None
    eval_steps: int | None = None
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    report_to: str | list[str] | None = "none"
    max_seq_length: int | None = None
    max_length: int | None = None
    packing: bool = False
    packing_strategy: str = "bfd"
    eval_packing: bool | None = None
    shuffle_dataset: bool = False
    truncation_mode: str = "keep_start"
    activation_offloading: bool = False
    train_on_responses_only: bool | None = None
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False
    loss_type: str | None = None
    seed: int = 42
    dataset_text_field: str = "text"
    eos_token: str | None = None
    pad_token: str | None = None
    dataset_kwargs: dict[str, Any] | None = None
    resume_from_checkpoint: bool | str = False
    length_buckets: tuple[int, ...] | None = None
    disable_tqdm: bool = False
    embedding_learning_rate: float | None = None
    # Accepted with no effect here (see the docstring).
    dataset_num_proc: int | None = None
    padding_free: bool | None = None
    pad_to_multiple_of: int | str | None = "auto"
    gradient_checkpointing: bool | None = None
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    remove_unused_columns: bool = True
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    run_name: str | None = None
    logging_strategy: str = "steps"
    push_to_hub: bool = False  # True raises: nothing here reaches the network

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}; accepted: an int >= 1")
        for name in ("per_device_eval_batch_size", "eval_steps", "save_total_limit", "max_seq_length", "max_length",
                     "dataset_num_proc"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r}; accepted: an int >= 1 or None")
        if self.max_seq_length is not None and self.max_length is not None and self.max_seq_length != self.max_length:
            raise ValueError(f"max_seq_length={self.max_seq_length} and max_length={self.max_length} name one length "
                             "(max_length is TRL's newer name for it); pass one of them")
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
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim={self.optim!r}; accepted: {', '.join(OPTIMIZERS)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r}; accepted: a number >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r}; accepted: a number > 0, or 0 or None (no "
                             "clipping)")
        check_adam_settings(self.adam_beta1, self.adam_beta2, self.adam_epsilon,
                            names=("adam_beta1", "adam_beta2", "adam_epsilon"),
                            embedding_learning_rate=self.embedding_learning_rate)
        for name in ("fp16", "bf16", "logging_first_step", "assistant_only_loss"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: True or False")
        if self.fp16 and self.bf16:
            raise ValueError("fp16=True and bf16=True: at most one of them can be True (as transformers)")
        if self.eval_strategy is not None and self.eval_strategy not in STRATEGIES:
            raise ValueError(f"eval_strategy={self.eval_strategy!r}; accepted: None, "
                             f"{', '.join(map(repr, STRATEGIES))}")
        if self.save_strategy not in STRATEGIES:
            hint = " (keeping the best checkpoint is not implemented)" if self.save_strategy == "best" else ""
            raise ValueError(f"save_strategy={self.save_strategy!r}; accepted: {', '.join(map(repr, STRATEGIES))}"
                             + hint)
        if self.logging_strategy != "steps":
            raise NotImplementedError(f"logging_strategy={self.logging_strategy!r}; accepted: 'steps' (every "
                                      "logging_steps; logging_first_step=True adds step 1)")
        for name in ("eos_token", "pad_token"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: None (the tokenizer's) or a token of "
                                 "the tokenizer's vocabulary, as a string")
        if self.push_to_hub is not False:
            raise NotImplementedError(f"push_to_hub={self.push_to_hub!r}: fastlora-jax does not upload to the Hugging "
                                      "Face Hub (nothing here reaches the network); accepted: False. Save with "
                                      "model.save_pretrained(directory), then upload it (`hf upload <repo_id> "
                                      "<directory>`)")
        if not _reports_nowhere(self.report_to):
            raise NotImplementedError(
                f"report_to={self.report_to!r}: fastlora-jax reports to no tracking integration (nothing is sent "
                "anywhere while training); accepted: 'none', None or []. The logs are in trainer.state.log_history, "
                "the TrainOutput of train() and output_dir/loss_curve.png")
        if self.loss_type not in LOSS_TYPES:
            raise NotImplementedError(f"loss_type={self.loss_type!r}; accepted: None, 'nll' or 'chunked_nll' (the "
                                      "token-mean cross-entropy; pass SFTTrainer(loss_fn=...) for another loss)")
        for name in ("shuffle_dataset", "activation_offloading"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: True or False")
        if self.eval_packing not in (None, True, False):
            raise ValueError(f"eval_packing={self.eval_packing!r}; accepted: True, False or None (as packing)")
        if self.truncation_mode != "keep_start":
            raise ValueError(f"truncation_mode={self.truncation_mode!r}; accepted: 'keep_start' (TRL deprecates "
                             "'keep_end'; to keep the end of long examples, cut them before training)")
        if not (self.pad_to_multiple_of in (None, "auto") or (isinstance(self.pad_to_multiple_of, int)
                                                             and not isinstance(self.pad_to_multiple_of, bool)
                                                             and self.pad_to_multiple_of >= 1)):
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of!r}; accepted: 'auto', None or an int >= 1")
        check_strategy(self.packing_strategy, name="packing_strategy")
        if self.dataset_kwargs is not None and (not isinstance(self.dataset_kwargs, dict)
                                                or set(self.dataset_kwargs) - {"skip_prepare_dataset"}):
            raise ValueError(f"dataset_kwargs={self.dataset_kwargs!r}; accepted: None or "
                             "{'skip_prepare_dataset': True / False} (TRL's only key)")
        for name in ("train_on_responses_only", "completion_only_loss"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: True, False or None")
        trl_choice = self._trl_responses_only()
        if self.train_on_responses_only is not None and trl_choice is not None \
                and trl_choice != self.train_on_responses_only:
            raise ValueError(f"train_on_responses_only={self.train_on_responses_only} disagrees with "
                             f"completion_only_loss={self.completion_only_loss}, assistant_only_loss="
                             f"{self.assistant_only_loss} (TRL's names for it); pass one of them")
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

    def _trl_responses_only(self) -> bool | None:
        """train_on_responses_only as TRL's completion_only_loss / assistant_only_loss set it (None: unset)."""
        if self.assistant_only_loss or self.completion_only_loss:
            return True
        return False if self.completion_only_loss is False else None

    @property
    def responses_only(self) -> bool | None:
        """The train_on_responses_only in force: the field, else what TRL's completion / assistant flags say."""
        return self.train_on_responses_only if self.train_on_responses_only is not None else self._trl_responses_only()

    @property
    def skip_prepare_dataset(self) -> bool:
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset", False))

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT_DIRNAME)


def _reports_nowhere(report_to) -> bool:
    """Whether transformers' report_to names no integration: "none", None, [] or ["none"]."""
    return report_to is None or report_to == "none" or (
        isinstance(report_to, (list, tuple)) and all(name == "none" for name in report_to))


# Unsloth's name (unsloth.UnslothTrainingArguments: the training arguments plus embedding_learning_rate).
UnslothTrainingArguments = SFTConfig
