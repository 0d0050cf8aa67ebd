"""The one validation path of the API server for every job request: the per-request
limits (413), token ids within the served vocabulary and sequences within its max
length (422), read from what each request declares (``hogwild.contracts.jobs``).
The trainer checks the token ids again, and each mode's own rules, when it admits the job."""

from __future__ import annotations

from collections.abc import Iterable

from .http_errors import ApiError
from .limits import Limits


def check_token_ids(token_lists: Iterable[tuple[str, list[int]]], vocab_size: int) -> None:
    for where, ids in token_lists:
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise ApiError(422, f"{where}: token id {bad} is outside the vocabulary (size {vocab_size})", where)


def validate_job(op, limits: Limits, vocab_size: int, max_model_len: int) -> None:
    """Raise ``ApiError`` for the first thing wrong with the job request ``op``."""
    samples = op.sample_count()
    if samples > limits.max_samples:
        raise ApiError(413, f"{samples} samples; the limit per request is {limits.max_samples} (HOGWILD_MAX_SAMPLES)", "samples")
    tokens = sum(len(ids) for _, ids in op.token_lists())
    if tokens > limits.max_tokens:
        raise ApiError(413, f"{tokens} tokens; the limit per request is {limits.max_tokens} (HOGWILD_MAX_TOKENS)", "samples")
    steps = op.planned_steps()
    if steps > limits.max_steps:
        raise ApiError(413, f"this job would take {steps} optimizer steps; the limit is {limits.max_steps} (HOGWILD_MAX_STEPS)")
    check_token_ids(op.token_lists(), vocab_size)
    for where, length in op.sequence_lengths():
        if length > max_model_len:
            param = where.partition(":")[0]
            raise ApiError(422, f"{where} is {length} tokens, longer than the model's max length {max_model_len}", param)
