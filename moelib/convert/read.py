"""A moelib checkpoint or an HF DeepSeek-V3/V2 directory opened for reading, every file, name, shape and dtype
checked against the model before anything is written."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from functools import partial
from pathlib import Path

import torch

from moelib.config import ModelConfig
from moelib.convert.shards import Shards, TensorFile, Unit
from moelib.errors import CheckpointError
from moelib.precision.fp8 import dequantize, scale_grid
from moelib.train.checkpoint import MANIFEST, CheckpointReader
from moelib.train.hf_format import FP8_BLOCK, from_hf_config, is_hf_mtp, mtp_shared_copies, to_hf_name

log = logging.getLogger("moelib")

INDEX = "model.safetensors.index.json"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """moelib tensor name -> shape of the full model (built on the meta device: no memory)."""
    from moelib.model.transformer import build_model

    return {k: tuple(v.shape) for k, v in build_model(cfg, "fp32", device="meta").state_dict().items()}


# -- moelib -----------------------------------------------------------------------------------------------------

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


# -- Hugging Face -----------------------------------------------------------------------------------------------

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
