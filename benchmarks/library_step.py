"""The library's own training step as SFTTrainer and hand-written loops run it, timed on `train_step.py`'s configs.

    python benchmarks/library_step.py --model 8b --batch 4 --seq 2048 --mode dots --layer-loop [--packed 4]

`fastlora_jax.make_train_step(model, AdamW(...), max_grad_norm=1.0)` fed host numpy batches each step, as the
trainer feeds it: the token-id check on the host, the transfer, the step with gradient clipping (transformers'
default max_grad_norm 1.0) and the guard that skips a non-finite update. `train_step.py run` times a bare
`jax.jit` of loss, gradient and optax update on device-resident ids; the two on one device show what the library's
step adds. The same random-weight model (`train_step.build`), the same flags (--mode, --layer-loop, --qlora, --optim,
...); --packed N: every row packs N examples (segment ids and positions, as SFTTrainer(packing=True) builds them),
so attention runs with segments; --packed-attention ragged (default: their ragged layout, as data.collate adds it) or
mask (segment ids alone: the [B, 1, T, S] mask path). One JSON line: tokens/s (median step after --warmup), peak GPU
memory (peak_bytes_in_use, XLA_PYTHON_CLIENT_PREALLOCATE=false), first-call seconds (compile + one step).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # noqa: E402  (this folder's bare-step benchmark: model, configs, flags)


def host_batch(config, batch: int, seq: int, packed: int, seed: int = 1, ragged: bool = True) -> dict:
    """{input_ids, labels[, segment_ids, positions, segment_offsets, segment_lengths]} int32 numpy: random ids [batch,
    seq], labels = ids; packed rows hold `packed` examples of seq // packed tokens, each example's first label -100
    (packing.pack_rows' rule), with their ragged layout where `ragged`."""
    import numpy as np

    from fastlora_jax.data import IGNORE_INDEX
    from fastlora_jax.packed_attention import segment_layout

    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq), dtype=np.int32)
    out = {"input_ids": ids, "labels": ids.copy()}
    if packed > 1:
        if seq % packed:
            raise SystemExit(f"--packed {packed} does not divide --seq {seq}")
        length = seq // packed
        out["segment_ids"] = np.broadcast_to(np.repeat(np.arange(1, packed + 1, dtype=np.int32), length),
                                             (batch, seq)).copy()
        out["positions"] = np.broadcast_to(np.tile(np.arange(length, dtype=np.int32), packed), (batch, seq)).copy()
        out["labels"][:, ::length] = IGNORE_INDEX
        if ragged:
            out.update(segment_layout(out["segment_ids"]))
    return out


def run(args) -> dict:
    t_start = time.perf_counter()
    model, config = train_step.build(args)
    return time_step(model, config, args, t_start)


def time_step(model, config, args, t_start: float) -> dict:
    """The JSON line's fields for `model` (built at `t_start`, a time.perf_counter()) under `args`."""
    import jax
    import numpy as np

    from fastlora_jax.training import make_train_step

    step = make_train_step(model, train_step.library_adamw(args.optim or "adamw_torch"),
                           max_grad_norm=args.max_grad_norm)
    batch = host_batch(config, args.batch, args.seq, args.packed, ragged=args.packed_attention == "ragged")
    init_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    metrics = step(batch)
    jax.block_until_ready(metrics["loss"])
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.warmup + args.steps):
        t = time.perf_counter()
        metrics = step(batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times[args.warmup:]))
    useful = train_step.useful_flops(config, args.batch, args.seq, args.packed)  # packed: each example's attention
    stats = jax.devices()[0].memory_stats() or {}
    return dict(system="fastlora-jax make_train_step", model=args.model, layers=config.num_hidden_layers,
                batch=args.batch, seq=args.seq, mode=str(args.mode), qlora=args.qlora, layer_loop=args.layer_loop,
                optim=args.optim or "adamw_torch", max_grad_norm=args.max_grad_norm, packed=args.packed,
                packed_attention=args.packed_attention if args.packed > 1 else None,
                init_s=round(init_s, 1), first_call_s=round(first_s, 1), step_s=round(step_s, 4),
                tokens_per_s=round(args.batch * args.seq / step_s),
                peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
                useful_tflops=round(useful / step_s / 1e12, 1),
                loss=round(float(metrics["loss"]), 3), finite=bool(metrics["finite"]))


def main(argv: list[str]) -> None:
    import argparse

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--packed", type=int, default=1, help="examples per row (segment ids); 1: plain rows")
    p.add_argument("--packed-attention", choices=("ragged", "mask"), default="ragged",
                   help="packed rows' attention: the ragged layout (as data.collate) or the segment-id mask alone")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, as SFTConfig's default")
    own, rest = p.parse_known_args(argv)
    if own.packed < 1 or not own.max_grad_norm > 0:
        raise SystemExit(f"--packed {own.packed} --max-grad-norm {own.max_grad_norm}; accepted: an int >= 1, a "
                         "positive float")
    args = train_step.run_args(rest)  # the bare step's flags (--model, --mode, --layer-loop, --optim, ...)
    args.packed, args.max_grad_norm, args.packed_attention = own.packed, own.max_grad_norm, own.packed_attention
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
