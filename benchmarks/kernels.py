"""Linear-kernel benchmark on Llama-3.1-8B shapes: the bf16 floor, LoRA (XLA, Pallas; opt-in `--paths lora_mosaic`:
the Mosaic GPU GEMM, Hopper only, at token counts its tiles divide) and NF4 (XLA, Pallas, XLA's
multiply-and-sum "reduce", and the gather-free formulations of benchmarks/nf4_formulations.py: nf4_split, nf4_concat,
nf4_select).

    pip install -e . --no-deps --no-build-isolation -q; python3 benchmarks/kernels.py [--check] [--tune]

Every path is timed as forward + the gradients training needs: the bf16 floor is y = x @ w and dx; LoRA gives y and
dx, da, db (w frozen); NF4 gives y and dx; `--forward-only` times y alone (generation). `layers` distinct weights
(so the weights do not sit in L2) are run in one jitted, unrolled function, as a model's layers would be; a batch
of 3 calls is timed after a warm-up call, and the median over batches divided by `layers` is reported, in
microseconds per layer. One JSON line per measurement; the full list goes to $OUT/kernels.jsonl when $OUT is set;
a table of ratios to the bf16 floor ends the output.
`--check` first runs tests/test_kernels_lora.py and tests/test_kernels_nf4.py (compiled on the GPU);
`--tune` times alternative Pallas tile settings; `--nf4-decodes select gather prmt prmt_gemv` times the fused NF4
kernels with each decode (its default tiles) beside the nf4_pallas path (whose decode is "auto"); "prmt_gemv" is
"prmt" with `rounding="gemv_4bit"` (bitsandbytes' inference-kernel weights, bf16 PTX tables). `--nf4-rounding
gemv_4bit` gives the NF4 `--paths` those weights (e.g. "reduce" against "pallas" at one token, as batch-1 decoding
after `for_inference` computes). `--dy-passes xla pallas` times each LoRA path twice: with the backward's dy @ b.T
and xa.T @ dy as two XLA dots, and as one Pallas pass over dy (columns "+dy", kernels/lora_dy.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from fastlora_jax import compiler_options, kernels
from fastlora_jax.kernels import lora, lora_mosaic, nf4
from fastlora_jax.nf4 import NF4Array, nf4_sizes

import nf4_formulations  # benchmarks/, beside this script

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (in, out): q/o, k/v, gate/up, down
TOKENS = (8192, 16, 1)
RANKS = (16, 64)
NF4_FORMULATION_PATHS = tuple(f"nf4_{f}" for f in nf4_formulations.FORMULATIONS)  # gather-free decodes
PATHS = ("bf16", "lora_xla", "lora_pallas", "lora_mosaic", "nf4_xla", "nf4_pallas", "nf4_reduce",
         *NF4_FORMULATION_PATHS)
REPO = Path(__file__).resolve().parent.parent
# Decodes of the fused NF4 kernels to time side by side (--nf4-decodes), each with its own default tiles
NF4_DECODES = ("select", "gather", "prmt", "prmt_gemv")


def layers_for(k: int, n: int, m: int) -> int:
    """Enough distinct layers that even their NF4 weights (k * n / 2 bytes each) overflow the 60 MB L2."""
    if m > 1024:
        return 2
    return max(8, min(16, math.ceil(160e6 / (k * n / 2))))


def random_nf4(key, n: int, k: int) -> NF4Array:
    """Random NF4 codes and absmax for one weight [n, k] (timing does not depend on the values)."""
    packed, nblocks, nested = nf4_sizes((n, k))
    keys = jax.random.split(key, 3)
    return NF4Array(
        jax.random.randint(keys[0], (packed,), 0, 256, jnp.int32).astype(jnp.uint8),
        jax.random.randint(keys[1], (nblocks,), 0, 256, jnp.int32).astype(jnp.uint8),
        jax.random.uniform(keys[2], (nested,), jnp.float32, 0.01, 0.1),
        jnp.asarray(0.02, jnp.float32), shape=(n, k), dtype=jnp.bfloat16)


def build(path: str, k: int, n: int, m: int, r: int, layers: int, tiles, options: dict, forward_only: bool = False,
          rounding: str = "dequantize_4bit", dy_pass: str = "xla"):
    """(jitted function, its arguments) computing `path`'s forward and gradients (only the forward when
    `forward_only`) for `layers` layers; each layer gives a tuple of outputs. `rounding`: the NF4 paths' weights;
    `dy_pass`: the LoRA paths' backward products of dy (`lora_linear(dy_pass=...)`).

    Each layer's weights are separate buffers (as a model's parameters are), so no slice copies are timed.
    `options` are the jit's compiler_options (main: fastlora_jax.compiler_options() and the --xla-option pairs).
    """
    jit = functools.partial(jax.jit, compiler_options=options)
    keys = jax.random.split(jax.random.key(k * 7 + n * 3 + m + r), 3 + 3 * layers)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)  # [M, in]
    g = jax.random.normal(keys[1], (m, n), jnp.float32).astype(jnp.bfloat16)  # [M, out] output cotangent
    lkeys = keys[3:].reshape(layers, 3)
    if path.startswith("nf4"):
        impl = path.split("_")[1]
        ws = [random_nf4(lkeys[i, 0], n, k) for i in range(layers)]
        if path in NF4_FORMULATION_PATHS:  # y and dx written out: what the custom_vjp's two halves compute
            def layer(x, g, w):
                if forward_only:
                    return (nf4_formulations.forward(x, w, impl),)
                return nf4_formulations.forward(x, w, impl), nf4_formulations.input_gradient(g, w, impl)

            return jit(lambda x, g, ws: [layer(x, g, w) for w in ws]), (x, g, ws)

        def layer(x, g, w):
            f = lambda x: nf4.nf4_linear(x, w, implementation=impl, block_sizes=tiles, rounding=rounding)
            if forward_only:
                return (f(x),)
            y, vjp = jax.vjp(f, x)
            return y, vjp(g)[0]

        return jit(lambda x, g, ws: [layer(x, g, w) for w in ws]), (x, g, ws)
    ws = [(jax.random.normal(lkeys[i, 0], (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16) for i in range(layers)]
    if path == "bf16":
        def layer(x, g, w):
            if forward_only:
                return (x @ w,)
            y, vjp = jax.vjp(lambda x: x @ w, x)
            return y, vjp(g)[0]

        return jit(lambda x, g, ws: [layer(x, g, w) for w in ws]), (x, g, ws)
    impl = path.split("_")[1]
    abs_ = [(jax.random.normal(lkeys[i, 1], (k, r), jnp.float32) * k ** -0.5,
             jax.random.normal(lkeys[i, 2], (r, n), jnp.float32) * 0.01) for i in range(layers)]

    def layer(x, g, w, a, b):
        f = lambda x, a, b: lora.lora_linear(x, w, a, b, 2.0, implementation=impl, block_sizes=tiles,
                                             dy_pass=dy_pass)
        if forward_only:
            return (f(x, a, b),)
        y, vjp = jax.vjp(f, x, a, b)
        return y, *vjp(g)

    return jit(lambda x, g, ws, abs_: [layer(x, g, w, a, b) for w, (a, b) in zip(ws, abs_)]), (x, g, ws, abs_)


def nf4_decode_variant(variant: str) -> tuple[str, str]:
    """(decode, rounding) of an --nf4-decodes name: "prmt_gemv" is "prmt" with rounding "gemv_4bit"."""
    return ("prmt", "gemv_4bit") if variant == "prmt_gemv" else (variant, "dequantize_4bit")


def nf4_decode_tiles(variant: str, m: int, k: int, n: int) -> tuple[nf4.BlockSizes, nf4.BlockSizes]:
    """(forward, backward) default BlockSizes of the fused NF4 kernels for an --nf4-decodes name, for [m, k] x
    [n, k].T."""
    decode, rounding = nf4_decode_variant(variant)
    return nf4.BlockSizes.for_forward(m, n, k, decode, rounding), nf4.BlockSizes.for_backward(m, n, k, decode)


def time_us(fn, args, layers: int, batches: int, per_batch: int = 3):
    """(median microseconds per layer, every batch's, compile + first-call seconds, the first layer's outputs)."""
    start = time.perf_counter()
    first = jax.block_until_ready(fn(*args))[0]
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / per_batch / layers * 1e6)
    return statistics.median(times), times, compile_s, first


def emit(record: dict, sink) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if sink is not None:
        sink.write(line + "\n")
        sink.flush()


def run_check(sink) -> None:
    """The kernel tests, compiled on this machine's GPU."""
    # -P: the repo root must not go on sys.path, where kernels/ would shadow Hugging Face's `kernels` package.
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_lora.py",
           "tests/test_kernels_nf4.py"]
    try:  # several test processes compile Triton kernels at once; they share the GPU, so none preallocates
        import xdist  # noqa: F401

        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", flush=True)
    lines = proc.stdout.strip().splitlines()
    emit({"check": "pytest " + " ".join(cmd[3:]), "returncode": proc.returncode,
          "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - start, 1)}, sink)


TUNE = {  # alternative Pallas tiles, tried on the first shape with --tune (after the main table)
    "lora_pallas": [lora.BlockSizes(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=4),
                    lora.BlockSizes(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
                    lora.BlockSizes(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)],
    "nf4_pallas_small": [nf4.BlockSizes(decode="gather"), nf4.BlockSizes(split_k=1),
                         nf4.BlockSizes(block_n=32, blocks_per_step=2), nf4.BlockSizes(block_k=32, num_warps=8)],
}


def time_parts(sink, batches: int, options: dict, m: int = 16, k: int = 4096, n: int = 4096) -> None:
    """The NF4 forward (x @ W.T) and input-gradient (g @ W) products alone: Pallas kernels against XLA's
    dequantize-then-matmul, to see which half costs what."""
    from fastlora_jax.nf4 import dequantize_nf4

    layers = layers_for(k, n, m)
    keys = jax.random.split(jax.random.key(1), layers + 2)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    g = jax.random.normal(keys[1], (m, n), jnp.float32).astype(jnp.bfloat16)
    ws = [random_nf4(keys[i + 2], n, k) for i in range(layers)]
    parts = {
        "fwd_pallas": lambda x, g, w: nf4.nf4_matmul_t(x, w),
        "bwd_pallas": lambda x, g, w: nf4.nf4_matmul(g, w),
        "fwd_xla": lambda x, g, w: jax.lax.dot_general(x, dequantize_nf4(w, x.dtype), (((1,), (1,)), ((), ()))),
        "bwd_xla": lambda x, g, w: g @ dequantize_nf4(w, g.dtype),
        "absmax_xla": lambda x, g, w: nf4._operands(w, n)[1],
    }
    for name, part in parts.items():
        fn = jax.jit(lambda x, g, ws, part=part: [part(x, g, w) for w in ws], compiler_options=options)
        median, times, compile_s, _ = time_us(fn, (x, g, ws), layers, batches)
        emit({"part": f"nf4_{name}", "in": k, "out": n, "tokens": m, "layers": layers, "median_us": round(median, 2),
              "batches_us": [round(t, 2) for t in times], "compile_s": round(compile_s, 2)}, sink)


def tune(sink, batches: int, options: dict, deadline: float, k: int, n: int, m_large: int, m_small: int) -> None:
    time_parts(sink, batches, options, m_small, k, n)
    for label, tiles_list in TUNE.items():
        path = label.removesuffix("_small")
        m = m_small if label.endswith("_small") else m_large
        for tiles in tiles_list:
            if time.perf_counter() > deadline:
                return
            measure(path, k, n, m, 16, sink, batches, tiles=tiles, tag={"tune": repr(tiles)}, options=options)


_XLA_OUTPUTS: dict[tuple, tuple] = {}  # the XLA path's first-layer outputs per (op, shape, rank, rounding)


def measure(path, k, n, m, r, sink, batches, *, options: dict, tiles=None, tag=None, forward_only=False,
            rounding: str = "dequantize_4bit", dy_pass: str = "xla") -> dict:
    layers = layers_for(k, n, m)
    record = {"path": path, "in": k, "out": n, "tokens": m, "r": r if path.startswith("lora") else None,
              "layers": layers, **({"forward_only": True} if forward_only else {}),
              **({"dy_pass": dy_pass} if dy_pass != "xla" else {}), **(tag or {})}
    family = (path.split("_")[0], k, n, m, r, rounding)  # compared only where the weights are the same
    try:
        fn, args = build(path, k, n, m, r, layers, tiles, options, forward_only, rounding, dy_pass)
        median, times, compile_s, outputs = time_us(fn, args, layers, batches)
        record.update(median_us=round(median, 2), batches_us=[round(t, 2) for t in times],
                      compile_s=round(compile_s, 2))
        if path.endswith("_xla") and dy_pass == "xla":
            _XLA_OUTPUTS[family] = outputs
        elif family in _XLA_OUTPUTS:  # same inputs (same keys): compare y and grads with the XLA path's
            record["rel_err_vs_xla"] = [float(jnp.linalg.norm((o.astype(jnp.float32) - w.astype(jnp.float32)))
                                              / jnp.linalg.norm(w.astype(jnp.float32)))
                                        for o, w in zip(outputs, _XLA_OUTPUTS[family])]
        del fn, args, outputs
    except Exception as err:  # a path that fails to compile or run is recorded, the others still run
        record["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
    emit(record, sink)
    return record


def _column(record: dict) -> str:
    if "decode" in record:
        return f"nf4_pallas[{record['decode']}]"
    dy = "+dy" if record.get("dy_pass") == "pallas" else ""
    return record["path"] + dy + (f" r{record['r']}" if record["r"] else "")


def table(records: list[dict], shapes, tokens) -> str:
    variants = [f"nf4_pallas[{d}]" for d in NF4_DECODES]
    cols = (["bf16"] + [f"{p}{dy} r{r}" for r in RANKS for p in ("lora_xla", "lora_pallas", "lora_mosaic")
                         for dy in ("", "+dy")]
            + ["nf4_xla", "nf4_pallas", "nf4_reduce"] + list(NF4_FORMULATION_PATHS) + variants)
    present = {_column(rec) for rec in records if "tune" not in rec}
    cols = [c for c in cols if c in present]
    rows = [f"{'in->out':>12} {'tokens':>6} " + " ".join(f"{c:>16}" for c in cols)]
    for k, n in shapes:
        for m in tokens:
            got = {}
            for rec in records:
                if (rec.get("in"), rec.get("out"), rec.get("tokens")) == (k, n, m) and "tune" not in rec:
                    got[_column(rec)] = rec.get("median_us")
            if not got:
                continue
            floor = got.get("bf16")
            cells = []
            for c in cols:
                t = got.get(c)
                cells.append("-" if t is None else f"{t:.1f}" if c == "bf16" or not floor else f"{t:.1f} ({t / floor:.2f}x)")
            rows.append(f"{f'{k}->{n}':>12} {m:>6} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="run the kernel tests compiled on the GPU first")
    parser.add_argument("--tune", action="store_true", help="time alternative Pallas tiles first")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="IN x OUT")
    parser.add_argument("--paths", nargs="+", default=[p for p in PATHS if p != "lora_mosaic"], choices=PATHS)
    parser.add_argument("--parts", action="store_true",
                        help="also time the NF4 forward and input-gradient halves alone at the token counts <= 64")
    parser.add_argument("--nf4-decodes", nargs="+", default=[], choices=NF4_DECODES,
                        help="also time the fused NF4 kernels with these decodes (at <= 1024 tokens; prmt: GPU)")
    parser.add_argument("--nf4-rounding", default="dequantize_4bit", choices=("dequantize_4bit", "gemv_4bit"),
                        help="the weights of the NF4 --paths (fastlora_jax.nf4.ROUNDINGS)")
    parser.add_argument("--dy-passes", nargs="+", default=["xla"], choices=("xla", "pallas"),
                        help="the LoRA paths' backward products of dy: two XLA dots, or one Pallas pass over dy; "
                             "each LoRA path is timed with each")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--forward-only", action="store_true",
                        help="time the forward alone (generation), not forward + gradients")
    parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an XLA option for the timed jits, over fastlora_jax.compiler_options(); repeatable")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new measurement after this long")
    parser.add_argument("--tune-reserve-s", type=float, default=25.0, help="of the budget, kept for --tune")
    args = parser.parse_args(argv)
    if "lora_mosaic" in args.paths and not lora_mosaic.on_hopper():
        parser.error(f"--paths lora_mosaic needs a Hopper GPU (compute capability 9.0); this is "
                     f"{jax.devices()[0].device_kind!r}")
    options = compiler_options(*args.xla_option)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    deadline = time.perf_counter() + args.budget_s
    out_dir = os.environ.get("OUT")
    sink = open(Path(out_dir) / "kernels.jsonl", "a") if out_dir else None
    if args.check:  # before this process initializes (and preallocates) the GPU
        run_check(sink)
    device = jax.devices()[0]
    emit({"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:], "xla_options": options,
          "auto_table": {op: list(v) for op, v in kernels.PALLAS_FASTER_ON_GPU.items()}}, sink)
    main_deadline = deadline - (args.tune_reserve_s if args.tune else 0.0)
    dy_passes = [d for d in ("xla", "pallas") if d in args.dy_passes]  # "xla" first: the reference for rel_err_vs_xla
    records = []
    for m in args.tokens:
        for k, n in shapes:
            for path in args.paths:
                if path == "nf4_pallas" and m > 1024 and (k, n) != shapes[0]:
                    continue  # recomputes the dequantization per token tile: one shape shows it
                if path == "lora_mosaic" and not (lora_mosaic.supports(m, n, k) and lora_mosaic.supports(m, k, n)):
                    continue  # the forward [m, k] @ [k, n] and the input gradient [m, n] @ [n, k] must tile
                for r in (RANKS if path.startswith("lora") else (0,)):
                    if m == 1 and r not in (0, RANKS[0]):
                        continue  # at one token the rank changes nothing measurable
                    if time.perf_counter() > main_deadline:
                        continue
                    nf4_path = path.startswith("nf4")
                    for dy_pass in dy_passes if path.startswith("lora") and not args.forward_only else ["xla"]:
                        records.append(measure(path, k, n, m, r, sink, args.batches, options=options,
                                               forward_only=args.forward_only, dy_pass=dy_pass,
                                               rounding=args.nf4_rounding if nf4_path else "dequantize_4bit",
                                               tag={"rounding": args.nf4_rounding} if nf4_path else None))
            for decode in args.nf4_decodes if m <= 1024 else ():
                if time.perf_counter() < main_deadline:
                    records.append(measure("nf4_pallas", k, n, m, 0, sink, args.batches, options=options,
                                           tiles=nf4_decode_tiles(decode, m, k, n), tag={"decode": decode},
                                           forward_only=args.forward_only,
                                           rounding=nf4_decode_variant(decode)[1]))
    small = [m for m in args.tokens if m <= 64]
    if args.parts:
        for m in small:
            for k, n in shapes:
                time_parts(sink, args.batches, options, m, k, n)
    if args.tune:
        tune(sink, args.batches, options, deadline, *shapes[0], max(args.tokens), max(small, default=min(args.tokens)))
    print(table(records, shapes, args.tokens), flush=True)
    if sink is not None:
        sink.close()


if __name__ == "__main__":
    main()
