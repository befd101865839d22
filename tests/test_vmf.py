"""vMF numerics against 50-digit mpmath, at the dimensions the model and the κ stage use."""
from __future__ import annotations

import functools
import warnings

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import special
from scipy.stats import vonmises_fisher

from icehpc import vmf

PS = [2, 3, 16, 256, 384, 768, 1024, 4096]
KAPPAS = [1e-3, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
GRID = [(p, k) for p in PS for k in KAPPAS]


@functools.lru_cache(maxsize=None)
def reference(p: int, kappa: float) -> tuple[mp.mpf, mp.mpf, mp.mpf]:
    """(log C_p(κ), A_p(κ), A_p'(κ)) at 50 digits; cached for the whole module run."""
    with mp.workdps(50):
        nu, k = mp.mpf(p) / 2 - 1, mp.mpf(kappa)
        i0, i1 = mp.besseli(nu, k), mp.besseli(nu + 1, k)
        a = i1 / i0
        return nu * mp.log(k) - mp.mpf(p) / 2 * mp.log(2 * mp.pi) - mp.log(i0), a, 1 - a * a - (p - 1) * a / k


def rel(got: float, ref: mp.mpf) -> float:
    with mp.workdps(50):
        return float(abs((mp.mpf(float(got)) - ref) / ref))


def test_log_cp_matches_mpmath_on_grid():
    got = {(p, k): float(vmf.log_cp(k, p)) for p, k in GRID}
    errs = {pk: rel(got[pk], reference(*pk)[0]) for pk in GRID}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-9, f"log C_p worst at (p, κ) = {worst}: {errs[worst]:.2e}"


def test_log_cp_vectorised_equals_scalar_and_broadcasts_p():
    k = np.array(KAPPAS)
    vec = vmf.log_cp(k[None, :], np.array(PS)[:, None])
    assert vec.shape == (len(PS), len(KAPPAS))
    for i, p in enumerate(PS):
        assert np.array_equal(vec[i], vmf.log_cp(k, p))


def test_bessel_ratio_and_complement_match_mpmath_on_grid():
    for p, k in GRID:
        _, a, _ = reference(p, k)
        assert rel(vmf.bessel_ratio(k, p), a) < 1e-11, (p, k)
        with mp.workdps(50):
            assert rel(vmf.bessel_ratio_complement(k, p), 1 - a) < 1e-11, (p, k)


def test_kappa_mle_matches_mpmath_on_grid():
    """R̄ = A_p(κ) rounded to float64; the reference is the exact root for that float R̄
    (κ + (R̄_float − A)/A', second order negligible), so only our solver's error is measured."""
    for p, k in GRID:
        _, a, da = reference(p, k)
        r = float(a)
        with mp.workdps(50):
            k_ref = mp.mpf(k) + (mp.mpf(r) - a) / da
        assert rel(vmf.kappa_mle(r, p), k_ref) < 1e-9, (p, k)


def test_ratio_stable_over_full_range_and_scipy_underflow_region():
    k = np.logspace(-6, 6, 400)
    for p in (2, 3, 64, 384, 1024, 4096):
        a = vmf.bessel_ratio(k, p)
        g = vmf.bessel_ratio_complement(k, p)
        assert np.all(np.isfinite(a)) and np.all((a > 0) & (a < 1)), p
        assert np.all(np.diff(a) > 0), f"A_p not increasing for p={p}"
        assert np.allclose(a + g, 1.0, rtol=0, atol=1e-12)
        back = vmf.kappa_mle(a, p)
        # the only error left is R̄'s float rounding, amplified by 1/(1 − R̄) near R̄ → 1
        assert np.all(np.abs(back / k - 1) < 1e-11 + 4e-16 / g), p
    with np.errstate(under="ignore"):
        assert special.ive(383.0 / 2 - 1, 1e-3) == 0.0  # where naive formulas give log(0)
    assert np.isfinite(vmf.log_cp(1e-3, 384))


def test_log_cp_at_zero_is_minus_log_sphere_area():
    for p in PS:
        area = np.log(2.0) + p / 2 * np.log(np.pi) - special.gammaln(p / 2)
        assert vmf.log_cp(0.0, p) == pytest.approx(-area, rel=1e-14, abs=1e-14)


def test_kappa_mle_limits_never_nan():
    for p in (2, 3, 384, 4096):
        out = vmf.kappa_mle([0.0, -0.1, 1e-300, 1 - 2.0**-53, 1.0, 1.0 + 1e-7], p)
        assert np.all(np.isfinite(out))
        assert out[0] == 0 and out[1] == 0
        assert out[2] == pytest.approx(p * 1e-300, rel=1e-12)
        assert out[3] == out[4] == out[5] > 1e15
    with pytest.raises(ValueError):
        vmf.kappa_mle(np.nan, 384)
    with pytest.raises(ValueError):
        vmf.log_cp(-1.0, 384)
    with pytest.raises(ValueError):
        vmf.log_cp(1.0, 1)


def test_closed_form_is_the_papers_formula_and_close_to_mle_in_the_middle():
    r = np.array([0.1, 0.5, 0.9])
    p = 384
    assert np.allclose(vmf.kappa_closed_form(r, p), r * (p - r**2) / (1 - r**2), rtol=1e-15)
    assert np.allclose(vmf.kappa_closed_form(r, p), vmf.kappa_mle(r, p), rtol=0.02)
    assert np.isfinite(vmf.kappa_closed_form(1.0, p))


def test_mle_recovers_kappa_where_scipy_fit_fails():
    """scipy's fit underflows at p = 384 and returns κ ≈ 1e-8; ours recovers κ from the same data."""
    x = vonmises_fisher(np.eye(384)[0], 500.0).rvs(3000, random_state=3)
    rbar = np.linalg.norm(x.mean(axis=0))
    assert vmf.kappa_mle(rbar, 384) == pytest.approx(500.0, rel=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, kappa_scipy = vonmises_fisher.fit(x)
    assert kappa_scipy < 1.0


def test_torch_log_cp_value_dtype_and_exact_gradient():
    k = torch.tensor([0.0, 1e-3, 2.5, 380.0, 1e4], dtype=torch.float64, requires_grad=True)
    out = vmf.log_cp_torch(k, 384)
    assert out.dtype == torch.float64
    assert np.allclose(out.detach().numpy(), vmf.log_cp(k.detach().numpy(), 384), rtol=1e-12, atol=0)
    out.sum().backward()
    assert np.allclose(k.grad.numpy(), -vmf.bessel_ratio(k.detach().numpy(), 384), rtol=1e-12, atol=0)
    k1 = torch.tensor([3.0, 700.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vmf.log_cp_torch(t, 768), (k1,), eps=1e-6, atol=1e-8)


def test_torch_log_cp_keeps_float32_and_shape():
    k = torch.full((2, 3), 50.0, dtype=torch.float32, requires_grad=True)
    out = vmf.log_cp_torch(k, 256)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    (out * torch.arange(6.0).reshape(2, 3)).sum().backward()
    a = float(vmf.bessel_ratio(50.0, 256))
    assert torch.allclose(k.grad, -a * torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("p", [32, 33, 41, 64, 128, 256, 384, 512, 768, 1024])
def test_torch_log_cp_equals_float64_reference_on_grid(p):
    """torch-native log C_p and its gradient −A_p equal the float64 numpy reference to
    1e-12 relative for κ from 1e-6 to 1e6 (every region: series, Debye, ν < 20 recurrence)."""
    k_np = np.concatenate([[0.0], np.logspace(-6, 6, 121), [2 * np.sqrt(p / 2)]])
    k = torch.tensor(k_np, requires_grad=True)
    out = vmf.log_cp_torch(k, p)
    ref = vmf.log_cp(k_np, p)
    assert np.all(np.abs(out.detach().numpy() - ref) <= 1e-12 * np.abs(ref))
    out.sum().backward()
    a = vmf.bessel_ratio(k_np, p)
    assert np.all(np.abs(-k.grad.numpy() - a) <= 1e-12 * a)


def test_torch_log_cp_stays_on_the_device(monkeypatch):
    """No host round trip: it runs on the meta device (which has no data to copy to the CPU) and
    never calls the numpy implementation."""
    def no_numpy(*args, **kwargs):
        raise AssertionError("log_cp_torch went through numpy")

    monkeypatch.setattr(vmf, "log_cp", no_numpy)
    monkeypatch.setattr(vmf, "bessel_ratio", no_numpy)
    k = torch.empty(7, device="meta", requires_grad=True)
    out = vmf.log_cp_torch(k, 256)
    assert out.device.type == "meta" and out.shape == (7,)
    (g,) = torch.autograd.grad(out.sum(), k)
    assert g.device.type == "meta"
    vmf.log_cp_torch(torch.tensor([1.0, 1e3], requires_grad=True), 32).sum().backward()


@pytest.mark.gpu
def test_torch_log_cp_on_cuda():
    k = torch.tensor([1.0, 100.0], device="cuda", requires_grad=True)
    out = vmf.log_cp_torch(k, 384)
    out.sum().backward()
    assert out.device.type == "cuda" and k.grad.device.type == "cuda"
    assert np.allclose(k.grad.cpu().numpy(), -vmf.bessel_ratio([1.0, 100.0], 384), rtol=1e-6)
