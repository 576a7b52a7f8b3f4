"""Closed-form identities of ROME, MEMIT, AlphaEdit and EMMET on random tensors."""
from __future__ import annotations

import pytest
import torch

from editlens.edit.alphaedit import alphaedit_update, nullspace_projection
from editlens.edit.emmet import emmet_update
from editlens.edit.memit import memit_update
from editlens.edit.rome import rome_update
from editlens.edit.stats import dk_norm


def _spd(d, g, n=None):
    X = torch.randn(d, n or 4 * d, generator=g, dtype=torch.float64)
    return X @ X.T / X.shape[1]


def test_rome_update_maps_key_to_value():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=g)
    C = _spd(10, g)
    k, v = torch.randn(10, generator=g), torch.randn(6, generator=g)
    dW = rome_update(W, C, k, v)
    assert torch.allclose((W.double() + dW) @ k.double(), v.double(), atol=1e-10)
    assert torch.linalg.matrix_rank(dW) == 1
    # same result from the inverse, and invariance to scaling C (λ)
    assert torch.allclose(rome_update(W, torch.linalg.inv(C), k, v, c_is_inverse=True), dW, atol=1e-10)
    assert torch.allclose(rome_update(W, 1.5e4 * C, k, v), dW, atol=1e-10)


def test_rome_update_hand_computed():
    # C = I, W = 0: ΔW = v kᵀ / (kᵀk)
    W = torch.zeros(2, 2)
    k = torch.tensor([1.0, 1.0])
    v = torch.tensor([2.0, 4.0])
    expected = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(rome_update(W, torch.eye(2), k, v), expected)


def test_memit_update_exact_as_lambda_vanishes():
    g = torch.Generator().manual_seed(1)
    K = torch.randn(12, 4, generator=g, dtype=torch.float64)  # full column rank, fewer keys than dims
    R = torch.randn(7, 4, generator=g, dtype=torch.float64)
    C = _spd(12, g)
    dW = memit_update(K, R, C, 1e-10)
    assert torch.allclose(dW @ K, R, atol=1e-6)
    # hand check against the normal equations at λ = 1
    dW1 = memit_update(K, R, C, 1.0)
    assert torch.allclose(dW1 @ (C + K @ K.T), R @ K.T, atol=1e-10)


def test_memit_lambda_monotone_on_preserved_keys():
    g = torch.Generator().manual_seed(2)
    K0 = torch.randn(16, 200, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / 200
    K = torch.randn(16, 3, generator=g, dtype=torch.float64)
    R = torch.randn(5, 3, generator=g, dtype=torch.float64)
    norms = [float((memit_update(K, R, C, lam) @ K0).norm()) for lam in (1e-2, 1e0, 1e2, 1.5e4, 1e6)]
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 1e-3 * norms[0]
    dks = [dk_norm(memit_update(K, R, C, lam), C) for lam in (1e-2, 1e2, 1e6)]
    assert dks[0] > dks[1] > dks[2]


def test_dk_norm_is_rms_over_keys():
    g = torch.Generator().manual_seed(3)
    K0 = torch.randn(8, 50, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / 50
    dW = torch.randn(3, 8, generator=g, dtype=torch.float64)
    rms = float(((dW @ K0).pow(2).sum(0).mean()).sqrt())
    assert dk_norm(dW, C) == pytest.approx(rms, rel=1e-10)


def test_alphaedit_no_component_on_preserved_keys():
    g = torch.Generator().manual_seed(4)
    d = 20
    # preserved keys span a 12-dim subspace: the null space of K0K0ᵀ has dim 8
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    K0 = basis[:, :12] @ torch.randn(12, 300, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / 300
    P = nullspace_projection(C, 1e-8)
    assert round(float(torch.trace(P))) == 8
    assert torch.allclose(P @ P, P, atol=1e-10)
    K = torch.randn(d, 3, generator=g, dtype=torch.float64)
    R = torch.randn(6, 3, generator=g, dtype=torch.float64)
    Kp = torch.randn(d, 5, generator=g, dtype=torch.float64)
    dW = alphaedit_update(K, R, P, Kp @ Kp.T, l2=1.0)
    assert float((dW @ K0).norm()) < 1e-9 * float(dW.norm()) * float(K0.norm())
    assert float(dW.norm()) > 1e-3
    # closed form: ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + I)⁻¹
    M = (Kp @ Kp.T) @ P + K @ K.T @ P + torch.eye(d, dtype=torch.float64)
    assert torch.allclose(dW, R @ K.T @ P @ torch.linalg.inv(M), atol=1e-10)
    # relative mode = absolute mode with threshold × λ_max
    lmax = float(torch.linalg.eigvalsh(C).max())
    assert torch.allclose(nullspace_projection(C, 1e-3, "relative"), nullspace_projection(C, 1e-3 * lmax), atol=1e-12)


def test_emmet_equality_constraint_and_minimality():
    g = torch.Generator().manual_seed(5)
    K = torch.randn(15, 4, generator=g, dtype=torch.float64)
    R = torch.randn(6, 4, generator=g, dtype=torch.float64)
    C = _spd(15, g)
    dW = emmet_update(K, R, C, lam=1.5e4, emmet_lambda=0.0)
    assert torch.allclose(dW @ K, R, atol=1e-9)
    # any other solution of ΔW K = R has a larger preservation cost tr(ΔW C ΔWᵀ)
    N = torch.linalg.svd(K.T).Vh[4:]  # rows spanning the null space of Kᵀ
    other = dW + torch.randn(6, N.shape[0], generator=g, dtype=torch.float64) @ N
    assert torch.allclose(other @ K, R, atol=1e-9)
    assert dk_norm(other, C) > dk_norm(dW, C)
    # the regularised variant relaxes the constraint
    dWr = emmet_update(K, R, C, lam=1.5e4, emmet_lambda=0.1)
    assert float((dWr @ K - R).norm()) > 1e-6
