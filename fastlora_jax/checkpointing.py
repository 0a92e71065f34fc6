"""Orbax checkpoints of a training run: trainable state, optimizer state, step, data position and rng.

A checkpoint is one orbax step directory (`<directory>/<step>/`) with two items: "state" (arrays: the trainable
variables by path, the optimizer state leaves in tree order, the base dropout key) and "meta" (JSON: the step, the
shapes of every trainable variable, and whatever the caller adds, e.g. the data position and the loss history).
Restoring checks the checkpoint against the model first and names every mismatch (other r, other targets).
Saving a step the directory already holds (written by an earlier Checkpointer; SFTTrainer moves an abandoned run's
later steps aside with `set_aside` instead) replaces it, writing the new checkpoint completely before the old one
goes; a replacement stopped by a crash is finished by the next Checkpointer opened on the directory.

Used with a `fastlora_jax.training.TrainStep`::

    manager = Checkpointer("out/checkpoints", max_to_keep=3)
    manager.save(train_step, meta={"epoch": 0})        # at step train_step.step
    meta = manager.restore(train_step)                 # latest step: model, optimizer state, step, rng restored
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastlora_jax.variables import TRAINABLE

FORMAT_VERSION = 1
STAGING_DIRNAME = ".replacing"  # where `Checkpointer.save` writes a step that replaces an existing one


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def trainable_arrays(model) -> dict[str, jax.Array]:
    """The model's trainable arrays by dotted path ("model.layers.self_attn.q_proj.lora_a")."""
    return {_key(path): var[...] for path, var in nnx.to_flat_state(nnx.state(model, TRAINABLE))}


def _spec(x) -> list:
    """[shape, dtype name] of an array, as stored in the checkpoint's JSON metadata."""
    return [list(np.shape(x)), np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype).name]


def lora_summary(shapes: dict[str, list]) -> str:
    """'r=8 on q_proj, v_proj' from trainable shapes (lora_a [..., in, r]), plus any other trainable modules."""
    ranks, targets, others = set(), set(), set()
    for path, (shape, _) in shapes.items():
        parts = path.split(".")
        if parts[-1] == "lora_a":
            ranks.add(shape[-1])
            targets.add(parts[-2])
        elif parts[-1] != "lora_b":
            others.add(".".join(parts[:-1]))
    text = f"r={'/'.join(map(str, sorted(ranks))) or '-'} on {', '.join(sorted(targets)) or 'no LoRA layer'}"
    return text + (f", trained modules {', '.join(sorted(others))}" if others else "")


def check_compatible(saved: dict[str, list], model_shapes: dict[str, list], where: str) -> None:
    """Raises ValueError naming every path missing, unexpected or of another shape/dtype between the two."""
    problems = []
    only_saved = sorted(set(saved) - set(model_shapes))
    only_model = sorted(set(model_shapes) - set(saved))
    if only_saved:
        problems.append(f"in the checkpoint but not the model: {', '.join(only_saved[:6])}"
                        + (f" (+{len(only_saved) - 6} more)" if len(only_saved) > 6 else ""))
    if only_model:
        problems.append(f"in the model but not the checkpoint: {', '.join(only_model[:6])}"
                        + (f" (+{len(only_model) - 6} more)" if len(only_model) > 6 else ""))
    for path in sorted(set(saved) & set(model_shapes)):
        (s_shape, s_dtype), (m_shape, m_dtype) = saved[path], model_shapes[path]
        if list(s_shape) != list(m_shape) or s_dtype != m_dtype:
            problems.append(f"{path}: checkpoint {tuple(s_shape)} {s_dtype}, model {tuple(m_shape)} {m_dtype}")
    if problems:
        raise ValueError(f"checkpoint {where} does not match the model (checkpoint: {lora_summary(saved)}; model: "
                         f"{lora_summary(model_shapes)}): " + "; ".join(problems[:8])
                         + (f"; (+{len(problems) - 8} more)" if len(problems) > 8 else ""))


def finish_interrupted_replacement(directory: str) -> None:
    """Completes or undoes a `Checkpointer._replace` that a crash stopped, so no checkpoint is lost: a step missing
    from `directory` is taken from the staging directory, the new checkpoint if it was written completely (orbax
    renames a step directory into place only once written), else the old one moved aside; then staging goes."""
    staging = os.path.join(directory, STAGING_DIRNAME)
    if not os.path.isdir(staging):
        return
    for name in sorted(os.listdir(staging)):
        step = name.removesuffix(".replaced")
        if not step.isdigit() or os.path.exists(os.path.join(directory, step)):
            continue
        new, old = os.path.join(staging, step), os.path.join(staging, f"{step}.replaced")
        os.rename(new if os.path.isdir(new) else old, os.path.join(directory, step))
    shutil.rmtree(staging)


class Checkpointer:
    """An orbax CheckpointManager over `directory` keeping the `max_to_keep` latest steps (None keeps all)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = True):
        import orbax.checkpoint as ocp

        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep={max_to_keep!r}; accepted: a positive int, or None to keep every step")
        self.directory = os.path.abspath(os.fspath(directory))
        self._ocp = ocp
        finish_interrupted_replacement(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._saved: set[int] = set()  # steps this Checkpointer wrote

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a step (the latest by default)."""
        step = self._resolve(step)
        return dict(self._manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())).meta)

    def _resolve(self, step: int | None) -> int:
        self._manager.reload()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; steps there: {steps}")
        return step

    # ------------------------------------------------------------------ save / restore

    def save(self, train_step, *, meta: dict[str, Any] | None = None) -> int:
        """Saves the train step's model trainable state, optimizer state, rng and step (+ `meta`); returns the step.

        A step this Checkpointer saved already is not written again (e.g. a final save right after a periodic one).
        A step found in the directory from an earlier Checkpointer (a loop that saves a step again) is replaced: the new
        checkpoint is written completely beside it, then swapped in (`_replace`)."""
        step = int(train_step.step)
        if step in self._saved:
            return step
        trainable = trainable_arrays(train_step.model)
        opt_leaves = jax.tree_util.tree_leaves(train_step.opt_state)
        state = {"trainable": trainable, "opt_state": {f"{i:05d}": x for i, x in enumerate(opt_leaves)},
                 "rng": train_step.rng}
        # A copy: orbax writes the JSON in the background, after the caller may have appended to its lists.
        info = {**copy.deepcopy(meta or {}), "format": FORMAT_VERSION, "step": step,
                "trainable": {k: _spec(v) for k, v in trainable.items()},
                "opt_state": [_spec(x) for x in opt_leaves]}
        args = self._ocp.args
        composite = args.Composite(state=args.StandardSave(state), meta=args.JsonSave(info))
        if step in self.all_steps():
            self._replace(step, composite)
        else:  # force: orbax would skip a step below the latest one (an earlier run's later steps)
            self._manager.save(step, args=composite, force=True)
        self._saved.add(step)
        return step

    def _replace(self, step: int, composite) -> None:
        """Writes `step` over the directory's existing checkpoint of that step, never leaving a partial one: the new
        checkpoint is written (synchronously) under STAGING_DIRNAME, then the old step directory is moved aside
        and the new one renamed into its place (renames within one directory), and the old one deleted."""
        self._manager.wait_until_finished()
        staging = os.path.join(self.directory, STAGING_DIRNAME)
        finish_interrupted_replacement(self.directory)
        options = self._ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        with self._ocp.CheckpointManager(staging, options=options) as writer:
            writer.save(step, args=composite, force=True)
            writer.wait_until_finished()
        target, old = os.path.join(self.directory, str(step)), os.path.join(staging, f"{step}.replaced")
        os.rename(target, old)
        os.rename(os.path.join(staging, str(step)), target)
        shutil.rmtree(staging)
        self._manager.reload()

    def restore(self, train_step, step: int | None = None) -> dict[str, Any]:
        """Restores a step (the latest by default) into the train step and its model; returns the step's meta.

        Raises ValueError naming the mismatch when the checkpoint's trainable variables (paths, shapes, dtypes) or
        optimizer state do not match, before anything is changed."""
        step = self._resolve(step)
        where = os.path.join(self.directory, str(step))
        meta = self.read_meta(step)
        model_state = nnx.state(train_step.model, TRAINABLE)
        flat = nnx.to_flat_state(model_state)
        check_compatible(meta["trainable"], {_key(p): _spec(v[...]) for p, v in flat}, where)
        opt_leaves, opt_tree = jax.tree_util.tree_flatten(train_step.opt_state)
        opt_specs = [_spec(x) for x in opt_leaves]
        if opt_specs != meta["opt_state"]:
            raise ValueError(f"checkpoint {where}: its optimizer state ({len(meta['opt_state'])} arrays) does not "
                             f"match this optimizer's ({len(opt_specs)} arrays); resume with the same optimizer "
                             "settings (optimizer type, schedule kind)")
        abstract = {"trainable": {_key(p): _abstract(v[...]) for p, v in flat},
                    "opt_state": {f"{i:05d}": _abstract(x) for i, x in enumerate(opt_leaves)},
                    "rng": _abstract(train_step.rng)}
        args = self._ocp.args
        state = self._manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract))).state
        for path, var in flat:
            var.set_value(_placed_like(state["trainable"][_key(path)], var[...]))
        nnx.update(train_step.model, model_state)
        restored = [_placed_like(state["opt_state"][f"{i:05d}"], x) for i, x in enumerate(opt_leaves)]
        train_step.opt_state = jax.tree_util.tree_unflatten(opt_tree, restored)
        train_step.rng = _placed_like(state["rng"], train_step.rng)
        train_step.step = int(meta["step"])
        return meta

    def set_aside(self, steps: list[int]) -> str:
        """Moves these steps out of the directory, so that restoring the latest step can no longer pick them, into
        a new folder `<directory>.earlier/<UTC time>/` beside it (renames: nothing is copied or deleted); returns
        that folder. For checkpoints of an earlier or abandoned run that a new run must not mix with its own."""
        self._manager.wait_until_finished()
        missing = sorted(set(steps) - set(self.all_steps()))
        if missing:
            raise ValueError(f"set_aside: steps {missing} are not in {self.directory}; steps there: {self.all_steps()}")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = os.path.join(f"{self.directory}.earlier", stamp)
        n = 1
        while os.path.exists(target):  # two set-asides within a second
            n += 1
            target = os.path.join(f"{self.directory}.earlier", f"{stamp}-{n}")
        os.makedirs(target)
        for step in sorted(steps):
            os.rename(os.path.join(self.directory, str(step)), os.path.join(target, str(step)))
        self._saved -= set(steps)
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until every asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _placed_like(restored: jax.Array, template) -> jax.Array:
    """The restored array placed as the template: orbax returns committed arrays, and a committed argument where the
    train step was compiled for an uncommitted one (the default device) would compile the step again."""
    if getattr(template, "committed", True):
        return restored
    return jnp.asarray(np.asarray(restored))


def _abstract(x) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def is_step_directory(path: str | os.PathLike) -> bool:
    """True when `path` looks like one orbax step directory (a number, holding "state" and "meta")."""
    path = os.fspath(path)
    return (re.fullmatch(r"\d+", os.path.basename(os.path.normpath(path))) is not None
            and os.path.isdir(os.path.join(path, "state")))
