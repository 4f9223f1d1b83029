"""Safetensors reading and streaming writing, with peak memory about one tensor chunk, never the model.

Reading goes through the `safetensors` library (`safe_open`, lazily, one tensor or row range at a time; the file
is reopened per read so that no mapping of the whole file stays resident).

Writing is done here because `safetensors.torch.save_file` needs every tensor of a shard in memory at once. The
format is simple and stable (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length, a JSON header mapping each name to {dtype, shape, data_offsets}, then the raw little-endian bytes. Since a
converter knows every output tensor's name, shape and dtype before it computes any of them, it writes the header
first and streams each tensor's bytes in row chunks. Files written here are read back with `safe_open` in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from trtfalcon.dtypes import FLOAT_NAMES, lookup
from trtfalcon.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def torch_dtype(name: str) -> torch.dtype:
    return lookup(name, among=FLOAT_NAMES, error=CheckpointError).torch


# ----------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class SafetensorsReader:
    """Lazy view of a single-file or sharded (index.json) safetensors checkpoint. Refuses pickle weights."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        files = self._find_files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for info in _read_header(f):
                if info.name in self.tensors:
                    raise CheckpointError(f"{f}: tensor '{info.name}' also appears in {self.tensors[info.name].file}")
                self.tensors[info.name] = info

    def _find_files(self) -> list[Path]:
        d = self.directory
        index = d / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted({d / str(v) for v in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index}: names shard '{f.name}', which is missing from {d}")
            self._index_map = {k: d / str(v) for k, v in weight_map.items()}
            return files
        self._index_map = None
        if (d / SINGLE_NAME).is_file():
            return [d / SINGLE_NAME]
        shards = sorted(d.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{d}: only pickle weights found ({', '.join(pickles[:3])}). trtfalcon loads safetensors only: "
                "unpickling runs arbitrary code from the file. Convert them once in a trusted environment, e.g. "
                "`FalconH1ForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
            )
        raise CheckpointError(f"{d}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors found")

    def check_index(self) -> None:
        """Every tensor the index names must be in the shard it names."""
        if self._index_map is None:
            return
        for name, f in self._index_map.items():
            info = self.tensors.get(name)
            if info is None or info.file != f:
                raise CheckpointError(f"{self.directory / INDEX_NAME}: says '{name}' is in {f.name}, but it is not")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing")
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        try:
            with safe_open(info.file, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}' ({e})") from e

    def get_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a tensor along dim 0, reading only those bytes."""
        info = self.info(name)
        try:
            with safe_open(info.file, framework="pt") as f:
                return f.get_slice(name)[start:end]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{info.file}: cannot read rows {start}:{end} of '{name}' ({e})") from e

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in {i.file for i in self.tensors.values()})


def _read_header(path: Path) -> list[TensorInfo]:
    """Parse and sanity-check one file's header; a truncated or corrupt file fails here, before any work."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated (file of {size} bytes has no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size})")
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = lookup(meta["dtype"], "safetensors", what=f"{path}: tensor '{name}' dtype",
                           error=CheckpointError).torch
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor '{name}' has an invalid header entry {meta!r}") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * torch.empty((), dtype=dtype).element_size():
            raise CheckpointError(f"{path}: tensor '{name}' header size does not match shape {shape} and dtype")
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} of the data section, "
                f"which has only {data_len} bytes"
            )
        out.append(TensorInfo(name, path, shape, dtype))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor known before it is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


Producer = Callable[[TensorSpec], Iterable[torch.Tensor]]


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_sharded(
    out_dir: Path,
    specs: list[TensorSpec],
    produce: Producer,
    max_shard_bytes: int = 2 * 2**30,
    on_tensor: Callable[[TensorSpec], None] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `specs` as shards + index into out_dir. `produce(spec)` yields the tensor in dim-0 pieces."""
    shards = plan_shards(specs, max_shard_bytes)
    names = (
        [SINGLE_NAME] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        _write_file(out_dir / fname, shard, produce, on_tensor, metadata)
        weight_map.update({s.name: fname for s in shard})
    if len(shards) > 1:
        total = sum(s.nbytes for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_file(
    path: Path, specs: list[TensorSpec], produce: Producer,
    on_tensor: Callable[[TensorSpec], None] | None, metadata: dict[str, str] | None,
) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": lookup(s.dtype, "torch").safetensors, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((-len(hbytes)) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hbytes)))
        fh.write(hbytes)
        for s in specs:
            written = 0
            for piece in produce(s):
                if piece.dtype != s.dtype or tuple(piece.shape[1:]) != tuple(s.shape[1:]):
                    raise CheckpointError(
                        f"internal: tensor '{s.name}' piece has dtype {piece.dtype} shape {tuple(piece.shape)}, "
                        f"expected {s.dtype} rows of {tuple(s.shape[1:])}"
                    )
                buf = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                fh.write(memoryview(buf))
                written += buf.nbytes
            if written != s.nbytes:
                raise CheckpointError(f"internal: tensor '{s.name}' produced {written} bytes, expected {s.nbytes}")
            if on_tensor is not None:
                on_tensor(s)


def row_chunks(num_rows: int, row_bytes: int, budget: int = 64 * 2**20) -> Iterator[tuple[int, int]]:
    """[start, end) row ranges whose fp32 working copy stays under `budget` bytes."""
    step = max(1, budget // max(1, row_bytes))
    for start in range(0, num_rows, step):
        yield start, min(num_rows, start + step)


# ----------------------------------------------------------------------------------------------------------------
# Atomic output directories


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside out_dir; rename it into place only if the block succeeds.

    On any failure the temp dir is removed, so a failed stage leaves nothing half written. An existing,
    non-empty out_dir is an error unless overwrite is set (then it is replaced only after success).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists and is not empty (pass --overwrite to replace it)")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
        # mkdtemp makes the directory 0700 and the rename keeps that; an artifact must be readable like any
        # directory the user makes (a Triton server running as another user reads model repositories).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot create output directory ({e.strerror})") from e
    try:
        yield tmp
        if out_dir.exists():
            old = parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_differs(input_dir: str | Path, out_dir: str | Path) -> None:
    """A stage may not write over its own input: atomic_output_dir would replace the directory being read."""
    if Path(input_dir).resolve() == Path(out_dir).resolve():
        raise CheckpointError(f"{out_dir}: the output directory must differ from the input checkpoint")
