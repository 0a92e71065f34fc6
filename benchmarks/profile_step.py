"""Where a training step's GPU time goes: trace `benchmarks/train_step.py`'s step, sum the time of each kernel.

    python benchmarks/profile_step.py --out DIR -- --model 8b --batch 4 --seq 2048 --mode dots
    python benchmarks/profile_step.py --summarize TRACE.json.gz      # re-read a trace written earlier

After the usual warm-up, `--trace-steps` steps run under `jax.profiler.trace`; GPU 0's kernels in the Perfetto
trace are summed by name (XLA names each kernel after its fusion, so a name is an HLO op: a GEMM, a cuDNN attention
call, a Pallas kernel, a copy) and by kind. Writes DIR/ops.tsv (every kernel: kind, ms per step, calls per step),
DIR/hlo.txt.gz (the optimized HLO, to read what each fusion holds) and DIR/perfetto_trace.json.gz, and prints the
kinds and the top kernels.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Kernel-name patterns, first match wins: what a device event is.
KINDS = (
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
    ("pallas", re.compile(r"pallas|lowrank|lora|nf4", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|wgmma|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|dynamic-slice|dynamic_slice|dynamic-update|dynamic_update", re.I)),
    ("collective", re.compile(r"nccl|all_reduce|all-reduce|all_gather|reduce_scatter", re.I)),
)


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(kernel)), "xla fusion")


def device_events(trace: dict, device: str = "/device:GPU:0") -> list[dict]:
    """Complete ('X') events on `device`'s stream rows (not host threads, not the 'XLA Ops'/'Steps' summary rows)."""
    pids = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in pids.items() if name == device}
    tids = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
            if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in gpu}
    keep = {key for key, name in tids.items() if "stream" in name.lower()} or set(tids)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and (e["pid"], e.get("tid")) in keep]


def summarize(trace_path: str, steps: int, out_dir: str | None = None, top: int = 45) -> None:
    """Prints GPU 0's busy time per kind and the `top` kernels per step; writes out_dir/ops.tsv when given."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = device_events(trace)
    if not events:
        names = sorted({e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"})
        print(f"no GPU device events in the trace; its processes: {names}", flush=True)
        return
    # By kernel name, not by the "hlo_op" argument: inside a CUDA graph that is the graph's name.
    ops: dict[str, dict] = collections.defaultdict(lambda: dict(us=0.0, calls=0))
    for e in events:
        ops[e["name"]]["us"] += e.get("dur", 0.0)
        ops[e["name"]]["calls"] += 1
    kinds = collections.Counter()
    for name, rec in ops.items():
        rec["kind"] = kind_of(name)
        kinds[rec["kind"]] += rec["us"]
    busy = sum(kinds.values())
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e.get("dur", 0.0) for e in events)
    print(f"device busy {busy / steps / 1e3:.1f} ms/step over a {(end - start) / steps / 1e3:.1f} ms/step span "
          f"({len(events)} kernels, {steps} steps)", flush=True)
    for kind, us in kinds.most_common():
        print(f"  {kind:12s} {us / steps / 1e3:8.2f} ms/step  {100 * us / busy:5.1f}%")
    ranked = sorted(ops.items(), key=lambda kv: -kv[1]["us"])
    print(f"top {top} kernels: ms/step, calls/step, us/call, kind, name")
    for name, rec in ranked[:top]:
        print(f"  {rec['us'] / steps / 1e3:7.2f} {rec['calls'] / steps:6.0f} {rec['us'] / rec['calls']:8.1f}  "
              f"{rec['kind']:10s} {name[:90]}")
    if out_dir:
        with open(os.path.join(out_dir, "ops.tsv"), "w") as f:
            f.write("kernel\tkind\tms_per_step\tcalls_per_step\n")
            for name, rec in ranked:
                f.write(f"{name}\t{rec['kind']}\t{rec['us'] / steps / 1e3:.4f}\t{rec['calls'] / steps:g}\n")


def _train_step_module():
    spec = importlib.util.spec_from_file_location("train_step_bench", os.path.join(HERE, "train_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profile(out_dir: str, run_argv: list[str], trace_steps: int, warmup: int) -> None:
    import jax

    bench = _train_step_module()
    args = bench.run_args(run_argv)
    model, config = bench.build(args)
    step, trainable, opt_state, frozen = bench.make_step(model, args)
    del model
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, config.vocab_size)
    compiled = step.lower(trainable, opt_state, frozen, ids).compile()
    os.makedirs(out_dir, exist_ok=True)
    with gzip.open(os.path.join(out_dir, "hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())
    state = [trainable, opt_state]  # donated each step: the newest buffers live here

    def run(steps: int) -> None:
        for _ in range(steps):
            state[0], state[1], loss = compiled(state[0], state[1], frozen, ids)
        loss.block_until_ready()

    run(warmup)
    trace_and_summarize(out_dir, run, trace_steps, label=" ".join(run_argv))


def trace_and_summarize(out_dir: str, run, steps: int, label: str = "") -> None:
    """Calls `run(steps)` (which blocks on its last result) under the profiler, keeps the Perfetto trace as
    out_dir/perfetto_trace.json.gz and summarizes it (see `summarize`)."""
    import jax

    os.makedirs(out_dir, exist_ok=True)
    trace_dir = os.path.join(out_dir, "trace")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run(steps)
    wall = (time.perf_counter() - t0) / steps
    print(f"{label}: traced {steps} steps, {wall * 1e3:.1f} ms/step wall under the profiler", flush=True)
    trace_path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    kept = os.path.join(out_dir, "perfetto_trace.json.gz")
    shutil.copy(trace_path, kept)
    shutil.rmtree(trace_dir)
    summarize(kept, steps, out_dir)


def main(argv: list[str]) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    run_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="profile")
    p.add_argument("--trace-steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--summarize", metavar="TRACE", help="summarize an existing perfetto_trace.json.gz")
    ns = p.parse_args(own)
    if ns.summarize:
        summarize(ns.summarize, ns.trace_steps)
    else:
        profile(ns.out, run_argv, ns.trace_steps, ns.warmup)


if __name__ == "__main__":
    main(sys.argv[1:])
