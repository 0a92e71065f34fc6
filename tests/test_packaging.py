"""The repository checkout as a working directory: its kernels/ folder (installed as fastlora_jax.kernels) must not
hide Hugging Face's `kernels` package, which transformers and peft import."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels package is absent")
def test_python_started_in_the_repository_root_imports_hugging_faces_kernels():
    script = ("import kernels, fastlora_jax.kernels as ours; "
              "print(kernels.__file__); print(ours.__file__); print(callable(ours.lora_linear))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    theirs, ours, callable_ = out.stdout.split()
    assert not theirs.startswith(ROOT + os.sep) and callable_ == "True"
    assert ours != theirs  # fastlora_jax.kernels is still this repository's
