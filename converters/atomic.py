"""Crash-safe writes: every file is written under a temporary name and renamed into place.

An interrupted save (an exception, a killed process) never leaves a half-written file under a name that loads.
`staged_directory` builds a whole checkpoint directory beside the target and moves its files in only once every
file is complete; `atomic_file` does the same for one file; `write_safetensors` streams tensors into a
safetensors file one at a time (the header is computed from the tensor specs first, so no tensor is held twice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
import struct
import tempfile
from typing import IO, Any, Iterable, Iterator, Sequence

import numpy as np

# numpy dtype name -> safetensors dtype tag
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file beside `path`; on a clean exit it is flushed, fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` keeps its previous content (or stays absent).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file: mode={mode!r}; accepted: 'wb', 'w'")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are readable like ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON as transformers and PEFT write it (indent 2, sorted keys, trailing newline)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, *, commit_last: Sequence[str] = (),
                     stale: Sequence[str] = ()) -> Iterator[str]:
    """Yields an empty staging directory beside `target`; fill it, and on a clean exit its files move into `target`.

    A missing `target` is created by renaming the staging directory (atomic). An existing `target` keeps its other
    files: each staged file replaces its namesake with one `os.replace` (atomic per file), the names in
    `commit_last` last (the file that makes the directory loadable, e.g. config.json), and files of `target`
    matching a glob in `stale` that this save did not write are removed afterwards (e.g. the shards of an older,
    bigger checkpoint). On an exception the staging directory is deleted and `target` is untouched.
    """
    target = os.path.abspath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"save directory {target!r} exists and is a file")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=parent)
    try:
        yield stage
        _commit(stage, target, commit_last, stale)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: str, target: str, commit_last: Sequence[str], stale: Sequence[str]) -> None:
    names = sorted(os.listdir(stage), key=lambda n: (n in commit_last, commit_last.index(n) if n in commit_last
                                                     else 0, n))
    for name in names:
        if os.path.isdir(os.path.join(stage, name)):
            raise IsADirectoryError(f"staged_directory: {name!r} is a directory; only flat checkpoints are staged")
        os.chmod(os.path.join(stage, name), 0o644)
    if not os.path.exists(target):
        os.chmod(stage, 0o755)
        os.replace(stage, target)
        return
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(target, name))
    written = set(names)
    for name in os.listdir(target):
        if name not in written and any(fnmatch.fnmatch(name, pattern) for pattern in stale):
            os.remove(os.path.join(target, name))


# --------------------------------------------------------------------------------------------- safetensors

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be before it is computed: its key, shape and numpy dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header (padded to 8 bytes) for tensors stored in `specs` order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        name = np.dtype(spec.dtype).name
        if name not in SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.key}: dtype {name} cannot be stored in safetensors; accepted: "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        if spec.key in header:
            raise ValueError(f"duplicate tensor key {spec.key!r}")
        header[spec.key] = {"dtype": SAFETENSORS_DTYPES[name], "shape": [int(d) for d in spec.shape],
                            "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | os.PathLike, specs: Sequence[TensorSpec], arrays: Iterable[np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Streams `arrays` (one per spec, same order, computed lazily) into a safetensors file, atomically.

    Raises ValueError if an array does not match its spec or the iterator yields too few or too many arrays; the
    file is then not created (or keeps its previous content).
    """
    with atomic_file(path, "wb") as f:
        f.write(safetensors_header(specs, metadata))
        iterator = iter(arrays)
        for spec in specs:
            array = next(iterator, None)
            if array is None:
                raise ValueError(f"write_safetensors: the arrays ended before {spec.key!r}")
            array = np.asarray(array)
            if tuple(array.shape) != tuple(spec.shape) or array.dtype != np.dtype(spec.dtype):
                raise ValueError(f"{spec.key}: got {array.dtype}{list(array.shape)}, "
                                 f"header says {np.dtype(spec.dtype)}{list(spec.shape)}")
            if array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("<"))
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        if next(iterator, None) is not None:
            raise ValueError("write_safetensors: more arrays than specs")


def save_tensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                 metadata: dict[str, str] | None = None) -> None:
    """A dict of host arrays -> one safetensors file (atomically), keys in sorted order."""
    keys = sorted(tensors)
    arrays = [np.asarray(tensors[k]) for k in keys]
    specs = [TensorSpec(k, tuple(a.shape), a.dtype) for k, a in zip(keys, arrays)]
    write_safetensors(path, specs, arrays, metadata)
