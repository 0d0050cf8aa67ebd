"""Inside vLLM's worker: project the residual stream onto concept vectors.

Every decoder layer gets a forward hook that calls one custom op,
``hogwild::readout_tap``, with the layer's two outputs (``hidden_states`` and
``residual``; their sum is what Hugging Face calls the layer's output, before
any final norm). The op is opaque to ``torch.compile``: Dynamo traces the hook
into the graph as a call of the op, which then runs on every step of a compiled
model as it does in eager mode (a plain hook would run only while tracing).

At the first layer of a step the tap reads the model runner's batch (which
request owns which rows, at which positions) and picks the rows to read: for
each request that carries a join key, the last row of the step when that step
samples a token (a prompt chunk that does not finish the prompt samples
nothing), or every row when the request asked for prompt readouts. At each
hooked layer it keeps ``(hidden + residual)[rows]`` in fp32; after the last
layer one batched matmul gives every layer's dot products and the tap sends
the step's values to the API server processes that wait for them
(``readout_wire``), never blocking the step.

Rows are keyed by sequence position, so a preempted request that recomputes
its tokens overwrites the same positions with the same values.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.library import Library

from hogwild.contracts.readout_wire import KEY_ARG, PROMPT_ARG, ReadoutStep, encode, inbox_path
from hogwild.readout import store as readout_store
from hogwild.readout.vectors import VectorSet

from . import vllm_internals

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it

_TAP: "ReadoutTap | None" = None
_UNSEEN = object()  # a request id the tap has not looked at yet


def readout_tap(hidden: torch.Tensor, residual: torch.Tensor, layer: int, sink: torch.Tensor) -> None:
    """Hand one decoder layer's outputs to the tap. ``sink`` is never written:
    declaring it mutated keeps the compiler from dropping a call with no outputs."""
    if _TAP is not None:
        _TAP.on_layer(layer, hidden, residual)


def _readout_tap_fake(hidden, residual, layer, sink) -> None:
    return None


# vLLM's own registration helper, not torch.library.custom_op: that one's dispatch
# costs ~13 us a call here, against ~2 us, and the op runs at every layer of every step.
_LIBRARY = Library("hogwild", "FRAGMENT")
vllm_internals.register_custom_op("readout_tap", readout_tap, ["sink"], _readout_tap_fake, _LIBRARY)


@dataclass
class _Projection:
    """A vector set as the tap uses it."""

    vector_set: VectorSet
    matrix: torch.Tensor  # (n_layers, hidden, n_columns) fp32, manifest layer order, on the model's device
    slots: dict[int, int]  # layer -> its index in the manifest's layer order

    @classmethod
    def of(cls, vector_set: VectorSet, device: torch.device) -> "_Projection":
        # Zero columns up to a multiple of 16: the batched matmul runs 1.5x faster on
        # 32 columns than on 29 (AVX-512 width) and the extra values are sliced off.
        stacked = vector_set.stacked().transpose(1, 2)
        n_concepts = stacked.shape[-1]
        matrix = torch.zeros(*stacked.shape[:2], -(-n_concepts // 16) * 16, dtype=torch.float32)
        matrix[..., :n_concepts] = stacked
        return cls(vector_set, matrix.to(device), {layer: i for i, layer in enumerate(vector_set.layers)})


@dataclass(frozen=True)
class _Wants:
    """What one request asked of the tap, read once from its sampling params."""

    key: str  # the join key of the HTTP request waiting for the rows
    prompt: bool  # every prompt position too
    prompt_len: int
    version: str  # the vector set it started with: a request never changes sets midway


@dataclass
class _Group:
    """The rows of one step read out with one vector set, as the columns of a ``ReadoutStep``."""

    projection: _Projection
    version: str
    keys: list[str] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)
    first_positions: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    row_index: list[int] = field(default_factory=list)
    take: slice | torch.Tensor | None = None  # the rows: a slice when contiguous (every decode step), else an index
    buffer: torch.Tensor | None = None  # (n_layers, n_rows, hidden) fp32: each hooked layer's rows
    streams: list[torch.Tensor] = field(default_factory=list)  # the buffer's per-layer views

    def add(self, wants: _Wants, request_id: str, first_position: int, first_row: int, count: int) -> None:
        self.keys.append(wants.key)
        self.request_ids.append(request_id)
        self.prompt_lens.append(wants.prompt_len)
        self.first_positions.append(first_position)
        self.counts.append(count)
        self.row_index.extend(range(first_row, first_row + count))

    def allocate(self, hidden_size: int, device: torch.device) -> None:
        """Pick the rows (a slice when they are contiguous) and the buffer the layers add them into."""
        rows = self.row_index
        if rows[-1] - rows[0] + 1 == len(rows):  # increasing, so contiguous
            self.take = slice(rows[0], rows[-1] + 1)
        else:
            self.take = torch.tensor(rows, dtype=torch.long, device=device)
        self.buffer = torch.empty(len(self.projection.slots), len(rows), hidden_size, dtype=torch.float32,
                                  device=device)
        self.streams = list(self.buffer.unbind(0))

    def keep(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Copy this group's rows of ``hidden + residual`` (the buffers are reused by the next layer)."""
        slot = self.projection.slots.get(layer)
        if slot is None:
            return
        take = self.take
        hidden, residual = (hidden[take], residual[take]) if isinstance(take, slice) else (
            hidden.index_select(0, take), residual.index_select(0, take))
        if hidden.dtype == torch.float32:
            torch.add(hidden, residual, out=self.streams[slot])
        else:  # sum in fp32, as the HF reference does after upcasting
            self.streams[slot].copy_(hidden).add_(residual)

    def values(self) -> np.ndarray:
        """(n_rows, n_layers, n_concepts): every layer's dot products in one batched matmul."""
        values = torch.bmm(self.buffer, self.projection.matrix)[..., : len(self.projection.vector_set.concepts)]
        return values.transpose(0, 1).contiguous().cpu().numpy()

    def step(self, members: list[int] | None = None) -> ReadoutStep:
        """The message header for all of this group's requests, or for ``members`` of them."""
        columns = [self.keys, self.request_ids, self.prompt_lens, self.first_positions, self.counts]
        if members is not None:
            columns = [[column[i] for i in members] for column in columns]
        vector_set = self.projection.vector_set
        return ReadoutStep(self.version, len(vector_set.layers), len(vector_set.concepts), *columns)


class ReadoutTap:
    """Per-worker readout state: vector sets, request pins, the current step's plan."""

    def __init__(self, runner, session: Path, hidden_size: int, num_layers: int, first: VectorSet | None,
                 device: torch.device):
        self.runner, self.session, self.device = runner, Path(session), device
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.sets: dict[str, _Projection] = {}
        self.current: str | None = None
        if first is not None:
            self._adopt(readout_store.STARTUP_VERSION, first)
        self.current_file = readout_store.current_file(self.session)
        self.stamp = readout_store.current_stamp(self.current_file)
        if self.stamp != (0, 0):
            self._poll(force=True)
        self.wants: dict[str, _Wants | None] = {}  # request id -> what it asked for (None: no readout)
        self.read_upto: dict[str, int] = {}  # request id -> the last position read out
        self.recomputed = 0  # requests seen starting over below what was read (preempted, then resumed)
        self.routes: dict[str, str | None] = {}  # join key -> its API server's socket
        self.groups: list[_Group] = []
        self.layers_present: list[int] = []
        self.sockets: dict[str, object] = {}
        self.zmq_context = None
        self.dropped = 0

    # -- vector sets ---------------------------------------------------------
    def _adopt(self, version: str, vector_set: VectorSet) -> None:
        self.sets[version] = _Projection.of(vector_set, self.device)
        self.current = version
        logger.info("hogwild readout: reading out %d concepts at layers %s (set %s)", len(vector_set.concepts),
                    list(vector_set.layers), version)

    def _poll(self, force: bool = False) -> None:
        stamp = readout_store.current_stamp(self.current_file)
        if stamp == self.stamp and not force:
            return
        self.stamp = stamp
        files = readout_store.current_files(self.session)
        if files is None or files.version in self.sets:
            return
        try:
            self._adopt(files.version, readout_store.load_files(files, self.hidden_size, self.num_layers))
        except Exception as exc:  # the API server checked it; keep serving with the old set
            logger.error("hogwild readout: cannot adopt vector set %s: %s", files.version, exc)

    def _forget_finished(self) -> None:
        live = vllm_internals.live_request_ids(self.runner)
        for rid in [r for r in self.wants if r not in live]:
            del self.wants[rid]
            self.read_upto.pop(rid, None)
        self.routes.clear()
        used = {w.version for w in self.wants.values() if w is not None} | {self.current}
        for version in [v for v in self.sets if v not in used]:
            del self.sets[version]

    def _read_wants(self, request_id: str) -> _Wants | None:
        arguments = vllm_internals.request_arguments(self.runner, request_id)
        key = arguments[0].get(KEY_ARG) if arguments else None
        if not isinstance(key, str):
            return None
        return _Wants(key, bool(arguments[0].get(PROMPT_ARG)), arguments[1], self.current)

    def _recompute(self, request_id: str) -> None:
        """A request computes again from below what was read: vLLM preempted it and now
        recomputes it. Its rows come again by position, so nothing is lost; say so in the log."""
        del self.read_upto[request_id]
        self.recomputed += 1
        if self.recomputed in (1, 10, 100) or self.recomputed % 1000 == 0:
            logger.info("hogwild readout: %d requests recomputed after preemption so far (rows are kept by position)",
                        self.recomputed)

    # -- one step ------------------------------------------------------------
    def plan(self) -> None:
        """At the first layer of a step: which rows of the flat batch to read, for whom."""
        self.groups = []
        self._poll()
        if self.current is None:
            return
        rows = vllm_internals.step_rows(self.runner)
        if not rows.request_ids:
            return
        query_starts, computed = rows.query_starts, rows.computed
        by_version: dict[str, _Group] = {}
        for i, rid in enumerate(rows.request_ids):
            wants = self.wants.get(rid, _UNSEEN)
            if wants is _UNSEEN:
                wants = self.wants[rid] = self._read_wants(rid)
            if wants is None:
                continue
            start, stop = query_starts[i], query_starts[i + 1]
            if stop <= start:
                continue
            first_pos = computed[i]
            if first_pos <= self.read_upto.get(rid, -1):
                self._recompute(rid)
            last_pos = first_pos + (stop - start) - 1
            if wants.prompt:
                first_row, count = start, stop - start
            elif last_pos >= wants.prompt_len - 1:  # this step's logits choose a token
                first_row, count, first_pos = stop - 1, 1, last_pos
            else:
                continue
            group = by_version.get(wants.version)
            if group is None:
                group = by_version[wants.version] = _Group(self.sets[wants.version], wants.version)
            group.add(wants, rid, first_pos, first_row, count)
            self.read_upto[rid] = first_pos + count - 1
        for group in by_version.values():
            group.allocate(self.hidden_size, self.device)
        self.groups = list(by_version.values())
        if len(self.wants) > 4 * max(len(rows.request_ids), 64):
            self._forget_finished()

    def on_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        if layer == self.layers_present[0]:
            self.plan()
        for group in self.groups:
            group.keep(layer, hidden, residual)
        if layer == self.layers_present[-1] and self.groups:
            self.flush()

    def flush(self) -> None:
        """Send each API server its requests' rows of this step; drop (and count) rather than block."""
        import zmq

        groups, self.groups = self.groups, []
        for group in groups:
            by_path: dict[str, list[int]] = {}
            for i, key in enumerate(group.keys):
                if key not in self.routes:  # None too: a key with no inbox stays unsent
                    path = inbox_path(self.session, key)
                    self.routes[key] = None if path is None else str(path)
                path = self.routes[key]
                if path is not None:
                    by_path.setdefault(path, []).append(i)
            if not by_path:
                continue
            values = group.values()
            for path, members in by_path.items():
                if len(members) == len(group.keys):  # one API server: the whole step as it is
                    frames = encode(group.step(), values)
                else:
                    offsets = np.cumsum([0, *group.counts])
                    frames = encode(group.step(members), np.concatenate(
                        [values[offsets[i]: offsets[i + 1]] for i in members]))
                try:
                    self._socket(path).send_multipart(frames, flags=zmq.NOBLOCK)  # copied: zero-copy costs more below ~64 KB
                except zmq.Again:
                    self.dropped += 1
                    if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                        logger.warning("hogwild readout: %d messages dropped (API server %s not reading)",
                                       self.dropped, path)

    def _socket(self, path: str):
        import zmq

        sock = self.sockets.get(path)
        if sock is None:
            if self.zmq_context is None:
                self.zmq_context = _context_off_compute_cores()
            sock = self.zmq_context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(f"ipc://{path}")
            self.sockets[path] = sock
        return sock


def _context_off_compute_cores():
    """A ZMQ context whose I/O thread runs on the cores vLLM left free of compute.

    vLLM's CPU worker binds its compute thread to its cores, and every thread
    started from it later inherits that binding, ZMQ's I/O thread included: each
    send then woke a thread on the compute core that preempted the model step
    (0.47 ms a step on the bench model, against 0.08 ms once it runs elsewhere).
    The free cores are those the process that started this one may use, less
    this thread's; none (a GPU worker, or no binding) leaves ZMQ's default.
    """
    import zmq

    context = zmq.Context()
    try:
        free = os.sched_getaffinity(os.getppid()) - os.sched_getaffinity(0)
    except OSError:
        free = set()
    for cpu in sorted(free):
        context.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)
    return context


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers (``model.model.layers`` in vLLM's Llama/Qwen2 families)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise RuntimeError(f"readout: cannot find the decoder layers of {type(model).__name__}")


def attach(runner, session: Path) -> ReadoutTap | None:
    """Hook every decoder layer of the runner's model. Inert (returns None) when
    no set is configured; raises ReadoutFileError at start-up for a bad one."""
    global _TAP
    files = readout_store.current_files(session)
    if files is None:
        return None
    config = vllm_internals.runner_config(runner)
    parallel = config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise RuntimeError("readout needs pipeline parallel size 1 (each stage would hold only some of the layers); "
                           "unset VLLM_READOUT_VECTORS or serve without pipeline parallelism")
    problem = vllm_internals.installed_version_problem()
    if problem:
        raise RuntimeError(f"readout is on (VLLM_READOUT_VECTORS) but {problem}: the tap reads the model runner's batch")
    if vllm_internals.tensor_parallel_rank() != 0:
        return None  # the residual stream is whole on every rank: one of them reports it
    model_config = config.model_config
    hidden_size = model_config.get_hidden_size()
    num_layers = model_config.hf_text_config.num_hidden_layers
    first = readout_store.load_files(files, hidden_size, num_layers)
    model = vllm_internals.runner_model(runner)
    tap = ReadoutTap(runner, session, hidden_size, num_layers, first, next(model.parameters()).device)
    layers = decoder_layers(model)
    for idx, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        tap.layers_present.append(idx)
        layer.register_buffer("hogwild_readout_sink", torch.zeros(1, device=next(layer.parameters()).device),
                              persistent=False)
        layer.register_forward_hook(_hook(idx))
    _TAP = tap
    compiled = config.compilation_config.mode != 0
    logger.info("hogwild readout: tapped %d decoder layers (%s)", len(tap.layers_present),
                "compiled: the tap is an opaque custom op in the graph" if compiled else "eager")
    return tap


def _hook(idx: int):
    def hook(module, args, output):
        hidden, residual = output if isinstance(output, tuple) else (output, torch.zeros_like(output))
        torch.ops.hogwild.readout_tap(hidden, residual, idx, module.hogwild_readout_sink)

    return hook
