"""Best-response hypernetworks: Self-Tuning Networks (STN) and Δ-STN.

Instead of differentiating through the inner solve (implicit differentiation, unrolling), a
hypernetwork ``ŵ_φ(λ)`` learns the best response ``w*(λ)`` near the current hyperparameters;
the hypergradient is then ordinary backprop through ``F(λ, ŵ_φ(λ))``. The STN layers keep the
hypernetwork compact by modulating the rows of each weight matrix by a function of ``λ``.

* :class:`STNLinear`, :class:`STNConv2d` — modulated layers (centered Δ-STN or uncentered STN).
* :class:`Hyperparameters` — named, constrained hyperparameters with a learnable perturbation.
* :class:`STNTrainer` — the alternating training loop (MacKay et al., 2019, Algorithm 1).
* :class:`Log`, :class:`Logit`, :class:`Identity` — transforms; :func:`concrete_dropout`.
"""

from .layers import STNConv2d, STNLinear
from .trainer import Hyperparameters, HyperSample, STNTrainer
from .transforms import Identity, Log, Logit, Transform, concrete_dropout

__all__ = [
    "STNLinear",
    "STNConv2d",
    "Hyperparameters",
    "HyperSample",
    "STNTrainer",
    "Transform",
    "Identity",
    "Log",
    "Logit",
    "concrete_dropout",
]
