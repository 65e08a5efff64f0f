"""CUDA-graph capture of a pure step: a thin stateful runner around a pure function, like a jit cache.

    step = graph_or_eager(train_step, device, what="the train step", updates_state=True)
    state, metrics = step(state, batch)          # copy the batch in, replay, hand back the static state

`GraphedFunction` holds static state buffers (read by every graph and, with `updates_state`, overwritten inside
it) and, per input signature (one per canvas), static inputs and a graph. Warm-up runs on a side stream and
discards its results, so the first replay is the first real step. Donation, as jax's donate_argnums: the
returned state *is* the static buffers and the metrics the graph's outputs, both overwritten by the next call.
A captured function must not read device values on the host (`graph_host.host_syncs` finds such operations);
tensors built from Python data are lifted by `graph_host.HostConstants`; in-place optimisers (apex) cannot be
captured. Where capture is impossible the function runs eagerly (same results) with a logged reason.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Protocol

import torch

from retina_fn import tree
from retina_fn.train.graph_host import HostConstants, host_syncs

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The capture of a graph failed (the function did something a CUDA graph cannot record)."""


def first_error(error: BaseException) -> BaseException:
    """The error a failure started with (a failed capture raises a second one when `torch.cuda.graph` closes)."""
    seen = {id(error)}
    while True:
        earlier = error.__cause__ or error.__context__
        if earlier is None or id(earlier) in seen:
            return error
        seen.add(id(earlier))
        error = earlier


class Capture(Protocol):
    """How a runner records a call: capture(body, warmup) -> replay, replay() having body()'s effect on the
    current static buffers (warmup() runs the function and discards the result); raises CaptureError."""

    def __call__(self, body: Callable[[], None], warmup: Callable[[], None]) -> Callable[[], None]: ...


class _Replay:
    """One captured CUDA graph and the constants it reads (kept alive as long as the graph)."""

    def __init__(self, graph, constants: HostConstants | None):
        self.graph, self.constants = graph, constants

    def __call__(self) -> None:
        self.graph.replay()


class CudaGraphCapture:
    """`Capture` with torch.cuda.CUDAGraph: warm-up on a side stream, one capture in this object's shared pool
    (thread_local error mode: the loader's pin-memory thread may use CUDA meanwhile). lift_constants runs under
    `HostConstants`; leave it off for a torch.compile'd function (inductor folds its own constants)."""

    def __init__(self, device: torch.device | str, warmup_steps: int = 2, lift_constants: bool = True):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.device, self.warmup_steps, self.lift_constants = torch.device(device), warmup_steps, lift_constants
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, body: Callable[[], None], warmup: Callable[[], None]) -> Callable[[], None]:
        constants = HostConstants() if self.lift_constants else None
        lifting = constants if constants is not None else contextlib.nullcontext()
        side, current = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.device(self.device), torch.cuda.stream(side), lifting:
            for _ in range(self.warmup_steps):
                warmup()
        current.wait_stream(side)
        if constants is not None:
            constants.recording = False
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), lifting, torch.cuda.graph(graph, pool=self.pool,
                                                                            capture_error_mode="thread_local"):
                body()
        except RuntimeError as e:
            torch.cuda.set_stream(current)  # a failed capture can leave its side stream current
            cause = first_error(e)
            raise CaptureError(str(cause) if cause is e else f"{cause} (then: {e})") from e
        return _Replay(graph, constants)


def _signature(inputs: tuple) -> tuple:
    """(input, path, shape, dtype) of every leaf of every input tree: what a graph is recorded for."""
    sig = []
    for i, x in enumerate(inputs):
        for path, leaf in tree.leaves_with_paths(x):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"graph inputs must be trees of tensors; input {i} has {type(leaf).__name__} at "
                                f"{path!r}")
            sig.append((i, path, tuple(leaf.shape), leaf.dtype))
    return tuple(sig)


def _describe(signature: tuple) -> str:
    """The largest input leaf of a signature, e.g. 'image [2, 3, 64, 64] (and 9 more leaves)'."""
    index, path, shape, _ = max(signature, key=lambda s: (len(s[2]), torch.Size(s[2]).numel()))
    return f"{path or f'input {index}'} {list(shape)} (and {len(signature) - 1} more leaves)"


class GraphedFunction:
    """The stateful runner (module docstring) around fn(state, *inputs) -> (new_state, outputs) when
    `updates_state` (a train step), else -> outputs (the eval forward; state the parameters); trees of tensors,
    new_state of the state's structure, shapes and dtypes. capture: CudaGraphCapture or a test's eager stand-in."""

    def __init__(self, fn: Callable, device: torch.device | str, capture: Capture, *, updates_state: bool,
                 name: str = "the step"):
        self.fn, self.device, self.capture = fn, torch.device(device), capture
        self.updates_state, self.name = updates_state, name
        self.state: Any = None  # the static state tree, made on the first call
        self._state_leaves: list[torch.Tensor] = []
        self._entries: dict[tuple, tuple] = {}  # signature -> (static input leaves, replay, output holder)

    @property
    def signatures(self) -> int:
        """How many input signatures have been recorded (graphed or fallen back to eager)."""
        return len(self._entries)

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, device=self.device).copy_(x)

    def load_state(self, state) -> None:
        """Copies `state` into the static state buffers (made from it on the first call), skipping the buffers
        themselves; ValueError when the structure, a shape or a dtype differs."""
        if self.state is None:
            self.state = tree.map(self._static, state)
            self._state_leaves = tree.leaves(self.state)
            return
        leaves = tree.leaves(state)
        if len(leaves) != len(self._state_leaves):
            raise ValueError(f"{self.name}: the state has {len(leaves)} leaves, the graph's buffers "
                             f"{len(self._state_leaves)}; a runner keeps one state structure")
        for (path, src), dst in zip(tree.leaves_with_paths(state), self._state_leaves):
            if src is dst:
                continue
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"{self.name}: state leaf {path!r} is {tuple(src.shape)} {src.dtype}, the "
                                 f"graph's buffer {tuple(dst.shape)} {dst.dtype}")
            dst.copy_(src)

    def _commit(self, new_state) -> None:
        """Copies a new state into the static state buffers (inside the graph when captured)."""
        new_leaves = tree.leaves(new_state)
        if len(new_leaves) != len(self._state_leaves):
            raise ValueError(f"{self.name} returned a state of {len(new_leaves)} leaves for one of "
                             f"{len(self._state_leaves)}")
        buffers = {id(b) for b in self._state_leaves}
        pairs = [(dst, src.clone() if id(src) in buffers else src)  # a buffer moved elsewhere: read it first
                 for src, dst in zip(new_leaves, self._state_leaves) if src is not dst]
        for dst, src in pairs:
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"{self.name} returned a state leaf of {tuple(src.shape)} {src.dtype} for a "
                                 f"buffer of {tuple(dst.shape)} {dst.dtype}")
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    def _record(self, signature: tuple, inputs: tuple) -> tuple:
        static_inputs = [tree.map(self._static, x) for x in inputs]
        holder: list = []

        def warmup() -> None:
            self.fn(self.state, *static_inputs)

        def body() -> None:
            result = self.fn(self.state, *static_inputs)
            if self.updates_state:
                new_state, result = result
                self._commit(new_state)
            holder[:] = [result]

        try:
            replay = self.capture(body, warmup)
            log.info("%s: CUDA graph recorded for %s", self.name, _describe(signature))
        except CaptureError as e:
            replay = body
            found = host_syncs(self.fn, self.state, *static_inputs)
            places = "; ".join(f"{op} at {', '.join(where)}" for op, where in found["where"].items()) or "none"
            log.warning("%s: CUDA graph capture failed for %s, so this shape runs eagerly (same results, "
                        "slower). Error: %s. A captured function must not read device values on the host "
                        "(.item(), bool(tensor), torch.equal, nonzero, boolean indexing, .tolist(), .cpu()); "
                        "retina_fn.train.graph_host.host_syncs found: %s", self.name, _describe(signature), e, places)
        return [leaf for x in static_inputs for leaf in tree.leaves(x)], replay, holder

    def __call__(self, state, *inputs):
        self.load_state(state)
        signature = _signature(inputs)
        if signature not in self._entries:
            self._entries[signature] = self._record(signature, inputs)
        static_leaves, replay, holder = self._entries[signature]
        for dst, src in zip(static_leaves, [leaf for x in inputs for leaf in tree.leaves(x)]):
            dst.copy_(src, non_blocking=True)
        replay()
        (outputs,) = holder
        return (self.state, outputs) if self.updates_state else outputs


def graph_or_eager(fn: Callable, device: torch.device | str, *, what: str, updates_state: bool,
                   lift_constants: bool = True, warmup_steps: int = 2, capture: Capture | None = None) -> Callable:
    """`fn` behind a `GraphedFunction` on a CUDA device, or `fn` itself (with a logged reason) elsewhere; a given
    `capture` is used on any device (tests)."""
    device = torch.device(device)
    if capture is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            log.warning("train.cuda_graph: %s runs without CUDA graphs on %s (graph capture needs a CUDA device)",
                        what, device)
            return fn
        capture = CudaGraphCapture(device, warmup_steps=warmup_steps, lift_constants=lift_constants)
    return GraphedFunction(fn, device, capture, updates_state=updates_state, name=what)
