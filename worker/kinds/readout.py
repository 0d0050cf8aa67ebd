"""Readout vectors trained on the live weights (``POST /readout/train``): a queued job;
inference goes on; the vectors are written to ``out`` and, when the server reads out,
become its current set."""

from __future__ import annotations

from pathlib import Path

import torch

from hogwild.contracts.jobs import SubmitReadoutOp
from hogwild.contracts.protocol import OpError
from hogwild.readout import store as readout_store
from hogwild.readout.corpus import CorpusError, read_corpus
from hogwild.readout.train import train_readout, write_training

from .base import Admission, JobKind, Services


class Readout(JobKind):
    request = SubmitReadoutOp

    def admit(self, service: Services, op: SubmitReadoutOp) -> Admission:
        try:  # a corpus that cannot be used is refused now, before any forward pass
            corpus = read_corpus(op.stories, op.min_positives)
        except CorpusError as exc:
            raise OpError("invalid", f"stories: {exc}") from None
        num_layers = service.access.model.config.num_hidden_layers
        bad = [layer for layer in op.layers if not 0 <= layer < num_layers]
        if bad:
            raise OpError("invalid", f"layers: {bad[0]} is out of range (the served model has layers 0..{num_layers - 1})")
        return Admission(len(corpus.texts()))

    def run(self, service: Services, job):
        op: SubmitReadoutOp = job.op
        corpus = read_corpus(op.stories, op.min_positives)
        job.info.total_steps = 1
        with service.access.reading() as model, torch.no_grad():
            result = train_readout(model, service.tokenizer(), corpus, sorted(set(op.layers)), op.aggregator, op.dtype,
                                   progress=False)
        written = write_training(result, op.out)
        loaded = None
        if readout_store.current_files(service.session) is not None:
            files, _ = readout_store.install(service.session, Path(written["vectors"]), Path(written["manifest"]),
                                             model.config.hidden_size, model.config.num_hidden_layers)
            loaded = files.version
        service.jobs.progress(job, 1, 1)
        job.info.result = {**written, "concepts": list(result.vector_set.concepts), "layers": list(result.vector_set.layers),
                           "loaded_version": loaded, "warnings": corpus.warnings, "triage": result.triage}
        return "succeeded", None


KIND = Readout()
