"""Property-based fuzzing of every plugin route against the server's own OpenAPI
schema: no 5xx, no crash, and a rejected request never changes the weights."""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core import NotSet

from ..conftest import serving

pytestmark = pytest.mark.server

# Small limits so that generated jobs are short and the limits themselves get hit.
FUZZ_LIMITS = {"HOGWILD_MAX_SAMPLES": "8", "HOGWILD_MAX_TOKENS": "512", "HOGWILD_MAX_STEPS": "4",
               "HOGWILD_MAX_QUEUED_JOBS": "2", "HOGWILD_MAX_BODY_BYTES": str(1 << 20),
               "HOGWILD_TRAINER_MEMORY_LIMIT": str(1 << 30)}


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir, tiny_readout, tmp_path_factory):
    # No key, beyond loopback, with the explicit opt-in: the widest surface.
    with serving(tiny_model_dir, tmp_path_factory.mktemp("fuzz"), "fuzz", dtype="float32", api_key=None, host="0.0.0.0",
                 env={"HOGWILD_ALLOW_UNAUTHENTICATED_TRAINING": "1", "VLLM_READOUT_VECTORS": str(tiny_readout),
                      **FUZZ_LIMITS}) as handle:
        yield handle


def plugin_operations(url: str):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    return [op for op in ops if re.match(r"^/(v1/)?(train|score|checkpoint|readout)", op.path)]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_plugin_routes_survive_fuzzing(fuzzed, mode):
    operations = plugin_operations(fuzzed.server.url)
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /train", "POST /v1/train", "GET /train/status", "GET /v1/train/status", "GET /train/{job_id}",
        "DELETE /train/{job_id}", "POST /score", "POST /v1/score", "POST /checkpoint", "POST /v1/checkpoint",
        "GET /v1/readout/manifest", "POST /readout/load", "POST /readout/train"}
    seen: dict[int, int] = {}

    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def fuzz(case):
            if isinstance(case.body, dict) and "samples" in case.body:
                # Accepted jobs finish before the answer, so no job trains while the
                # next request's effect on the weights is checked.
                case.body["wait"] = True
            digest = fuzzed.arena_digest()
            response = case.call(base_url=fuzzed.server.url, timeout=300)
            # An optional body left out is valid even in a "negative" case (/checkpoint).
            if not (mode is GenerationMode.NEGATIVE and isinstance(case.body, NotSet)):
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
            where = (case.method, case.formatted_path, str(case.body)[:300], response.status_code, response.text[:300])
            assert response.status_code < 500, where
            if response.status_code >= 400:
                assert fuzzed.arena_digest() == digest, where

        try:
            fuzz()
        except Unsatisfiable:
            # No invalid input exists where the only parameter is a free string
            # (the job id) or there is none (status).
            assert mode is GenerationMode.NEGATIVE and operation.method in ("get", "delete")
    assert httpx.get(f"{fuzzed.server.url}/health", timeout=30).status_code == 200
    assert len(fuzzed.complete([5, 6, 7], 3)) == 3
    if mode is GenerationMode.POSITIVE:
        # Schema-valid requests get through, or hit a limit, or fail a check the
        # schema cannot express (token ids past the vocabulary, ranges past the prompt,
        # paths outside the directories requests may name: 403).
        assert 200 in seen and set(seen) <= {200, 403, 404, 409, 413, 422, 429}, seen
    else:  # invalid ones never do
        assert seen and all(400 <= code < 500 for code in seen), seen
