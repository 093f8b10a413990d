"""safetensors shards read and written one tensor at a time, and output directories that appear only whole.

A shard is read at its header's offsets (no mmap, no pickle) and written incrementally: its header is known
from the plan, so tensors are appended as they are produced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moelib.errors import CheckpointError, ConfigError
from moelib.train.checkpoint import tensor_checksum

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEADER = 100 * 2**20  # safetensors' own limit; a larger length means a corrupt file


# -- safetensors, one tensor at a time --------------------------------------------------------------------------

class TensorFile:
    """A safetensors file whose header is validated on open and whose tensors are read one by one."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
                if not 0 < n <= min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{path}: truncated or not a safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: shard file is missing") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (lo, hi) = _DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name} has a malformed header entry {e!r}") from None
            if hi - lo != _numel(shape) * dtype.itemsize:
                raise CheckpointError(f"{path}: tensor {name} spans {hi - lo} bytes, but {e['dtype']} "
                                      f"{list(shape)} needs {_numel(shape) * dtype.itemsize}")
            self.specs[name] = (dtype, shape, lo, hi)
        end = max((s[3] for s in self.specs.values()), default=0)
        if self.start + end > size:
            raise CheckpointError(f"{path}: truncated: the header describes {end} bytes of tensor data, "
                                  f"the file holds {size - self.start}")
        self._file = None

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, lo, hi = self.specs[name]
        out = torch.empty(shape, dtype=dtype)
        if hi > lo:
            if self._file is None:
                self._file = open(self.path, "rb")  # kept open across reads
            self._file.seek(self.start + lo)
            if self._file.readinto(out.view(-1).view(torch.uint8).numpy()) != hi - lo:
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name}")
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ShardWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes) are declared up front, then appended
    in that order, so a shard never has to sit in memory."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        self.specs, self.done = specs, 0
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, tensor: torch.Tensor) -> None:
        name, dtype, shape = self.specs[self.done]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: planned {dtype} {shape}, produced {tensor.dtype} {tuple(tensor.shape)}")
        if tensor.numel():
            self.file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self.done += 1

    def close(self) -> None:
        self.file.close()


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Shards:
    """Tensors spread over safetensors files by a name -> file map (a moelib manifest or an HF index).

    Opening validates every file and that each name the map gives is in its file; ``verify(name, tensor)``,
    when given, checks every tensor read (a moelib manifest's checksums)."""

    def __init__(self, root: Path, weight_map: dict[str, str], index_name: str,
                 verify: Callable[[str, torch.Tensor], None] | None = None):
        self.root, self.index_name, self.verify = root, index_name, verify
        self.files = {f: TensorFile(root / f) for f in sorted(set(weight_map.values()))}
        self.where = {}
        for name, f in weight_map.items():
            if name not in self.files[f].specs:
                raise CheckpointError(f"{root / f}: tensor {name}, which {index_name} maps to this shard, "
                                      "is not in it")
            self.where[name] = self.files[f]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self.where[name].specs[name]
        return dtype, shape

    def nbytes(self, name: str) -> int:
        _, _, lo, hi = self.where[name].specs[name]
        return hi - lo

    def get(self, name: str) -> torch.Tensor:
        tensor = self.where[name].get(name)
        if self.verify is not None:
            self.verify(name, tensor)
        return tensor

    def check(self, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] = _FLOATS) -> None:
        dtype, have = self.spec(name)
        path = self.where[name].path
        if have != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {list(have)}, but the model config needs "
                                  f"{list(shape)}")
        if dtype not in dtypes:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, expected one of "
                                  f"{', '.join(str(d) for d in dtypes)}")

    def close(self) -> None:
        for f in self.files.values():
            f.close()


# -- planning and writing ---------------------------------------------------------------------------------------

@dataclass
class Unit:
    """Output tensors produced together (an FP8 weight and its scales come from one quantisation)."""

    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    make: Callable[[], list[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(_numel(shape) * dtype.itemsize for _, dtype, shape in self.outputs)


def write_shards(units: list[Unit], out: Path, max_shard_bytes: int, desc: str,
                 progress: bool, checksums: dict[str, str] | None = None) -> dict[str, str]:
    """Pack units in order into shards of at most ``max_shard_bytes`` (a larger unit gets its own) and write
    them; returns output name -> shard file. ``checksums``, when given, receives each tensor's checksum."""
    groups: list[list[Unit]] = []
    size = 0
    for u in units:
        if not groups or (size + u.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.nbytes
    weight_map = {}
    n_tensors = sum(len(u.outputs) for u in units)
    bar = tqdm(total=sum(u.nbytes for u in units), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=not progress, dynamic_ncols=True)
    done = 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(out / fname, [o for u in group for o in u.outputs])
        try:
            for u in group:
                for (name, _, _), t in zip(u.outputs, u.make()):
                    writer.write(t)
                    if checksums is not None:
                        checksums[name] = tensor_checksum(t)
                for name, _, _ in u.outputs:
                    weight_map[name] = fname
                done += len(u.outputs)
                bar.update(u.nbytes)
                bar.set_postfix_str(f"{done}/{n_tensors} tensors", refresh=False)
        finally:
            writer.close()
    bar.close()
    return weight_map


@contextmanager
def staged(final: Path, overwrite: bool):
    """A fresh directory next to ``final`` that becomes ``final`` when the block succeeds and is removed when
    it fails, so nothing half-written ever appears under the output name."""
    final = Path(final)
    if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
        raise CheckpointError(f"{final}: output exists and is not empty (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20 (the units of transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size: {text!r} is not a positive size such as 5GB or 512MiB")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)
