"""The main job (`fastlora-jax demo`): SmolLM2-135M-Instruct learns made-up facts about Zorbland with LoRA on CPU.

It asks held-out questions before training, fine-tunes on the bundled `fastlora_jax/data/zorbland.jsonl` with
SFTTrainer, asks them again, saves the PEFT adapter and the loss plot in the output directory and, where torch and
peft are installed, loads the adapter with PEFT over the same base weights and compares the logits.
About 2 to 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import warnings
from importlib import resources

DATASET = "zorbland.jsonl"
HELD_OUT = "zorbland_heldout.jsonl"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo trains. The defaults learn the facts on SmolLM2-135M-Instruct in 15 steps."""

    model: str = "SmolLM2-135M-Instruct"
    output_dir: str = "outputs/zorbland-lora"
    max_steps: int = 15
    batch_size: int = 4
    learning_rate: float = 2e-3
    r: int = 16
    lora_alpha: float = 32.0
    max_seq_length: int = 64
    max_new_tokens: int = 24
    seed: int = 3407
    peft_check: bool = True


def dataset_path(name: str = DATASET) -> str:
    """The path of a bundled dataset file (fastlora_jax/data/NAME)."""
    path = resources.files("fastlora_jax").joinpath("data", name)
    if not path.is_file():
        raise FileNotFoundError(f"bundled dataset {name!r} is missing from {path}")
    return str(path)


def held_out_questions() -> list[tuple[str, str]]:
    """(question, expected answer) pairs never seen in training."""
    with open(dataset_path(HELD_OUT), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def ask(model, tokenizer, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of the model to chat questions (one batch, KV cache)."""
    from fastlora_jax.generate import for_inference, generate

    chats = [[{"role": "user", "content": q}] for q in questions]
    enc = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="np",
                                        return_dict=True)
    out = generate(for_inference(model), enc["input_ids"], max_new_tokens=max_new_tokens,
                   attention_mask=enc["attention_mask"], eos_token_id=tokenizer.eos_token_id)
    prompt_len = enc["input_ids"].shape[1]
    return [tokenizer.decode(row[prompt_len:], skip_special_tokens=True).strip() for row in out.tolist()]


def run(config: DemoConfig = DemoConfig()) -> dict:
    """Runs the demo; returns {"before", "after", "correct_before", "correct_after", "train", "peft_rel_err", ...}."""
    from fastlora_jax import FastLanguageModel
    from fastlora_jax.generate import for_training
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    start = time.perf_counter()
    clock = lambda: f"[{time.perf_counter() - start:5.0f} s]"  # noqa: E731
    pairs = held_out_questions()
    questions, expected = [q for q, _ in pairs], [a for _, a in pairs]

    print(f"{clock()} loading {config.model} ...", flush=True)
    model, tokenizer = FastLanguageModel.from_pretrained(config.model, max_seq_length=config.max_seq_length)
    if tokenizer is None:
        raise ValueError(f"{config.model!r} has no tokenizer; the demo needs one with a chat template")
    base_tensors = _base_tensors(model) if config.peft_check and _peft_available() else None

    print(f"{clock()} answers BEFORE fine-tuning (questions not in the training data):", flush=True)
    before = ask(model, tokenizer, questions, config.max_new_tokens)
    _print_answers(questions, before)

    model = FastLanguageModel.get_peft_model(model, r=config.r, lora_alpha=config.lora_alpha,
                                             target_modules=list(TARGET_MODULES), lora_dropout=0.0,
                                             use_gradient_checkpointing=False, random_state=config.seed)
    for_training(model)
    trainable, total = model.get_nb_trainable_parameters()
    data = dataset_path()
    print(f"{clock()} fine-tuning {trainable:,} LoRA parameters ({100 * trainable / total:.2f}% of {total:,}) on "
          f"{data} for {config.max_steps} steps of {config.batch_size} chats ...", flush=True)
    args = SFTConfig(output_dir=config.output_dir, max_steps=config.max_steps,
                     per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
                     lr_scheduler_type="linear", logging_steps=1, save_steps=config.max_steps,
                     save_total_limit=1, max_seq_length=config.max_seq_length, train_on_responses_only=True,
                     seed=config.seed)
    result = SFTTrainer(model, tokenizer, train_dataset=data, args=args).train()
    losses = result.loss_history
    print(f"{clock()} loss {losses[0][1]:.3f} (step 1) -> {losses[-1][1]:.3f} (step {losses[-1][0]}), "
          f"{result.metrics['train_tokens_per_second']:.0f} tokens/s", flush=True)

    print(f"{clock()} answers AFTER fine-tuning:", flush=True)
    after = ask(model, tokenizer, questions, config.max_new_tokens)
    _print_answers(questions, after)
    model.save_pretrained(config.output_dir, tokenizer=tokenizer)
    print(f"{clock()} saved the PEFT adapter in {config.output_dir}/ (adapter_config.json, "
          f"adapter_model.safetensors) and the loss curve {result.plot_path}", flush=True)

    peft_rel_err = None
    if base_tensors is not None:
        peft_rel_err = _peft_check(model, tokenizer, base_tensors, config.output_dir, questions[0])
        print(f"{clock()} PEFT loads the adapter: logits of PeftModel(transformers Llama) vs fastlora-jax, "
              f"relative error {peft_rel_err:.1e}", flush=True)
    elif config.peft_check:
        print(f"{clock()} torch / peft not installed: skipped the PEFT load check", flush=True)

    score = lambda answers: sum(a.strip() == e for a, e in zip(answers, expected))  # noqa: E731
    summary = dict(before=before, after=after, expected=expected, correct_before=score(before),
                   correct_after=score(after), losses=losses, plot_path=result.plot_path,
                   output_dir=config.output_dir, peft_rel_err=peft_rel_err, seconds=time.perf_counter() - start)
    print(f"{clock()} exact held-out answers: {summary['correct_before']}/{len(expected)} before, "
          f"{summary['correct_after']}/{len(expected)} after", flush=True)
    return summary


def _print_answers(questions: list[str], answers: list[str]) -> None:
    for q, a in zip(questions, answers):
        print(f"  Q: {q}\n  A: {a}", flush=True)


def _peft_available() -> bool:
    from importlib.util import find_spec

    return find_spec("torch") is not None and find_spec("peft") is not None


def _base_tensors(model) -> dict:
    """The base weights as a transformers state dict (HF keys, float32 numpy), taken before LoRA is added."""
    import numpy as np

    from fastlora_jax.converters import merge

    return {key: np.array(value) for key, value in merge.merged_tensors(model)}  # writable copies for torch


def _peft_check(model, tokenizer, base_tensors: dict, adapter_dir: str, question: str) -> float:
    """Loads the saved adapter with PEFT over a transformers Llama holding the same base weights; returns the
    relative error of its logits on one chat prompt against this model's."""
    import numpy as np
    import torch

    # bitsandbytes (imported by peft) warns that its optional CPU kernels package is absent; not used here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(**model.config.to_hf_config()))
    missing, unexpected = base.load_state_dict({k: torch.from_numpy(v) for k, v in base_tensors.items()},
                                               strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"PEFT check: base weights do not fit transformers' Llama (missing {missing}, "
                         f"unexpected {unexpected})")
    with warnings.catch_warnings():  # transformers / peft deprecation notices about their own internals
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(base.eval(), adapter_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="np", return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = peft_model(torch.from_numpy(np.asarray(ids))).logits.float().numpy()
    ours = np.asarray(model(ids), np.float32)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def main(argv: list[str] | None = None) -> int:
    """`python -m fastlora_jax.main_job [options]` = `fastlora-jax demo [options]`."""
    from fastlora_jax import cli

    return cli.main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
