"""Routed experts' checkpoint keys: one entry per expert under its global id, whatever the storage.

GroupedExperts stores its experts stacked ([E, ...], one grouped GEMM serves them all) and, under expert
parallelism, holds only a shard; its state dict still names each expert's three weights separately
(``experts.17.up_proj.weight``, the released checkpoints' names), so checkpoints do not depend on how
experts are stored or sharded.
"""

from __future__ import annotations

import torch

_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class PerExpertStateDict:
    """Mixin for an nn.Module with ``num_experts``, ``expert_offset`` and ``expert_weights(e)`` (name ->
    view of local expert e's weight): saves and loads those views under global expert ids."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for e in range(self.num_experts):
            for name, tensor in self.expert_weights(e).items():
                key = f"{prefix}{self.expert_offset + e}.{name}.weight"
                destination[key] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        with torch.no_grad():
            for e in range(self.num_experts):
                for name, target in self.expert_weights(e).items():
                    key = f"{prefix}{self.expert_offset + e}.{name}.weight"
                    if key not in state_dict:
                        missing_keys.append(key)
                    elif state_dict[key].shape != target.shape:
                        error_msgs.append(f"{key}: shape {tuple(state_dict[key].shape)} in the checkpoint, "
                                          f"{tuple(target.shape)} in the model")
                    else:
                        target.copy_(state_dict[key])
        if strict:
            mine = {f"{prefix}{self.expert_offset + e}.{n}.weight" for e in range(self.num_experts)
                    for n in _EXPERT_WEIGHTS}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in mine
                                   and k[len(prefix):].split(".")[0].isdigit())
