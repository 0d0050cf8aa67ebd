"""``/v1/score``'s pieces that need no server: ranges over the caller's positions when
vLLM expands image placeholders, and data URIs."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from hogwild.plugin.api_server.scoring import BadImage, caller_positions, decode_images, range_totals

P = 99  # the image placeholder


def test_positions_the_caller_sent_map_onto_the_expanded_prompt():
    sent = [1, 2, P, 3, 4, P, 5]
    served = [1, 2, P, P, P, P, 3, 4, P, P, 5]  # images of 4 and 2 tokens
    assert caller_positions(sent, served, P) == [0, 1, None, 6, 7, None, 10]
    # Log-probabilities of the served prompt, read at the caller's positions: ranges keep meaning what they meant.
    served_logprobs = [None] + [-float(q) for q in range(1, len(served))]
    mine = [None if q is None else served_logprobs[q] for q in caller_positions(sent, served, P)]
    assert range_totals(mine, [[3, 5], [0, 7], [2, 3]]) == [
        {"range_index": 0, "total_logprob": -13.0, "n_tokens": 2},  # tokens 3 and 4, at 6 and 7 in the engine's prompt
        {"range_index": 1, "total_logprob": -24.0, "n_tokens": 4},  # the placeholders count no text
        {"range_index": 2, "total_logprob": 0.0, "n_tokens": 0}]


def test_a_prompt_that_does_not_match_is_refused():
    with pytest.raises(ValueError, match="differs from the caller's at position 1"):
        caller_positions([1, 2, 3], [1, 5, 3], P)
    with pytest.raises(ValueError, match="no image tokens"):
        caller_positions([1, P, 3], [1, 3], P)
    with pytest.raises(ValueError, match="longer"):
        caller_positions([1], [1, 2], P)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_data_uris_become_images_and_bad_ones_are_named():
    (image,) = decode_images([_png()])
    assert image.size == (8, 6) and image.mode == "RGB"
    for bad, why in (("https://example.com/cat.png", "not a data URI"), ("data:text/plain;base64,aGk=", "not a data URI"),
                     ("data:image/png;base64,@@@", "not a readable image"),
                     ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a readable image")):
        with pytest.raises(BadImage, match=f"multi_modal_data.image.1: {why}"):
            decode_images([_png(), bad])
