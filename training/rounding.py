"""Writing fp32 results into 16-bit weights: round to nearest, or stochastically.

The served weights are trained in place in their own dtype (no fp32 master
copy). Round-to-nearest loses every update smaller than half a spacing of the
weight (a weight of 0.02 in bf16 has a spacing of 1.2e-4, so an update of 1e-5
vanishes) and is biased towards the weights it can move. Stochastic rounding
picks one of the two neighbours of the exact value with probabilities that make
the expected written value the exact one: small updates land on average.

``noise`` is 16 random bits per element, drawn from a generator the
caller owns (never torch's global one): the same noise gives the same rounding,
which is what lets a merged adapter be reverted bit for bit (``preimages``).

Everything here works on one chunk of a tensor at a time; ``for_each_chunk``
splits a parameter along its first dimension so that the fp32 temporaries stay
bounded (``CHUNK_ELEMENTS``), whatever the parameter's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from hogwild.contracts.sft_config import Rounding

ROUNDED_DTYPES = (torch.bfloat16, torch.float16)
NOISE_RANGE = 1 << 16
NOISE_BIAS = 1 << 15  # int16 noise + this = uniform in [0, NOISE_RANGE)
# Elements per chunk of a write: bounds the fp32 temporaries (a few of this size).
CHUNK_ELEMENTS = 1 << 22
SCRATCH_TENSORS = 4  # fp32-sized temporaries alive at once in a chunked write (for the memory estimate)


def is_rounded(dtype: torch.dtype) -> bool:
    """Whether writes into ``dtype`` lose precision that rounding decides."""
    return dtype in ROUNDED_DTYPES


def draw_noise(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """16 uniform random bits per element (int16; ``NOISE_BIAS`` added makes them
    [0, 65536)), on the generator's device. Drawn as 64-bit words, four elements
    each: torch's CPU generator costs the same per draw whatever its width."""
    n = math.prod(shape)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator,
                          device=generator.device)
    return words.view(torch.int16)[:n].view(shape)


def round_stochastic_(x: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32, contiguous, a temporary: its bits are overwritten) in ``dtype``:
    the neighbour above |x| with probability equal to how far |x| lies towards it,
    so E[result] = x.

    bf16 is the top half of an fp32's bits: adding 16 random bits below the cut and
    truncating does it exactly, in place. fp16 has another exponent range, so there
    the two neighbours are found with ``nextafter`` and one is chosen with the same noise.
    """
    if dtype == torch.bfloat16:
        return _cut_with_noise_(x, noise).to(torch.bfloat16)
    nearest = x.to(dtype)
    nearest32 = nearest.float()
    toward = torch.where(x > nearest32, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(nearest, toward)
    gap = other.float() - nearest32
    p_other = torch.where(gap != 0, (x - nearest32) / gap, 0.0)
    return torch.where(noise.float() + NOISE_BIAS < p_other * NOISE_RANGE, other, nearest)


def _cut_with_noise_(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32, contiguous) with the noise added below bf16's cut and the low 16 bits
    cleared, in place: exactly a bf16 value, stochastically rounded."""
    x.view(torch.int32).add_(noise).add_(NOISE_BIAS).bitwise_and_(-NOISE_RANGE)
    return x


def round_to_(x: torch.Tensor, dtype: torch.dtype, rounding: Rounding, noise: torch.Tensor | None) -> torch.Tensor:
    """``x`` (fp32, a temporary that may be overwritten) converted to ``dtype`` as
    ``rounding`` says (exact for fp32)."""
    if rounding == "stochastic" and is_rounded(dtype):
        return round_stochastic_(x, dtype, noise)
    return x.to(dtype)


def chunk_rows(t: torch.Tensor, limit: int = CHUNK_ELEMENTS) -> int:
    """Rows of dim 0 per chunk: at least one, else as many as fit in ``limit`` elements."""
    per_row = max(1, t[0].numel()) if t.ndim > 1 and t.shape[0] else 1
    return max(1, limit // per_row)


def for_each_chunk(t: torch.Tensor, limit: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of dim 0 covering ``t`` (a 0-d tensor is one chunk)."""
    if t.ndim == 0:
        yield 0, 1
        return
    rows = chunk_rows(t, limit)
    for start in range(0, t.shape[0], rows):
        yield start, min(start + rows, t.shape[0])


def rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``t`` (a view; the whole tensor if 0-d)."""
    return t if t.ndim == 0 else t[start:stop]


def write(dst: torch.Tensor, value: torch.Tensor, rounding: Rounding, generator: torch.Generator | None) -> None:
    """``dst.copy_(value rounded into dst's dtype)``: in the same storage, so a
    server computing with ``dst`` sees the new values. ``value`` (fp32) is a
    temporary of the caller's, overwritten."""
    if rounding == "stochastic" and dst.dtype == torch.bfloat16:  # the cut value converts exactly in copy_
        dst.copy_(_cut_with_noise_(value.contiguous(), draw_noise(value.shape, generator)))
        return
    noise = draw_noise(value.shape, generator) if rounding == "stochastic" and is_rounded(dst.dtype) else None
    dst.copy_(round_to_(value.contiguous(), dst.dtype, rounding, noise))


def add_in_place(w: torch.Tensor, delta: torch.Tensor, rounding: Rounding, generator: torch.Generator | None) -> None:
    """``w += delta`` computed in fp32 and written once, chunk by chunk. ``delta``
    has ``w``'s shape (any float dtype)."""
    for start, stop in for_each_chunk(w):
        chunk = rows(w, start, stop)
        write(chunk, chunk.float() + rows(delta, start, stop).float(), rounding, generator)


REACH = 3  # preimage candidates: the nearest to ``merged - delta`` and this many either side


def preimages(merged: torch.Tensor, delta: torch.Tensor, rounding: Rounding,
              noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``w`` could have given ``merged = round_to(w + delta, rounding, noise)``.

    Returns ``(candidates, matches)``, both ``(2 * REACH + 1, *shape)``: the values of
    ``merged``'s dtype around ``merged - delta``, nearest in the middle, and which of
    them round to ``merged``. Within one binade rounding with a fixed noise shifts
    ``w`` by a whole number of spacings, so exactly one matches; where ``w + delta``
    crossed into a larger binade, two can (information rounding destroyed)."""
    dtype = merged.dtype
    nearest = (merged.float() - delta).to(dtype)
    up, down = [nearest], [nearest]
    for _ in range(REACH):
        up.append(torch.nextafter(up[-1], torch.full_like(nearest, torch.inf)))
        down.append(torch.nextafter(down[-1], torch.full_like(nearest, -torch.inf)))
    candidates = torch.stack(down[:0:-1] + up)
    matches = torch.stack([round_to_(c.float() + delta, dtype, rounding, noise) == merged for c in candidates])
    return candidates, matches


def choices_of(original: torch.Tensor, candidates: torch.Tensor, matches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What restoring ``original`` needs beyond ``preimages``: for each element with
    several matching candidates (flat order), which of them it was (uint8); and
    the flat indices where ``original`` is not a matching candidate at all."""
    is_original = (candidates == original) & matches
    found = is_original.any(0)
    rank = ((matches.cumsum(0) - 1) * is_original).sum(0)
    ambiguous = matches.sum(0) > 1
    return rank[ambiguous].to(torch.uint8), (~found).view(-1).nonzero().view(-1)


def restore(candidates: torch.Tensor, matches: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """The candidate each element was, ``choices`` deciding where several match
    (``choices_of``'s order); the nearest where none does."""
    ambiguous = matches.sum(0) > 1
    rank = torch.zeros(matches.shape[1:], dtype=torch.long, device=matches.device)
    rank[ambiguous] = choices.to(device=matches.device, dtype=torch.long)
    pick = matches & (matches.cumsum(0) - 1 == rank)
    pick[REACH] |= ~matches.any(0)
    return candidates.gather(0, pick.to(torch.uint8).argmax(0, keepdim=True))[0]


def spacing(t: torch.Tensor) -> torch.Tensor:
    """The gap from each element of ``t`` (16-bit float) to the next larger representable magnitude."""
    mag = t.abs()
    return torch.nextafter(mag, torch.full_like(mag, torch.inf)).float() - mag.float()


def default_rounding(model: torch.nn.Module) -> Rounding:
    """Stochastic where any trainable weight is bf16/fp16, else nearest (fp32 is written exactly)."""
    return "stochastic" if any(is_rounded(p.dtype) for p in model.parameters() if p.requires_grad) else "nearest"


def rounding_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    """The rounding noise's own generator for a job: seeded by the job's ``seed`` and
    the optimizer's step count, so a job is reproducible and consecutive jobs differ."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (1 << 63))


def typical_spacing(weights: list[torch.Tensor], sample: int = 4096) -> float | None:
    """The median spacing of the 16-bit ``weights`` (a sample of each), or None when
    none is 16-bit: the smallest change a typical weight can hold."""
    picked = []
    for w in weights:
        if is_rounded(w.dtype) and w.numel():
            flat = w.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            picked.append(spacing(flat[::step][:sample]).cpu())
    return float(torch.cat(picked).median()) if picked else None


# Measured on the tiny bf16 model (30 APOLLO steps, loss drop against fp32's on the same
# weights): stochastic rounding carries 1.0x at lr*steps = 2.5 spacings, 0.96x at 0.25,
# 0.88x at 0.025, 0.68x at 0.0025. Below this fraction of a spacing it stops being reliable.
CARRY_LIMIT = 0.01


def small_update_warning(lr: float, steps: int, typical: float | None) -> str | None:
    """A warning when the job's whole planned movement of a typical weight (about
    lr per optimizer step) is below ``CARRY_LIMIT`` of one spacing of it: fewer
    than one weight in a hundred then moves at all, and what lands is mostly noise."""
    if typical is None or lr * steps >= CARRY_LIMIT * typical:
        return None
    return (f"lr {lr:g} x {steps} steps moves a typical weight by about {lr * steps:.2g}, under 1% of one spacing of it "
            f"in the served dtype ({typical:.2g}): even stochastic rounding lands such updates mostly as noise; "
            f"raise lr or steps")
