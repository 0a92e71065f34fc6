"""Packed rows and their batches for a model: what `SFTTrainer(packing=True)` trains on, for your own loop.

    from fastlora_jax import data
    from fastlora_jax.packed_batches import PackedBatches

    examples = data.tokenize_dataset("chats.jsonl", tokenizer, max_seq_length=2048, train_on_responses_only=True)
    packed = PackedBatches(examples, model, batch_size=8, max_seq_length=2048)
    for epoch in range(2):
        for batch in packed.epoch(epoch, seed=3407):
            metrics = step(batch)

The examples are packed for cuDNN's ragged attention layout (`packing.pack` with at most `max_examples` to a
row), the layout shape of each padded length is planned over the whole dataset (`data.ragged_layouts`), and each
epoch batches the rows that shape does not hold among themselves (`data.layout_misfits`, `data.epoch_order`). All
three come from the model's config and the micro-batch size alone, so the rows and the batches are the same on any
machine. The layout itself goes into the batches only where the model runs it (`packed_attention.ragged_supported`,
one device); elsewhere the segment-id mask gives the same results.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fastlora_jax import data, packed_attention, packing

Layouts = dict[int, tuple[int, int]]  # {padded length T: (chunk C, slots M)}


class PackedBatches:
    """Packs tokenized examples for `model` and yields shuffled batches of `batch_size` rows, epoch by epoch.

    examples: `data.tokenize_dataset`'s rows (dicts with "input_ids" and "labels"). model: the model to train (its
    `config` sizes the layout; without one the rows are packed best fit and get no layout). micro_batch_size: the
    rows of one forward pass where a step accumulates gradients over several (batch_size = micro_batch_size x
    gradient_accumulation_steps); the layout's workspace is sized for one. buckets: the padded lengths
    (`data.length_buckets(max_seq_length)` by default). strategy: TRL's packing_strategy (`fastlora_jax.packing`):
    "bfd" (examples must fit max_seq_length), "bfd_split" (longer ones are cut into pieces that do) or "wrapped"
    (all tokens concatenated and cut into rows; no segments, so no layout).
    """

    def __init__(self, examples: Sequence[dict[str, np.ndarray]], model, *, batch_size: int, max_seq_length: int,
                 micro_batch_size: int | None = None, buckets: Sequence[int] | None = None, pad_token_id: int = 0,
                 strategy: str = "bfd"):
        micro_batch_size = batch_size if micro_batch_size is None else micro_batch_size
        if micro_batch_size < 1 or batch_size < 1 or batch_size % micro_batch_size:
            raise ValueError(f"batch_size={batch_size!r}, micro_batch_size={micro_batch_size!r}; accepted: ints "
                             ">= 1, batch_size a multiple of micro_batch_size")
        self.batch_size, self.pad_token_id = batch_size, pad_token_id
        self.buckets = tuple(buckets or data.length_buckets(max_seq_length))
        if self.buckets[-1] < max_seq_length:
            raise ValueError(f"buckets={self.buckets} must reach max_seq_length={max_seq_length}")
        slot_limit = _slot_limit(getattr(model, "config", None), micro_batch_size)
        slots = 0 if slot_limit is None or strategy == "wrapped" else slot_limit(max_seq_length)
        self.max_examples = slots - 1 if slots >= 2 else None  # a row and its padding fit one chunk's slots
        # "wrapped" rows have no segments: no layout, nothing batched apart
        self.rows = packing.pack(examples, max_seq_length, strategy=strategy, max_examples=self.max_examples)
        self.plan: Layouts = ({} if slot_limit is None else
                              data.ragged_layouts(self.rows, self.buckets, slot_limit=slot_limit))
        self.layouts = _runnable(self.plan, model)
        self.misfits = data.layout_misfits(self.rows, self.buckets, self.plan)

    def __len__(self) -> int:
        """Batches an epoch (the last may be short)."""
        return data.num_batches(len(self.rows), self.batch_size)

    def epoch(self, epoch: int, *, seed: int, shuffle: bool = True, start: int = 0
              ) -> Iterator[dict[str, np.ndarray]]:
        """The batches of one epoch (an order seeded by (seed, epoch)), from batch `start` on."""
        return data.iterate_batches(self.rows, batch_size=self.batch_size, buckets=self.buckets,
                                    pad_token_id=self.pad_token_id, seed=seed, epoch=epoch, shuffle=shuffle,
                                    start=start, layouts=self.layouts, misfits=self.misfits)


def _slot_limit(config: Any, micro_batch_size: int) -> Callable[[int], int] | None:
    """T -> the most layout slots a micro-batch of rows of T tokens may use (`packed_attention.max_slots`), from the
    model's config; None without one."""
    if config is None:
        return None
    width = config.num_attention_heads * config.head_dim
    return lambda T: packed_attention.max_slots(micro_batch_size, T, width)


def _runnable(plan: Layouts, model) -> Layouts | None:
    """`plan` where the model runs the ragged path (`packed_attention.ragged_supported`, no mesh); None elsewhere: a
    layout the model cannot use would only add a second compile per length."""
    inner = getattr(model, "model", None)
    if not plan or getattr(inner, "mesh", None) is not None or not packed_attention.ragged_supported():
        return None
    return plan
