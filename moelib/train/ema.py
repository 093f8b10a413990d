"""Parameter EMA in CPU memory, updated in the background (V3 keeps one to judge the model early).

Per step ``update(step)`` takes a snapshot of the parameters into CPU buffers and hands
``ema = decay·ema + (1 − decay)·param`` (an fp32 lerp) to a daemon worker thread, then returns: the
training step never waits for the average. On CUDA the snapshot is a non-blocking device-to-host copy
on a side stream into pinned buffers; the worker waits on its event before reading. The compute stream
is made to wait for that copy (a device-side dependency, the host does not block), because the next
optimizer step overwrites the parameters the copy is reading. On CPU the snapshot is a synchronous
memcpy, cheaper than the lerp it lets run in the background.

Memory: an fp32 average plus one snapshot buffer per tensor, both in host memory. One update is in
flight at a time: ``update`` first waits for the previous lerp (long finished in practice, since a
training step lasts longer) before reusing the snapshot buffers.

Names: the caller gives the global names of the tensors this rank holds (under pipeline or expert
parallelism a subset of the model), e.g. ``GradSync.params`` or ``ParameterEMA.from_modules``. Routed
experts live in stacked tensors (GroupedExperts); the EMA averages the stacked tensor but its state dict
uses the model's per-expert state-dict keys (``layers.3.mlp.experts.17.up_proj.weight``, the index
being global), exactly as ``model.state_dict()`` and ZeroAdamW's state dict do, so an EMA written under
one layout loads under another. Keys are ``"ema." + <model state-dict key>``; buffers (router biases)
are not averaged.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moelib.errors import CheckpointError
from moelib.model.moe import GroupedExperts
from moelib.parallel.zero import expert_views

PREFIX = "ema."
ExpertInfo = tuple[GroupedExperts, str, str]  # (module, its prefix "layers.3.mlp.experts.", attr), as GradSync


@dataclass
class _Entry:
    name: str                    # the parameter's module path (stacked experts: "...experts.gate_up_proj")
    copies: list[torch.Tensor]   # the live tensors with that name on this rank (read the first, write all)
    average: torch.Tensor        # fp32, host memory
    snapshot: torch.Tensor       # host buffer the next update copies into, in the parameter's dtype
    expert: ExpertInfo | None

    def keyed(self, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(model state-dict key, view of ``t``) for this entry: one, or one per expert weight."""
        if self.expert is None:
            return [(self.name, t)]
        return expert_views(*self.expert, t)


class ParameterEMA:
    """fp32 exponential moving average of named parameters, kept in host memory, updated in the background.

    ``params``: global name -> tensor (or the list of this rank's copies of that name, as in
    ``GradSync.params``; the first is averaged, ``copy_to`` writes all). ``expert_modules``: for names
    that are stacked routed-expert tensors, (GroupedExperts, prefix, attr) as ``GradSync.expert_modules``,
    so the state dict uses per-expert keys. The average starts as a copy of the current parameters.
    """

    def __init__(self, params: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], decay: float, *,
                 expert_modules: Mapping[str, ExpertInfo] | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.step: int | None = None  # the training step of the last update
        pin = torch.cuda.is_available()
        expert_modules = expert_modules or {}
        self._entries: list[_Entry] = []
        for name in sorted(params):
            copies = [params[name]] if isinstance(params[name], torch.Tensor) else list(params[name])
            src = copies[0].detach()
            average = torch.empty(src.shape, dtype=torch.float32, pin_memory=pin)
            average.copy_(src)
            snapshot = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
            self._entries.append(_Entry(name, copies, average, snapshot, expert_modules.get(name)))
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_modules(cls, modules: nn.Module | Sequence[nn.Module], decay: float) -> ParameterEMA:
        """The trainable parameters of ``modules`` (a model, or this rank's pipeline stages) under their
        module paths, routed experts recognised as such. A parameter reachable under two names (a tied
        weight) is averaged once, under the first."""
        modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        params: dict[str, list[torch.Tensor]] = {}
        experts: dict[str, ExpertInfo] = {}
        seen: set[int] = set()
        for module in modules:
            for mod_name, mod in module.named_modules():
                prefix = f"{mod_name}." if mod_name else ""
                for attr, p in mod.named_parameters(recurse=False):
                    name = prefix + attr
                    if not p.requires_grad or (id(p) in seen and name not in params):
                        continue
                    seen.add(id(p))
                    if all(p is not q for q in params.setdefault(name, [])):
                        params[name].append(p)
                    if isinstance(mod, GroupedExperts) or hasattr(mod, "expert_offset"):  # as GradSync
                        experts[name] = (mod, prefix, attr)
        return cls(params, decay, expert_modules=experts)

    # -- the update --------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Snapshot the parameters and fold them into the average in the background; returns at once.
        Call after the optimizer step of training step ``step`` (kept as ``self.step``, for the caller's
        checkpoint manifest). If the previous background update failed, its exception is raised here
        and this update is not taken."""
        self.wait()
        events = self._snapshot()
        self.step = step
        self._idle.clear()
        self._ensure_worker()
        self._jobs.put(events)

    def wait(self) -> None:
        """Block until the background update is done; re-raise its exception if it failed."""
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Finish outstanding work and stop the worker thread (a later update starts a new one)."""
        self.wait()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _snapshot(self) -> list[torch.cuda.Event]:
        events = []
        on_cuda = [e for e in self._entries if e.copies[0].is_cuda]
        for e in self._entries:
            if not e.copies[0].is_cuda:
                e.snapshot.copy_(e.copies[0].detach())
        for device in sorted({e.copies[0].device for e in on_cuda}, key=str):
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            compute = torch.cuda.current_stream(device)
            stream.wait_stream(compute)  # the optimizer step that produced the parameters comes first
            with torch.cuda.stream(stream):
                for e in on_cuda:
                    if e.copies[0].device == device:
                        e.snapshot.copy_(e.copies[0].detach(), non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            compute.wait_event(event)  # later writes to the parameters wait for the copy
            events.append(event)
        return events

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="moelib-ema", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            events = self._jobs.get()
            if events is None:
                return
            try:
                for event in events:
                    event.synchronize()
                self._apply()
            except BaseException as error:  # handed to the training thread at its next wait/update
                self._error = error
            finally:
                self._idle.set()

    @torch.no_grad()
    def _apply(self) -> None:
        weight = 1.0 - self.decay
        for e in self._entries:
            e.average.lerp_(e.snapshot.float(), weight)

    # -- evaluation with the averaged weights --------------------------------------------------------------

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the average into the tracked parameters (``model=None``), or load it into ``model`` by
        state-dict key (any model whose keys include this EMA's, e.g. a full single-process model)."""
        self.wait()
        if model is None:
            for e in self._entries:
                for p in e.copies:
                    p.detach().copy_(e.average)
            return
        averaged = {k: v for e in self._entries for k, v in e.keyed(e.average)}
        result = model.load_state_dict(averaged, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"EMA tensor {result.unexpected_keys[0]} has no counterpart in the model")

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """``with ema.applied(): evaluate(...)``: the tracked parameters hold the average inside the block
        and get their training values back after it (also when it raises). The training values wait in the
        host snapshot buffers, idle between updates, so no device memory is spent; do not ``update``
        inside the block."""
        self.wait()
        with torch.no_grad():
            for e in self._entries:
                e.snapshot.copy_(e.copies[0].detach())  # copies of one name are equal (replicas)
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for e in self._entries:
                    for p in e.copies:
                        p.detach().copy_(e.snapshot)

    # -- checkpoints ------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """The state-dict keys this rank holds: ``"ema." + <model state-dict key>``."""
        return [PREFIX + k for e in self._entries for k, _ in e.keyed(e.average)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"ema.<model state-dict key>": fp32 tensor}`` for this rank's tensors (waits for the
        background update first). The tensors are copies: later updates do not change them."""
        self.wait()
        return {PREFIX + k: v.clone() for e in self._entries for k, v in e.keyed(e.average)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load exactly this rank's keys (see ``keys``); values of another dtype are converted. A missing,
        extra or misshaped tensor raises CheckpointError naming it, and nothing is loaded."""
        self.wait()
        targets = {PREFIX + k: v for e in self._entries for k, v in e.keyed(e.average)}
        for key in targets:
            if key not in state:
                raise CheckpointError(f"EMA tensor {key} is missing from the checkpoint")
        for key, value in state.items():
            if key not in targets:
                raise CheckpointError(f"EMA tensor {key} in the checkpoint is not a parameter of this model")
            if tuple(value.shape) != tuple(targets[key].shape):
                raise CheckpointError(f"EMA tensor {key} has shape {tuple(value.shape)} in the checkpoint, "
                                      f"{tuple(targets[key].shape)} in the model")
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(state[key])
