"""Hyperparameters with perturbations, and the joint STN training loop (Algorithm 1).

:class:`Hyperparameters` holds the unconstrained hyperparameters ``λ`` and the log of the
perturbation scale ``σ`` as parameters; :meth:`Hyperparameters.sample` draws ``λ + ε``,
``ε ~ N(0, diag σ²)``, per example. :class:`STNTrainer` alternates ``t_train`` steps on the
hypernetwork parameters ``φ`` (training loss at ``λ + ε``, ``λ`` fixed) with ``t_valid`` steps
on ``λ`` and ``σ`` (validation loss at ``λ + ε`` minus ``τ H[p(ε|σ)]``, ``φ`` fixed), as in
MacKay et al. (2019), Algorithm 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .transforms import Identity, Transform

__all__ = ["Hyperparameters", "HyperSample", "STNTrainer"]


class HyperSample:
    """A draw of (perturbed) hyperparameters handed to the losses and to the STN layers.

    Attributes:
        raw: unconstrained ``λ + ε``, shape ``(B, H)`` (per example) or ``(H,)``.
        center: the current unconstrained ``λ`` (detached), shape ``(H,)``: the ``λ0`` of
            the centered (Δ-STN) layers.
        training: True in the weight steps (apply the regularisers: dropout, weight decay),
            False in the hyperparameter steps (evaluate the plain validation loss).

    ``sample["name"]`` returns the constrained value of one hyperparameter, shape ``(B,)`` or
    ``()``, and raises ``KeyError`` for an unknown name.

    Examples:
        >>> hp = il.hyper.Hyperparameters({"wd": (il.hyper.Log(), 1e-3)})
        >>> s = hp.sample(4)
        >>> s.raw.shape, s["wd"].shape, bool((s["wd"] > 0).all())
        (torch.Size([4, 1]), torch.Size([4]), True)
    """

    def __init__(self, raw: Tensor, center: Tensor, names: list[str], transforms: list[Transform],
                 training: bool) -> None:
        self.raw = raw
        self.center = center
        self.names = names
        self.transforms = transforms
        self.training = training

    def __getitem__(self, name: str) -> Tensor:
        """The constrained value of hyperparameter ``name``: shape ``(B,)`` or ``()``."""
        try:
            i = self.names.index(name)
        except ValueError:
            raise KeyError(f"no hyperparameter named {name!r}; known: {self.names}.") from None
        return self.transforms[i](self.raw[..., i])


class Hyperparameters(nn.Module):
    """Named continuous hyperparameters, stored unconstrained, with a learnable perturbation.

    Args:
        spec: mapping ``name -> (transform, initial value)`` (or ``name -> initial value`` for
            an unconstrained one). Constraints are handled by the transform: the value
            ``T(λ)`` lies in the transform's domain for every real ``λ`` (``Log``: ``> 0``,
            ``Logit(low, high)``: inside ``(low, high)``), and perturbations are added to
            ``λ``, so perturbed values are always admissible.
        sigma: initial perturbation scale ``σ`` in the unconstrained space (float > 0, one for
            all hyperparameters, or a mapping ``name -> float``). ``σ`` is stored as
            ``log σ``, hence stays positive.

    Shapes:
        With ``H = len(spec)``, ``raw`` and ``log_sigma`` are ``(H,)``; ``sample(B)`` draws a
        :class:`HyperSample` with ``raw`` of shape ``(B, H)``.

    Raises:
        TypeError: ``spec`` is not a mapping of names to ``(transform, value)`` or values.
        ValueError: an initial value outside its transform's domain, or a ``sigma`` that is not
            positive or names unknown hyperparameters.

    Examples:
        >>> hp = il.hyper.Hyperparameters(
        ...     {"wd": (il.hyper.Log(), 1e-4), "p": (il.hyper.Logit(0.0, 0.9), 0.1)}, sigma=0.5)
        >>> hp.n, sorted(hp.values())
        (2, ['p', 'wd'])
        >>> round(hp.values()["wd"], 8)
        0.0001
    """

    def __init__(self, spec: Mapping[str, Any], sigma: float | Mapping[str, float] = 0.5) -> None:
        super().__init__()
        if not isinstance(spec, Mapping) or len(spec) == 0:
            raise TypeError(
                "spec must be a non-empty mapping name -> (transform, initial value), got "
                f"{type(spec).__name__}."
            )
        self.names: list[str] = []
        self.transforms: list[Transform] = []
        raws = []
        for name, entry in spec.items():
            if not isinstance(name, str):
                raise TypeError(f"spec keys must be str names, got {name!r}.")
            if isinstance(entry, tuple):
                if len(entry) != 2 or not isinstance(entry[0], Transform):
                    raise TypeError(
                        f"spec[{name!r}] must be (transform, initial value) with an "
                        f"il.hyper transform, got {entry!r}."
                    )
                transform, init = entry
            else:
                transform, init = Identity(), entry
            try:
                raws.append(float(transform.inverse(init)))
            except (TypeError, ValueError) as err:
                raise ValueError(f"spec[{name!r}]: bad initial value: {err}") from None
            self.names.append(name)
            self.transforms.append(transform)
        if isinstance(sigma, Mapping):
            unknown = set(sigma) - set(self.names)
            if unknown:
                raise ValueError(f"sigma names unknown hyperparameters {sorted(unknown)}.")
            sig = [sigma.get(n, 0.5) for n in self.names]
        else:
            sig = [sigma] * len(self.names)
        for s in sig:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
                raise ValueError(f"sigma must be > 0, got {s!r}.")
        self.raw = nn.Parameter(torch.tensor(raws))
        self.log_sigma = nn.Parameter(torch.tensor([math.log(s) for s in sig]))

    @property
    def n(self) -> int:
        """Number of hyperparameters ``H``."""
        return len(self.names)

    @property
    def sigma(self) -> Tensor:
        """Perturbation scale ``σ``, shape ``(H,)``."""
        return self.log_sigma.exp()

    def values(self) -> dict[str, float]:
        """Current constrained values as floats."""
        with torch.no_grad():
            pairs = zip(self.names, self.transforms, strict=True)
            return {n: float(t(self.raw[i])) for i, (n, t) in enumerate(pairs)}

    def entropy(self) -> Tensor:
        """Entropy of ``p(ε|σ) = N(0, diag σ²)``: ``Σ log σ + H/2 log(2πe)``."""
        return self.log_sigma.sum() + 0.5 * self.n * math.log(2 * math.pi * math.e)

    def sample(
        self,
        batch_size: int | None = None,
        *,
        perturb: bool = True,
        hyper_grad: bool = False,
        training: bool = True,
        generator: torch.Generator | None = None,
    ) -> HyperSample:
        """Draw ``λ + ε`` (``ε = σ ⊙ ξ``, ``ξ ~ N(0, I)``).

        Args:
            batch_size: ``B`` for one draw per example (shape ``(B, H)``); None for one draw.
            perturb: add ``ε`` (False: the current ``λ``).
            hyper_grad: keep the graph to ``λ`` and ``σ`` (the hyperparameter step); otherwise
                both are detached (the weight step).
            training: stored on the sample (see :class:`HyperSample`).
            generator: optional random generator.
        """
        raw = self.raw if hyper_grad else self.raw.detach()
        shape = (self.n,) if batch_size is None else (batch_size, self.n)
        if perturb:
            xi = torch.randn(shape, dtype=raw.dtype, device=raw.device, generator=generator)
            sigma = self.sigma if hyper_grad else self.sigma.detach()
            value = raw + sigma * xi
        else:
            value = raw.expand(shape)
        return HyperSample(value, self.raw.detach(), self.names, self.transforms, training)


def _batch_size(batch: object) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0].shape[0]
    raise TypeError(
        "per_example=True needs batches that are a tensor or a tuple/list starting with a "
        f"tensor (to read the batch size), got {type(batch).__name__}; use per_example=False."
    )


def _forever(source: object, name: str) -> Iterator:
    """Endless batches from a callable (called each time) or a re-iterable (e.g. DataLoader)."""
    if callable(source):
        while True:
            yield source()
    if not isinstance(source, Iterable):
        raise TypeError(f"{name} must be a callable returning a batch or an iterable of batches, "
                        f"got {type(source).__name__}.")
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{name} yielded no batches.")


class STNTrainer:
    """Joint training of a hypernetwork and its hyperparameters (STN Algorithm 1).

    Each :meth:`step` runs ``t_train`` weight steps
    ``φ ← φ - α1 ∂/∂φ f(λ + ε, ŵ_φ(λ + ε))`` with the user's optimizer, then ``t_valid``
    hyperparameter steps on ``λ`` and ``σ`` (Adam) with the objective
    ``F(λ + ε, ŵ_φ(λ + ε)) - τ H[p(ε|σ)]``. The entropy bonus keeps ``σ`` from collapsing, so
    the hypernetwork keeps seeing a neighbourhood of ``λ`` (its Jacobian is then meaningful).

    The model is any PyTorch module; the losses decide how the hyperparameters enter it:
    STN layers (:class:`~implicit_layers.hyper.STNLinear`, ...) take the sample as their
    ``hyper`` argument, and regularisers read constrained values with ``sample["name"]``.

    Args:
        hparams: the :class:`Hyperparameters`.
        train_loss: ``train_loss(batch, sample) -> scalar`` (regularised training loss).
        val_loss: ``val_loss(batch, sample) -> scalar`` (validation loss; ``sample.training``
            is False, so regularisers like dropout should be off).
        optimizer: a torch optimizer over the model's (hypernetwork) parameters; it must not
            contain ``hparams``' parameters.
        hyper_lr: Adam learning rate for ``λ``.
        sigma_lr: Adam learning rate for ``log σ`` (default: ``hyper_lr``); 0 keeps σ fixed.
        t_train, t_valid: weight steps and hyperparameter steps per :meth:`step`.
        tau: entropy weight ``τ >= 0``.
        per_example: one perturbation per example (needs tensor batches) instead of per batch.
        perturb_valid: perturb ``λ`` in the hyperparameter step too (as Algorithm 1).

    Raises:
        TypeError: ``hparams``, a loss or ``optimizer`` of the wrong type.
        ValueError: ``optimizer`` holds ``hparams``' parameters, or a negative step count,
            learning rate or ``tau``.

    Examples:
        Tune a weight decay ``wd`` of a one-unit linear model by its validation loss:

        >>> hp = il.hyper.Hyperparameters({"wd": (il.hyper.Log(), 1e-2)})
        >>> layer = il.hyper.STNLinear(3, 1, hp.n)
        >>> X, y = torch.randn(32, 3), torch.randn(32)
        >>> def train_loss(batch, s):
        ...     return ((layer(X, s)[:, 0] - y).square() + s["wd"] * layer.weight_sq_norm(s)).mean()
        >>> def val_loss(batch, s):
        ...     return (layer(X, s)[:, 0] - y).square().mean()
        >>> trainer = il.hyper.STNTrainer(hp, train_loss, val_loss,
        ...                               torch.optim.SGD(layer.parameters(), lr=0.1))
        >>> records = trainer.fit(lambda: X, lambda: X, steps=3)
        >>> len(records), sorted(records[-1])[:3]
        (3, ['sigma', 'time', 'train_loss'])
    """

    def __init__(
        self,
        hparams: Hyperparameters,
        train_loss: Callable[[Any, HyperSample], Tensor],
        val_loss: Callable[[Any, HyperSample], Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        hyper_lr: float = 3e-3,
        sigma_lr: float | None = None,
        t_train: int = 5,
        t_valid: int = 1,
        tau: float = 1e-3,
        per_example: bool = True,
        perturb_valid: bool = True,
    ) -> None:
        if not isinstance(hparams, Hyperparameters):
            raise TypeError(f"hparams must be an il.hyper.Hyperparameters, got {type(hparams).__name__}.")
        for name, fn in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable (batch, sample) -> scalar, got "
                                f"{type(fn).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        hyper_ids = {id(p) for p in hparams.parameters()}
        if any(id(p) in hyper_ids for g in optimizer.param_groups for p in g["params"]):
            raise ValueError(
                "optimizer must only hold the model (hypernetwork) parameters; it contains the "
                "hyperparameters, which the trainer updates itself."
            )
        for name, val in (("t_train", t_train), ("t_valid", t_valid)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{name} must be an int >= 0, got {val!r}.")
        for name, rate in (("hyper_lr", hyper_lr), ("tau", tau)):
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
                raise ValueError(f"{name} must be a float >= 0, got {rate!r}.")
        sigma_lr = hyper_lr if sigma_lr is None else sigma_lr
        if isinstance(sigma_lr, bool) or not isinstance(sigma_lr, (int, float)) or sigma_lr < 0:
            raise ValueError(f"sigma_lr must be a float >= 0, got {sigma_lr!r}.")
        self.hparams = hparams
        self.train_loss = train_loss
        self.val_loss = val_loss
        self.optimizer = optimizer
        self.t_train = t_train
        self.t_valid = t_valid
        self.tau = float(tau)
        self.per_example = per_example
        self.perturb_valid = perturb_valid
        groups: list[dict[str, Any]] = [{"params": [hparams.raw], "lr": float(hyper_lr)}]
        if sigma_lr > 0:
            groups.append({"params": [hparams.log_sigma], "lr": float(sigma_lr)})
        self.hyper_optimizer = torch.optim.Adam(groups)
        self.hyper_params = [g["params"][0] for g in groups]

    def _sample(self, batch: object, *, hyper: bool) -> HyperSample:
        b = _batch_size(batch) if self.per_example else None
        return self.hparams.sample(
            b,
            perturb=self.perturb_valid if hyper else True,
            hyper_grad=hyper,
            training=not hyper,
        )

    def train_step(self, batch: object) -> float:
        """One weight step on ``φ`` at perturbed, fixed hyperparameters; returns the loss."""
        sample = self._sample(batch, hyper=False)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.train_loss(batch, sample)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def hyper_step(self, batch: object) -> float:
        """One step on ``λ`` and ``σ`` (``φ`` fixed); returns the validation loss."""
        sample = self._sample(batch, hyper=True)
        loss = self.val_loss(batch, sample)
        objective = loss - self.tau * self.hparams.entropy()
        # Gradients only for λ and σ, so the model's .grad buffers are untouched.
        grads = torch.autograd.grad(objective, self.hyper_params, allow_unused=True)
        for p, g in zip(self.hyper_params, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        self.hyper_optimizer.step()
        return float(loss.detach())

    def step(self, train_batches: Iterator, val_batches: Iterator) -> dict[str, float]:
        """``t_train`` weight steps then ``t_valid`` hyperparameter steps."""
        tr = [self.train_step(next(train_batches)) for _ in range(self.t_train)]
        va = [self.hyper_step(next(val_batches)) for _ in range(self.t_valid)]
        return {
            "train_loss": sum(tr) / len(tr) if tr else float("nan"),
            "val_loss": sum(va) / len(va) if va else float("nan"),
        }

    def fit(
        self,
        train_data: object,
        val_data: object,
        steps: int,
        *,
        progress: bool = False,
        callback: Callable[[int, dict], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run ``steps`` outer steps (each ``t_train + t_valid`` updates).

        Args:
            train_data, val_data: a callable returning a batch, or a re-iterable of batches
                (e.g. a DataLoader; restarted when exhausted).
            steps: number of outer steps.
            progress: show a tqdm progress bar.
            callback: called as ``callback(step, record)`` after every step.

        Returns:
            One record per step: ``train_loss``, ``val_loss``, ``time`` (seconds since start),
            ``sigma`` (list) and the constrained hyperparameter values by name.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}.")
        tr, va = _forever(train_data, "train_data"), _forever(val_data, "val_data")
        history = []
        it: Iterable[int] = range(steps)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="STN", leave=False)
        start = time.perf_counter()
        for k in it:
            rec: dict[str, Any] = self.step(tr, va)
            rec["time"] = time.perf_counter() - start
            rec["sigma"] = self.hparams.sigma.detach().tolist()
            rec.update(self.hparams.values())
            history.append(rec)
            if callback is not None:
                callback(k, rec)
        return history
