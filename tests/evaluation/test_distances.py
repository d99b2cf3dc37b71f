"""Distances between real and generated galaxy sets: floors, power, analytic values, C2ST."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch

from galgen.errors import GalgenInputError
from galgen.evaluation.distances import (binned_comparison, c2st_images, c2st_statistics, compare_statistics,
                                         ks_distance, split_half, wasserstein_distance)

STATS = ("flux", "sigma", "e1", "e2", "e", "r50", "concentration", "asymmetry", "smoothness", "gini", "m20")


def population(n: int, seed: int, *, size_scale: float = 1.0, e1_shift: float = 0.0, nan_fraction: float = 0.02):
    """A synthetic statistics dict shaped like ``morphology_statistics``'s, with NaN failures."""
    rng = np.random.default_rng(seed)
    flux = rng.lognormal(np.log(2000.0), 0.8, n)
    sigma = size_scale * rng.lognormal(np.log(0.8), 0.3, n)
    e1 = rng.normal(e1_shift, 0.25, n)
    e2 = rng.normal(0.0, 0.25, n)
    st = {"flux": flux, "sigma": sigma, "e1": e1, "e2": e2, "e": np.hypot(e1, e2),
          "r50": 1.2 * sigma * rng.lognormal(0, 0.1, n),
          "concentration": rng.normal(3.0, 0.4, n) + 0.2 * np.log10(flux),
          "asymmetry": rng.gamma(2.0, 0.05, n), "smoothness": rng.normal(0.02, 0.02, n),
          "gini": rng.normal(0.5, 0.05, n), "m20": rng.normal(-1.8, 0.2, n)}
    for k in STATS:
        st[k][rng.random(n) < nan_fraction] = np.nan
    st["ok"] = np.all([np.isfinite(st[k]) for k in STATS], 0)
    st["flag"] = np.where(st["ok"], 0, 2)
    return st


@pytest.fixture(scope="module")
def real():
    return population(2000, 1)


# -- one statistic ---------------------------------------------------------------------

def test_w1_of_two_normals_is_the_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 40000), rng.normal(0.7, 1, 40000)
    assert wasserstein_distance(a, b, scale=1) == pytest.approx(0.7, abs=0.02)
    # normalised by the std of the first (real) sample: N(0, 2) vs N(1, 2) -> 1 / 2
    a2, b2 = 2 * a, 2 * rng.normal(0.5, 1, 40000)
    assert wasserstein_distance(a2, b2) == pytest.approx(0.5, abs=0.02)
    assert wasserstein_distance(a2, b2) == pytest.approx(
        scipy.stats.wasserstein_distance(a2, b2) / np.std(a2, ddof=1), rel=1e-12)
    # the normalisation is by ``a`` only: scaling ``b`` changes the distance, not the unit
    assert wasserstein_distance(a, 3 * a) == pytest.approx(2 * np.mean(np.abs(a)) / np.std(a, ddof=1), rel=1e-9)


def test_nans_are_dropped_and_ks_matches_scipy():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, 500), rng.normal(0.2, 1, 400)
    an, bn = np.concatenate([a, [np.nan] * 7]), np.concatenate([[np.nan, np.inf], b])
    assert ks_distance(an, bn) == scipy.stats.ks_2samp(a, b).statistic
    assert wasserstein_distance(an, bn) == pytest.approx(wasserstein_distance(a, b), rel=1e-12)
    assert np.isnan(ks_distance([np.nan], b)) and np.isnan(wasserstein_distance([1.0], b))


# -- compare_statistics ----------------------------------------------------------------

def test_same_distribution_is_at_the_floor(real):
    res = compare_statistics(real, population(2000, 2))
    for k in STATS:
        s = res["statistics"][k]
        assert s["w1"] <= 2 * s["w1_floor"], (k, s)
        assert s["ks"] <= 2 * s["ks_floor"], (k, s)
        assert 1900 < s["n_real"] < 2000 and 1900 < s["n_gen"] < 2000  # NaNs dropped
    summ = res["summary"]
    assert summ["names"] == list(STATS)
    assert 0.7 < summ["w1_ratio"] < 1.4 and 0.7 < summ["ks_ratio"] < 1.4
    json.dumps(res, allow_nan=False)


def test_floor_and_distance_use_samples_of_the_same_size(real):
    # a set compared with itself: the generated half-size subsample is drawn from the very
    # galaxies of the real set, so the distance is at (or below) the floor's scale, while
    # the all-vs-all distance is exactly zero
    res = compare_statistics(real, real)
    for k in STATS:
        s = res["statistics"][k]
        assert s["ks_all"] == 0.0 and s["w1_all"] == 0.0
        assert s["w1_ratio"] < 1.2, (k, s)
        assert s["median_real"] == s["median_gen"]
    # halving: the floor of N/2 vs N/2 exceeds the all-vs-all distance of two independent
    # N-sized draws by about sqrt(2)
    res2 = compare_statistics(real, population(2000, 5), repeats=20)
    ratio = np.mean([res2["statistics"][k]["w1_floor"] / res2["statistics"][k]["w1_all"] for k in STATS])
    assert 1.1 < ratio < 2.0


def test_larger_sizes_are_told_apart_in_the_size_statistics_only(real):
    res = compare_statistics(real, population(2000, 2, size_scale=1.3))
    for k in ("sigma", "r50"):
        s = res["statistics"][k]
        assert s["w1"] > 5 * s["w1_floor"] and s["ks"] > 5 * s["ks_floor"], (k, s)
        assert s["ks_pvalue_all"] < 1e-10
        assert s["median_gen"] / s["median_real"] == pytest.approx(1.3, rel=0.05)
        assert s["transformed"]  # log10 by default
    for k in set(STATS) - {"sigma", "r50"}:
        assert res["statistics"][k]["w1_ratio"] < 2, k
    assert res["summary"]["w1_ratio"] > 1.5


def test_shifted_statistic_and_transforms(real):
    res = compare_statistics(real, population(2000, 2, e1_shift=0.1), names=["e1", "e2"])
    assert list(res["statistics"]) == ["e1", "e2"]
    assert res["statistics"]["e1"]["w1_ratio"] > 5 and res["statistics"]["e2"]["w1_ratio"] < 2
    # normalised W1 of a pure shift is shift / std of real: 0.1 / 0.25
    assert res["statistics"]["e1"]["w1_all"] == pytest.approx(0.4, abs=0.1)
    # without the log transform, W1 of flux is in units of the (skewed) real flux spread
    raw = compare_statistics(real, real, names=["flux"], transforms={"flux": None})
    assert not raw["statistics"]["flux"]["transformed"]
    sq = compare_statistics(real, real, names=["e1"], transforms={"e1": np.square})
    assert sq["statistics"]["e1"]["transformed"]


# -- C2ST on statistics ----------------------------------------------------------------

def test_c2st_statistics_null_and_alternative(real):
    same = c2st_statistics(real, population(2000, 2))
    assert same["n"] == 4000 and same["se"] == pytest.approx(np.sqrt(0.25 / 4000))
    assert abs(same["accuracy"] - 0.5) < 3 * same["se"], same
    assert abs(same["floor"] - 0.5) < 3 * same["floor_se"], same
    assert same["p_value"] > 1e-3
    diff = c2st_statistics(real, population(2000, 2, size_scale=1.3))
    assert diff["accuracy"] > 0.6 and diff["p_value"] < 1e-3, diff
    json.dumps(diff, allow_nan=False)


def test_c2st_statistics_balances_classes_and_is_reproducible(real):
    gen = population(700, 9, e1_shift=0.3)
    a = c2st_statistics(real, gen, names=["e1", "e2", "flux"], seed=3, folds=3)
    assert a["n"] == 1400 and a["folds"] == 3
    assert a["accuracy"] > 0.65
    assert c2st_statistics(real, gen, names=["e1", "e2", "flux"], seed=3, folds=3) == a


# -- C2ST on images --------------------------------------------------------------------

def blobs(n: int, seed: int, *, size_scale: float = 1.0, s: int = 64, noise: float = 1.0) -> np.ndarray:
    """Elliptical Gaussian galaxies with lognormal fluxes and sizes plus Gaussian sky noise."""
    rng = np.random.default_rng(seed)
    flux = rng.lognormal(np.log(600.0), 0.4, n)[:, None, None]
    sig = size_scale * rng.lognormal(np.log(2.5), 0.2, n)[:, None, None]
    q = rng.uniform(0.5, 1.0, n)[:, None, None]
    th = rng.uniform(0, np.pi, n)[:, None, None]
    y, x = np.mgrid[:s, :s] - s // 2
    u, v = np.cos(th) * x + np.sin(th) * y, -np.sin(th) * x + np.cos(th) * y
    img = flux / (2 * np.pi * sig ** 2) * np.exp(-0.5 * (u ** 2 / q + v ** 2 * q) / sig ** 2)
    return (img + rng.normal(0, noise, img.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def stamps():
    return blobs(1500, 1)


def test_c2st_images_same_distribution(stamps):
    res = c2st_images(stamps, blobs(1500, 2))
    assert res["n_test"] == 900 and res["n_train"] == 2100 and res["input_size"] == 32
    assert abs(res["accuracy"] - 0.5) < 3 * res["se"], res
    json.dumps(res, allow_nan=False)


def test_c2st_images_larger_sizes():
    # ln sizes scattered by 0.2 per class and separated by ln 1.3 = 0.26: if size alone
    # were seen perfectly, the Bayes accuracy would be Phi(0.26 / 0.4) = 0.74
    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    res = c2st_images(blobs(1500, 3), torch.from_numpy(blobs(1500, 4, size_scale=1.3)), noise=1.0)
    assert res["accuracy"] > 0.65 and res["p_value"] < 1e-6, res
    assert torch.equal(torch.get_rng_state(), before)  # the global random state is untouched
    assert torch.get_num_threads() == threads


def test_c2st_images_is_reproducible_and_checks_input():
    a, b = blobs(120, 5, s=32), blobs(100, 6, s=32, size_scale=1.3)
    r1 = c2st_images(a, b, seed=4, epochs=1, noise=(1.0, np.ones(100)))
    r2 = c2st_images(a, b, seed=4, epochs=1, noise=(1.0, np.ones(100)))
    r1.pop("seconds"), r2.pop("seconds")
    assert r1 == r2 and r1["n_test"] == 60 and r1["input_size"] == 32
    with pytest.raises(GalgenInputError, match="gen"):
        c2st_images(a, blobs(10, 1, s=48))
    with pytest.raises(GalgenInputError, match="real"):
        c2st_images(a[0], b)
    with pytest.raises(GalgenInputError, match="noise"):
        c2st_images(a, b, noise=np.ones(3))


# -- binned comparison -----------------------------------------------------------------

def test_binned_comparison_finds_the_one_bad_bin(real):
    gen = population(2000, 2)
    bright = gen["flux"] > np.nanquantile(real["flux"], 0.75)
    gen["concentration"] = np.where(bright, gen["concentration"] + 0.5, gen["concentration"])
    res = binned_comparison(real, gen, by="flux", bins=4)
    json.dumps(res, allow_nan=False)
    assert res["by"] == "flux" and len(res["edges"]) == 5 and "flux" not in res["names"]
    assert sum(res["n_real"]) == int(np.isfinite(real["flux"]).sum())
    assert max(res["n_real"]) - min(res["n_real"]) <= 1
    pc = [b["statistics"]["concentration"]["ks_pvalue"] for b in res["bins"]]
    assert pc[3] < 1e-10 and min(pc[:3]) > 1e-3, pc
    c3 = res["bins"][3]["statistics"]["concentration"]
    assert c3["median_gen"] - c3["median_real"] == pytest.approx(0.5, abs=0.1)
    assert c3["p16_real"] < c3["median_real"] < c3["p84_real"]
    for b in res["bins"]:
        for k in set(STATS) - {"flux", "concentration"}:
            assert b["statistics"][k]["ks_pvalue"] > 1e-4, (k, b["lo"])


def test_binned_comparison_by_size_with_edges(real):
    res = binned_comparison(real, population(2000, 2, size_scale=1.3), by="r50", names=["e", "gini"],
                            bins=[0.3, 1.0, 3.0])
    assert res["edges"] == [0.3, 1.0, 3.0] and res["names"] == ["e", "gini"]
    # the larger generated galaxies crowd the upper size bin
    assert res["frac_gen"][1] > res["frac_real"][1] + 0.1


# -- split_half and bad input ----------------------------------------------------------

def test_split_half_keeps_galaxies_together(real):
    a, b = split_half(real, seed=5)
    assert len(a["flux"]) == 1000 and len(b["flux"]) == 1000
    assert set(a) == set(real)
    pairs = {(f, s) for f, s in zip(real["flux"], real["sigma"], strict=True) if np.isfinite(f) and np.isfinite(s)}
    got = {(f, s) for h in (a, b) for f, s in zip(h["flux"], h["sigma"], strict=True)
           if np.isfinite(f) and np.isfinite(s)}
    assert got == pairs
    assert not set(a["flux"][np.isfinite(a["flux"])]) & set(b["flux"][np.isfinite(b["flux"])])
    a2, _ = split_half(real, seed=5)
    assert np.array_equal(a2["flux"], a["flux"], equal_nan=True)
    a3, _ = split_half(real, seed=6)
    assert not np.array_equal(a3["flux"], a["flux"], equal_nan=True)


def test_bad_input_names_the_argument(real):
    gen = dict(population(100, 2))
    del gen["m20"]
    with pytest.raises(GalgenInputError, match="gen.*m20"):
        compare_statistics(real, gen)
    with pytest.raises(GalgenInputError, match="names.*nope"):
        compare_statistics(real, real, names=["nope"])
    with pytest.raises(GalgenInputError, match="real"):
        compare_statistics({}, real)
    with pytest.raises(GalgenInputError, match="gen"):
        c2st_statistics(real, {"flux": np.array([])})
    with pytest.raises(GalgenInputError, match="real"):
        compare_statistics({"flux": np.ones(3), "e": np.ones(4)}, real)
    with pytest.raises(GalgenInputError, match="by"):
        binned_comparison(real, real, by="colour")
    with pytest.raises(GalgenInputError, match="bins"):
        binned_comparison(real, real, by="flux", bins=[3.0, 1.0])
    with pytest.raises(GalgenInputError, match="stats"):
        split_half({"flux": np.ones(1)})
    with pytest.raises(GalgenInputError, match="transforms"):
        compare_statistics(real, real, transforms={"flux": 3})
