"""Training-step benchmark: LoRA / QLoRA on random-weight Llama configs, one JSON line per configuration.

    python benchmarks/train_step.py run --model 8b --batch 4 --seq 2048 --mode unsloth [--qlora]
    python benchmarks/train_step.py suite NAME [NAME ...]   # named lists of `run`s, each in its own process
    python benchmarks/train_step.py memory --model 8b --qlora --batch 1 --seq 1048576 --mode long_context
    python benchmarks/train_step.py longest --mode long_context 262144 524288 1048576   # analysis per length

Random bf16 weights initialised on the device under jit (QLoRA: random NF4 codes and absmax, never a bf16 copy of
the decoder), LoRA r=16, alpha=16 on the 7 projections through `fastlora_jax.lora.get_peft_model`, AdamW on the
adapters only (gradients taken w.r.t. the trainable state alone), buffers donated, chunked fused cross-entropy.
Per configuration: median step of `--steps` after `--warmup`, tokens/s, peak GPU memory (peak_bytes_in_use with
XLA_PYTHON_CLIENT_PREALLOCATE=false; one process per configuration, since the peak never resets), useful TFLOP/s
(PERFORMANCE.md: 4 x params x tokens + 3 x causal attention forward) and compile time (lower + compile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = {"8b": "llama-3.1-8b", "1b": "llama-3.2-1b", "135m": "smollm2-135m", "tiny": None}
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_theta=10000.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Named lists of runs (each a `run` command line), so one device call runs several configs.
SUITES = {
    "8b": ["--model 8b --batch 4 --seq 2048 --mode dots", "--model 8b --batch 4 --seq 2048 --mode False",
           "--model 8b --batch 4 --seq 2048 --mode True", "--model 8b --batch 4 --seq 2048 --mode unsloth"],
    "8b-qlora": ["--model 8b --batch 4 --seq 2048 --mode unsloth --qlora",
                 "--model 8b --batch 4 --seq 2048 --mode dots --qlora"],
    "long": ["--model 8b --qlora --batch 1 --seq 131072 --mode unsloth --steps 1 --warmup 0",
             "--model 8b --qlora --batch 1 --seq 262144 --mode long_context --steps 1 --warmup 0"],
    "8b-16k": ["--model 8b --batch 1 --seq 16384 --mode unsloth", "--model 8b --batch 1 --seq 16384 --mode True"],
    "1b": ["--model 1b --batch 8 --seq 2048 --mode dots", "--model 1b --batch 8 --seq 2048 --mode False",
           "--model 1b --batch 8 --seq 2048 --mode True", "--model 1b --batch 8 --seq 2048 --mode unsloth"],
    "compile": ["--model 8b --batch 4 --seq 2048 --mode unsloth --layers 2 --steps 2 --warmup 1"],
    "tiny": ["--model tiny --batch 2 --seq 128 --mode dots --steps 2 --warmup 1",
             "--model tiny --batch 2 --seq 128 --mode unsloth --steps 2 --warmup 1"],
}


def parse_mode(text: str):
    return {"false": False, "true": True}.get(text.lower(), text)


def make_config(args):
    from fastlora_jax.config import LlamaConfig, preset

    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    if args.model == "tiny":
        return LlamaConfig(**{**TINY, **overrides})
    return preset(MODELS[args.model], **overrides)


def _random_nf4(key, stack: int, shape: tuple[int, int]):
    """A stacked NF4Array of random codes and absmax (the step's speed does not depend on the values)."""
    import jax
    import jax.numpy as jnp

    from fastlora_jax.nf4 import NF4Array, nf4_sizes

    packed_n, nblocks, nested = nf4_sizes(shape)
    k1, k2 = jax.random.split(key)
    packed = jax.random.bits(k1, (stack, packed_n), jnp.uint8)
    absmax_q = jax.random.bits(k2, (stack, nblocks), jnp.uint8)
    nested_absmax = jnp.full((stack, nested), 0.01, jnp.float32)
    offset = jnp.full((stack,), 0.02, jnp.float32)
    return NF4Array(packed, absmax_q, nested_absmax, offset, shape=shape, dtype=jnp.bfloat16)


def _random_bf16(key, shape):
    """Random bf16 of magnitude in [2^-6, 2^-5) and random sign, made from 16-bit patterns (no float32 temp)."""
    import jax
    import jax.numpy as jnp

    bits = jax.random.bits(key, shape, jnp.uint16)
    bits = (bits & jnp.uint16(0x807F)) | jnp.uint16(0x3C80)  # sign, exponent 2^-6, 7 random mantissa bits
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def build(args):
    """(model with LoRA adapters, config); weights random, created on the device under jit."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fastlora_jax.lora import get_peft_model
    from fastlora_jax.model import Llama

    config = make_config(args)

    @nnx.jit
    def init():
        # Built with zeros (constants under jit), then every matrix is filled with random bf16 drawn as 16-bit
        # patterns: no float32 copy of any weight ever exists, so the process peak is the training step's.
        model = Llama(config, dtype=jnp.bfloat16, rngs=None, implementation=args.implementation)
        flat = nnx.to_flat_state(nnx.state(model))
        nnx.update(model, nnx.from_flat_state(
            [(path, v.replace(_random_bf16(jax.random.key(i), v[...].shape))
              if v[...].ndim >= 2 and not any("norm" in str(p) for p in path) else v)
             for i, (path, v) in enumerate(flat)]))
        if args.qlora:  # the bf16 decoder weights are dead code: only NF4 codes leave the jit
            from fastlora_jax.nf4 import NF4Linear

            layers = model.model.layers
            for i, (path, (fan_in, fan_out)) in enumerate(config.linear_shapes().items()):
                parent, name = path.split(".")
                w = _random_nf4(jax.random.key(100 + i), config.num_hidden_layers, (fan_out, fan_in))
                setattr(getattr(layers, parent), name, NF4Linear(w, implementation=args.implementation))
        return model

    model = init()
    get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                   use_gradient_checkpointing=args.mode)
    model.model.mlp_chunk_size = args.mlp_chunk
    model.model.scan_layers = not args.layer_loop
    model.model.mlp_dequantize_once = not args.mlp_dequantize_per_chunk
    return model, config


def library_adamw(optim: str):
    """fastlora_jax.training.AdamW as both step benchmarks build it: constant 1e-4, weight decay 0.01, `optim` by
    transformers' name ("adamw_torch", "adamw_8bit", ...)."""
    from fastlora_jax.training import AdamW

    return AdamW(lr_scheduler_type="constant", learning_rate=1e-4, total_steps=1, weight_decay=0.01, optim=optim)


def make_step(model, args):
    """(jitted step, trainable state, optimizer state, frozen state); step(trainable, opt, frozen, ids)."""
    import functools

    import jax
    import optax
    from flax import nnx

    from fastlora_jax.loss import causal_lm_loss
    from fastlora_jax.variables import TRAINABLE

    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    # optax.adamw (the peers' optimizer), or the library's AdamW by transformers' optim name
    tx = optax.adamw(1e-4) if args.optim is None else library_adamw(args.optim)
    opt_state = tx.init(trainable)

    def loss_fn(trainable, frozen, ids):
        m = nnx.merge(graphdef, trainable, frozen)
        loss_sum, n = causal_lm_loss(m, ids, ids, chunk_size=args.chunk)
        return loss_sum / n

    @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=xla_options(args))
    def step(trainable, opt_state, frozen, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step, trainable, opt_state, frozen


def xla_options(args) -> dict:
    """The step's jax.jit compiler_options: fastlora_jax.compiler_options() (what make_train_step compiles with),
    updated by the --xla-option NAME=VALUE pairs (this step's compilation only, not the process)."""
    from fastlora_jax import compiler_options

    return compiler_options(*args.xla_option)


def useful_flops(config, batch: int, seq: int, examples_per_row: int = 1) -> float:
    """PERFORMANCE.md's useful FLOPs of a step: 4 x params x tokens + 3 x the causal attention forward, which for
    rows packing `examples_per_row` examples of seq / examples_per_row tokens covers only each example's own."""
    from fastlora_jax.lora import base_parameter_count

    n_params = base_parameter_count(config)
    length = seq / examples_per_row
    attention = 4 * batch * examples_per_row * length * length * config.hidden_size * config.num_hidden_layers / 2
    return 4 * n_params * batch * seq + 3 * attention


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "host_argument_size_in_bytes", "host_output_size_in_bytes", "host_alias_size_in_bytes",
              "host_temp_size_in_bytes")
    out = {f.replace("_size_in_bytes", "_gib"): round(getattr(m, f, 0) / 2**30, 3) for f in fields
           if hasattr(m, f)}
    device = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    out["device_total_gib"] = round(device / 2**30, 3)
    return out


def _count_slice_fusions(compiled) -> int:
    """Mentions of "dynamic_slice_fusion" / "address_computation" in the compiled HLO text: a rough diagnostic
    (it counts text, not fusions; with cuBLAS GEMMs it was the same with and without the fusion flag)."""
    text = compiled.as_text() or ""
    return text.count("dynamic_slice_fusion") + text.count("address_computation")


def run(args) -> dict:
    import jax
    import numpy as np

    t_start = time.perf_counter()
    model, config = build(args)
    step, trainable, opt_state, frozen = make_step(model, args)
    del model
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, config.vocab_size)
    jax.block_until_ready((trainable, frozen, ids))
    init_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, ids).compile()
    compile_s = time.perf_counter() - t0
    result = dict(system="fastlora-jax", model=args.model, layers=config.num_hidden_layers, batch=args.batch,
                  seq=args.seq, mode=str(args.mode), qlora=args.qlora, optim=args.optim or "optax.adamw",
                  implementation=args.implementation, chunk=args.chunk, mlp_chunk=args.mlp_chunk,
                  mlp_dequantize_per_chunk=args.mlp_dequantize_per_chunk,
                  layer_loop=args.layer_loop, xla_flags=os.environ.get("XLA_FLAGS", ""),
                  xla_options=xla_options(args), dynamic_slice_fusions=_count_slice_fusions(compiled),
                  compile_s=round(compile_s, 1), init_s=round(init_s, 1), **_memory(compiled))
    if args.compile_only:
        return result
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        trainable, opt_state, loss = compiled(trainable, opt_state, frozen, ids)
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
        losses.append(loss)
    step_s = float(np.median(times[args.warmup:]))
    tokens = args.batch * args.seq
    stats = jax.devices()[0].memory_stats() or {}
    result.update(step_s=round(step_s, 4), tokens_per_s=round(tokens / step_s),
                  peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
                  useful_tflops=round(useful_flops(config, args.batch, args.seq) / step_s / 1e12, 1),
                  first_loss=round(float(losses[0]), 4), loss=round(float(loss), 3), first_step_s=round(times[0], 3))
    return result


def run_args(argv: list[str]) -> argparse.Namespace:
    from fastlora_jax.loss import DEFAULT_CHUNK_SIZE

    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=list(MODELS), default="8b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mode", type=parse_mode, default="unsloth")
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (compile-time study)")
    p.add_argument("--implementation", default="auto", choices=["auto", "xla", "pallas", "mosaic"])
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE, help="cross-entropy chunk (tokens)")
    p.add_argument("--mlp-chunk", type=int, default=None, help="tokens per MLP chunk (default: the mode's)")
    p.add_argument("--layer-loop", action="store_true", help="scan_layers=False: a Python loop over the layers")
    p.add_argument("--mlp-dequantize-per-chunk", action="store_true",
                   help="mlp_dequantize_once=False: NF4 MLP weights dequantized in every MLP chunk")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an XLA option for this step's compilation (jax.jit compiler_options), over the library's "
                        "fastlora_jax.compiler_options(); repeatable")
    p.add_argument("--optim", default=None, help="fastlora_jax.training.AdamW's optim (adamw_torch, adamw_8bit, ...); "
                   "default: optax.adamw, as the peers")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-only", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    command, rest = (argv[0], argv[1:]) if argv else ("suite", ["tiny"])
    if command == "run":
        args = run_args(rest)
        try:
            print(json.dumps(run(args)), flush=True)
        except Exception as e:  # OOM or otherwise: report and go on
            print(json.dumps(dict(system="fastlora-jax", args=" ".join(rest), error=f"{type(e).__name__}: "
                                  f"{str(e)[:400]}")), flush=True)
            raise SystemExit(1)
    elif command == "memory":
        args = run_args(rest + ["--compile-only"])
        print(json.dumps(run(args)), flush=True)
    elif command == "longest":  # compiled memory analysis of 8B QLoRA at batch 1, one process per length
        p = argparse.ArgumentParser()
        p.add_argument("--mode", default="long_context")
        p.add_argument("seqs", type=int, nargs="+")
        a = p.parse_args(rest)
        for seq in a.seqs:
            subprocess.run([sys.executable, __file__, "memory", "--model", "8b", "--qlora", "--batch", "1",
                            "--seq", str(seq), "--mode", a.mode], check=False)
    elif command == "suite":
        for name in rest:
            for line in SUITES[name]:
                subprocess.run([sys.executable, __file__, "run", *line.split()], check=False)
    else:
        raise SystemExit(f"unknown command {command!r}; accepted: run, memory, longest, suite")


if __name__ == "__main__":
    main(sys.argv[1:])
