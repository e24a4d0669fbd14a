"""Run an attack phase eagerly or as a replayed CUDA graph, through one calling convention.

A *phase* is a function ``fn(*inputs) -> tuple[Tensor, ...]`` of tensors only. Everything else it reads
(module parameters and buffers, attack settings) must be the same objects at every call, and its outputs
must not require gradients. A method's :meth:`~crdnd_ray.methods.base.Distiller.attack_phase` (the
teacher's forward on the batch and the K steps of :func:`crdnd_ray.attacks.pgd`) and the scoring of an
evaluation attack in :func:`crdnd_ray.attacks.evaluate` are such functions. Two runners call them:

* :class:`EagerRunner` calls ``fn(*inputs)``.
* :class:`GraphRunner` calls the same ``fn``. The first call with a new key runs it eagerly on the
  runner's side stream (the warm-up: cuDNN and cuBLAS initialise outside any capture); the second
  captures it as a CUDA graph on static copies of the inputs, on the same stream; from then on each call
  copies its inputs into those buffers and replays the graph. The key is ``fn``, the caller's ``tag``
  (e.g. the module's training flag), the inputs' shapes, strides, dtypes and devices, and the autocast
  and grad modes; a train loader with ``drop_last`` therefore needs one graph.

Random starts are drawn inside the graph from the default CUDA generator, which torch registers with
every capture: each replay reads the generator's current seed and offset and advances the offset by what
the graph consumed, so a replay draws the same numbers as an eager call from the same generator state.
BatchNorm runs in the mode Python sets during capture (``attack.bn_mode``): ``eval`` records kernels on
the running statistics, ``train`` records batch statistics and the running-statistics update, which
every replay repeats as the eager call would. Autocast's weight cache is off inside the runner's calls
(casts are recomputed in the graph, as :func:`torch.cuda.make_graphed_callables` requires).

A capture that fails (an operation that synchronises with the host, say) leaves the runner eager from
then on, and ``notify(reason)`` is called once. :class:`RunnerSource` makes the runners of a training run
from ``train.cuda_graphs`` and reports, in one line, whether they are graphed and why not.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["AttackRunner", "EagerRunner", "GraphRunner", "Phase", "RunnerSource", "eager_reason"]

Phase = Callable[..., tuple[Tensor, ...]]
"""``fn(*inputs) -> outputs``: tensors in, a tuple of tensors without gradient out."""

_WARMED = object()
_EAGER = object()


class AttackRunner(Protocol):
    """Runs a :data:`Phase` on its inputs and returns its outputs."""

    def __call__(self, fn: Phase, *inputs: Tensor, tag: Hashable = None) -> tuple[Tensor, ...]: ...


class EagerRunner:
    """Calls the phase directly."""

    def __call__(self, fn: Phase, *inputs: Tensor, tag: Hashable = None) -> tuple[Tensor, ...]:
        """Return ``fn(*inputs)``; ``tag`` is ignored."""
        return fn(*inputs)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def replay(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return tuple(output.clone() for output in self.outputs)


def _uncached_autocast() -> torch.autocast:
    """The caller's CUDA autocast state with the weight-cast cache off."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


def _key(fn: Phase, tag: Hashable, inputs: tuple[Tensor, ...]) -> Hashable:
    signature = tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)
    return (fn, tag, signature, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch.is_grad_enabled())


class GraphRunner:
    """Captures each phase as a CUDA graph on its second call with the same key and replays it afterwards.

    Graphs hold the memory of their inputs, outputs and intermediates (one shared pool per runner) and
    point at the parameters of the modules ``fn`` used when it was captured: keep a runner for one set of
    modules, and drop it with them. Replayed outputs are fresh clones, valid after the next call.
    """

    def __init__(self, device: torch.device | str | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        self._device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self._notify = notify
        self._stream = torch.cuda.Stream(device=self._device)
        self._pool = torch.cuda.graph_pool_handle()
        self._entries: dict[Hashable, Any] = {}
        self.failure: str | None = None
        """Why the runner fell back to eager calls (None while it captures)."""

    @property
    def graphs(self) -> int:
        """How many graphs the runner holds."""
        return sum(isinstance(entry, _Graph) for entry in self._entries.values())

    def __call__(self, fn: Phase, *inputs: Tensor, tag: Hashable = None) -> tuple[Tensor, ...]:
        """``fn(*inputs)``: eager on a key's first call, captured on its second, replayed after."""
        if self.failure is not None:
            return fn(*inputs)
        key = _key(fn, tag, inputs)
        entry = self._entries.get(key)
        if entry is None:
            outputs = self._warm_up(fn, inputs)
            self._entries[key] = _WARMED if outputs else _EAGER
            return outputs
        if entry is _EAGER:
            return fn(*inputs)
        if entry is _WARMED:
            try:
                entry = self._capture(fn, inputs)
            except RuntimeError as error:
                self._fail(f"capture failed: {_first_cause(error)}")
                return fn(*inputs)
            self._entries[key] = entry
        return entry.replay(inputs)

    def _warm_up(self, fn: Phase, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        current = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream), _uncached_autocast():
            outputs = tuple(fn(*inputs))
        current.wait_stream(self._stream)
        for output in outputs:
            if output.requires_grad:
                raise ValueError(
                    f"{getattr(fn, '__qualname__', fn)!r} returned a tensor that requires gradients, so it cannot "
                    "be replayed as a CUDA graph: an attack phase returns detached tensors (adversarial inputs, "
                    "teacher outputs under torch.no_grad); compute anything that needs gradients in the loss."
                )
            output.record_stream(current)
        return outputs

    def _capture(self, fn: Phase, inputs: tuple[Tensor, ...]) -> _Graph:
        static = tuple(value.detach().clone() for value in inputs)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self._device)
        try:
            with (torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"),
                  _uncached_autocast()):
                outputs = tuple(fn(*static))
        finally:
            torch.cuda.set_stream(current)
        return _Graph(graph, static, outputs)

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self._entries.clear()
        if self._notify is not None:
            self._notify(reason)


def _first_cause(error: BaseException) -> str:
    """The message of the error that started a chain (a failed capture raises again when it ends)."""
    while error.__context__ is not None:
        error = error.__context__
    return " ".join(str(error).split())[:300] or type(error).__name__


def eager_reason(setting: bool | str, device: torch.device, collectives_in_attack: bool = False) -> str | None:
    """Why ``train.cuda_graphs = setting`` on ``device`` means eager attacks (None: they are graphed).

    ``collectives_in_attack`` is true when the attack itself talks to other ranks (SyncBatchNorm in train
    mode during the attack), which a per-rank graph must not capture.
    """
    if setting is False:
        return "train.cuda_graphs is false"
    if device.type != "cuda":
        return f"device is {device.type}"
    if collectives_in_attack:
        return "SyncBatchNorm in train mode during the attack (attack.bn_mode: train) synchronises ranks"
    return None


class RunnerSource:
    """Makes the runners of one training run (training attack, each evaluation): all graphed, or all eager.

    ``notify`` hears one line at the start (``CUDA graphs on: ...`` or ``CUDA graphs off: <why>``) and one
    more if a capture fails, after which every runner made is eager.
    """

    def __init__(self, setting: bool | str, device: torch.device, notify: Callable[[str], None] | None = None,
                 collectives_in_attack: bool = False) -> None:
        self.device = device
        self.reason = eager_reason(setting, device, collectives_in_attack)
        """Why runners are eager (None while they are graphed)."""
        self._notify = notify or (lambda line: None)
        self._notify("CUDA graphs on: attacks are captured once per batch shape and replayed"
                     if self.reason is None else f"CUDA graphs off: {self.reason}")

    def __call__(self) -> AttackRunner:
        """A new runner: a :class:`GraphRunner` with its own graphs, or an :class:`EagerRunner`."""
        return EagerRunner() if self.reason is not None else GraphRunner(self.device, self._failed)

    def _failed(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._notify(f"CUDA graphs off: {reason}; attacks run eagerly from now on")
