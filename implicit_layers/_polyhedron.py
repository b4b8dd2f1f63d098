"""The Euclidean projection onto a polyhedron, a quadratic program solved by :func:`~implicit_layers.qp`."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ._capture import refuse_vmap
from ._eager import run_eagerly
from ._info import ConvergenceError, ConvergenceWarning, user_stacklevel
from ._qp._functional import qp
from ._qp._ipm import SOLVED, STATUS_NAMES, inaccurate_hint
from ._qp._settings import InteriorPoint
from ._set_params import require_tensor

__all__ = ["polyhedron"]


@run_eagerly  # one graph break under torch.compile (its checks and report read the host)
def polyhedron(
    x: Tensor,
    A: Tensor | None = None,
    b: Tensor | None = None,
    G: Tensor | None = None,
    h: Tensor | None = None,
    *,
    solver: InteriorPoint | None = None,
) -> Tensor:
    """Project onto the polyhedron ``{y: A y = b, G y <= h}``.

    The projection is the quadratic program ``min ½‖y‖² − xᵀy  s.t.  Ay = b, Gy <= h``, solved
    by :func:`~implicit_layers.qp` (an interior point in float64, whatever the dtype of ``x``).
    Its backward differentiates the KKT conditions at the solution, so derivatives reach ``x``
    and every one of ``A, b, G, h`` that requires them, to any order (``create_graph=True``,
    ``torch.func.grad`` / ``jacrev``). It does not run under ``torch.func.vmap``: pass a batch as
    leading dimensions of ``x`` instead, which are solved together in one batched solve.

    Where a closed form exists it is cheaper and exact to rounding: ``halfspace``,
    ``hyperplane``, ``affine_set``, ``box``, ``box_section``.

    Args:
        x: points, shape ``(*batch, n)``.
        A: equality constraints, shape ``(p, n)`` (shared by the batch) or ``(*batch, p, n)``;
            with ``b``, or ``None`` for no equalities.
        b: shape ``(p,)`` or ``(*batch, p)``; ``None`` exactly when ``A`` is.
        G: inequality constraints, shape ``(m, n)`` or ``(*batch, m, n)``; with ``h``, or
            ``None`` for no inequalities.
        h: shape ``(m,)`` or ``(*batch, m)``; ``None`` exactly when ``G`` is.
        solver: the settings of the interior point (default ``il.InteriorPoint()``); its
            ``on_failure`` decides whether an empty set warns (default) or raises, and
            ``infeasible="closest"`` projects onto the closest nonempty polyhedron instead.

    Returns:
        The projection, shape of ``x``. Like the other set parameters, ``A, b, G, h`` are cast
        to the dtype of ``x``.

    Raises:
        TypeError: a non-tensor or non-float argument, a ``solver`` that is not an
            ``il.InteriorPoint``, or a call under ``torch.func.vmap``.
        ValueError: no constraint at all, ``A`` without ``b`` (or ``G`` without ``h``), or shapes
            that do not fit ``x``.
        implicit_layers.ConvergenceError: the set is empty, with
            ``solver=il.InteriorPoint(on_failure="raise")``.

    Warns:
        implicit_layers.ConvergenceWarning: the set is empty (or the solve stopped at its step
            limit) for some vectors; the warning names them, and their outputs are not
            projections.

    Example:
        >>> G = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> polyhedron(torch.tensor([1.0, 1.0], dtype=torch.float64), G=G, h=torch.ones(1, dtype=G.dtype))
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    x = require_tensor(x, "x")
    refuse_vmap(
        "projection.polyhedron", (("x", x), ("A", A), ("b", b), ("G", G), ("h", h)),
        "it projects a batch natively, so give the batch as leading dimensions of x (and of A, b, "
        "G, h if they differ per vector) instead; torch.func.grad and jacrev work.",
    )
    if solver is None:
        solver = InteriorPoint()
    elif not isinstance(solver, InteriorPoint):
        raise TypeError(f"solver must be an il.InteriorPoint, got {type(solver).__name__}.")
    batch = x.shape[:-1]
    n = x.shape[-1]
    eq = _pair(A, b, "A", "b", x)
    ineq = _pair(G, h, "G", "h", x)
    if eq is None and ineq is None:
        raise ValueError(
            "polyhedron needs constraints: got A, b, G and h all None. Pass A and b (A y = b), "
            "G and h (G y <= h), or both; without constraints the projection is x itself."
        )
    N = math.prod(batch)
    if N == 0:  # no vector to project
        return x.clone()
    q = -x.reshape(N, n) if batch else -x
    Q = torch.eye(n, dtype=x.dtype, device=x.device)
    G_, h_ = (_flat(ineq[0], 2, N), _flat(ineq[1], 1, N)) if ineq is not None else (None, None)
    A_, b_ = (_flat(eq[0], 2, N), _flat(eq[1], 1, N)) if eq is not None else (None, None)
    # il.qp's own warning would name qp; this one names the projection and its vectors.
    y, info = qp(Q, q, G_, h_, A_, b_, solver=solver.replace(on_failure="ignore"), return_info=True)
    _report(info.status, batch, solver)
    return y.reshape(x.shape)


def _flat(t: Tensor, core: int, N: int) -> Tensor:
    """A batched parameter with its batch dimensions flattened into one (il.qp takes one at most)."""
    return t.reshape((N,) + t.shape[t.dim() - core:]) if t.dim() > core else t


def _pair(
    M: Tensor | None, v: Tensor | None, mname: str, vname: str, x: Tensor
) -> tuple[Tensor, Tensor] | None:
    """The checked constraint pair ``(M, v)`` cast to ``x``'s dtype, or ``None`` when both are absent."""
    if M is None and v is None:
        return None
    if M is None or v is None:
        given, missing = (vname, mname) if M is None else (mname, vname)
        raise ValueError(
            f"{mname} and {vname} go together: got {given} but {missing}=None. Pass both or neither."
        )
    M = require_tensor(M, mname).to(x.dtype)
    v = require_tensor(v, vname).to(x.dtype)
    batch, n = tuple(x.shape[:-1]), x.shape[-1]
    if M.dim() not in (2, 2 + len(batch)) or M.shape[-1] != n or (M.dim() > 2 and M.shape[:-2] != batch):
        raise ValueError(
            f"{mname} must have shape (k, n) or (*x.shape[:-1], k, n) with n = {n} and x.shape[:-1] = "
            f"{batch}; got {tuple(M.shape)}."
        )
    k = M.shape[-2]
    if v.dim() not in (1, 1 + len(batch)) or v.shape[-1] != k or (v.dim() > 1 and v.shape[:-1] != batch):
        raise ValueError(
            f"{vname} must have shape (k,) or (*x.shape[:-1], k) with k = {k} (the rows of {mname}) and "
            f"x.shape[:-1] = {batch}; got {tuple(v.shape)}."
        )
    return M, v


def _report(status: Tensor, batch: torch.Size, solver: InteriorPoint) -> None:
    """One warning (or error) naming every vector whose projection was not found."""
    if solver.on_failure == "ignore":
        return
    codes = status.reshape(-1).tolist()
    failed = [i for i, c in enumerate(codes) if c != SOLVED]
    if not failed:
        return
    if batch:
        where = "the vector(s) at " + ", ".join(
            f"{tuple(int(j) for j in torch.unravel_index(torch.tensor(i), batch))} ({STATUS_NAMES[codes[i]]})"
            for i in failed[:20]
        ) + (" ..." if len(failed) > 20 else "")
    else:
        where = f"x ({STATUS_NAMES[codes[0]]})"
    closest = (" With infeasible='closest' their outputs project onto the closest nonempty polyhedron "
               "(h and b shifted by the least amount)." if solver.infeasible == "closest"
               else " Their outputs are not projections.")
    message = (
        f"projection.polyhedron: no projection found for {where}: {len(failed)} of {len(codes)} "
        f"vector(s).{closest} 'primal infeasible' means the set {{A y = b, G y <= h}} is empty: check "
        f"the constraints; 'max steps' means the solver stopped early: raise max_steps (now "
        f"{solver.max_steps}) in solver=il.InteriorPoint(...).{inaccurate_hint(codes)}"
    )
    if solver.on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=user_stacklevel())
