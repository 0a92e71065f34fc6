"""Training building blocks: the loss of a batch, a jitted train step over the trainable state, an eval step, and
AdamW under transformers' learning-rate schedules (linear / cosine / constant with warm-up), 32-bit (torch's AdamW)
or bitsandbytes' 8-bit blockwise AdamW (`AdamW(optim="adamw_8bit")`, see fastlora_jax.adamw_8bit).

A hand-written loop::

    from fastlora_jax import data
    from fastlora_jax.training import AdamW, make_eval_step, make_train_step

    rows = data.prepare_rows("train.jsonl", tokenizer, max_seq_length=512)   # tokenized, labels -100 where ignored
    batches = data.iterate_batches(rows, batch_size=8, buckets=data.length_buckets(512))  # one shuffled epoch
    tx = AdamW(lr_scheduler_type="cosine", learning_rate=2e-4, total_steps=100, warmup_steps=5)  # or any optax tx
    step = make_train_step(model, tx, gradient_accumulation_steps=2, max_grad_norm=1.0)
    for batch in batches:                  # dicts of [B, T] int32 arrays: input_ids, labels (and packing's ids)
        metrics = step(batch)              # updates the model's LoRA weights in place
        print(float(metrics["loss"]))
    eval_loss = make_eval_step(model).mean_loss(eval_batches)

The step splits the model into its trainable state (`fastlora_jax.TRAINABLE`) and everything else, and
differentiates a function of the trainable state only: frozen weights get no gradient and no optimizer state.
The trainable arrays and the optimizer state are donated to the step (read them back from the model, not from
arrays held since before the step). A step whose loss, gradient or updated trainable weights are not finite (the
latter e.g. from an optimizer's division by zero) leaves the state unchanged and reports `finite=False`. Both steps
compile with `fastlora_jax.compiler_options()` (cuBLAS for every matmul, so the LoRA sums fuse into the GEMMs on a
GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fastlora_jax.adamw_8bit import BnbTensor, adamw_8bit
from fastlora_jax.data import IGNORE_INDEX, check_token_ids
from fastlora_jax.packed_attention import SEGMENT_KEYS
from fastlora_jax.variables import TRAINABLE, TrainableBias, TrainableCopy
from fastlora_jax.xla_options import compiler_options

SCHEDULES = ("linear", "cosine", "constant")
# transformers' `optim` names that AdamW runs: torch's AdamW, and bitsandbytes' 8-bit blockwise AdamW ("paged" moves
# torch's optimizer state between host and GPU on demand; the numbers are those of the unpaged optimizer).
OPTIMIZERS_8BIT = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", *OPTIMIZERS_8BIT)
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids", "positions", *SEGMENT_KEYS)
LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def _default_loss_fn() -> LossFn:
    from fastlora_jax.loss import causal_lm_loss

    return causal_lm_loss


def batch_loss(model, batch: dict, *, dropout_rng: jax.Array | None = None,
               loss_fn: LossFn | None = None) -> tuple[jax.Array, jax.Array]:
    """(loss_sum, n_tokens) of a batch dict: "input_ids", "labels" [B, T] and optional "attention_mask",
    "segment_ids", "positions" [B, T], "segment_offsets" / "segment_lengths" (packed rows' ragged layout,
    `fastlora_jax.packed_attention`). The mean loss is loss_sum / n_tokens. The layout, which only speeds up
    attention, reaches a `loss_fn` only if its signature names those keywords or takes **kwargs."""
    unknown = set(batch) - set(BATCH_KEYS)
    if unknown:
        raise ValueError(f"batch has unknown keys {sorted(unknown)}; accepted: {', '.join(BATCH_KEYS)}")
    loss_fn = loss_fn or _default_loss_fn()
    extra = {k: batch[k] for k in BATCH_KEYS[2:] if batch.get(k) is not None}
    if not _takes_keywords(loss_fn, SEGMENT_KEYS):
        extra = {k: v for k, v in extra.items() if k not in SEGMENT_KEYS}
    return loss_fn(model, batch["input_ids"], batch["labels"], dropout_rng=dropout_rng, **extra)


def _takes_keywords(fn, names) -> bool:
    """True when fn(**{name: ...}) binds every name (named parameters or **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass every key
        return True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return any(p.kind == p.VAR_KEYWORD for p in params) or set(names) <= named


def has_dropout(model) -> bool:
    """True when some LoRA layer of the model has dropout > 0 (so the train step needs an rng)."""
    return any(isinstance(node, nnx.Module) and getattr(node, "dropout", 0.0) > 0.0
               for _, node in nnx.iter_graph(model))


def weight_decay_mask(params: nnx.State):
    """True on trainable leaves that weight decay applies to: not biases, not norm weights (as HF's Trainer)."""
    def decays(path, variable) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not (isinstance(variable, TrainableBias) or names[-1] == "bias" or any("norm" in n for n in names))

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def embedding_groups(params: nnx.State):
    """"embeddings" on the modules_to_save copies (`TrainableCopy`), "rest" elsewhere: Unsloth's parameter groups
    for `embedding_learning_rate` (the parameters named *modules_to_save.default.weight in PEFT)."""
    return jax.tree_util.tree_map(lambda v: "embeddings" if isinstance(v, TrainableCopy) else "rest", params,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))


def bnb_tensors(params: nnx.State):
    """A `BnbTensor` on each trainable leaf: how bitsandbytes sees it in the equivalent PEFT model, one torch tensor
    per stacked layer in Hugging Face's layout. LoRA A/B [*layers, in, r] / [*layers, r, out] are per-layer
    transposes (HF's [r, in] / [out, r]); biases [*layers, out] per-layer vectors; a modules_to_save lm_head [D, V]
    the transpose of HF's [V, D]; a modules_to_save embedding keeps 32-bit state (transformers' Trainer registers
    that override for every nn.Embedding weight with bitsandbytes' 8-bit optimizers)."""
    def tensor(path, variable) -> BnbTensor:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        ndim = jnp.ndim(variable.get_value())
        if isinstance(variable, nnx.LoRAParam):
            return BnbTensor(stack_axes=ndim - 2, transpose=True)
        if isinstance(variable, TrainableBias):
            return BnbTensor(stack_axes=ndim - 1)
        if isinstance(variable, TrainableCopy):
            return BnbTensor(optim_bits=32) if "embed_tokens" in names else BnbTensor(transpose=True)
        return BnbTensor()

    return jax.tree_util.tree_map_with_path(tensor, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares) over every leaf, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def _all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (a bool [])."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _split(model):
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    if not jax.tree_util.tree_leaves(trainable):
        raise ValueError("the model has no trainable variables (fastlora_jax.TRAINABLE selects none); "
                         "add LoRA adapters with get_peft_model first")
    return graphdef, trainable, frozen


def _committed(tree, mesh=None):
    """Every array of `tree` committed to its device(s), as jit outputs are. Without a mesh each array stays where it
    is; under a mesh (fastlora_jax.sharding) arrays that do not span it (e.g. Adam's step count) are replicated."""
    if mesh is None:
        return jax.tree.map(lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array) else x, tree)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        if not isinstance(x, jax.Array):
            return x
        spans = len(x.sharding.device_set) == mesh.size
        return jax.device_put(x, x.sharding if spans else replicated)

    return jax.tree.map(place, tree)


def _device_batch(batch: dict, model) -> dict:
    """The batch's arrays on the device; under a mesh (fastlora_jax.sharding) rows split over ("data", "fsdp").
    Token ids the batch holds on the host (numpy arrays, lists) are checked against the model's vocab first
    (`data.check_token_ids`): the embedding gather would read past the table without an error. Arrays already on a
    device are not read back for it."""
    batch = {k: v for k, v in batch.items() if v is not None}
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    for key in ("input_ids", "labels"):
        if vocab_size is not None and key in batch and not isinstance(batch[key], jax.Array):
            ids = np.asarray(batch[key])
            check_token_ids(ids if key == "input_ids" else ids[ids != IGNORE_INDEX], vocab_size,
                            where=f"the batch's {key}")
    mesh = getattr(getattr(model, "model", None), "mesh", None)
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    from fastlora_jax.sharding import shard_batch

    return shard_batch(batch, mesh)


def _microbatches(batch: dict, n: int) -> dict:
    """[n * b, T] arrays -> [n, b, T] (gradient accumulation over the leading axis). The ragged layout's [R, ...]
    arrays split the same way: R = b * n * T / C chunk rows, each within one row of the batch."""
    rows = batch["input_ids"].shape[0]
    if rows % n:
        raise ValueError(f"batch of {rows} rows is not divisible by gradient_accumulation_steps={n}")
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class _StepStatics:
    """Everything the compiled step depends on besides its array arguments (hashable: equal statics share one
    compiled program, e.g. a resumed run's new TrainStep)."""

    graphdef: Any
    tx: optax.GradientTransformation
    loss_fn: LossFn
    accumulation: int
    max_grad_norm: float | None


class TrainStep:
    """`step(batch) -> metrics`: one optimizer update of the model's trainable state (see the module docstring).

    batch: dict of [R, T] arrays with R = gradient_accumulation_steps * micro-batch rows; the step runs the
      micro-batches one after another (`jax.lax.scan`), sums their losses and gradients and divides by the number
      of target tokens of the whole batch (so accumulation equals one large batch).
    metrics: {"loss": mean loss [], "n_tokens": [], "grad_norm": before clipping [], "finite": bool [] (False: the
      step was skipped, its loss, gradient or updated weights not finite)}.
    Token ids given on the host (numpy arrays) outside the model's vocab raise ValueError before the step runs.
    Attributes: `opt_state` (optax state of the trainable state only), `step` (updates done: it selects the dropout
    rng), `rng` (the base dropout key, from `seed`, or the model's peft_config.random_state, or 0).
    """

    def __init__(self, model, tx: optax.GradientTransformation, *, gradient_accumulation_steps: int = 1,
                 max_grad_norm: float | None = None, seed: int | None = None, loss_fn: LossFn | None = None):
        if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps!r}; accepted: an int >= 1")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}; accepted: a positive float, or None for no clipping")
        self.model, self.tx = model, tx
        if seed is None:
            seed = getattr(getattr(model, "peft_config", None), "random_state", None) or 0
        self.rng = jax.random.PRNGKey(seed)  # uint32 [2]
        self.step = 0
        graphdef, trainable, _ = _split(model)
        # Commit the state the step donates and returns to its device(s) now: the step's outputs are committed, so
        # uncommitted inputs on the first call would make the second call compile the step again.
        mesh = getattr(getattr(model, "model", None), "mesh", None)
        trainable = _committed(trainable, mesh)
        nnx.update(model, trainable)
        self.opt_state = _committed(tx.init(trainable), mesh)
        self._statics = _StepStatics(graphdef, tx, loss_fn or _default_loss_fn(), gradient_accumulation_steps,
                                     None if max_grad_norm is None else float(max_grad_norm))
        self._dropout = has_dropout(model)

    def __call__(self, batch: dict) -> dict[str, jax.Array]:
        graphdef, trainable, frozen = _split(self.model)
        if graphdef != self._statics.graphdef:
            raise ValueError("the model's structure changed since the train step was made; make a new one")
        batch = _device_batch(batch, self.model)
        rng = jax.random.fold_in(self.rng, self.step) if self._dropout else None
        trainable, self.opt_state, metrics = _train_update(trainable, self.opt_state, frozen, batch, rng,
                                                           statics=self._statics)
        nnx.update(self.model, trainable)
        self.step += 1
        return metrics


@functools.partial(jax.jit, static_argnames=("statics",), donate_argnums=(0, 1),
                   compiler_options=compiler_options())
def _train_update(trainable, opt_state, frozen, batch, rng, *, statics: _StepStatics):
    def micro_loss(params, micro, micro_rng):
        model = nnx.merge(statics.graphdef, params, frozen)
        loss_sum, n = batch_loss(model, micro, dropout_rng=micro_rng, loss_fn=statics.loss_fn)
        return loss_sum.astype(jnp.float32), n

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if statics.accumulation == 1:
        (loss_sum, n_tokens), grads = grad_fn(trainable, batch, rng)
    else:
        def body(carry, xs):
            micro, i = xs
            micro_rng = None if rng is None else jax.random.fold_in(rng, i)
            (s, n), g = grad_fn(trainable, micro, micro_rng)
            total_s, total_n, total_g = carry
            return (total_s + s, total_n + n, jax.tree.map(jnp.add, total_g, g)), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, trainable))
        xs = (_microbatches(batch, statics.accumulation), jnp.arange(statics.accumulation))
        (loss_sum, n_tokens, grads), _ = jax.lax.scan(body, init, xs)
    denom = jnp.maximum(n_tokens, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = global_norm(grads)
    if statics.max_grad_norm is not None:  # torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6), capped at 1
        scale = jnp.minimum(1.0, statics.max_grad_norm / (grad_norm + 1e-6))
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    updates, new_opt_state = statics.tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_trainable)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731  a bad step changes nothing
    new_trainable = jax.tree.map(keep, new_trainable, trainable)
    new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    return new_trainable, new_opt_state, {"loss": loss, "n_tokens": n_tokens, "grad_norm": grad_norm,
                                          "finite": finite}


def make_train_step(model, tx: optax.GradientTransformation, *, gradient_accumulation_steps: int = 1,
                    max_grad_norm: float | None = None, seed: int | None = None,
                    loss_fn: LossFn | None = None) -> TrainStep:
    """A jitted train step updating only the model's trainable state; see `TrainStep`."""
    return TrainStep(model, tx, gradient_accumulation_steps=gradient_accumulation_steps,
                     max_grad_norm=max_grad_norm, seed=seed, loss_fn=loss_fn)


class EvalStep:
    """`eval_step(batch) -> (loss_sum, n_tokens)` of the model as it is now (no dropout, no gradient)."""

    def __init__(self, model, *, loss_fn: LossFn | None = None):
        self.model = model
        self.loss_fn = loss_fn or _default_loss_fn()

    def __call__(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        graphdef, trainable, frozen = _split(self.model)
        batch = _device_batch(batch, self.model)
        return _eval_loss(trainable, frozen, batch, graphdef=graphdef, loss_fn=self.loss_fn)

    def mean_loss(self, batches: Iterable[dict]) -> float:
        """The loss over all target tokens of the batches (a token-weighted mean, not a mean of batch means)."""
        results = [self(batch) for batch in batches]  # all dispatched before the first wait: no device idles on us
        fetched = jax.device_get(results)
        total, count = sum(float(loss_sum) for loss_sum, _ in fetched), sum(int(n) for _, n in fetched)
        if count == 0:
            raise ValueError("the evaluation batches hold no target token (every label is -100)")
        return total / count


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn"), compiler_options=compiler_options())
def _eval_loss(trainable, frozen, batch, *, graphdef, loss_fn):
    return batch_loss(nnx.merge(graphdef, trainable, frozen), batch, loss_fn=loss_fn)


def make_eval_step(model, *, loss_fn: LossFn | None = None) -> EvalStep:
    """An eval step of the model's current weights; see `EvalStep`."""
    return EvalStep(model, loss_fn=loss_fn)


# ---------------------------------------------------------------------------------------------- optimizer


def make_schedule(kind: str, learning_rate: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """The learning rate of update `count` (0-based), as transformers' get_{linear,cosine,constant}_schedule_with_warmup
    schedules: linear warm-up from 0 over warmup_steps, then linear decay to 0 / half-cosine decay to 0 / constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type={kind!r}; accepted: {', '.join(SCHEDULES)}")
    decay_steps = max(1, total_steps - warmup_steps)
    decay = {"linear": optax.linear_schedule(learning_rate, 0.0, decay_steps),
             "cosine": optax.cosine_decay_schedule(learning_rate, decay_steps),
             "constant": optax.constant_schedule(learning_rate)}[kind]
    if warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


def check_adam_settings(beta1: float, beta2: float, eps: float, names=("b1", "b2", "eps"),
                        embedding_learning_rate: float | None = None) -> None:
    """Raises ValueError naming the setting (by `names`) unless both betas are in [0, 1) and eps >= 0, as torch's
    AdamW requires, and embedding_learning_rate is None or > 0."""
    for name, value in zip(names, (beta1, beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r}; accepted: 0 <= {name} < 1 (as torch's AdamW)")
    if not eps >= 0:
        raise ValueError(f"{names[2]}={eps!r}; accepted: a number >= 0 (as torch's AdamW)")
    if embedding_learning_rate is not None and not embedding_learning_rate > 0:
        raise ValueError(f"embedding_learning_rate={embedding_learning_rate!r}; accepted: a number > 0 or None")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamW:
    """AdamW under `make_schedule`, as a hashable value with optax's init / update: equal settings compare equal, so
    a new trainer with the same settings (a resumed run) reuses the compiled train step.
    Weight decay is torch's decoupled one and skips biases and norm weights (`weight_decay_mask`).
    optim (transformers' names): "adamw_torch" / "adamw_torch_fused" run optax.adamw (torch's AdamW numbers);
    "adamw_8bit" / "adamw_bnb_8bit" / "paged_adamw_8bit" run bitsandbytes' 8-bit blockwise AdamW
    (`fastlora_jax.adamw_8bit`, its CUDA kernels' arithmetic) over the layers as PEFT's torch tensors (`bnb_tensors`):
    about 2 bytes of optimizer state per trained value instead of 8.
    embedding_learning_rate (UnslothTrainer's): the modules_to_save copies (`TrainableCopy`: embed_tokens, lm_head)
    train at this base rate under the same schedule, the rest at learning_rate, as Unsloth's two parameter groups;
    None: one rate for all."""

    lr_scheduler_type: str
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    embedding_learning_rate: float | None = None

    def __post_init__(self):
        check_adam_settings(self.b1, self.b2, self.eps, embedding_learning_rate=self.embedding_learning_rate)
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim={self.optim!r}; accepted: {', '.join(OPTIMIZERS)}")

    @property
    def schedule(self) -> optax.Schedule:
        return make_schedule(self.lr_scheduler_type, self.learning_rate, self.total_steps, self.warmup_steps)

    def transform(self) -> optax.GradientTransformation:
        if self.embedding_learning_rate is None:
            return self._adamw(self.schedule)
        embedding = make_schedule(self.lr_scheduler_type, self.embedding_learning_rate, self.total_steps,
                                  self.warmup_steps)
        return optax.multi_transform({"rest": self._adamw(self.schedule), "embeddings": self._adamw(embedding)},
                                     embedding_groups)

    def _adamw(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        if self.optim in OPTIMIZERS_8BIT:
            return adamw_8bit(schedule, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay,
                              mask=weight_decay_mask, tensors=bnb_tensors)
        return optax.adamw(schedule, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay,
                           mask=weight_decay_mask)

    def init(self, params):
        return self.transform().init(params)

    def update(self, updates, state, params=None):
        return self.transform().update(updates, state, params)

