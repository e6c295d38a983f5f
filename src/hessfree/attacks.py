"""Adversarial attacks used by :class:`hessfree.targets.Robustness`.

Each attack receives the input tensor ``x`` (B, ...), a function giving the
per-example loss at a candidate input, and a function giving the model
outputs. It returns detached adversarial inputs. Attacks are run at each
member's parameters and the result is then held fixed (Danskin's theorem: the
gradient of the worst-case loss is the gradient at the maximiser).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._checks import integer, number

LossOfInput = Callable[[torch.Tensor], torch.Tensor]


def _input_grad(loss_fn: LossOfInput, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(x).sum(), x)
    return g


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


class Attack:
    """Base class: ``perturb(x, loss_fn, output_fn) -> x_adv``."""

    clip: tuple[float, float] | None = None

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            return x
        lo, hi = (b.to(x) if isinstance(b, torch.Tensor) else b for b in self.clip)
        return x.clamp(lo, hi)

    @staticmethod
    def _check_clip(clip: Any, cls: str) -> tuple[Any, Any] | None:
        """``(low, high)``: numbers, or tensors / arrays of per-feature bounds that broadcast
        against the input; finite, with ``low < high`` everywhere."""
        if clip is None:
            return None
        if isinstance(clip, (str, bytes)) or not hasattr(clip, "__len__") or len(clip) != 2:
            raise ValueError(f"{cls}: clip must be (low, high) or None, got {clip!r}")
        lo, hi = clip[0], clip[1]
        if isinstance(lo, (torch.Tensor, np.ndarray)) or isinstance(hi, (torch.Tensor, np.ndarray)):
            lo_t, hi_t = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
            if not (bool(torch.isfinite(lo_t).all()) and bool(torch.isfinite(hi_t).all()) and bool((lo_t < hi_t).all())):
                raise ValueError(f"{cls}: clip must be finite (low, high) with low < high everywhere, got {clip!r}")
            return torch.as_tensor(lo), torch.as_tensor(hi)
        lo, hi = number(lo, f"{cls}: clip low"), number(hi, f"{cls}: clip high")
        if not lo < hi:
            raise ValueError(f"{cls}: clip must be (low, high) with low < high, got {clip!r}")
        return lo, hi

    def perturb(self, x: torch.Tensor, loss_fn: LossOfInput, output_fn: Callable) -> torch.Tensor:
        raise NotImplementedError


class FGSM(Attack):
    """Fast gradient sign method: ``x + eps * sign(grad_x loss)`` (L-inf radius eps).

    Args:
        eps: perturbation size in input units.
        clip: optional ``(low, high)`` valid input range: numbers, or per-feature tensors / arrays
            that broadcast against the input (``ValueError`` unless finite with low < high).
    """

    def __init__(self, eps: float, clip: tuple[float, float] | None = None):
        self.eps, self.clip = number(eps, "FGSM: eps", 0), self._check_clip(clip, "FGSM")

    def perturb(self, x, loss_fn, output_fn):
        return self._clip(x + self.eps * _input_grad(loss_fn, x).sign()).detach()

    def __repr__(self) -> str:
        return f"FGSM(eps={self.eps})"


class PGD(Attack):
    """Projected gradient ascent on the loss within an L-inf or L2 ball.

    Args:
        eps: ball radius in input units.
        steps: ascent steps.
        step_size: per-step size; default ``2.5 * eps / steps``.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform point in the ball (seeded; for ``"l2"``
            a uniform direction and radius ``eps * U^(1/d)``). Each batch draws its
            start from the same seed, so the start of an example depends on its
            row in the batch (and the target slightly on ``batch_size``).
        seed: seed of the random start.
        clip: optional ``(low, high)`` valid input range: numbers, or per-feature tensors / arrays
            that broadcast against the input (``ValueError`` unless finite with low < high).
    """

    def __init__(
        self,
        eps: float,
        steps: int = 10,
        step_size: float | None = None,
        norm: str = "linf",
        random_start: bool = True,
        seed: int = 0,
        clip: tuple[float, float] | None = None,
    ):
        eps, steps = number(eps, "PGD: eps", 0), integer(steps, "PGD: steps")
        if norm not in ("linf", "l2"):
            raise ValueError(f"PGD: norm must be 'linf' or 'l2', got {norm!r}")
        self.eps, self.steps, self.norm = eps, steps, norm
        self.step_size = number(step_size, "PGD: step_size", 0, above=True) if step_size is not None else 2.5 * eps / steps
        self.random_start, self.seed = bool(random_start), integer(seed, "PGD: seed", None)
        self.clip = self._check_clip(clip, "PGD")

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        return delta * (self.eps / _per_example_norm(delta)).clamp(max=1.0)

    def perturb(self, x, loss_fn, output_fn):
        x0 = x.detach()
        delta = torch.zeros_like(x0)
        if self.random_start and self.eps > 0:
            gen = torch.Generator().manual_seed(self.seed)
            if self.norm == "linf":
                noise = torch.rand(x0.shape, generator=gen, dtype=x0.dtype) * 2 - 1
                delta = (noise * self.eps).to(x0.device)
            else:  # uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d)
                d = x0[0].numel()
                direction = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
                radius = torch.rand(x0.shape[0], generator=gen, dtype=x0.dtype).pow(1.0 / d) * self.eps
                shape = (-1, *([1] * (x0.dim() - 1)))
                delta = (direction / _per_example_norm(direction) * radius.view(shape)).to(x0.device)
        for _ in range(self.steps):
            g = _input_grad(loss_fn, self._clip(x0 + delta))
            step = g.sign() if self.norm == "linf" else g / _per_example_norm(g)
            delta = self._project(delta + self.step_size * step)
        return self._clip(x0 + delta).detach()

    def __repr__(self) -> str:
        return f"PGD(eps={self.eps}, steps={self.steps}, norm={self.norm!r})"


def binary_margin(outputs: torch.Tensor) -> torch.Tensor:
    """Signed margin of a binary classifier, ``(B,)``: the logit for one output,
    ``logit_1 - logit_0`` for two outputs."""
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        return outputs.reshape(-1)
    if outputs.dim() == 2 and outputs.shape[1] == 2:
        return outputs[:, 1] - outputs[:, 0]
    raise ValueError(
        f"LinearMinimal needs a binary classifier (1 or 2 outputs), got outputs of shape "
        f"{tuple(outputs.shape)}; use FGSM or PGD for multi-class models"
    )


class LinearMinimal(Attack):
    """Closed-form minimal perturbation across a linear decision boundary.

    ``x_adv = x - (1 + overshoot) * m(x) / ||w||^2 * w`` with ``m(x) = w.x + b``
    the signed margin and ``w = grad_x m``. For a linear model the new margin is
    exactly ``-overshoot * m(x)``; for other models this is one DeepFool step.
    Only points whose loss the step raises are moved (those the model classifies
    correctly): crossing the boundary from the wrong side would correct a
    misclassified point, which is no attack. So accuracy under this attack is 0
    on the attacked model, and the loss under attack is never below the clean loss.
    """

    def __init__(self, overshoot: float = 0.3):
        self.overshoot = number(overshoot, "LinearMinimal: overshoot", 0)

    def perturb(self, x, loss_fn, output_fn):
        return self.perturb_differentiable(x, output_fn, loss_fn).detach()

    def perturb_differentiable(self, x: torch.Tensor, output_fn: Callable, loss_fn: Callable | None = None) -> torch.Tensor:
        """``x_adv`` as a differentiable function of the model's parameters
        (``x`` itself is treated as a constant). With ``loss_fn`` (per-example
        loss at an input) points whose loss the step would not raise stay at ``x``."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            margin = binary_margin(output_fn(x))
            (w,) = torch.autograd.grad(margin.sum(), x, create_graph=True)
            w_norm2 = w.reshape(w.shape[0], -1).pow(2).sum(1).clamp_min(1e-24)
            coef = ((1 + self.overshoot) * margin / w_norm2).view(-1, *([1] * (x.dim() - 1)))
            x_adv = x.detach() - coef * w
        if loss_fn is None:
            return x_adv
        with torch.no_grad():  # which points the step attacks: a piecewise-constant choice
            raises = (loss_fn(x_adv.detach()) > loss_fn(x.detach())).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(raises, x_adv, x.detach())

    def __repr__(self) -> str:
        return f"LinearMinimal(overshoot={self.overshoot})"
