"""Inside the API server: readout's state and the work behind its routes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hogwild.readout import store as readout_store
from hogwild.readout.vectors import ReadoutFileError

from .http_errors import ApiError
from .readout_inbox import ReadoutInbox

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it


class ReadoutFrontend:
    """Present only while readout is on (``VLLM_READOUT_VECTORS`` at start-up)."""

    def __init__(self, session: Path, model_config):
        self.session = session
        self.hidden_size = model_config.get_hidden_size()
        self.num_layers = model_config.hf_text_config.num_hidden_layers
        files = readout_store.current_files(session)
        # The worker refused a bad start-up set already; this names the problem again here.
        readout_store.load_files(files, self.hidden_size, self.num_layers)
        self.inbox = ReadoutInbox(session)

    @classmethod
    def if_enabled(cls, session: Path, model_config) -> "ReadoutFrontend | None":
        return cls(session, model_config) if readout_store.current_files(session) is not None else None

    async def start(self) -> None:
        await self.inbox.start()

    def manifest(self) -> dict:
        files = readout_store.current_files(self.session)  # checked whole when it was installed
        return {**json.loads(files.manifest.read_text()), "version": files.version}

    def load(self, vectors: Path, manifest: Path | None) -> dict:
        """Check a set against the served model and make it current; 422 (nothing changed) when it does not fit."""
        try:
            files, vector_set = readout_store.install(self.session, vectors, manifest, self.hidden_size, self.num_layers)
        except ReadoutFileError as exc:
            raise ApiError(422, str(exc), "vectors") from None
        logger.info("hogwild readout: loaded %s (%d concepts, layers %s) as set %s", vectors, len(vector_set.concepts),
                    list(vector_set.layers), files.version)
        return {**vector_set.manifest, "version": files.version}
