"""Which tokens of a conversation are the assistant's: read off the model's own chat
template, so ChatML, Llama-3 headers and any template with a generation prompt work
without naming a family (the circuit breaker's loss mask)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class AssistantMarkers:
    """Token ids that open and close an assistant turn, read off the template."""

    header: tuple[int, ...]
    end: tuple[int, ...]


def assistant_markers(tokenizer) -> AssistantMarkers | None:
    """Render a conversation with the model's own chat template and read the
    assistant header (what the generation prompt adds) and the end-of-turn
    marker (what follows the reply). Works for ChatML (Qwen), Llama-3 headers,
    and any template that supports ``add_generation_prompt``; None when the
    tokenizer has no template or the markers cannot be found."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": "USERTEXT"}]
    reply = "ASSISTANTREPLY"
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": reply}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no usable markers
        return None
    if not prompt.startswith(bare) or reply not in full:
        return None
    header = prompt[len(bare):]
    end = full[full.index(reply) + len(reply):].strip()
    end = re.match(r"\S+", end).group(0) if end else ""
    header_ids = tuple(tokenizer.encode(header.strip() or header, add_special_tokens=False))
    end_ids = tuple(tokenizer.encode(end, add_special_tokens=False)) if end else ()
    return AssistantMarkers(header_ids, end_ids) if header_ids else None


def _find(seq: list[int], sub: tuple[int, ...], start: int) -> int:
    n = len(sub)
    for i in range(start, len(seq) - n + 1):
        if tuple(seq[i:i + n]) == sub:
            return i
    return -1


def assistant_spans(ids: list[int], markers: AssistantMarkers) -> list[tuple[int, int]]:
    """Half-open token spans of every assistant reply in ``ids``: from after the
    header to the end-of-turn marker included (the model must learn to stop),
    or to the end of the sequence."""
    spans, pos = [], 0
    while (at := _find(ids, markers.header, pos)) >= 0:
        start = at + len(markers.header)
        # The header as tokenized alone may lack the newline that follows it in context.
        while start < len(ids) and ids[start] in markers.header:
            start += 1
        stop = _find(ids, markers.end, start) if markers.end else -1
        end = stop + len(markers.end) if stop >= 0 else len(ids)
        if end > start:
            spans.append((start, end))
        pos = end
    return spans


def loss_mask(ids: list[int], markers: AssistantMarkers | None, policy: str) -> tuple[list[bool], bool]:
    """Per-token mask and whether an assistant span was found. ``policy``
    ``assistant``: only assistant replies count, falling back to the whole
    sequence when there is none; ``all``: every token."""
    if policy == "all":
        return [True] * len(ids), True
    spans = assistant_spans(ids, markers) if markers else []
    if not spans:
        return [True] * len(ids), False
    mask = [False] * len(ids)
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    return mask, True


# ---- losses ----------------------------------------------------------------
