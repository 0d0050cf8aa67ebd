"""APOLLO optimizer set-up (``apollo-torch``) for full-weight training.

APOLLO keeps Adam moments for a low-rank random projection of each weight
matrix's gradient and uses them only to estimate a per-channel (or per-tensor)
scaling of the raw gradient, so its state is a small fraction of AdamW's. As in
the APOLLO paper, the projection applies to the 2-D weights of the transformer
blocks; embeddings, the LM head, norms and biases get plain AdamW moments from
the same optimizer (a parameter group without ``rank``).

``RoundingApollo`` is apollo-torch's ``APOLLOAdamW`` (same parameter groups,
state and projectors, so saved states load in either) with its ``step``
rewritten for weights that are trained in place in bf16/fp16: the update and
the decoupled weight decay are computed in fp32 and written once, chunk by
chunk, with stochastic or nearest rounding (``rounding.py``); the moments are
kept in fp32. With fp32 weights it computes what ``APOLLOAdamW.step`` does
(``tests/test_rounding.py`` checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from apollo_torch import APOLLOAdamW
from apollo_torch.random_projector import GradientProjector, next_seed

from hogwild.contracts.sft_config import ApolloHyper, ApolloStructure, Rounding

from .rounding import for_each_chunk, is_rounded, rows, write


def is_projected(name: str, param: torch.nn.Parameter) -> bool:
    """The parameters APOLLO projects: 2-D weights inside the decoder blocks."""
    return param.ndim == 2 and ".layers." in f".{name}"


@dataclass(frozen=True)
class SplitMatrix:
    """A tensor-parallel rank's part of a projected weight: along ``dim``, the slice from
    ``start`` of a matrix of ``full_shape``; the other parts are on the ranks of ``group``."""

    dim: int
    start: int
    full_shape: tuple[int, int]
    group: object = None


def build_optimizer(model: torch.nn.Module, structure: ApolloStructure, hyper: ApolloHyper, project: bool = True):
    """A ``RoundingApollo`` over every trainable parameter of ``model``; on a tensor-parallel
    rank it knows which projected weights are parts of one (``SplitMatrix``). ``project=False``:
    no parameter is projected, so it is AdamW (LoRA factors, already low-rank)."""
    projected, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (projected if project and is_projected(name, param) else plain).append(param)
    groups = [{"params": plain}]
    if projected:
        groups.append(
            {
                "params": projected,
                "rank": structure.rank,
                "proj": structure.proj,
                "proj_type": structure.proj_type,
                "update_proj_gap": structure.update_proj_gap,
                "scale_type": hyper.scale_type,
                "scale": hyper.scale,
            }
        )
    optimizer = RoundingApollo(
        groups,
        lr=hyper.lr,
        betas=tuple(hyper.betas),
        eps=hyper.eps,
        weight_decay=hyper.weight_decay,
        correct_bias=hyper.correct_bias,
        scale_front=structure.scale_front,
        disable_nl=structure.norm_growth_limit is None,
    )
    apply_hyper(optimizer, hyper, lr=hyper.lr)
    layout = getattr(model, "hogwild_tensor_parallel", None)
    if layout is not None:
        params = dict(model.named_parameters())
        optimizer.split = {params[name]: SplitMatrix(dim, start, full, layout.group)
                           for name, (dim, start, full) in layout.split_matrices.items() if is_projected(name, params[name])}
    return optimizer


def apply_hyper(optimizer: torch.optim.Optimizer, hyper: ApolloHyper, lr: float) -> None:
    """Set the per-step settings on every parameter group (``lr`` after warm-up)."""
    for group in optimizer.param_groups:
        group.update(lr=lr, betas=tuple(hyper.betas), eps=hyper.eps, weight_decay=hyper.weight_decay, correct_bias=hyper.correct_bias)
        if "rank" in group:
            group.update(scale_type=hyper.scale_type, scale=hyper.scale)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in tensors of the optimizer's state (moments, projections)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "__dict__"):  # projector objects hold their matrices
                total += sum(v.numel() * v.element_size() for v in vars(value).values() if isinstance(v, torch.Tensor))
    return total


class RoundingApollo(APOLLOAdamW):
    """``APOLLOAdamW`` whose step writes each weight once, rounded as ``rounding`` says.

    Set ``rounding`` and ``generator`` (the rounding noise's own generator, on the
    weights' device) before stepping; ``nearest`` needs no generator.
    """

    rounding: Rounding = "nearest"
    generator: torch.Generator | None = None
    split: dict = {}  # parameter -> SplitMatrix, on a tensor-parallel rank

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.nn.Parameter, group: dict) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("APOLLO does not support sparse gradients")
        state = self.state[p]
        state.setdefault("step", 0)
        beta1, beta2 = group["betas"]
        projected = "rank" in group
        if projected:
            # Steps 1-3 of APOLLO on the low-rank projection (small): moments, then the
            # channel- or tensor-wise scaling of the raw gradient they imply.
            if "projector" not in state:
                state["projector"] = self._initialize_projector(group, state)
            part = self.split.get(p)
            if part is not None and isinstance(state["projector"], GradientProjector):
                low, whole = project_part(state["projector"], grad, state["step"], part), True
            else:
                low, whole = state["projector"].project(grad, state["step"]).float(), part is None
            shape = part.full_shape if part is not None else grad.shape
            exp_avg, exp_avg_sq = self._moments(state, low)
            state["step"] += 1
            exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            norm_grad = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
            norm_dim = 0 if shape[0] < shape[1] else 1
            if group["scale_type"] == "channel":
                factor = torch.norm(norm_grad, dim=norm_dim) / (torch.norm(low, dim=norm_dim) + 1e-8)
                if norm_dim == 1:
                    factor = factor.unsqueeze(1)
            else:
                if whole:
                    factor = torch.norm(norm_grad) / (torch.norm(low) + 1e-8)
                else:  # each rank holds a part of the projection
                    squares = torch.stack([norm_grad.square().sum(), low.square().sum()])
                    dist.all_reduce(squares, group=part.group)
                    factor = squares[0].sqrt() / (squares[1].sqrt() + 1e-8)
            front, back = self._scales(state, grad, factor, group["scale"], part)
        else:
            exp_avg, exp_avg_sq = self._moments(state, grad)
            state["step"] += 1
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        decay = group["lr"] * group["weight_decay"]
        # Step 4: the update in the weight's full shape, written once per chunk.
        for start, stop in for_each_chunk(p):
            g = rows(grad, start, stop).float()
            if projected:
                update = _scaled(g, factor, start, stop) * front
                update = update if back is None else update * back
            else:
                m, v = rows(exp_avg, start, stop), rows(exp_avg_sq, start, stop)
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                update = m / v.sqrt().add_(group["eps"])
            target = rows(p.data, start, stop)
            w = target.float().add(update, alpha=-step_size)
            if group["weight_decay"] > 0.0:
                w.add_(w, alpha=-decay)
            write(target, w, self.rounding if is_rounded(p.dtype) else "nearest", self.generator)

    @staticmethod
    def _moments(state: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's moments in fp32 (a bf16 second moment cannot decay: 0.999 v rounds back to v)."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
            state["exp_avg_sq"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        elif state["exp_avg"].dtype != torch.float32:  # saved by an older version
            state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].float(), state["exp_avg_sq"].float()
        return state["exp_avg"], state["exp_avg_sq"]

    def _scales(self, state: dict, grad: torch.Tensor, factor: torch.Tensor, scale: float, part: SplitMatrix | None = None):
        """The multipliers of ``grad * factor`` that APOLLOAdamW applies after scaling:
        sqrt(scale) (before or after the limiter) and Fira's norm-growth limiter,
        whose norm is summed chunk by chunk instead of over a full-size temporary."""
        root = math.sqrt(scale)
        front = root if self.scale_front else 1.0
        back = None if self.scale_front else root
        if self.disable_nl:
            return front, back
        squares = torch.zeros((), dtype=torch.float32, device=grad.device)
        for start, stop in for_each_chunk(grad):
            squares += (_scaled(rows(grad, start, stop).float(), factor, start, stop) * front).square().sum()
        if part is not None:  # the norm of the whole weight's scaled gradient
            dist.all_reduce(squares, group=part.group)
        norm = squares.sqrt()
        if "scaled_grad" in state:
            limiter = max(norm / (state["scaled_grad"] + 1e-8), 1.01) / 1.01
            state["scaled_grad"] = norm / limiter
            return front / limiter, back
        state["scaled_grad"] = norm
        return front, back


def project_part(projector: GradientProjector, grad: torch.Tensor, step: int, part: SplitMatrix) -> torch.Tensor:
    """APOLLO's random projection of the whole weight's gradient, computed on a part of it:
    the side and the random matrix are the whole weight's (same seed as at tensor parallel
    1), this rank uses the matrix's slice along its split; when the projection sums over
    the split dim, the ranks' partial projections are all-reduced (each rank then holds
    the whole low-rank gradient), else each holds its rows or columns of it. The update
    is then exactly the one the whole weight gets at tensor parallel 1."""
    m, n = part.full_shape
    side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(projector.proj_type,
                                                                                                projector.proj_type)
    sums_over_split = (side == "right") == (part.dim == 1)
    if projector.ortho_matrix is None or step % projector.update_proj_gap == 0:
        shape_only = torch.zeros((), dtype=torch.float32, device=grad.device).expand(m, n)
        matrix = projector.get_orthogonal_matrix(shape_only, projector.rank, type=side, seed=projector.seed).to(grad.dtype)
        projector.seed = next_seed(projector.seed)
        if sums_over_split:  # keep this rank's slice of it
            length = grad.shape[part.dim]
            matrix = matrix[:, part.start : part.start + length] if side == "right" else matrix[part.start : part.start + length]
        projector.ortho_matrix = matrix.contiguous()
    low = (grad @ projector.ortho_matrix.t() if side == "right" else projector.ortho_matrix.t() @ grad).float()
    if sums_over_split:
        dist.all_reduce(low, group=part.group)
    return low


def _scaled(g: torch.Tensor, factor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``grad * factor`` (``g`` holds those rows of the
    gradient; a per-row factor is sliced with them, a per-column or scalar one broadcasts)."""
    return g * (factor[start:stop] if factor.ndim == 2 and factor.shape[1] == 1 else factor)
