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
layer one batched matmul gives every layer's dot products and the tap sends the step's values to the API server processes that wait
for them (``readout_wire``), never blocking the step.

Rows are keyed by sequence position, so a preempted request that recomputes
its tokens overwrites the same positions with the same values.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hogwild.readout import store as readout_store
from hogwild.readout.vectors import VectorSet

from .readout_wire import KEY_ARG, PROMPT_ARG, ReadoutRows, encode, inbox_path

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it

_TAP: "ReadoutTap | None" = None


@torch.library.custom_op("hogwild::readout_tap", mutates_args=("sink",))
def readout_tap(hidden: torch.Tensor, residual: torch.Tensor, layer: int, sink: torch.Tensor) -> None:
    """Hand one decoder layer's outputs to the tap. ``sink`` is never written:
    declaring it mutated keeps the compiler from dropping a call with no outputs."""
    if _TAP is not None:
        _TAP.on_layer(layer, hidden, residual)


@readout_tap.register_fake
def _(hidden, residual, layer, sink) -> None:
    return None


@dataclass
class _Projection:
    """A vector set as the tap uses it."""

    vector_set: VectorSet
    matrix: torch.Tensor  # (n_layers, hidden, n_concepts) fp32, manifest layer order
    slots: dict[int, int]  # layer -> its index in the manifest's layer order


@dataclass
class _Group:
    """The rows of one step read out with one vector set."""

    projection: _Projection
    rows: list[ReadoutRows] = field(default_factory=list)
    row_index: list[int] = field(default_factory=list)
    take: slice | torch.Tensor | None = None  # the rows: a slice when contiguous (every decode step), else an index
    streams: torch.Tensor | None = None  # (n_layers, n_rows, hidden) fp32: each layer's rows, copied

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
        matrix = self.projection.matrix.to(self.streams.device)
        return torch.bmm(self.streams, matrix).transpose(0, 1).cpu().numpy()


class ReadoutTap:
    """Per-worker readout state: vector sets, request pins, the current step's plan."""

    def __init__(self, runner, session: Path, hidden_size: int, num_layers: int, first: VectorSet | None):
        self.runner, self.session = runner, Path(session)
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.sets: dict[str, _Projection] = {}
        self.current: str | None = None
        if first is not None:
            self._adopt(readout_store.STARTUP_VERSION, first)
        self.stamp = readout_store.current_stamp(self.session)
        if self.stamp != (0, 0):
            self._poll(force=True)
        self.pins: dict[str, str] = {}  # request id -> set version it started with
        self.routes: dict[str, Path | None] = {}  # join key -> its API server's socket
        self.groups: list[_Group] = []
        self.layers_present: list[int] = []
        self.sockets: dict[Path, object] = {}
        self.zmq_context = None
        self.dropped = 0

    # -- vector sets ---------------------------------------------------------
    def _adopt(self, version: str, vector_set: VectorSet) -> None:
        self.sets[version] = _Projection(vector_set, vector_set.stacked().transpose(1, 2).contiguous(),
                                         {layer: i for i, layer in enumerate(vector_set.layers)})
        self.current = version
        logger.info("hogwild readout: reading out %d concepts at layers %s (set %s)", len(vector_set.concepts),
                    list(vector_set.layers), version)

    def _poll(self, force: bool = False) -> None:
        stamp = readout_store.current_stamp(self.session)
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
        live = self.runner.requests
        for rid in [r for r in self.pins if r not in live]:
            del self.pins[rid]
        self.routes.clear()
        used = set(self.pins.values()) | {self.current}
        for version in [v for v in self.sets if v not in used]:
            del self.sets[version]

    # -- one step ------------------------------------------------------------
    def plan(self, device: torch.device) -> None:
        """At the first layer of a step: which rows of the flat batch to read, for whom."""
        self.groups = []
        self._poll()
        if self.current is None:
            return
        batch = self.runner.input_batch
        n = batch.num_reqs
        if n == 0:
            return
        qsl = self.runner.query_start_loc.np[: n + 1]
        computed = batch.num_computed_tokens_cpu[:n]
        by_version: dict[str, _Group] = {}
        for i, rid in enumerate(batch.req_ids[:n]):
            state = self.runner.requests.get(rid)
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None) or {}
            key = extra.get(KEY_ARG)
            if not isinstance(key, str):
                continue
            start, stop = int(qsl[i]), int(qsl[i + 1])
            if stop <= start:
                continue
            first_pos, prompt_len = int(computed[i]), int(state.num_prompt_tokens)
            last_pos = first_pos + (stop - start) - 1
            if extra.get(PROMPT_ARG):
                rows = range(start, stop)
            elif last_pos >= prompt_len - 1:  # this step's logits choose a token
                rows, first_pos = range(stop - 1, stop), last_pos
            else:
                continue
            version = self.pins.setdefault(rid, self.current)
            group = by_version.get(version)
            if group is None:
                group = by_version[version] = _Group(self.sets[version])
            vector_set = group.projection.vector_set
            group.rows.append(ReadoutRows(key, rid, prompt_len, first_pos, len(rows), len(vector_set.layers),
                                          len(vector_set.concepts), version))
            group.row_index.extend(rows)
        for group in by_version.values():
            first, count = group.row_index[0], len(group.row_index)
            if group.row_index == list(range(first, first + count)):
                group.take = slice(first, first + count)
            else:
                group.take = torch.tensor(group.row_index, dtype=torch.long, device=device)
            group.streams = torch.empty(len(group.projection.slots), count, self.hidden_size, dtype=torch.float32,
                                        device=device)
        self.groups = list(by_version.values())
        if len(self.pins) > 4 * max(n, 64):
            self._forget_finished()

    def on_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        if layer == self.layers_present[0]:
            self.plan(hidden.device)
        for group in self.groups:
            group.keep(layer, hidden, residual)
        if layer == self.layers_present[-1] and self.groups:
            self.flush()

    def flush(self) -> None:
        """Send each API server its requests' rows of this step; drop (and count) rather than block."""
        import zmq

        outgoing: dict[Path, tuple[list[ReadoutRows], list[np.ndarray]]] = defaultdict(lambda: ([], []))
        for group in self.groups:
            values, offset = group.values(), 0
            for rows in group.rows:
                if rows.key not in self.routes:  # None too: a key with no inbox stays unsent
                    self.routes[rows.key] = inbox_path(self.session, rows.key)
                path = self.routes[rows.key]
                if path is not None:
                    outgoing[path][0].append(rows)
                    outgoing[path][1].append(values[offset: offset + rows.count])
                offset += rows.count
        self.groups = []
        for path, (rows, values) in outgoing.items():
            sock = self._socket(path)
            try:
                sock.send_multipart(encode(rows, values), flags=zmq.NOBLOCK)  # copied: zero-copy costs more below ~64 KB
            except zmq.Again:
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    logger.warning("hogwild readout: %d messages dropped (API server %s not reading)", self.dropped, path)

    def _socket(self, path: Path):
        import zmq

        sock = self.sockets.get(path)
        if sock is None:
            if self.zmq_context is None:
                self.zmq_context = zmq.Context.instance()
            sock = self.zmq_context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(f"ipc://{path}")
            self.sockets[path] = sock
        return sock


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
    parallel = runner.vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise RuntimeError("readout needs pipeline parallel size 1 (each stage would hold only some of the layers); "
                           "unset VLLM_READOUT_VECTORS or serve without pipeline parallelism")
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() != 0:
        return None  # the residual stream is whole on every rank: one of them reports it
    model_config = runner.vllm_config.model_config
    hidden_size = model_config.get_hidden_size()
    num_layers = model_config.hf_text_config.num_hidden_layers
    first = readout_store.load_files(files, hidden_size, num_layers)
    tap = ReadoutTap(runner, session, hidden_size, num_layers, first)
    layers = decoder_layers(runner.get_model())
    for idx, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        tap.layers_present.append(idx)
        layer.register_buffer("hogwild_readout_sink", torch.zeros(1, device=next(layer.parameters()).device),
                              persistent=False)
        layer.register_forward_hook(_hook(idx))
    _TAP = tap
    compiled = runner.vllm_config.compilation_config.mode != 0
    logger.info("hogwild readout: tapped %d decoder layers (%s)", len(tap.layers_present),
                "compiled: the tap is an opaque custom op in the graph" if compiled else "eager")
    return tap


def _hook(idx: int):
    def hook(module, args, output):
        hidden, residual = output if isinstance(output, tuple) else (output, torch.zeros_like(output))
        torch.ops.hogwild.readout_tap(hidden, residual, idx, module.hogwild_readout_sink)

    return hook
