"""Streaming conversion between moelib checkpoints and the Hugging Face DeepSeek-V3 / DeepSeek-V2 layouts.

Both directions read one tensor at a time from safetensors shards (plain reads at the header's offsets, no
mmap, no pickle) and write each output shard incrementally: its header is known from the plan, so tensors
are appended as they are produced. Peak host memory is therefore a few copies of the largest tensor, not a
shard, let alone the model. Everything is validated (files, headers, names, shapes, dtypes) before the
first byte is written, and the output is assembled under a temporary name and renamed at the end.

moelib checkpoints are layout-free: the manifest maps global tensor names to shards, whichever
pipeline/expert-parallel layout wrote them, so no resharding step exists or is needed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from moelib.config import ModelConfig, TrainConfig
from moelib.errors import CheckpointError, ConfigError, DataError
from moelib.precision.fp8 import dequantize, quantize, scale_grid
from moelib.train.checkpoint import FORMAT, MANIFEST, CheckpointReader, checksum_fields, step_dir, tensor_checksum
from moelib.train.hf_format import (
    FP8_BLOCK,
    HF_HIGH_PRECISION,
    from_hf_config,
    is_hf_mtp,
    mtp_shared_copies,
    to_hf_config,
    to_hf_name,
)
from moelib.train.tokenizer import write_hf_tokenizer

log = logging.getLogger("moelib")

INDEX = "model.safetensors.index.json"
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": list(FP8_BLOCK)}
EXPORT_DTYPES = ("fp32", "bf16", "fp8")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_SEED = TrainConfig.seed  # what a new run seeds its initial weights with
_MAX_HEADER = 100 * 2**20  # safetensors' own limit; a larger length means a corrupt file


# -- safetensors, one tensor at a time ------------------------------------------------------------------------

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


def _copy_tokenizer(dirs: Iterable[Path], out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        for d in dirs:
            if (d / name).is_file():
                shutil.copy2(d / name, out / name)
                copied.append(name)
                break
    return copied


def _tokenizer_config(out: Path, cfg: ModelConfig) -> None:
    """Add what AutoTokenizer needs beside a copied tokenizer.json; one it cannot parse is exported as it is."""
    try:
        write_hf_tokenizer(out / "tokenizer.json", out, cfg.max_position_embeddings)
    except DataError as e:
        warnings.warn(f"{e} The export holds it unchanged, without a tokenizer_config.json.", stacklevel=2)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """moelib tensor name -> shape of the full model (built on the meta device: no memory)."""
    from moelib.model.transformer import build_model

    return {k: tuple(v.shape) for k, v in build_model(cfg, "fp32", device="meta").state_dict().items()}


def _is_fp8_weight(hf_name: str, shape: tuple[int, ...]) -> bool:
    """The tensors the FP8 release quantises: every 2-D Linear weight but the high-precision ones."""
    return len(shape) == 2 and hf_name.endswith(".weight") and not hf_name.endswith(HF_HIGH_PRECISION)


def _hf_order(hf_name: str) -> tuple:
    """Embedding first, then layer by layer (so each layer lands in as few shards as possible), head last."""
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    if m:
        return 1, int(m.group(1)), hf_name
    return (0 if "embed_tokens" in hf_name else 2), 0, hf_name


# -- moelib -> Hugging Face -------------------------------------------------------------------------------------

def open_moelib(path: str | os.PathLike, ema: bool = False) -> tuple[CheckpointReader, ModelConfig, Shards,
                                                                     dict[str, str]]:
    """(reader, config, shards, model name -> stored name) of a moelib checkpoint, every tensor checked."""
    reader = CheckpointReader(path)
    manifest = reader.path / MANIFEST
    if not isinstance(reader.manifest.get("model"), dict):
        raise CheckpointError(f"{manifest}: no 'model' config")
    cfg = ModelConfig.from_dict(reader.manifest["model"])
    shards = Shards(reader.path, reader.weight_map, MANIFEST, verify=reader.verify)
    if ema and not any(k.startswith("ema.") for k in reader.weight_map):
        raise CheckpointError(f"{manifest}: --ema asked for, but the checkpoint holds no ema.* tensors")
    source = {}
    for name, shape in expected_shapes(cfg).items():
        stored = f"ema.{name}" if ema and f"ema.{name}" in shards else name
        if stored not in shards:
            raise CheckpointError(f"{manifest}: tensor {stored} is missing from the checkpoint")
        shards.check(stored, shape)
        source[name] = stored
    return reader, cfg, shards, source


def _export_unit(shards: Shards, hf_name: str, stored: str, dtype: str) -> Unit:
    _, shape = shards.spec(stored)
    if dtype == "fp8" and _is_fp8_weight(hf_name, shape):
        def make() -> list[torch.Tensor]:
            w, parts = shards.get(stored), []
            # 128-row slabs bound quantize()'s fp32 temporaries to a slice of the tensor.
            for i in range(0, shape[0], 16 * FP8_BLOCK[0]):
                parts.append(quantize(w[i:i + 16 * FP8_BLOCK[0]], FP8_BLOCK, name=hf_name))
            return [torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])]
        return Unit([(hf_name, torch.float8_e4m3fn, shape),
                     (f"{hf_name}_scale_inv", torch.float32, scale_grid(shape, FP8_BLOCK))], make)
    out = torch.float32 if dtype == "fp32" or hf_name.endswith("e_score_correction_bias") else torch.bfloat16
    return Unit([(hf_name, out, shape)], lambda: [shards.get(stored).to(out)])


def export_hf(load: str | os.PathLike, save: str | os.PathLike, dtype: str = "bf16", ema: bool = False,
              max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, progress: bool = False) -> Path:
    """Write a moelib checkpoint (any layout) as a Hugging Face DeepSeek-V3 directory (DeepSeek-V2 for V2's
    routing); returns its path."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    reader, cfg, shards, source = open_moelib(load, ema)
    try:
        hf_config = to_hf_config(cfg, "float32" if dtype == "fp32" else "bfloat16")
        if dtype == "fp8":
            hf_config["quantization_config"] = dict(QUANTIZATION_CONFIG)
        if hf_config["model_type"] == "deepseek_v2":
            source = _without_router_bias(shards, source, reader.path / MANIFEST)
        units = [_export_unit(shards, to_hf_name(name, cfg), stored, dtype) for name, stored in source.items()]
        units += [_export_unit(shards, hf, source[name], dtype) for hf, name in mtp_shared_copies(cfg).items()]
        units.sort(key=lambda u: _hf_order(u.outputs[0][0]))
        with staged(Path(save), overwrite) as tmp:
            weight_map = write_shards(units, tmp, max_shard_bytes, f"export {dtype}", progress)
            total = sum(u.nbytes for u in units)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            copied = _copy_tokenizer([reader.path, reader.path.parent], tmp)
            if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
                _tokenizer_config(tmp, cfg)
    finally:
        shards.close()
    return Path(save)


def _without_router_bias(shards: Shards, source: dict[str, str], manifest: Path) -> dict[str, str]:
    """``source`` less the router biases, which deepseek_v2 does not have: only all-zero ones can go."""
    for name, stored in source.items():
        if name.endswith("e_score_correction_bias") and shards.get(stored).any():
            raise CheckpointError(f"{manifest}: tensor {stored} is not zero, and the deepseek_v2 format has no "
                                  "router bias to hold it (train V2 models with bias_update_speed 0 to export them)")
    return {k: v for k, v in source.items() if not k.endswith("e_score_correction_bias")}


# -- Hugging Face -> moelib -------------------------------------------------------------------------------------

def open_hf(path: str | os.PathLike, drop_mtp: bool = False,
            mtp_seed: int | None = None) -> tuple[ModelConfig, Shards, list[Unit]]:
    """(config, shards, units producing fp32 moelib tensors) of an HF DeepSeek-V3/V2 directory, all checked.

    ``drop_mtp``: leave the MTP modules out (config and tensors). MTP layers that config.json declares but no
    shard holds (transformers never saves them) draw one warning; with ``mtp_seed`` they are initialised as
    a new run with that seed would, without it the model comes without them."""
    root = Path(path)
    config_path = root / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: missing (not a Hugging Face model directory)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: unreadable ({e})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    declared = from_hf_config(hf_config, str(config_path))
    v2 = hf_config["model_type"] == "deepseek_v2"
    if (root / INDEX).is_file():
        try:
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{root / INDEX}: unreadable index ({e})") from None
        index_name = INDEX
    elif (root / "model.safetensors").is_file():
        index_name = "model.safetensors"
        weight_map = {name: index_name for name in TensorFile(root / index_name).specs}
    else:
        raise CheckpointError(f"{root}: neither {INDEX} nor model.safetensors is there")
    shards = Shards(root, weight_map, index_name)
    expected = expected_shapes(declared)
    wanted = {to_hf_name(name, declared): name for name in expected}
    known = set(wanted) | set(mtp_shared_copies(declared)) | {f"{n}_scale_inv" for n in wanted}
    for hf in weight_map:
        if hf not in known:
            raise CheckpointError(f"{shards.where[hf].path}: tensor {hf} is not part of the model {config_path} "
                                  "describes")
    absent = declared.num_nextn_predict_layers > 0 and not any(is_hf_mtp(hf, declared) for hf in weight_map)
    if absent:
        _warn_mtp_absent(root, declared, index_name, "dropped (--no-mtp)" if drop_mtp else "absent from the model"
                         if mtp_seed is None else f"freshly initialised with seed {mtp_seed}")
    cfg = declared
    if drop_mtp or (absent and mtp_seed is None):
        cfg = dataclasses.replace(declared, num_nextn_predict_layers=0)
    for hf, source in mtp_shared_copies(cfg).items():
        if hf in shards:
            shards.check(hf, expected[source])
    units = []
    for name, shape in expected_shapes(cfg).items():
        hf = to_hf_name(name, cfg)
        if absent and name.startswith("mtp."):
            make = partial(_fresh, name, shape, cfg.init_std, mtp_seed)
        elif hf not in shards and name.endswith("e_score_correction_bias") and v2:
            make = partial(_fresh, name, shape, cfg.init_std, 0)  # zero: DeepSeek-V2 has no selection bias
        elif hf not in shards:
            raise CheckpointError(f"{root}: tensor {hf} is missing (named by no shard in {index_name})")
        elif shards.spec(hf)[0] == torch.float8_e4m3fn:
            shards.check(hf, shape, (torch.float8_e4m3fn,))
            scale = f"{hf}_scale_inv"
            if scale not in shards:
                raise CheckpointError(f"{shards.where[hf].path}: FP8 tensor {hf} has no {scale}")
            shards.check(scale, scale_grid(shape, FP8_BLOCK), (torch.float32, torch.bfloat16))
            make = partial(_dequantized, shards, hf, scale)
        else:
            shards.check(hf, shape)
            make = partial(_as_fp32, shards, hf)
        units.append(Unit([(name, torch.float32, shape)], make))
    return cfg, shards, units


def _warn_mtp_absent(root: Path, cfg: ModelConfig, index_name: str, what: str) -> None:
    first, n = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    layers = f"model.layers.{first}" + (f"-{first + n - 1}" if n > 1 else "")
    log.warning(f"{root}: config.json declares {n} MTP layer(s) ({layers}.*) that no shard in {index_name} holds; "
                f"the MTP modules are {what}")


def _fresh(name: str, shape: tuple[int, ...], std: float, seed: int) -> list[torch.Tensor]:
    from moelib.model.transformer import init_tensor

    return [init_tensor(torch.empty(shape), name, std, seed)]


def _dequantized(shards: Shards, name: str, scale: str) -> list[torch.Tensor]:
    return [dequantize(shards.get(name), shards.get(scale).float(), FP8_BLOCK)]


def _as_fp32(shards: Shards, name: str) -> list[torch.Tensor]:
    return [shards.get(name).float()]


def import_hf(load: str | os.PathLike, save: str | os.PathLike, max_shard_bytes: int = 5 * 10**9,
              overwrite: bool = False, progress: bool = False, no_mtp: bool = False,
              seed: int = DEFAULT_SEED) -> Path:
    """Write an HF DeepSeek-V3/V2 directory (fp32, bf16 or FP8, dequantised on CPU) as a moelib checkpoint root
    holding step 0 and ``latest``; returns the step directory.

    The weights are fp32 (moelib's master dtype). The manifest has no training state ("train"), which tells
    v3_pretrain --load to start a fresh optimizer and data stream from these weights. MTP modules config.json
    declares but no shard holds start as a new run seeded with ``seed`` would start them; ``no_mtp`` drops
    the MTP modules instead."""
    cfg, shards, units = open_hf(load, drop_mtp=no_mtp, mtp_seed=seed)
    try:
        final = step_dir(save, 0)
        with staged(Path(save), overwrite) as tmp:
            step = tmp / final.name
            step.mkdir()
            checksums: dict[str, str] = {}
            weight_map = write_shards(units, step, max_shard_bytes, "import", progress, checksums)
            manifest = {"format": FORMAT, "step": 0, "model": cfg.to_dict(), "weight_map": weight_map,
                        **checksum_fields(checksums), "source": {"hf_dir": str(Path(load).resolve())}}
            (step / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            _copy_tokenizer([Path(load)], step)
            (tmp / "latest").write_text(f"{final.name}\n")
    finally:
        shards.close()
    return final


# -- loading for inference --------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike):
    """A CPU model in eval mode from a moelib checkpoint (step directory or root) or an HF DeepSeek-V3/V2
    directory (without the MTP modules when no shard holds them); calling it on input_ids [B, T] returns the
    main model's logits [B, T, vocab]."""
    from moelib.model.transformer import build_model

    path = Path(path)
    if (path / "config.json").is_file() and not (path / MANIFEST).is_file():
        cfg, shards, units = open_hf(path)
        try:
            state = {u.outputs[0][0]: u.make()[0] for u in units}
        finally:
            shards.close()
    else:
        _, cfg, shards, source = open_moelib(path)
        try:
            state = {name: shards.get(stored) for name, stored in source.items()}
        finally:
            shards.close()
    model = build_model(cfg, "fp32", seed=0)
    model.load_state_dict(state)
    return model.eval()

