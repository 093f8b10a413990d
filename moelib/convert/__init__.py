"""Streaming conversion between moelib checkpoints and the Hugging Face DeepSeek-V3 / DeepSeek-V2 layouts.

Both directions read one tensor at a time from safetensors shards (plain reads at the header's offsets, no
mmap, no pickle) and write each output shard incrementally: its header is known from the plan, so tensors
are appended as they are produced. Peak host memory is therefore a few copies of the largest tensor, not a
shard, let alone the model. Everything is validated (files, headers, names, shapes, dtypes) before the
first byte is written, and the output is assembled under a temporary name and renamed at the end.

moelib checkpoints are layout-free: the manifest maps global tensor names to shards, whichever
pipeline/expert-parallel layout wrote them, so no resharding step exists or is needed.
"""

from moelib.convert.load import load_model
from moelib.convert.read import INDEX, expected_shapes, open_hf, open_moelib
from moelib.convert.shards import Shards, ShardWriter, TensorFile, Unit, parse_size, staged, write_shards
from moelib.convert.write import DEFAULT_SEED, EXPORT_DTYPES, QUANTIZATION_CONFIG, TOKENIZER_FILES, export_hf, import_hf
from moelib.train.hf_format import FP8_BLOCK

__all__ = [
    "export_hf", "import_hf", "load_model", "open_moelib", "open_hf", "expected_shapes",
    "TensorFile", "ShardWriter", "Shards", "Unit", "write_shards", "staged", "parse_size",
    "INDEX", "QUANTIZATION_CONFIG", "EXPORT_DTYPES", "TOKENIZER_FILES", "DEFAULT_SEED", "FP8_BLOCK",
]
