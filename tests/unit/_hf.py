"""A model written as a Hugging Face DeepSeek-V3 directory (config.json + one safetensors file)."""

import json
from pathlib import Path

from safetensors.torch import save_file

from moelib.train.hf_format import to_hf_config, to_hf_state_dict


def write_hf(model, path: Path) -> Path:
    tensors = {k: v.contiguous().clone() for k, v in to_hf_state_dict(model.state_dict(), model.cfg)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(to_hf_config(model.cfg, "float32")))
    return path
