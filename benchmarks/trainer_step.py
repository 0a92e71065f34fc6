"""SFTTrainer's loop against the step it runs, on `train_step.py`'s random-weight configs, in one process.

    python benchmarks/trainer_step.py --model 1b --batch 8 --seq 2048 --mode dots --layer-loop

First `make_train_step` alone, as `library_step.py` times it (one host batch, a wait on the loss after each step);
then `SFTTrainer.train()` on the same model: a dataset of random rows of --seq tokens, --steps + --warmup + 1
updates, a cosine schedule, logging every step with the tqdm bar (Unsloth's notebooks log every step), no
checkpoints, each step's end taken by a callback. What the trainer adds to the step is the host work between two
steps that the device waits for: batching, the schedule, logging. One JSON line: both medians after --warmup and
their tokens/s.

    python benchmarks/trainer_step.py --model 1b --batch 8 --seq 2048 --mode dots --layer-loop --example-tokens 240

With --example-tokens N, SFTTrainer alone trains on packed rows of chat-like examples (lognormal lengths around N
tokens, sigma 0.8, seed 2): what its packing and cuDNN's ragged layout give on such data. The JSON line adds the
mean step time without compiles (steps over 3x the median), the share of batches with the ragged layout and the
real tokens a second.
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


def trainer_step_times(model, config, args) -> tuple[list[float], list[dict]]:
    """Seconds between the ends of consecutive SFTTrainer steps (its callback's clock), all but the first step; and
    the batches of all the steps."""
    import numpy as np

    from fastlora_jax import SFTConfig, SFTTrainer

    rng = np.random.default_rng(2)
    steps = args.warmup + args.steps + 1
    if args.example_tokens:  # enough chat-like examples to fill steps * batch packed rows, and a tenth more
        mean = args.example_tokens * np.exp(0.8 ** 2 / 2)
        lengths = np.clip(rng.lognormal(np.log(args.example_tokens), 0.8, int(1.1 * steps * args.batch * args.seq
                                                                              / mean)).astype(int), 2, args.seq)
    else:
        lengths = np.full(steps * args.batch, args.seq)
    rows = [{"input_ids": rng.integers(0, config.vocab_size, n).tolist()} for n in lengths]
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model, None, train_dataset=rows, callbacks=[lambda *_: ends.append(time.perf_counter())],
                             args=SFTConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=steps,
                                            max_seq_length=args.seq, length_buckets=(args.seq,), learning_rate=1e-4,
                                            lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1,
                                            save_strategy="no", optim=args.optim or "adamw_torch",
                                            bf16=True, seed=3, packing=bool(args.example_tokens)))
        trainer.train()
        upcoming = trainer._batches_from(0, 3)  # the batches train() ran, in its order (seed 3)
        batches = [next(upcoming) for _ in range(steps)]
    return list(np.diff(ends)), batches


def run(args) -> dict:
    import numpy as np

    from fastlora_jax import data

    t_start = time.perf_counter()
    model, config = train_step.build(args)
    out = {} if args.example_tokens else library_step.time_step(model, config, args, t_start)  # the step alone
    times, batches = trainer_step_times(model, config, args)
    trainer_s = float(np.median(times[args.warmup:]))
    out.update(trainer_step_s=round(trainer_s, 4), trainer_tokens_per_s=round(args.batch * args.seq / trainer_s),
               trainer_steps_s=[round(t, 4) for t in times])
    if args.example_tokens:
        timed = [t for t in times[args.warmup:] if t < 3 * trainer_s]  # steps that did not compile
        batches = batches[args.warmup + 1:]  # the steps `times` holds, after the warm-up
        tokens = float(np.mean([data.count_tokens(b) for b in batches]))
        out.update(example_tokens=args.example_tokens, mean_step_s=round(float(np.mean(timed)), 4),
                   steps_without_compile=len(timed), real_tokens_per_s=round(tokens / float(np.mean(timed))),
                   layout_share=round(float(np.mean(["segment_offsets" in b for b in batches])), 3))
    return out


def main(argv: list[str]) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    example_tokens = 0
    if "--example-tokens" in argv:  # this script's own flag; the rest are train_step.py's
        k = argv.index("--example-tokens")
        example_tokens, argv = int(argv[k + 1]), argv[:k] + argv[k + 2:]
    args = train_step.run_args(argv)
    args.packed, args.max_grad_norm, args.packed_attention = 1, 1.0, "mask"
    args.example_tokens = example_tokens
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
