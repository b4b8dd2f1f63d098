"""The initial guess of a backward linear solve, from what the forward solver learned.

A forward solver may offer a guess for ``A x = b`` (:meth:`ForwardSolver.adjoint_guess`,
Broyden's inverse-Jacobian estimate: the warm start of SHINE, Ramzi et al. 2022). The guess
``h`` is used through the multiple ``c h`` with the smallest residual ``‖b - c A h‖``, per
sample, so the start is never worse than zero (``c = 0`` where the guess does not help): an
estimate that is accurate only along the forward's secant directions can otherwise start the
solve far off (residuals 10-1000 times ``‖b‖`` were measured on linear fixed points). The
scaling costs one product ``A h``; the linear solver's own first product, ``A x0`` for its
initial residual, is answered from it, so the warm start costs one product in all. The solver
then iterates to its usual tolerance (relative to ``‖b‖``), so the result is as accurate as
from zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: Products checked against the initial guess before the cache is dropped: the solver's
#: initial residual comes first, after at most the two products of a symmetry probe.
_LOOKUPS = 3


def warm_start(
    mv: Callable[[Tensor], Tensor], b: Tensor, guess: Tensor | None, source: str
) -> tuple[Tensor | None, Callable[[Tensor], Tensor]]:
    """The initial guess ``c h`` (``c`` per sample, least residual) and a product that answers
    ``A (c h)`` from the product already spent.

    Args:
        mv: the operator product on ``(B, n)``.
        b: the right-hand sides, ``(B, n)``.
        guess: the guess ``h``, ``(B, n)``, or ``None``.
        source: who made the guess, for the error message.

    Returns:
        ``(x0, mv)``: the scaled guess (``None`` if ``guess`` is), and the product to give the
            linear solver.

    Raises:
        ValueError: if ``guess`` does not have the shape, dtype and device of ``b``.
    """
    if guess is None:
        return None, mv
    if guess.shape != b.shape or guess.dtype != b.dtype or guess.device != b.device:
        raise ValueError(
            f"{source}.adjoint_guess returned a tensor of shape {tuple(guess.shape)}, "
            f"{guess.dtype} on {guess.device}; it must match the right-hand side "
            f"({tuple(b.shape)}, {b.dtype} on {b.device}), or be None to start from zero."
        )
    h = guess.detach()
    w = mv(h)
    ww = torch.linalg.vecdot(w, w)
    c = torch.linalg.vecdot(b, w) / ww.clamp_min(torch.finfo(b.dtype).tiny)
    c = torch.where(torch.isfinite(c) & (ww > 0), c, torch.zeros_like(c)).unsqueeze(-1)
    x0, ax0 = c * h, c * w
    # Where the guess or its product is not finite, start from zero.
    ok = torch.isfinite(x0).all(-1, keepdim=True) & torch.isfinite(ax0).all(-1, keepdim=True)
    x0 = torch.where(ok, x0, torch.zeros_like(x0))
    ax0 = torch.where(ok, ax0, torch.zeros_like(ax0))
    return x0, _KnownProduct(mv, x0, ax0)


class _KnownProduct:
    """``mv``, except that a product with ``x0`` among the first few is answered from
    ``ax0`` (solvers start with ``b - A x0``)."""

    def __init__(self, mv: Callable[[Tensor], Tensor], x0: Tensor, ax0: Tensor) -> None:
        self.mv = mv
        self.known: tuple[Tensor, Tensor] | None = (x0, ax0)
        self.lookups = _LOOKUPS

    def __call__(self, v: Tensor) -> Tensor:
        if self.known is not None:
            x0, ax0 = self.known
            self.lookups -= 1
            if self.lookups <= 0:
                self.known = None
            if v.shape == x0.shape and torch.equal(v, x0):
                self.known = None
                return ax0.clone()
        return self.mv(v)
