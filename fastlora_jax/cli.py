"""The `fastlora-jax` command: finetune, generate, export, demo.

    fastlora-jax finetune --model SmolLM2-135M-Instruct --data chats.jsonl --output my-lora --max-steps 60
    fastlora-jax generate --model SmolLM2-135M-Instruct --adapter my-lora --prompt "Who rules Zorbland?"
    fastlora-jax export --model SmolLM2-135M-Instruct --adapter my-lora --output merged --format merged_16bit
    fastlora-jax demo          # the main job: SmolLM2-135M-Instruct learns the bundled Zorbland facts on CPU

Bad arguments, paths and values exit with status 2 (usage) or 1 (runtime) and one line on stderr; `--debug`
shows the traceback instead. Argument values and files are checked before the model loads; what depends on the
model (target modules, the records' fields against the tokenizer) once it has loaded.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CHECKPOINTING = ("false", "true", "unsloth", "dots", "long_context")
EXPORT_FORMATS = ("adapter", "merged_16bit", "gguf")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")  # fastlora_jax.packing.STRATEGIES, without importing JAX
_ERRORS = (ValueError, OSError, NotImplementedError, FloatingPointError, TypeError, KeyError)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `fastlora-jax finetune: error: argument --r: ...` (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(message) -> str:
    return " ".join(str(message).split())


# ------------------------------------------------------------------------------------------------ value checks

def _integer(text: str, accepted: str, ok) -> int:
    """int(text) where ok(value), else an argparse error naming the text and what is accepted."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r}; accepted: {accepted}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, "an integer >= 1", lambda value: value >= 1)


def _non_negative_int(text: str) -> int:
    return _integer(text, "an integer >= 0", lambda value: value >= 0)


def _seed(text: str) -> int:
    return _integer(text, "an integer in [0, 2**63)", lambda value: 0 <= value < 2**63)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}; accepted: a number > 0")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}; accepted: a number in [0, 1)")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}; accepted: a number >= 0")
    return value


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing file")
    return text


def _existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return text


def _output_dir(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return text


def _targets(text: str):
    if text == "all-linear":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}; accepted: comma-separated module names or 'all-linear'")
    return names


# ---------------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastlora-jax", description="LoRA / QLoRA fine-tuning of Llama models in JAX.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{finetune,generate,export,demo}")

    def model_options(p, *, default=DEFAULT_MODEL, default_text="%(default)s"):
        p.add_argument("--model", default=default,
                       help="a local Hugging Face directory, a .gguf file, a repo id in the local HF cache, or "
                            f"the alias {DEFAULT_MODEL!r} (default: {default_text})")
        p.add_argument("--load-in-4bit", action="store_true", help="quantize the base weights to NF4 (QLoRA)")
        p.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="compute dtype (auto: bfloat16 on GPU, float16 on T4 / V100, float32 on CPU; "
                            "default: %(default)s)")

    f = sub.add_parser("finetune", help="train a LoRA adapter on a JSONL dataset",
                       description="Trains LoRA adapters with SFTTrainer and writes the PEFT adapter "
                                   "(adapter_config.json, adapter_model.safetensors), the tokenizer, the loss curve "
                                   "(loss_curve.png) and orbax checkpoints (checkpoints/) into --output.")
    model_options(f)
    f.add_argument("--data", required=True, type=_existing_file,
                   help="JSONL file, one record per line: {'messages': [...]} (chat), {'text': ...} or "
                        "{'prompt': ..., 'completion': ...}")
    f.add_argument("--output", required=True, type=_output_dir, help="output directory")
    f.add_argument("--max-steps", type=_positive_int, default=None,
                   help="optimizer steps to run; overrides --epochs (default: use --epochs)")
    f.add_argument("--epochs", type=_positive_float, default=1.0, help="passes over the data (default: %(default)s)")
    f.add_argument("--r", type=_positive_int, default=16, help="LoRA rank (default: %(default)s)")
    f.add_argument("--lora-alpha", type=_positive_float, default=16.0,
                   help="LoRA alpha; scaling = alpha / r (default: %(default)s)")
    f.add_argument("--lora-dropout", type=_fraction, default=0.0, help="dropout on the LoRA input (default: 0)")
    f.add_argument("--target-modules", type=_targets, default=_targets(DEFAULT_TARGETS),
                   help=f"comma-separated module names or 'all-linear' (default: {DEFAULT_TARGETS})")
    f.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step (default: %(default)s)")
    f.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1,
                   help="micro-batches per optimizer step (default: %(default)s)")
    f.add_argument("--lr", type=_positive_float, default=2e-4, help="peak learning rate (default: %(default)s)")
    f.add_argument("--lr-scheduler", choices=("linear", "cosine", "constant"), default="linear",
                   help="learning-rate schedule after warm-up (default: %(default)s)")
    f.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: %(default)s)")
    f.add_argument("--weight-decay", type=_non_negative, default=0.0, help="AdamW weight decay (default: 0)")
    f.add_argument("--max-seq-length", type=_positive_int, default=512,
                   help="longer examples are truncated (default: %(default)s)")
    f.add_argument("--packing", action="store_true", help="pack several examples into each sequence")
    f.add_argument("--packing-strategy", choices=PACKING_STRATEGIES, default="bfd",
                   help="with --packing, TRL's: bfd (examples truncated), bfd_split (long ones cut into pieces), "
                        "wrapped (all tokens concatenated and cut into rows) (default: %(default)s)")
    f.add_argument("--train-on-responses-only", action="store_true",
                   help="loss on assistant answers / completions only (default: on for prompt/completion data, "
                        "off for chats and text)")
    f.add_argument("--gradient-checkpointing", choices=CHECKPOINTING, default="unsloth",
                   help="recompute activations in the backward pass: false, true, unsloth (offload layer inputs "
                        "to host memory), dots, long_context (default: %(default)s)")
    f.add_argument("--no-scan-layers", action="store_true",
                   help="run the decoder layers as a Python loop instead of one scan: 3%% faster steps with "
                        "dots on an H200, several times the compile time (8B: 27-55 s against 4-13 s); keep the "
                        "scan for unsloth")
    f.add_argument("--save-steps", type=_positive_int, default=500,
                   help="orbax checkpoint every N steps, and at the end (default: %(default)s)")
    f.add_argument("--logging-steps", type=_positive_int, default=10,
                   help="log every N steps: in the progress bar, or a line each with --no-progress "
                        "(default: %(default)s)")
    f.add_argument("--seed", type=_seed, default=3407, help="LoRA init and data order seed (default: %(default)s)")
    f.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUTPUT/checkpoints (same options as that run)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="answer a prompt with a model and an optional adapter",
                       description="Greedy (or sampled) generation with the KV cache; prints each answer.")
    model_options(g, default=None, default_text=f"the --adapter's base model, else {DEFAULT_MODEL!r}")
    g.add_argument("--adapter", type=_existing_dir, default=None, help="a PEFT LoRA adapter directory")
    g.add_argument("--prompt", required=True, action="append",
                   help="the user message (repeat the option for a batch of prompts)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=128, help="default: %(default)s")
    g.add_argument("--temperature", type=_non_negative, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=_positive_float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--top-k", type=_non_negative_int, default=0, help="sample from the k best tokens (0 = off)")
    g.add_argument("--min-p", type=_non_negative, default=0.0,
                   help="drop tokens below min-p x the top token's probability (0 = off)")
    g.add_argument("--repetition-penalty", type=_positive_float, default=1.0,
                   help="transformers' repetition penalty, greedy decoding too (1 = off)")
    g.add_argument("--seed", type=_seed, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt as raw text instead of a chat user message")

    e = sub.add_parser("export", help="write an adapter, a merged 16-bit checkpoint or a GGUF file",
                       description="Loads the base model and the adapter, then writes --format into --output.")
    model_options(e, default=None, default_text="the base model named in the adapter's adapter_config.json")
    e.add_argument("--adapter", type=_existing_dir, required=True, help="a PEFT LoRA adapter directory")
    e.add_argument("--output", required=True, type=_output_dir, help="output directory")
    e.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                   help="adapter (PEFT directory), merged_16bit (transformers checkpoint with the adapter folded "
                        "in), gguf (llama.cpp file of the merged model)")
    e.add_argument("--save-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="merged_16bit weight dtype (default: %(default)s)")
    e.add_argument("--quantization", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                   help="gguf tensor type (default: %(default)s)")

    d = sub.add_parser("demo", help="the main job: teach SmolLM2-135M-Instruct the bundled Zorbland facts",
                       description="Asks held-out questions, fine-tunes on fastlora_jax/data/zorbland.jsonl, asks "
                                   "again, saves the PEFT adapter and loss curve, and checks that PEFT loads it.")
    d.add_argument("--model", default=DEFAULT_MODEL, help="the base model (default: %(default)s)")
    d.add_argument("--output", type=_output_dir, default="outputs/zorbland-lora",
                   help="where the adapter, the loss curve and the checkpoints go (default: %(default)s)")
    d.add_argument("--max-steps", type=_positive_int, default=15, help="optimizer steps (default: %(default)s)")
    d.add_argument("--batch-size", type=_positive_int, default=4, help="chats per step (default: %(default)s)")
    d.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (default: %(default)s)")
    d.add_argument("--no-peft-check", action="store_true",
                   help="skip loading the saved adapter with PEFT (done only where torch and peft are installed)")
    return parser


# -------------------------------------------------------------------------------------------------- commands

def _dtype(name: str):
    return None if name == "auto" else name


def _load(args, adapter: str | None = None):
    from fastlora_jax import FastLanguageModel

    model_name = args.model if args.model is not None else (adapter or DEFAULT_MODEL)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name, dtype=_dtype(args.dtype),
                                                         load_in_4bit=args.load_in_4bit)
    if adapter is not None and args.model is not None:
        model.load_adapter(adapter)
    return model, tokenizer


def finetune(args) -> int:
    from fastlora_jax import FastLanguageModel, data
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    records = data.load_records(args.data)  # a malformed file fails here, before the model loads
    if not records:
        raise ValueError(f"--data {args.data!r} holds no records")
    config = SFTConfig(output_dir=args.output, max_steps=args.max_steps or -1, num_train_epochs=args.epochs,
                       per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.lr,
                       lr_scheduler_type=args.lr_scheduler, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, logging_steps=args.logging_steps, save_steps=args.save_steps,
                       max_seq_length=args.max_seq_length, packing=args.packing,
                       packing_strategy=args.packing_strategy,
                       train_on_responses_only=True if args.train_on_responses_only else None, seed=args.seed,
                       resume_from_checkpoint=args.resume, disable_tqdm=args.no_progress)
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.max_seq_length,
                                                         dtype=_dtype(args.dtype), load_in_4bit=args.load_in_4bit)
    if tokenizer is None:
        raise ValueError(f"--model {args.model!r} has no tokenizer files; finetune needs one")
    model = FastLanguageModel.get_peft_model(
        model, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules, use_gradient_checkpointing=_checkpointing(args.gradient_checkpointing),
        random_state=args.seed)
    model.model.scan_layers = not args.no_scan_layers
    trainable, total = model.get_nb_trainable_parameters()
    print(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%) on {len(records)} "
          f"records", flush=True)
    result = SFTTrainer(model, tokenizer, train_dataset=records, args=config).train()
    model.save_pretrained(args.output, tokenizer=tokenizer)
    last = result.loss_history[-1] if result.loss_history else (result.global_step, float("nan"))
    print(f"step {last[0]}: loss {last[1]:.4f}; adapter saved in {args.output}"
          + (f", loss curve {result.plot_path}" if result.plot_path else ""), flush=True)
    return 0


def _checkpointing(name: str):
    return {"false": False, "true": True}.get(name, name)


def generate(args) -> int:
    import numpy as np

    from fastlora_jax.generate import for_inference
    from fastlora_jax.generate import generate as generate_ids

    if not args.top_p <= 1.0:
        raise ValueError(f"--top-p {args.top_p}; accepted: a number in (0, 1]")
    if not args.min_p <= 1.0:
        raise ValueError(f"--min-p {args.min_p}; accepted: a number in [0, 1]")
    model, tokenizer = _load(args, args.adapter)
    if tokenizer is None:
        raise ValueError(f"--model {args.model!r} has no tokenizer files; generate needs one")
    use_chat = not args.no_chat_template and getattr(tokenizer, "chat_template", None)
    ids, mask = _left_padded(_prompt_ids(tokenizer, args.prompt, chat=use_chat))
    out = generate_ids(for_inference(model), ids, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, attention_mask=mask,
                       eos_token_id=tokenizer.eos_token_id, seed=args.seed)
    prompt_len = ids.shape[1]
    for i, row in enumerate(np.asarray(out)):
        if i:
            print()
        print(tokenizer.decode(row[prompt_len:], skip_special_tokens=True).strip(), flush=True)
    return 0


def _prompt_ids(tokenizer, prompts: list[str], *, chat: bool) -> list[list[int]]:
    """Each prompt's token ids: a chat user message followed by the generation prompt, or the raw text."""
    if chat:
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        encoded = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, return_dict=True)
    else:
        encoded = tokenizer(prompts)
    rows = [list(row) for row in encoded["input_ids"]]
    empty = [p for p, row in zip(prompts, rows) if not row]
    if empty:
        raise ValueError(f"--prompt {empty[0]!r} encodes to no token; accepted: a prompt with some text")
    return rows


def _left_padded(rows: list[list[int]]):
    """ids, attention mask [B, T] of token lists padded on the left. The tokenizer needs no pad token: generate
    puts its own pad id in the masked slots (0 here), and the answers are decoded from after the prompts."""
    import numpy as np

    width = max(len(row) for row in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return ids, mask


def export(args) -> int:
    model, tokenizer = _load(args, args.adapter)
    if args.format == "adapter":
        model.save_pretrained(args.output, tokenizer=tokenizer)
        where = args.output
    elif args.format == "merged_16bit":
        model.save_pretrained_merged(args.output, tokenizer, save_method="merged_16bit", dtype=args.save_dtype)
        where = args.output
    else:
        where = model.save_pretrained_gguf(args.output, tokenizer, quantization_method=args.quantization)
    print(f"wrote {args.format} to {where}", flush=True)
    return 0


def demo(args) -> int:
    from fastlora_jax import main_job

    main_job.run(main_job.DemoConfig(model=args.model, output_dir=args.output, max_steps=args.max_steps,
                                     batch_size=args.batch_size, learning_rate=args.lr,
                                     peft_check=not args.no_peft_check))
    return 0


COMMANDS = {"finetune": finetune, "generate": generate, "export": export, "demo": demo}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastlora-jax` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"fastlora-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except _ERRORS as error:
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"fastlora-jax {args.command}: error: {type(error).__name__}: {_one_line(message)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
