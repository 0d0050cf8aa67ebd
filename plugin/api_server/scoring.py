"""``/v1/score``: log-likelihood of prompt ranges, computed by vLLM's engine."""

from __future__ import annotations

import base64
import binascii
import io
import secrets


async def prompt_token_logprobs(engine_client, prompt: list[int], priority: int = 0, images: list | None = None,
                                placeholder: int | None = None, lora_request=None) -> list[float | None]:
    """log P(prompt[p] | prompt[:p]) for every position of ``prompt`` (None at p = 0, and
    at image placeholders).

    One engine request with ``prompt_logprobs=0`` (each prompt token's own logprob), under
    ``lora_request``'s adapter when one is given, at ``priority`` (honoured under ``--scheduling-policy priority``); such requests skip
    reading the prefix cache, so every position is computed with the weights the engine
    holds now. With ``images`` vLLM's own multimodal processing expands each
    ``placeholder`` token of the prompt into the image's tokens; the answer is mapped back
    onto the positions the caller sent (``caller_positions``).
    """
    # Every vLLM name the plugin uses is in vllm_internals (the one model_runner module the API
    # server imports: it imports nothing of vLLM, torch or the trainer until called).
    from ..model_runner.vllm_internals import score_request

    request, params = score_request(prompt)
    if images:
        request["multi_modal_data"] = {"image": images}
    final = None
    async for output in engine_client.generate(request, params, f"hogwild-score-{secrets.token_hex(8)}", priority=priority,
                                                lora_request=lora_request):
        final = output
    served = list(final.prompt_token_ids)
    positions = final.prompt_logprobs
    logprobs = [None] + [positions[q][served[q]].logprob for q in range(1, len(served))]
    if not images:
        return logprobs
    return [None if q is None else logprobs[q] for q in caller_positions(prompt, served, placeholder)]


def caller_positions(sent: list[int], served: list[int], placeholder: int) -> list[int | None]:
    """For each position of the prompt as sent (one ``placeholder`` per image), its position
    in the prompt vLLM computed (each placeholder expanded into a run of them); None for a
    placeholder, which has no text log-probability. Raises ValueError if ``served`` is not
    ``sent`` with its placeholders expanded."""
    out: list[int | None] = []
    q = 0
    for token in sent:
        if token == placeholder:
            if q >= len(served) or served[q] != placeholder:
                raise ValueError(f"the engine's prompt has no image tokens where the caller's has its placeholder (at {len(out)})")
            while q < len(served) and served[q] == placeholder:
                q += 1
            out.append(None)
            continue
        if q >= len(served) or served[q] != token:
            raise ValueError(f"the engine's prompt differs from the caller's at position {len(out)}")
        out.append(q)
        q += 1
    if q != len(served):
        raise ValueError("the engine's prompt is longer than the caller's with its images expanded")
    return out


class BadImage(ValueError):
    """An image that is not a base64 data URI of a picture; the message says which and why."""


def decode_images(uris: list[str]) -> list:
    """``data:image/...;base64,...`` URIs as PIL images (RGB)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for i, uri in enumerate(uris):
        head, comma, payload = uri.partition(",")
        if not (comma and head.startswith("data:image/") and head.endswith(";base64")):
            raise BadImage(f"multi_modal_data.image.{i}: not a data URI of an image ('data:image/<type>;base64,<data>')")
        try:
            image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
            image.load()
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
            raise BadImage(f"multi_modal_data.image.{i}: not a readable image ({type(exc).__name__}: {exc})") from None
        images.append(image.convert("RGB"))
    return images


def range_totals(logprobs: list[float | None], ranges: list[list[int]]) -> list[dict]:
    """Sum of per-position logprobs over each half-open range (position 0 and image
    placeholders have none and are not counted)."""
    scores = []
    for index, (start, end) in enumerate(ranges):
        picked = [logprobs[p] for p in range(max(start, 1), end) if logprobs[p] is not None]
        scores.append({"range_index": index, "total_logprob": float(sum(picked)), "n_tokens": len(picked)})
    return scores
