"""Tests of implicit_layers.hyper (STN / Δ-STN) and of the hypernetwork / meta-descent examples."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import implicit_layers as il
from implicit_layers import hyper
from tests.helpers import load_example

pytestmark = pytest.mark.usefixtures("single_thread")


# -- transforms and concrete dropout ------------------------------------------------------------


@pytest.mark.parametrize("transform,value", [(hyper.Log(), 3e-4), (hyper.Logit(0.0, 0.9), 0.35),
                                             (hyper.Logit(-2.0, 5.0), 4.9), (hyper.Identity(), -1.5)])
def test_transform_roundtrip(transform, value):
    u = transform.inverse(torch.tensor(value, dtype=torch.float64))
    assert float(transform(u)) == pytest.approx(value, rel=1e-12)


def test_transform_domain_errors():
    with pytest.raises(ValueError, match="Log"):
        hyper.Log().inverse(0.0)
    with pytest.raises(ValueError, match=r"\(0.0, 0.9\)"):
        hyper.Logit(0.0, 0.9).inverse(0.95)
    with pytest.raises(ValueError, match="low < high"):
        hyper.Logit(1.0, 1.0)
    with pytest.raises(TypeError, match="low"):
        hyper.Logit("a", 1.0)


def test_concrete_dropout_mean_mask_and_rate_gradient(device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.ones(4000, 50, dtype=torch.float64, device=device)
    rate = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    out = hyper.concrete_dropout(x, rate, temperature=0.05, generator=g)
    keep = out.detach() * (1 - 0.3)
    # Nearly binary mask with keep fraction 1 - p, and unbiased activations.
    assert float(((keep > 0.05) & (keep < 0.95)).float().mean()) < 0.1
    assert float(keep.mean()) == pytest.approx(0.7, abs=0.01)
    assert float(out.detach().mean()) == pytest.approx(1.0, abs=0.02)
    # Differentiable in the rate: a loss that penalises dropped units grows with p.
    (grad,) = torch.autograd.grad((out - 1).square().mean(), rate)
    assert torch.isfinite(grad) and float(grad) > 0
    # Per-example rates and evaluation mode.
    per = torch.full((4000,), 0.5, dtype=torch.float64, device=device)
    assert hyper.concrete_dropout(x, per, generator=g).shape == x.shape
    assert hyper.concrete_dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match="rate"):
        hyper.concrete_dropout(x, torch.full((3,), 0.5, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="temperature"):
        hyper.concrete_dropout(x, 0.5, temperature=0.0)


# -- layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("modulation", ["linear", "sigmoid"])
@pytest.mark.parametrize("centered", [True, False])
def test_stn_linear_matches_per_example_weights(device, modulation, centered):
    torch.manual_seed(0)
    layer = hyper.STNLinear(5, 4, 2, centered=centered, modulation=modulation).double().to(device)
    with torch.no_grad():
        layer.hyper_scale.normal_()
    x = torch.randn(6, 5, dtype=torch.float64, device=device)
    lam = torch.randn(6, 2, dtype=torch.float64, device=device)
    center = torch.randn(2, dtype=torch.float64, device=device)
    y = layer(x, lam, center=center)
    # Reference from the parameters, written out per example.
    u = lam - center if centered else lam
    for i in range(6):
        s = layer.hyper_scale @ u[i]
        if modulation == "linear":
            W = layer.weight + s[:, None] * layer.hyper_weight
            b = layer.bias + s * layer.hyper_bias
        else:
            g = torch.sigmoid(s + layer.hyper_shift)
            W, b = g[:, None] * layer.weight, layer.bias
        torch.testing.assert_close(y[i], W @ x[i] + b)
        torch.testing.assert_close(layer.weight_sq_norm(lam, center)[i], W.square().sum())
    if centered and modulation == "linear":
        # Δ-STN: at λ = λ0 the layer is its base layer, whatever Φ is.
        torch.testing.assert_close(layer(x, center, center=center), F.linear(x, layer.weight, layer.bias))


def test_stn_conv2d_matches_per_example_conv(device):
    torch.manual_seed(0)
    conv = hyper.STNConv2d(3, 5, 3, 2, padding=1).double().to(device)
    with torch.no_grad():
        conv.hyper_scale.normal_()
    hp = hyper.Hyperparameters({"a": 0.0, "b": (hyper.Log(), 2.0)}).double().to(device)
    s = hp.sample(4)
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64, device=device)
    y = conv(x, s)
    W = conv.effective_weight(s)
    assert W.shape == (4, 5, 3, 3, 3)
    s_vec = (s.raw - s.center) @ conv.hyper_scale.T
    for i in range(4):
        ref = F.conv2d(x[i : i + 1], W[i], conv.bias + s_vec[i] * conv.hyper_bias, padding=1)[0]
        torch.testing.assert_close(y[i], ref)
    torch.testing.assert_close(conv.weight_sq_norm(s), W.flatten(1).square().sum(1))


def test_layer_argument_errors():
    layer = hyper.STNLinear(3, 2, 1)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="center"):
        layer(x, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="hyper must have shape"):
        layer(x, torch.zeros(4, 2), center=torch.zeros(2))
    with pytest.raises(TypeError, match="hyper"):
        layer(x, [0.0])
    with pytest.raises(ValueError, match="batch size"):
        layer(x, torch.zeros(3, 1), center=torch.zeros(1))
    with pytest.raises(ValueError, match="n_hyper"):
        hyper.STNLinear(3, 2, 0)
    with pytest.raises(ValueError, match="modulation"):
        hyper.STNLinear(3, 2, 1, modulation="tanh")
    with pytest.raises(ValueError, match="in_features"):
        hyper.STNLinear(0, 2, 1)
    with pytest.raises(TypeError, match="centered"):
        hyper.STNLinear(3, 2, 1, centered="yes")


# -- hyperparameters and trainer ----------------------------------------------------------------


def test_hyperparameters_sample_respects_constraints():
    torch.manual_seed(0)
    hp = hyper.Hyperparameters({"p": (hyper.Logit(0.0, 0.9), 0.85), "wd": (hyper.Log(), 1e-3)}, sigma=3.0)
    s = hp.sample(10000)
    assert s.raw.shape == (10000, 2) and s.center.shape == (2,)
    assert float(s["p"].min()) > 0 and float(s["p"].max()) < 0.9
    assert float(s["wd"].min()) > 0
    assert hp.values()["p"] == pytest.approx(0.85)
    assert float(s.raw[:, 1].std()) == pytest.approx(3.0, rel=0.05)
    with pytest.raises(KeyError, match="lr"):
        s["lr"]
    with pytest.raises(ValueError, match="sigma"):
        hyper.Hyperparameters({"a": 0.0}, sigma=0.0)
    with pytest.raises(ValueError, match="spec\\['p'\\]"):
        hyper.Hyperparameters({"p": (hyper.Logit(), 1.5)})
    with pytest.raises(TypeError, match="spec"):
        hyper.Hyperparameters({})


def test_trainer_argument_errors():
    hp = hyper.Hyperparameters({"a": 0.0})
    layer = hyper.STNLinear(2, 1, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)

    def loss(b, s):
        return layer(b, s).square().mean()

    with pytest.raises(ValueError, match="optimizer"):
        hyper.STNTrainer(hp, loss, loss, torch.optim.SGD(list(layer.parameters()) + [hp.raw], lr=0.1))
    with pytest.raises(TypeError, match="optimizer"):
        hyper.STNTrainer(hp, loss, loss, "sgd")
    with pytest.raises(TypeError, match="val_loss"):
        hyper.STNTrainer(hp, loss, None, opt)
    with pytest.raises(ValueError, match="t_train"):
        hyper.STNTrainer(hp, loss, loss, opt, t_train=-1)
    with pytest.raises(ValueError, match="tau"):
        hyper.STNTrainer(hp, loss, loss, opt, tau=-1.0)
    with pytest.raises(TypeError, match="hparams"):
        hyper.STNTrainer({"a": 0.0}, loss, loss, opt)
    trainer = hyper.STNTrainer(hp, loss, loss, opt)
    with pytest.raises(ValueError, match="steps"):
        trainer.fit(lambda: torch.ones(4, 2), lambda: torch.ones(4, 2), 0)
    with pytest.raises(TypeError, match="per_example"):
        trainer.train_step({"x": 1})


def test_hyper_step_entropy_widens_sigma_and_leaves_model_grads():
    # A validation loss that ignores ε: only the entropy bonus -τ H acts on σ, so σ must grow,
    # and the hyperparameter step must not write gradients into the model.
    hp = hyper.Hyperparameters({"a": 1.0}, sigma=0.5)
    layer = hyper.STNLinear(2, 1, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    trainer = hyper.STNTrainer(hp, lambda b, s: layer(b, s).square().mean(),
                               lambda b, s: (layer(b, s) * 0).sum() + s.center.sum(), opt,
                               hyper_lr=0.05, tau=1.0)
    batch = torch.ones(8, 2)
    for _ in range(5):
        trainer.hyper_step(batch)
    assert float(hp.sigma.detach()[0]) > 0.5 * math.exp(0.2)
    assert all(p.grad is None for p in layer.parameters())


# -- best response of ridge regression ------------------------------------------------------------


def _ridge_problem(device):
    g = torch.Generator().manual_seed(0)
    n, d = 60, 4
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64))
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * noise
    return X.to(device), y.to(device)


def _ridge_loss(w, lam, X, y):
    """``J_tr(λ, w) = ‖Xw - y‖² / (2n) + ½ e^λ ‖w‖²`` for ``w`` of shape ``(K, d)``, ``λ`` ``(K,)``."""
    return 0.5 * (w @ X.T - y).square().mean(-1) + 0.5 * lam.exp() * w.square().sum(-1)


def _ridge_jacobian(lam0, X, y, device):
    """``w*(λ0)`` and ``∂w*/∂λ`` at ``λ0`` from ``il.argmin`` with the implicit (CG) backward."""
    d = X.shape[1]
    lam = torch.tensor(lam0, dtype=torch.float64, device=device, requires_grad=True)
    w_star = il.argmin(lambda w, lm: _ridge_loss(w[None], lm[None], X, y)[0],
                       torch.zeros(d, dtype=torch.float64, device=device), lam,
                       solver=il.solvers.LBFGS(), backward=il.backward.Implicit(il.linear.CG()))
    jac = torch.stack([torch.autograd.grad(w_star[i], lam, retain_graph=True)[0] for i in range(d)])
    return w_star.detach(), jac


def test_sigmoid_modulation_represents_ridge_best_response_exactly(device):
    # The lecture's architecture: w(λ) = 1ᵀ (σ(λ v + c) ⊙_row Q0). With the eigenpairs (s_k², u_k)
    # of XᵀX/n and b = Xᵀy/n, w*(λ) = Σ_k σ(log s_k² - λ) u_k u_kᵀ b / s_k²: set v = -1,
    # c_k = log s_k² - λ0 (centered input λ - λ0) and the rows of Q0 to u_k u_kᵀ b / s_k².
    X, y = _ridge_problem(device)
    n, d = X.shape
    evals, evecs = torch.linalg.eigh(X.T @ X / n)
    b = X.T @ y / n
    lam0 = 1.5
    layer = hyper.STNLinear(d, d, 1, modulation="sigmoid", bias=False).double().to(device)
    with torch.no_grad():
        layer.hyper_scale.fill_(-1.0)
        layer.hyper_shift.copy_(evals.log() - lam0)
        layer.weight.copy_((evecs * (evecs.T @ b / evals)).T)
    center = torch.tensor([lam0], dtype=torch.float64, device=device)

    def w_of(lam_vec):
        return layer.effective_weight(lam_vec, center=center).sum(-2)

    for lam in (-2.0, 0.0, lam0, 4.0):
        w_star, _ = _ridge_jacobian(lam, X, y, device)
        torch.testing.assert_close(w_of(torch.tensor([lam], dtype=torch.float64, device=device)), w_star)
    _, jac_ift = _ridge_jacobian(lam0, X, y, device)
    _, jac = torch.func.jvp(w_of, (center,), (torch.ones_like(center),))
    torch.testing.assert_close(jac, jac_ift, rtol=1e-6, atol=1e-9)


def _train_ridge_stn(centered, lam0, X, y, max_steps, device):
    """Train ``w(λ) = w0 + Φ u`` (one STNLinear, linear modulation) on ``λ0 + ε``, ``σ = 0.1``.

    Returns the first step at which ``∂w/∂λ`` is within 5% of the implicit Jacobian (checked
    every 10 steps; None if never), the Jacobian then, and the implicit one.
    """
    d = X.shape[1]
    _, jac_ift = _ridge_jacobian(lam0, X, y, device)
    torch.manual_seed(0)
    hp = hyper.Hyperparameters({"lam": lam0}, sigma=0.1).double().to(device)
    layer = hyper.STNLinear(1, d, 1, centered=centered, bias=False).double().to(device)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    center = hp.raw.detach()

    def w_of(lam_vec):
        ones = torch.ones(lam_vec.shape[:-1] + (1,), dtype=torch.float64, device=device)
        return layer(ones, lam_vec, center=center)

    jac = None
    for step in range(1, max_steps + 1):
        s = hp.sample(32)
        loss = _ridge_loss(w_of(s.raw), s.raw[:, 0], X, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            _, jac = torch.func.jvp(w_of, (center,), (torch.ones_like(center),))
            jac = jac.detach()
            err = float(torch.linalg.vector_norm(jac - jac_ift) / torch.linalg.vector_norm(jac_ift))
            if err < 0.05:
                return step, jac.detach(), jac_ift
    return None, jac.detach(), jac_ift


@pytest.mark.parametrize("lam0", [3.0, -3.0])
def test_ridge_response_jacobian_centered_faster_than_uncentered(device, lam0):
    X, y = _ridge_problem(device)
    steps_c, jac_c, jac_ift = _train_ridge_stn(True, lam0, X, y, 400, device)
    assert steps_c is not None, "the Δ-STN response Jacobian did not reach 5% of the implicit one"
    torch.testing.assert_close(jac_c, jac_ift, rtol=0.0, atol=0.05 * float(jac_ift.norm()))
    # Same data, optimizer, perturbations and seed: the uncentered STN is not there in 3x the steps.
    steps_u, _, _ = _train_ridge_stn(False, lam0, X, y, 3 * steps_c, device)
    assert steps_u is None or steps_u > 3 * steps_c


# -- the toy problem ------------------------------------------------------------------------------


def test_delta_stn_toy_converges_and_uncentered_pathology(tmp_path):
    res = load_example("stn_toy").main(["--tiny", "--out", str(tmp_path)])
    c, u = res["centered"], res["uncentered"]
    # Δ-STN: λ = w = 0 within tolerance, λ never moves away from the optimum.
    assert abs(c["final_lam"]) < 0.1 and abs(c["final_w"]) < 0.05
    assert c["max_lam"] <= res["lam0"] + 0.05
    assert abs(c["min_phi"]) < 0.1
    # STN: the spurious negative response Jacobian drives λ away from 0 first.
    assert u["min_phi"] < -0.5
    assert u["max_lam"] > res["lam0"] + 0.5
    assert abs(u["final_lam"]) > 10 * abs(c["final_lam"]) and abs(u["final_lam"]) > 0.5
    assert os.path.exists(res["plot"])


# -- meta-descent ---------------------------------------------------------------------------------


def _gd_manual(eta, H, b, w0, steps):
    w = w0
    for _ in range(steps):
        w = w - eta * (H @ w - b)
    return 0.5 * w @ H @ w - b @ w


def test_gradient_descent_tensor_step_size_gradient(device):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(30, 6, generator=g, dtype=torch.float64)
    H = (A.T @ A / 30 + 0.1 * torch.eye(6, dtype=torch.float64)).to(device)
    b = torch.randn(6, generator=g, dtype=torch.float64).to(device)
    w0 = torch.zeros(6, dtype=torch.float64, device=device)

    def final(eta):
        solver = il.solvers.GradientDescent(step_size=eta, max_steps=9, rtol=0.0, on_failure="ignore")
        w = il.argmin(lambda w: 0.5 * w @ H @ w - b @ w, w0, solver=solver, backward=il.backward.Unrolled())
        return 0.5 * w @ H @ w - b @ w

    eta = torch.tensor(0.4, dtype=torch.float64, device=device, requires_grad=True)
    value = final(eta)
    (grad,) = torch.autograd.grad(value, eta)
    h = 1e-6
    with torch.no_grad():
        fd = (final(eta + h) - final(eta - h)) / (2 * h)
    torch.testing.assert_close(value, _gd_manual(eta.detach(), H, b, w0, 9))
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=0.0)

    # One step size per problem of a batch: each gets its own gradient.
    etas = torch.tensor([0.2, 0.5], dtype=torch.float64, device=device, requires_grad=True)
    solver = il.solvers.GradientDescent(step_size=etas, max_steps=9, rtol=0.0, on_failure="ignore")
    W = il.argmin(lambda w: 0.5 * ((w @ H) * w).sum(-1) - w @ b, torch.zeros(2, 6, dtype=torch.float64,
                  device=device), solver=solver, backward=il.backward.Unrolled(), batched=True)
    losses = 0.5 * ((W @ H) * W).sum(-1) - W @ b
    (gb,) = torch.autograd.grad(losses.sum(), etas)
    for i in range(2):
        e = etas[i].detach().clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(_gd_manual(e, H, b, w0, 9), e)
        torch.testing.assert_close(gb[i], gi)


def test_truncated_backward_with_tensor_step_size(device):
    # Truncated(k) on GradientDescent(step_size=<tensor>): k more steps from the forward result,
    # differentiated in the step size; reference: the same T + k steps written out by hand.
    g = torch.Generator().manual_seed(2)
    A = torch.randn(20, 5, generator=g, dtype=torch.float64)
    H = (A.T @ A / 20 + 0.1 * torch.eye(5, dtype=torch.float64)).to(device)
    b = torch.randn(5, generator=g, dtype=torch.float64).to(device)
    eta = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    solver = il.solvers.GradientDescent(step_size=eta, max_steps=10, rtol=0.0, on_failure="ignore")
    w = il.argmin(lambda w: 0.5 * w @ H @ w - b @ w, torch.zeros(5, dtype=torch.float64, device=device),
                  solver=solver, backward=il.backward.Truncated(3))
    (grad,) = torch.autograd.grad(0.5 * w @ H @ w - b @ w, eta)
    z = torch.zeros(5, dtype=torch.float64, device=device)
    for _ in range(10):
        z = z - 0.3 * (H @ z - b)
    e = eta.detach().clone().requires_grad_(True)
    zk = z
    for _ in range(3):
        zk = zk - e * (H @ zk - b)
    (ref,) = torch.autograd.grad(0.5 * zk @ H @ zk - b @ zk, e)
    torch.testing.assert_close(w, zk.detach())
    torch.testing.assert_close(grad, ref)


def test_meta_descent_tiny_short_horizon_bias(tmp_path):
    res = load_example("meta_descent").main(["--tiny", "--out", str(tmp_path)])
    assert res["fd_check"]["rel_error"] < 1e-6
    greedy, long = res["sweep"][1], res["sweep"][res["budget"]]
    assert long["eta"] > 1.2 * greedy["eta"]  # the greedy horizon picks a too-small step
    assert long["final_loss"] < 0.7 * greedy["final_loss"]  # ... and ends with a worse loss
    assert long["eta"] < res["eta_max"]
    tr = res["truncated"]
    assert tr["grad_ratio"] == pytest.approx(tr["k"] / res["budget"], rel=1e-6)
    assert os.path.exists(res["plot"])


# -- digits ------------------------------------------------------------------------------------------


def test_stn_digits_tiny(tmp_path):
    res = load_example("stn_digits").main(["--tiny", "--out", str(tmp_path)])
    stn = res["stn"]
    assert stn["test_acc"] > 0.9 and stn["test_loss"] < 0.4
    assert 0 < stn["hparams"]["p1"] < 0.9 and 0 < stn["hparams"]["p2"] < 0.9 and stn["hparams"]["wd"] > 0
    # The schedule moved: the hyperparameter steps do change λ.
    first, last = stn["history"][0], stn["history"][-1]
    assert any(abs(math.log(last[k] / first[k])) > 1e-3 for k in ("p1", "p2", "wd"))
    # Same total budget of minibatch passes for the searches (up to rounding).
    for k in ("random", "grid"):
        assert stn["passes"] - res[k]["configs"] < res[k]["passes"] <= stn["passes"]
        assert res[k]["test_acc"] > 0.8
    assert res["implicit"]["test_acc"] > 0.9 and res["implicit"]["hparams"]["wd"] > 0
    assert os.path.exists(res["plot"])
