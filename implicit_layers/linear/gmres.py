"""Restarted GMRES for general (non-symmetric) systems."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import GraphedSolverKeywords, check_positive_int
from .._cuda_graph import ChunkGraphs, graph_runner
from .._info import SolveInfo
from ._base import LinearSolver
from ._loop import LinearLoop, check_active
from ._operator import LinearOperator
from ._restart import run_in_rounds

__all__ = ["GMRES", "arnoldi_step"]


class GMRES(LinearSolver):
    """Restarted GMRES(m), batched, with per-sample stopping.

    Minimises the residual ``‖b - A x‖`` over a Krylov subspace of dimension up to ``restart``,
    then restarts from the improved ``x``. Works for any invertible operator (non-symmetric,
    indefinite) and needs only the product ``A v``; it is the default backward solver of
    fixed-point and root layers, whose linear systems ``(I - J) u = g`` are non-symmetric.

    The Arnoldi basis is orthogonalised by classical Gram-Schmidt applied twice (as stable as
    modified Gram-Schmidt, but a few batched products per step instead of a loop); the
    Hessenberg matrix is reduced by Givens rotations, so each sample's residual norm is known
    after every inner step and a sample stops as soon as it meets its tolerance, even in the
    middle of a cycle. At each restart (and at the end) the residual is recomputed as
    ``b - A x``, so the reported residual is the true one; a sample whose true residual does not
    decrease over a whole cycle (stagnation, or a singular operator) is stopped and reported as
    not converged.

    Cost: each inner step is one operator product plus ``O(j n)`` work for the ``j``-th basis
    vector; each cycle adds one operator product for the true residual. Memory holds
    ``B (restart + 1) n`` numbers for the basis.

    Solves ``(B, n)`` right-hand sides (:meth:`LinearSolver.solve`) and returns ``(x, info)``
    with ``x`` of shape ``(B, n)`` and per-sample :class:`~implicit_layers.SolveInfo`.

    Args:
        restart: Krylov dimension ``m`` of each cycle (default 20; clamped to ``n``); the one
            positional argument, as in the textbook name GMRES(m). Larger values converge in
            fewer products on hard problems at the price of memory ``O(B m n)`` and ``O(m n)``
            work per step.
        max_steps: limit on the total number of inner steps (Arnoldi products) over all cycles
            (default 1000); ``info.steps`` counts the inner steps each sample used.
        rtol, atol, check_every, on_failure: as for every linear solver
            (:class:`~implicit_layers.linear.LinearSolver`).
        cuda_graph: record the Arnoldi steps between two checks as CUDA graphs (one per
            position in the cycle, each captured at its second use) and replay them
            (default ``False``); same conditions as :class:`Neumann`'s.

    Raises:
        TypeError: if a setting has the wrong type (``restart=2.5``) or a setting other than
            ``restart`` is passed positionally.
        ValueError: if a setting is out of range (``restart < 1``, ``rtol < 0``, ...).

    Examples:
        >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([4.0, 1.0], dtype=torch.float64)
        >>> x, info = il.linear.solve(A, b, il.linear.GMRES(10, rtol=1e-12))
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), int(info.steps)
        (True, 2)

        As the backward of a fixed-point layer (its default there):

        >>> W = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64, requires_grad=True)
        >>> z = il.fixed_point(lambda z: torch.tanh(W @ z + 1), torch.zeros(2, dtype=torch.float64),
        ...                    backward=il.linear.GMRES(restart=5))
        >>> z.sum().backward()
        >>> W.grad.shape
        torch.Size([2, 2])
    """

    name = "GMRES"
    supports_cuda_graph = True

    def __init__(self, restart: int = 20, **settings: Unpack[GraphedSolverKeywords]) -> None:
        super().__init__(**settings)
        self.restart = check_positive_int(restart, "restart")

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        m_max = min(self.restart, b.shape[1])
        graphs = graph_runner(
            self.name, self.cuda_graph, b, recording=torch.is_grad_enabled(),
            autograd_products=True,
        )
        # Without autograd the buffers are written in place; with it, each step builds new
        # tensors. One cycle loop (_Cycles) serves both: only the Arnoldi step differs.
        cycles = (
            _InPlaceCycles(b, m_max, op.mv, graphs) if not torch.is_grad_enabled()
            else _RecordedCycles(b, m_max, op.mv)
        )
        return run_in_rounds(self, op, b, x0, cycles)

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps}) or restart (now {self.restart}), or loosen "
            "rtol/atol; for small ill-conditioned problems Dense is exact."
        )


#: Rows of the basis per block of the in-place cycles' Gram-Schmidt products.
_BLOCK = 8

_CONSTANTS: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}


def _constants(dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """The constants of the cycles in ``dtype`` on ``device`` (``zero``, ``one``, ``inf``;
    ``I2`` and ``J2``: a rotation ``[[c, s], [-s, c]]`` is ``c · I + s · J``), made once:
    each is an op. Normal tensors (also when first asked for in inference mode), never
    written; not kept while compiling."""
    key = (dtype, device)
    constants = _CONSTANTS.get(key)
    if constants is None:
        with torch.inference_mode(False):
            constants = {
                "zero": torch.zeros((), dtype=dtype, device=device),
                "one": torch.ones((), dtype=dtype, device=device),
                "inf": torch.full((), torch.inf, dtype=dtype, device=device),
                "I2": torch.eye(2, dtype=dtype, device=device),
                "J2": torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=dtype, device=device),
            }
        if not torch.compiler.is_compiling():
            _CONSTANTS[key] = constants
    return constants


class _Cycles:
    """The GMRES cycle of :func:`run_in_rounds`, shared by the in-place and the recorded
    variants: up to ``restart`` Arnoldi steps (``check_every`` of them between two checks, or
    a replayed chunk), then the least-squares update of the iterate. A variant allocates its
    buffers (:meth:`_start`) and takes a step (:meth:`_step`) on the loop state
    ``(tol, res, active, used)``: the tolerances, the residual estimates, the samples stepping
    and the steps each sample took in the cycle."""

    V: Tensor  # the Arnoldi basis, (B, m + 1, n)
    omega: Tensor  # the accumulated Givens rotations, omega @ H = R, (B, m + 1, m + 1)
    R: Tensor  # the triangular factor, (B, m, m)

    def __init__(
        self, b: Tensor, m_max: int, mv: Callable[[Tensor], Tensor],
        graphs: ChunkGraphs | None = None,
    ) -> None:
        self.mv = mv
        self.graphs = graphs
        self.m_max = m_max
        self.eps = torch.finfo(b.dtype).eps
        self.c = _constants(b.dtype, b.device)
        self.zero, self.one = self.c["zero"], self.c["one"]

    def _start(
        self, m: int, r: Tensor, beta: Tensor, started: Tensor, loop: LinearLoop
    ) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _step(self, j: int, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def __call__(
        self, x: Tensor, r: Tensor, beta: Tensor, started: Tensor, loop: LinearLoop
    ) -> tuple[Tensor, Tensor]:
        m = min(self.m_max, loop.max_steps - loop.k)
        state = self._start(m, r, beta, started, loop)
        if self.graphs is not None:
            state, j_end = self._chunked(m, state, loop)
        else:
            j_end = 0
            for j in range(m):
                # j == 0: the cycle starts right after a check.
                if not loop.proceed(state[1], active=state[2], check=j > 0):
                    break
                state = self._step(j, state)
                j_end = j + 1
        used = state[3].view(x.shape[0])
        if j_end == 0:
            return x, used
        # Per sample, solve the triangular system of its first `used` steps only: the columns
        # past them are those of the identity (the solve reads the upper triangle only).
        k = j_end
        mask = torch.arange(k, device=x.device) < used.unsqueeze(-1)  # (B, k)
        eye = torch.eye(k, dtype=x.dtype, device=x.device)
        Rk = torch.where(mask.unsqueeze(-2), self.R[:, :k, :k], eye)
        g = torch.where(mask, beta.unsqueeze(-1) * self.omega[:, :k, 0], self.zero)
        y = torch.linalg.solve_triangular(Rk, g.unsqueeze(-1), upper=True)
        return x + torch.bmm(y.mT, self.V[:, :k]).squeeze(1), used

    def _chunked(
        self, m: int, state: tuple[Tensor, ...], loop: LinearLoop
    ) -> tuple[tuple[Tensor, ...], int]:
        """The cycle's steps in chunks of ``check_every`` steps counted from the start of the
        cycle (the step-by-step loop counts them over the whole solve), so that every cycle
        reuses the same graphs, keyed by first step and length; a check between chunks.
        Each sample takes the same steps as in the step-by-step loop: a sample's steps stop
        where it converges, whenever the batch notices. Returns the state and the steps
        taken."""
        assert self.graphs is not None
        j = 0
        while j < m:
            if j > 0:  # as LinearLoop.proceed at a check (none right after the round's)
                all_done, _ = check_active(state[2], state[1], loop.name)
                if all_done:
                    break
            w = min(m - j, loop.check_every)

            def chunk(*state: Tensor, j0: int = j, w: int = w) -> tuple[Tensor, ...]:
                for i in range(j0, j0 + w):
                    state = self._step(i, state)
                return state

            state = self.graphs.run((j, w), chunk, state)
            loop.k += w
            j += w
        return state, j


class _InPlaceCycles(_Cycles):
    """GMRES cycles without autograd: the basis, the rotations and the triangular factor live
    in buffers allocated once per solve and written in place, through views made once, so
    that an Arnoldi step (:func:`arnoldi_step`) is about 34 ops besides the product and
    nothing synchronises between checks. The residual estimates and tolerances of the state
    are relative to the cycle's initial residual norms, all ``(B, 1, 1)``."""

    def __init__(
        self, b: Tensor, m_max: int, mv: Callable[[Tensor], Tensor],
        graphs: ChunkGraphs | None = None,
    ) -> None:
        super().__init__(b, m_max, mv, graphs)
        batch, n = b.shape
        dtype, device = b.dtype, b.device
        self.V = torch.zeros(batch, m_max + 1, n, dtype=dtype, device=device)
        # the rotations start as the identity (again at each later cycle, from _eye)
        self._eye = torch.eye(m_max + 1, dtype=dtype, device=device)
        self.omega = self._eye.repeat(batch, 1, 1)
        # one row more than the factor has: column j is written whole (its entries past j
        # are zeros), through a view that a split makes for every j at once
        self.R = torch.zeros(batch, m_max + 1, m_max, dtype=dtype, device=device)
        V, omega, R = self.V, self.omega, self.R
        # The views the steps work through, made once per solve (where a family of views
        # tiles a tensor, one split makes them all). A step works on the whole basis and
        # the whole rotations: the basis rows past step j are zeros (their coefficients come
        # out zero, and subtract nothing) and the rotations' rows past j + 1 are those of the
        # identity, so no step makes a view of its leading block.
        self.rows = V.unbind(1)
        self.rows3 = V.split(1, dim=1)  # (B, 1, n): row j
        self.VT = V.mT
        self.omegaT = omega.mT
        # The Gram-Schmidt products read the basis's leading rows in blocks of _BLOCK rows
        # (the block's rows past step j are zeros): the whole basis at every step would read
        # up to twice the rows the step needs (12 % more time for a solve at n = 256), a view
        # of the step's own rows would cost a view op per step; a block's views are made once.
        ends = sorted({min(m_max + 1, -(-(j + 1) // _BLOCK) * _BLOCK) for j in range(m_max)})
        blocks = {k: (V[:, :k], self.VT[:, :, :k], self.omegaT[:, :k]) for k in ends}
        self.block = [blocks[min(m_max + 1, -(-(j + 1) // _BLOCK) * _BLOCK)] for j in range(m_max)]
        self.next0 = omega[:, 1:, :1].split(1, dim=1)  # (B, 1, 1): omega[:, j + 1, 0]
        self.cols = R.mT.split(1, dim=1)  # (B, 1, m + 1): column j of R
        self.diag = R.diagonal(dim1=1, dim2=2).unsqueeze(-1).split(1, dim=1)  # (B, 1, 1)
        # (B, 2, m + 1): rows j and j + 1 of the rotations, overlapping windows of one unfold
        self.pairs = omega.unfold(1, 2, 1).transpose(-1, -2).unbind(1)
        self._cycles = 0

    @property
    def eye(self) -> Tensor:
        """The identity, ``(B, m + 1, m + 1)`` (a view)."""
        return self._eye.expand_as(self.omega)

    def _start(
        self, m: int, r: Tensor, beta: Tensor, started: Tensor, loop: LinearLoop
    ) -> tuple[Tensor, ...]:
        batch = r.shape[0]
        beta3 = beta.view(batch, 1, 1)
        # The steps track residuals relative to beta (the rotations' entry |omega_{j+1,0}|).
        rel_tol = loop.tol.view(batch, 1, 1) / beta3
        if self._cycles:  # the basis rows and rotations of the last cycle: reset
            self.V.zero_()
            self.omega.copy_(self.eye)
        self._cycles += 1
        torch.div(r.unsqueeze(1), torch.where(beta3 > 0, beta3, self.one), out=self.rows3[0])
        active = started.view(batch, 1, 1)
        used = torch.zeros(batch, 1, 1, dtype=torch.int64, device=r.device)
        return rel_tol, torch.ones_like(beta3), active, used

    def _step(self, j: int, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        rel_tol, res, active, used = state
        res, active = arnoldi_step(
            self.mv, j, self.rows[j], self.rows3[j + 1], *self.block[j], self.pairs[j],
            self.next0[j], self.cols[j], self.diag[j], rel_tol, res, active, used, self.eps,
            self.c,
        )
        return rel_tol, res, active, used


class _RecordedCycles(_Cycles):
    """GMRES cycles under autograd: buffers of the cycle's size allocated per cycle and
    out-of-place updates of the per-sample state, whose residual estimates and tolerances are
    absolute, all ``(B,)``.

    The step is the Arnoldi step of :func:`arnoldi_step` written without its in-place
    writes: that one overwrites the rotations it has just multiplied (``pair``), which a
    recorded product must keep intact. For the same reason, when autograd records the step
    (the product or the basis requires grad), the new basis vector and rotation go into
    copies of ``V`` and ``omega``: the products of earlier steps saved views of the old ones.
    ``R`` is read only by the back-substitution after the cycle, so it is written in place."""

    def _start(
        self, m: int, r: Tensor, beta: Tensor, started: Tensor, loop: LinearLoop
    ) -> tuple[Tensor, ...]:
        batch, n = r.shape
        dtype, device = r.dtype, r.device
        self.V = torch.zeros(batch, m + 1, n, dtype=dtype, device=device)
        self.V[:, 0] = r / torch.where(beta > 0, beta, self.one).unsqueeze(-1)
        self.omega = torch.eye(m + 1, dtype=dtype, device=device).repeat(batch, 1, 1)
        self.R = torch.zeros(batch, m, m, dtype=dtype, device=device)
        self.beta = beta
        used = torch.zeros(batch, dtype=torch.int64, device=device)
        return loop.tol, beta.clone(), started.clone(), used

    def _step(self, j: int, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        tol, res, active, used = state
        V, omega, R, eps, zero, one = self.V, self.omega, self.R, self.eps, self.zero, self.one
        batch = V.shape[0]
        w = self.mv(V[:, j])
        recording = w.requires_grad or V.requires_grad
        basis = V[:, : j + 1]
        # Classical Gram-Schmidt, twice. Row-vector products (B, 1, n) x (B, n, j+1):
        # 4-6x faster on the CPU than the column form (B, j+1, n) x (B, n, 1).
        h = torch.bmm(w.unsqueeze(1), basis.mT)
        w = w - torch.bmm(h, basis).squeeze(1)
        h2 = torch.bmm(w.unsqueeze(1), basis.mT)
        w = w - torch.bmm(h2, basis).squeeze(1)
        h = (h + h2).squeeze(1)
        hnorm = torch.linalg.vector_norm(w, dim=-1)
        colnorm = torch.hypot(torch.linalg.vector_norm(h, dim=-1), hnorm)
        # Happy breakdown: the Krylov space is invariant, the solution lies in it.
        breakdown = hnorm <= eps * colnorm
        hnorm = torch.where(breakdown, zero, hnorm)
        if recording:
            V = self.V = V.clone()
        V[:, j + 1] = w * torch.where(breakdown, zero, hnorm.reciprocal()).unsqueeze(-1)
        # Apply the previous rotations to the new column, then a new one to zero h_{j+1,j}.
        # Samples that are done keep rotating harmlessly: only their first `used` rows and
        # columns enter their solution, and later rotations do not touch them.
        t = torch.bmm(omega[:, : j + 1, : j + 1], h.unsqueeze(-1)).squeeze(-1)
        d = torch.hypot(t[:, j], hnorm)
        inv_d = torch.where(d > 0, d, one).reciprocal()
        cs = torch.where(d > 0, t[:, j] * inv_d, one)
        sn = hnorm * inv_d
        rot = torch.stack([cs, sn, -sn, cs], dim=-1).view(batch, 2, 2)
        rotated = torch.bmm(rot, omega[:, j : j + 2, : j + 2])
        if recording:
            omega = self.omega = omega.clone()
            # hypot saved t[:, j]: the rotated column is a new tensor, not t overwritten
            t = torch.cat((t[:, :j], d.unsqueeze(-1)), dim=-1)
        else:
            t[:, j] = d
        omega[:, j : j + 2, : j + 2] = rotated
        R[:, : j + 1, j] = t
        new_res = self.beta * omega[:, j + 1, 0].abs()
        # d ~ 0: the new column is in the span of the previous ones (singular operator); the
        # step is dropped. NaN stays "ok" so that the next check sees it.
        ok = active & ~(d <= 10 * eps * colnorm)
        used = used + ok
        res = torch.where(ok, new_res, res)
        return tol, res, ok & (new_res > tol) & ~breakdown, used


def arnoldi_step(
    mv: Callable[[Tensor], Tensor], j: int, v: Tensor, v_next: Tensor, basis: Tensor,
    basisT: Tensor, omegaT: Tensor, pair: Tensor, next0: Tensor, col: Tensor, diag: Tensor,
    rel_tol: Tensor, res: Tensor, active: Tensor, used: Tensor, eps: float,
    c: dict[str, Tensor],
) -> tuple[Tensor, Tensor]:
    """Step ``j`` of a GMRES cycle, in place (no autograd): the next basis vector, the new
    Hessenberg column reduced by Givens rotations, and each sample's residual estimate.

    Classical Gram-Schmidt twice; a happy breakdown (an invariant Krylov space) ends the
    sample; a new column in the span of the previous ones (``d ≈ 0``, a singular operator)
    drops the step. Samples that are done keep rotating harmlessly: only their first ``used``
    rows and columns enter their solution (their later rotations may even hold NaN). Free of
    host synchronisation and of Python branches on data (it compiles with
    ``torch.compile(fullgraph=True)``; with more of the basis given than its first ``j + 1``
    rows, make ``v_next`` inside the compiled region, ``basis[:, j + 1 : j + 2]``: a view of
    the written row passed in beside the basis is an aliased input that is also mutated,
    which inductor gets wrong).

    Args:
        mv: the operator product on ``(B, n)``.
        j: the step within the cycle.
        v: basis vector ``j``, ``(B, n)``; ``v_next``: the view ``(B, 1, n)`` of vector ``j+1``.
        basis, basisT: the first ``j + 1`` basis vectors ``(B, j+1, n)`` and their
            transpose, or more leading rows of it (up to the whole basis ``(B, m+1, n)``)
            with zeros past row ``j``.
        omegaT: the transposed accumulated rotations ``(B, j+1, j+1)``, or as many rows as
            ``basis`` has, each as long as ``col`` (up to ``m + 1``): the new column's entries past ``j`` come
            out zero, as the rotations' rows past ``j`` are still those of the identity;
            ``pair``: rows ``j`` and ``j + 1`` of the rotations ``(B, 2, j+2)`` (or longer:
            their entries past ``j + 1`` are zeros); ``next0``: their entry ``(j + 1, 0)``,
            ``(B, 1, 1)``.
        col: column ``j`` of the triangular factor, ``(B, 1, j+1)`` or longer; ``diag``: its
            entry ``(j, j)``, ``(B, 1, 1)``.
        rel_tol: the tolerances divided by the cycle's initial residual norms, ``(B, 1, 1)``.
        res: the residual estimates relative to the cycle's initial residual norms;
            ``active``: the samples stepping, ``(B, 1, 1)``.
        used: the steps each sample took in the cycle, ``(B, 1, 1)`` int64 (updated).
        eps: the dtype's machine epsilon.
        c: constants ``zero``, ``inf``, ``I2``, ``J2`` of the dtype.

    Returns:
        ``(res, active)`` after the step (``res`` relative, as given).
    """
    w0 = mv(v).unsqueeze(1)
    # ‖A v‖ bounds the Hessenberg column's norm (Gram-Schmidt keeps it up to rounding)
    scale = torch.linalg.vector_norm(w0, dim=-1, keepdim=True) * eps
    h = torch.bmm(w0, basisT)
    w = torch.baddbmm(w0, h, basis, alpha=-1.0)
    h2 = torch.bmm(w, basisT)
    w = torch.baddbmm(w, h2, basis, alpha=-1.0)
    h = h + h2
    hnorm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    # Happy breakdown: the Krylov space is invariant, the solution lies in it.
    breakdown = hnorm <= scale
    # Eagerly the quotient and the column below are written in place by `out=` (one op each
    # instead of two); dynamo refuses `out=` into a strided view, so a compiled step copies.
    eager = not torch.compiler.is_compiling()
    if eager:
        torch.div(w, torch.where(breakdown, c["inf"], hnorm), out=v_next)
    else:
        v_next.copy_(w / torch.where(breakdown, c["inf"], hnorm))
    hnorm = torch.where(breakdown, c["zero"], hnorm)
    # The previous rotations applied to the new column, written into the factor's column;
    # then a new rotation zeroes h_{j+1,j}.
    if eager:
        torch.bmm(h, omegaT, out=col)
    else:
        col.copy_(torch.bmm(h, omegaT))
    # [[c, s], [-s, c]] with c = t_j / d, s = h_{j+1,j} / d (NaN where d = 0: such a step
    # is dropped below, and a dropped or done sample's later rotations never enter its
    # solution); d = hypot(t_j, h_{j+1,j}) written over t_j, the factor's diagonal entry
    t_j = diag * c["I2"]
    d = diag.hypot_(hnorm)
    rot = torch.addcmul(t_j, hnorm, c["J2"]) * d.reciprocal()
    pair.copy_(torch.bmm(rot, pair))
    # the residual estimate relative to the cycle's initial residual norm
    new_res = next0.abs()
    # d ~ 0: the new column is in the span of the previous ones (singular operator); the
    # step is dropped. NaN stays "ok" so that the next check sees it.
    ok = active > (d <= scale * 10)
    used.add_(ok)
    res = torch.where(ok, new_res, res)
    return res, (ok & (new_res > rel_tol)) > breakdown
