"""Checking and broadcasting the problem data of :func:`~implicit_layers.qp`."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._capture import refuse_vmap, transforms_active
from ._linalg import largest_abs

__all__ = ["QPData", "check_inputs", "expand"]

QPData = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    refuse_vmap("il.qp", ((name, value),), "it solves batches natively, so pass the batch as a "
                "leading dimension of the inputs instead (torch.func.grad and jacrev work).")
    if not (value.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor (float32 or float64), got {value.dtype}.")
    return value


def _check_rank(t: Tensor, name: str, core: int, shape: str) -> None:
    if t.dim() not in (core, core + 1):
        raise ValueError(
            f"{name} must have shape {shape} or (B, {shape[1:]}, got {tuple(t.shape)}. "
            "Give one leading batch dimension at most, or none to share it across the batch."
        )


def check_inputs(
    Q: object, q: object, G: object | None, h: object | None, A: object | None, b: object | None
) -> tuple[QPData, int | None]:
    """Validate the data and return it with empty ``G, h`` / ``A, b`` filled in, and ``B``.

    Returns:
        ``(Q, q, G, h, A, b)`` in their given (unexpanded) shapes, and the batch size ``B``
        (``None`` when no input carries a batch dimension).

    Raises:
        TypeError: a non-tensor or non-float input.
        ValueError: shapes that do not fit together, or ``G`` without ``h`` (``A`` without ``b``).
    """
    q_t = _tensor(q, "q")
    if q_t.dim() not in (1, 2):
        raise ValueError(f"q must have shape (n,) or (B, n), got {tuple(q_t.shape)}.")
    n = q_t.shape[-1]
    Q_t = _tensor(Q, "Q")
    _check_rank(Q_t, "Q", 2, "(n, n)")
    if Q_t.shape[-2:] != (n, n):
        raise ValueError(f"Q must be (n, n) = ({n}, {n}) to match q of shape {tuple(q_t.shape)}, "
                         f"got {tuple(Q_t.shape)}.")
    pairs = []
    for mat, vec, mname, vname in ((G, h, "G", "h"), (A, b, "A", "b")):
        if (mat is None) != (vec is None):
            raise ValueError(f"{mname} and {vname} go together: got {mname}="
                             f"{'None' if mat is None else 'a tensor'} and {vname}="
                             f"{'None' if vec is None else 'a tensor'}. Pass both or neither.")
        if mat is None:
            pairs.append((q_t.new_zeros(0, n), q_t.new_zeros(0)))
            continue
        M = _tensor(mat, mname)
        v = _tensor(vec, vname)
        _check_rank(M, mname, 2, "(k, n)")
        if v.dim() not in (1, 2):
            raise ValueError(f"{vname} must have shape (k,) or (B, k), got {tuple(v.shape)}.")
        if M.shape[-1] != n or M.shape[-2] != v.shape[-1]:
            raise ValueError(
                f"{mname} must be (k, n) with n = {n} (from q) and k = {v.shape[-1]} (from {vname}), "
                f"got {mname} of shape {tuple(M.shape)} and {vname} of shape {tuple(v.shape)}."
            )
        pairs.append((M, v))
    (G_t, h_t), (A_t, b_t) = pairs
    data = (Q_t, q_t, G_t, h_t, A_t, b_t)
    # Mixed dtypes (a bfloat16 Q from a matmul under autocast next to a float32 q) are promoted
    # to the widest, as torch's binary operations do.
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in data))
    Q_t, q_t, G_t, h_t, A_t, b_t = data = tuple(t.to(dtype) for t in data)  # type: ignore[assignment]
    names = ("Q", "q", "G", "h", "A", "b")
    core = (2, 1, 2, 1, 2, 1)
    batches = {name: t.shape[0] for name, t, c in zip(names, data, core, strict=True) if t.dim() == c + 1}
    sizes = set(batches.values())
    if len(sizes) > 1:
        raise ValueError(f"the batch sizes of the inputs differ: {batches}. Give every batched "
                         "input the same leading dimension B.")
    batch = sizes.pop() if sizes else None
    devices = {t.device for t in data}
    if len(devices) > 1:
        raise ValueError(f"Q, q, G, h, A, b must be on one device, got {sorted(map(str, devices))}.")
    _check_finite(data, names, core)
    # The objective ½zᵀQz depends on the symmetric part of Q alone, which the solver's Newton
    # systems need. A Q symmetric to rounding that carries no derivatives is used as given (no
    # new tensor); one that carries them always enters as its symmetric part (a symmetric
    # gradient).
    Q_t = _symmetric_part(Q_t)
    _check_positive_semidefinite(Q_t)
    return (Q_t, q_t, G_t, h_t, A_t, b_t), batch


def _check_finite(data: QPData, names: tuple[str, ...], core: tuple[int, ...]) -> None:
    """Raise a ``ValueError`` naming the first input with a NaN or infinite entry (and its
    batch sample): the interior point would run its whole step budget on it and return NaN as
    if the constraints were infeasible, and its backward fail in a linear-algebra routine."""
    if data[0].device.type == "meta":
        return
    # One sum per input decides first, in one host synchronisation: it is finite when every
    # entry is (a sum of finite entries that overflows takes the entry-wise test below). A
    # tenth of the time of entry-wise tests, which allocate a mask the size of the data.
    if bool(torch.isfinite(torch.stack([t.sum() for t in data])).all()):
        return
    finite = torch.stack([torch.isfinite(t).all() for t in data])
    if bool(finite.all()):
        return
    name, t, c = next((n, t, c) for n, t, c, ok in zip(names, data, core, finite.tolist(), strict=True)
                      if not ok)
    where = ""
    if t.dim() == c + 1:
        bad = ~torch.isfinite(t.flatten(1)).all(-1)
        where = f" (batch sample {int(bad.nonzero()[0, 0])})"
    hint = (" An infinite bound is no constraint: drop that row of G and h." if name == "h" else "")
    raise ValueError(f"{name} must be finite, got a NaN or infinite entry{where}.{hint}")


def _symmetric_part(Q: Tensor) -> Tensor:
    """``(Q + Qᵀ)/2``, or ``Q`` itself where it is symmetric up to rounding and carries no
    derivatives. Where it carries them, always the symmetric part (the same values for a
    symmetric ``Q``): the solution depends on it alone, so its gradient is symmetric, as
    finite differences of single entries and ``gradcheck`` see it; ``Q`` itself would give
    ``-y zᵀ``, wrong along antisymmetric directions."""
    if Q.device.type == "meta" or Q.shape[-1] == 0:
        return Q
    if Q.requires_grad or transforms_active():
        return (Q + Q.mT) / 2
    M = Q.detach()
    if torch.equal(M, M.mT):  # the common case, without a temporary the size of Q
        return Q
    if bool((M - M.mT).abs().amax() <= 64 * torch.finfo(M.dtype).eps * M.abs().amax()):
        return Q
    return (Q + Q.mT) / 2


def _check_positive_semidefinite(Q: Tensor) -> None:
    """Raise a ``ValueError`` naming ``Q`` if a diagonal entry is negative, or an entry is
    larger than the geometric mean of its two diagonal entries (``Qᵢⱼ² > QᵢᵢQⱼⱼ``: an
    indefinite 2 x 2 principal minor), beyond rounding: a nonconvex QP, whose stationary points
    the interior-point method would return as solved. Both are entry-wise tests; a full test
    (a Cholesky factorisation of every ``Q``, measured a tenth of a batched solve's time) is
    not made, so an indefinite ``Q`` whose 2 x 2 principal minors are all nonnegative is not
    caught here.

    Rounding is allowed for at the precision ``Q`` may have been built in, not only the one it
    is passed in (float32 data passed as float64, a Schur complement that is zero up to
    rounding): a diagonal entry down to ``-1e-6`` of the largest entry, and minors at zero up
    to a relative ``1/32`` on ``Qᵢⱼ²`` (rank one or duplicated variables, rounded down to
    bfloat16, as an autocast matmul returns them). A ``Q`` that is zero up to the rounding of a
    cancellation has no larger entry to measure that rounding against, and may be refused."""
    if Q.device.type == "meta" or Q.shape[-1] == 0:
        return
    Qd = Q.detach()
    diag = Qd.diagonal(dim1=-2, dim2=-1)
    # The largest entry, on the diagonal for a positive semidefinite matrix (read over the
    # whole matrix: an indefinite Q may have a zero diagonal).
    scale = largest_abs(Qd.flatten(-2)).unsqueeze(-1)
    slack = max(64 * torch.finfo(diag.dtype).eps, 1e-6) * scale
    negative = (diag < -slack).any(-1)
    # |Qᵢⱼ| / √(dᵢdⱼ) row by row, in one temporary (a tenth of the time of the products). For
    # Q = 0 (an LP) this is 0/0: NaN, which passes the test.
    root = (diag.clamp_min(0.0) + slack).rsqrt()
    ratio = torch.mul(Qd, root.unsqueeze(-2)).abs_().amax(-1) * root
    minor = (ratio > (1 + 1 / 32) ** 0.5).any(-1)
    bad = negative | minor
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0, 0])
        where = "" if bad.dim() == 0 else f" (batch sample {first})"
        what = ("it has a negative diagonal entry" if bool(negative.flatten()[first]) else
                "an entry exceeds the geometric mean of its two diagonal entries, so a 2 x 2 "
                "principal minor is negative")
        raise ValueError(
            f"Q must be positive semidefinite (a convex QP){where}: {what}. For a nonconvex "
            "objective use il.argmin with a constraint, or make Q convex (e.g. Q = L Lᵀ + εI)."
        )


def expand(data: QPData, batch: int) -> QPData:
    """Every input with its leading batch dimension (views, no copies)."""
    core = (2, 1, 2, 1, 2, 1)
    out = [t if t.dim() == c + 1 else t.expand((batch,) + t.shape) for t, c in zip(data, core, strict=True)]
    return out[0], out[1], out[2], out[3], out[4], out[5]


