"""A model for inference from either format, read one block at a time."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from moelib.convert.read import open_hf, open_moelib
from moelib.train.checkpoint import MANIFEST


def load_model(path: str | os.PathLike, cast: Callable[[nn.Module], object] | None = None):
    """A CPU model in eval mode from a moelib checkpoint (step directory or root) or an HF DeepSeek-V3/V2
    directory (without the MTP modules when no shard holds them); calling it on input_ids [B, T] returns the
    main model's logits [B, T, vocab].

    The model is built on the meta device and each block (embedding, decoder layer, final norm, head, MTP
    module) gets memory only when its weights are read, in fp32; ``cast(block)``, if given, then changes it in
    place (to bf16 or FP8, say). So loading holds the model in its final dtype plus one block in fp32, never
    a whole fp32 copy next to a freshly initialised model."""
    from moelib.model.transformer import build_model

    with _readers(Path(path)) as (cfg, readers):
        model = build_model(cfg, "fp32", device="meta")
        for prefix, block in _blocks(model):
            block.to_empty(device="cpu")
            block.load_state_dict({name[len(prefix):]: read() for name, read in readers.items()
                                   if name.startswith(prefix)})
            if cast is not None:
                cast(block)
    model.reset_buffers()
    return model.eval()


@contextmanager
def _readers(path: Path) -> Iterator[tuple[object, dict[str, Callable[[], torch.Tensor]]]]:
    """(config, moelib tensor name -> a call that reads it) of either format, the files open meanwhile."""
    if (path / "config.json").is_file() and not (path / MANIFEST).is_file():
        cfg, shards, units = open_hf(path)
        readers = {u.outputs[0][0]: (lambda u=u: u.make()[0]) for u in units}
    else:
        _, cfg, shards, source = open_moelib(path)
        readers = {name: (lambda s=stored: shards.get(s)) for name, stored in source.items()}
    try:
        yield cfg, readers
    finally:
        shards.close()


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(state-dict prefix, module) of each unit loaded at once: the model's children, and the items of its
    module containers (one decoder layer or MTP module at a time)."""
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            for key, item in child.named_children():
                yield f"{name}.{key}.", item
        else:
            yield f"{name}.", child
