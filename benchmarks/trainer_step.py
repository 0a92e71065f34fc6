"""SFTTrainer's loop against the step it runs, on `train_step.py`'s random-weight configs, in one process.

    python benchmarks/trainer_step.py --model 1b --batch 8 --seq 2048 --mode dots --layer-loop

First `make_train_step` alone, as `library_step.py` times it (one host batch, a wait on the loss after each step);
then `SFTTrainer.train()` on the same model: a dataset of random rows of --seq tokens, --steps + --warmup + 1
updates, a cosine schedule, logging every step with the tqdm bar (Unsloth's notebooks log every step), no
checkpoints, each step's end taken by a callback. What the trainer adds to the step is the host work between two
steps that the device waits for: batching, the schedule, logging. One JSON line: both medians after --warmup and
their tokens/s.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import library_step  # noqa: E402  (this folder's library-step benchmark)
import train_step  # noqa: E402  (this folder's bare-step benchmark: model, configs, flags)


def trainer_step_times(model, config, args) -> list[float]:
    """Seconds between the ends of consecutive SFTTrainer steps (its callback's clock), all but the first step."""
    import numpy as np

    from fastlora_jax import SFTConfig, SFTTrainer

    rng = np.random.default_rng(2)
    steps = args.warmup + args.steps + 1
    rows = [{"input_ids": rng.integers(0, config.vocab_size, args.seq).tolist()} for _ in range(steps * args.batch)]
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model, None, train_dataset=rows, callbacks=[lambda *_: ends.append(time.perf_counter())],
                             args=SFTConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=steps,
                                            max_seq_length=args.seq, length_buckets=(args.seq,), learning_rate=1e-4,
                                            lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1,
                                            save_strategy="no", optim=args.optim or "adamw_torch",
                                            bf16=True, seed=3))
        trainer.train()
    return list(np.diff(ends))


def run(args) -> dict:
    import numpy as np

    t_start = time.perf_counter()
    model, config = train_step.build(args)
    out = library_step.time_step(model, config, args, t_start)  # make_train_step alone, on this model
    times = trainer_step_times(model, config, args)
    trainer_s = float(np.median(times[args.warmup:]))
    out.update(trainer_step_s=round(trainer_s, 4), trainer_tokens_per_s=round(args.batch * args.seq / trainer_s),
               trainer_steps_s=[round(t, 4) for t in times])
    return out


def main(argv: list[str]) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = train_step.run_args(argv)
    args.packed, args.max_grad_norm, args.packed_attention = 1, 1.0, "mask"
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
