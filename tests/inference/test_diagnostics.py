"""R-hat and ESS against arviz on the same chains."""

import numpy as np
import pytest

from galgen.inference.diagnostics import ess_bulk, ess_tail, split_rhat, summarize_chains

az = pytest.importorskip("arviz")


def ar1(rng, chains, draws, phi, shift=0.0):
    x = np.empty((chains, draws))
    x[:, 0] = rng.normal(size=chains)
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + np.sqrt(1 - phi**2) * rng.normal(size=chains)
    return x + shift * np.arange(chains)[:, None]


@pytest.mark.parametrize("phi, shift, draws", [(0.0, 0.0, 400), (0.6, 0.0, 500), (0.95, 0.0, 301),
                                               (0.3, 1.5, 400), (0.99, 0.0, 200)])
def test_matches_arviz(phi, shift, draws):
    rng = np.random.default_rng(int(phi * 100) + draws)
    x = ar1(rng, 4, draws, phi, shift)
    assert split_rhat(x) == pytest.approx(az.rhat(x, method="rank"), rel=1e-8)
    assert ess_bulk(x) == pytest.approx(az.ess(x, method="bulk"), rel=1e-8)
    assert ess_tail(x) == pytest.approx(az.ess(x, method="tail"), rel=1e-8)


def test_vectorised_over_galaxies_and_parameters():
    rng = np.random.default_rng(0)
    x = np.stack([np.stack([ar1(rng, 3, 200, p) for p in (0.1, 0.8)], -1) for _ in range(3)])  # (G, C, N, d)
    s = summarize_chains(x)
    assert s["rhat"].shape == (3, 2)
    for g in range(3):
        for j in range(2):
            assert s["ess_bulk"][g, j] == pytest.approx(az.ess(x[g, :, :, j], method="bulk"), rel=1e-8)
            assert s["rhat"][g, j] == pytest.approx(az.rhat(x[g, :, :, j], method="rank"), rel=1e-8)
    assert (s["ess_bulk"][:, 0] > s["ess_bulk"][:, 1]).all()  # more autocorrelation, fewer effective draws
    stuck = ar1(rng, 4, 300, 0.5, shift=3.0)
    assert split_rhat(stuck) > 1.5
