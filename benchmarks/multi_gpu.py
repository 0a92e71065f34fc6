"""Several GPUs: the train_step.py LoRA step under a (data, fsdp) mesh, same per-GPU batch, one JSON line per run.

    python benchmarks/multi_gpu.py suite                       # 1 GPU, data=2, fsdp=2: each in its own process
    python benchmarks/multi_gpu.py run --data 2 --fsdp 1 --per-gpu-batch 4 --model 8b --mode dots

The model is built exactly as benchmarks/train_step.py builds it (random weights, LoRA r=16 on the 7 projections),
then every variable is placed by fastlora_jax.sharding's rules and the batch is split over ("data", "fsdp").
Reported per device: bytes in use once the model and optimizer state are placed (weights per GPU), and the peak
during the timed steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    """A sibling benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(ns) -> dict:
    import jax
    import numpy as np

    from fastlora_jax import sharding

    bench = _load("train_step")
    n_gpus = ns.data * ns.fsdp
    batch = ns.per_gpu_batch * n_gpus
    args = bench.run_args(["--model", ns.model, "--batch", str(batch), "--seq", str(ns.seq), "--mode", ns.mode])
    mesh = sharding.make_mesh(data=ns.data, fsdp=ns.fsdp, devices=jax.devices()[:n_gpus])
    model, config = bench.build(args)
    sharding.shard_model(model, mesh)
    step, trainable, opt_state, frozen = bench.make_step(model, args)
    del model
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = jax.tree.map(  # scalars (Adam's step count) made on one device: replicate them over the mesh
        lambda x: x if len(x.sharding.device_set) == n_gpus else jax.device_put(x, replicated), opt_state)
    ids = sharding.shard_batch(np.random.default_rng(1).integers(0, config.vocab_size, (batch, ns.seq)), mesh)
    jax.block_until_ready((trainable, opt_state, frozen, ids))
    placed_gib = [round((d.memory_stats() or {}).get("bytes_in_use", 0) / 2**30, 2) for d in jax.devices()[:n_gpus]]
    t0 = time.perf_counter()
    step.lower(trainable, opt_state, frozen, ids).compile()  # timed alone; the loop below calls `step`
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(ns.warmup + ns.steps):
        t = time.perf_counter()
        # The jitted function (not `compiled`): XLA may pick other output shardings than the inputs had, and the
        # warm-up steps absorb the one extra compilation that causes.
        trainable, opt_state, loss = step(trainable, opt_state, frozen, ids)
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times[ns.warmup:]))
    if ns.profile:  # two more steps under the profiler; GPU 0's kernels summed per kind and per kernel
        state = [trainable, opt_state]

        def run_steps(steps: int) -> None:
            for _ in range(steps):
                state[0], state[1], loss = step(state[0], state[1], frozen, ids)
            loss.block_until_ready()

        _load("profile_step").trace_and_summarize(ns.profile, run_steps, 2, label=f"data={ns.data} fsdp={ns.fsdp}")
    peaks = [round((d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 2) for d in jax.devices()[:n_gpus]]
    return dict(system="fastlora-jax", model=ns.model, gpus=n_gpus, data=ns.data, fsdp=ns.fsdp, batch=batch,
                per_gpu_batch=ns.per_gpu_batch, seq=ns.seq, mode=ns.mode, step_s=round(step_s, 4),
                tokens_per_s=round(batch * ns.seq / step_s), placed_gib_per_gpu=placed_gib, peak_gib_per_gpu=peaks,
                compile_s=round(compile_s, 1), loss=round(float(loss), 3))


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=int, default=1)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--per-gpu-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--model", default="8b", choices=["8b", "1b", "tiny"])
    p.add_argument("--mode", default="dots")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", metavar="DIR", help="trace two more steps; summarize GPU 0's kernels into DIR")
    return p.parse_args(argv)


def main(argv):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if argv and argv[0] == "run":
        ns = parse(argv[1:])
        try:
            print(json.dumps(run(ns)), flush=True)
        except Exception as e:  # OOM or otherwise: report and go on
            print(json.dumps(dict(system="fastlora-jax", args=" ".join(argv[1:]),
                                  error=f"{type(e).__name__}: {str(e)[:400]}")), flush=True)
            raise SystemExit(1)
        return
    extra = argv[1:] if argv and argv[0] == "suite" else argv
    for layout in (["--data", "1", "--fsdp", "1"], ["--data", "2", "--fsdp", "1"], ["--data", "1", "--fsdp", "2"]):
        subprocess.run([sys.executable, __file__, "run", *layout, *extra], check=False)


if __name__ == "__main__":
    main(sys.argv[1:])
