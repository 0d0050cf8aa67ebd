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

import torch
from apollo_torch import APOLLOAdamW

from hogwild.contracts.sft_config import ApolloHyper, ApolloStructure, Rounding

from .rounding import for_each_chunk, is_rounded, rows, write


def is_projected(name: str, param: torch.nn.Parameter) -> bool:
    """The parameters APOLLO projects: 2-D weights inside the decoder blocks."""
    return param.ndim == 2 and ".layers." in f".{name}"


def build_optimizer(model: torch.nn.Module, structure: ApolloStructure, hyper: ApolloHyper):
    """A ``RoundingApollo`` over every trainable parameter of ``model``."""
    projected, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (projected if is_projected(name, param) else plain).append(param)
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
            low = state["projector"].project(grad, state["step"]).float()
            exp_avg, exp_avg_sq = self._moments(state, low)
            state["step"] += 1
            exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            norm_grad = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
            norm_dim = 0 if grad.shape[0] < grad.shape[1] else 1
            if group["scale_type"] == "channel":
                factor = torch.norm(norm_grad, dim=norm_dim) / (torch.norm(low, dim=norm_dim) + 1e-8)
                if norm_dim == 1:
                    factor = factor.unsqueeze(1)
            else:
                factor = torch.norm(norm_grad) / (torch.norm(low) + 1e-8)
            front, back = self._scales(state, grad, factor, group["scale"])
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

    def _scales(self, state: dict, grad: torch.Tensor, factor: torch.Tensor, scale: float):
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
        norm = squares.sqrt()
        if "scaled_grad" in state:
            limiter = max(norm / (state["scaled_grad"] + 1e-8), 1.01) / 1.01
            state["scaled_grad"] = norm / limiter
            return front / limiter, back
        state["scaled_grad"] = norm
        return front, back


def _scaled(g: torch.Tensor, factor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``grad * factor`` (``g`` holds those rows of the
    gradient; a per-row factor is sliced with them, a per-column or scalar one broadcasts)."""
    return g * (factor[start:stop] if factor.ndim == 2 and factor.shape[1] == 1 else factor)
