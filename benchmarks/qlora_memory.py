"""QLoRA memory: bytes of a preset's weights in 4-bit, and peak host memory while quantizing on load.

    python benchmarks/qlora_memory.py weights --preset llama-3.1-8b      # exact, from shapes (nnx.eval_shape)
    python benchmarks/qlora_memory.py load --preset llama-3.2-1b --dir /tmp/ckpt   # writes a random bf16 checkpoint
                                                                                  # once, then loads it in 4-bit

`weights` counts every array the model holds after `from_pretrained(..., load_in_4bit=True)`: NF4 codes and their
quantization state for the decoder linears, 16-bit embeddings, norms and head. `load` runs the real loader in a
fresh process and reports its peak resident memory (ru_maxrss) next to the checkpoint's size and the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def weight_bytes(preset: str) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    from fastlora_jax.config import preset as make_preset
    from fastlora_jax.model import Llama
    from fastlora_jax.nf4 import nf4_sizes

    config = make_preset(preset)
    L = config.num_hidden_layers
    model = nnx.eval_shape(lambda: Llama(config, dtype=jnp.bfloat16))
    sixteen = sum(v.size * v.dtype.itemsize for _, v in nnx.to_flat_state(nnx.state(model)))
    linear_16 = sum(L * i * o * 2 for i, o in config.linear_shapes().values())
    nf4 = 0
    for fan_in, fan_out in config.linear_shapes().values():
        packed, nblocks, nested = nf4_sizes((fan_out, fan_in))
        nf4 += L * (packed + nblocks + 4 * nested + 4)  # uint8 codes, uint8 absmax, f32 nested absmax, f32 offset
    total_4bit = sixteen - linear_16 + nf4
    return dict(preset=preset, bf16_weights_gib=round(sixteen / 2**30, 3), nf4_weights_gib=round(total_4bit / 2**30, 3),
                decoder_linears_bf16_gib=round(linear_16 / 2**30, 3), decoder_linears_nf4_gib=round(nf4 / 2**30, 3),
                bits_per_linear_weight=round(8 * nf4 / (linear_16 / 2), 3))


def write_random_checkpoint(preset: str, directory: str) -> None:
    """A random bf16 HF checkpoint of the preset's shapes, written one tensor at a time."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from fastlora_jax.config import preset as make_preset

    config = make_preset(preset)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf_config(), f)
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
               "model.norm.weight": (config.hidden_size,)}
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for i in range(config.num_hidden_layers):
        for name, (fan_in, fan_out) in config.linear_shapes().items():
            tensors[f"model.layers.{i}.{name}.weight"] = (fan_out, fan_in)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = (config.hidden_size,)
    arrays = {k: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16) for k, s in tensors.items()}
    save_file(arrays, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def load_peak(directory: str) -> dict:
    """Loads in 4-bit (bf16 compute) and reports the process's peak resident memory."""
    import time

    import jax
    from flax import nnx

    from fastlora_jax import FastLanguageModel

    t = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(directory, dtype="bfloat16", load_in_4bit=True)
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t
    held = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(checkpoint_gib=round(os.path.getsize(os.path.join(directory, "model.safetensors")) / 2**30, 3),
                model_4bit_gib=round(held / 2**30, 3), peak_host_rss_gib=round(peak / 2**30, 3),
                load_s=round(seconds, 1), backend=jax.default_backend())


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["weights", "load", "_load"])
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    if args.command == "weights":
        print(json.dumps(weight_bytes(args.preset)))
    elif args.command == "load":
        directory = args.dir or f"/tmp/fastlora-{args.preset}-bf16"
        if not os.path.exists(os.path.join(directory, "model.safetensors")):
            write_random_checkpoint(args.preset, directory)
        run = subprocess.run([sys.executable, __file__, "_load", "--dir", directory], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr[-2000:])
        print(json.dumps({"preset": args.preset, **json.loads(run.stdout.strip().splitlines()[-1])}))
    else:
        print(json.dumps(load_peak(args.dir)))


if __name__ == "__main__":
    main(sys.argv[1:])
