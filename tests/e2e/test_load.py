"""Under load: 16 completion streams and back-to-back /train jobs, nothing fails
and no job is lost (a short version of `python -m bench load`)."""

from __future__ import annotations

import asyncio

import pytest

from bench.load import run_load

pytestmark = pytest.mark.server


def test_streams_and_training_together_lose_nothing(served):
    result = asyncio.run(run_load(served.server.url, str(served.model_dir), dict(served.http.headers), seconds=12, train=True))
    assert result["failed_requests"] == 0, result["failures"]
    assert result["jobs_lost"] == 0
    assert result["jobs_submitted"] >= 5 and result["jobs_succeeded"] == result["jobs_submitted"]
    assert result["completions"] >= 16
