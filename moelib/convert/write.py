"""One format written from the other: ``export_hf`` (moelib -> Hugging Face) and ``import_hf`` (the reverse)."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from moelib.config import ModelConfig, TrainConfig
from moelib.convert.read import INDEX, open_hf, open_moelib
from moelib.convert.shards import Shards, Unit, staged, write_shards
from moelib.errors import CheckpointError, ConfigError, DataError
from moelib.precision.fp8 import quantize, scale_grid
from moelib.train.checkpoint import FORMAT, MANIFEST, checksum_fields, step_dir
from moelib.train.hf_format import FP8_BLOCK, HF_HIGH_PRECISION, mtp_shared_copies, to_hf_config, to_hf_name
from moelib.train.tokenizer import write_hf_tokenizer

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": list(FP8_BLOCK)}
EXPORT_DTYPES = ("fp32", "bf16", "fp8")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")
DEFAULT_SEED = TrainConfig.seed  # what a new run seeds its initial weights with


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
