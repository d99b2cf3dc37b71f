"""Figures: fit panels and corner plots are written as PNGs of the right layout; bad input is refused."""

import numpy as np
import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.inference.fit import fit_file
from galgen.plotting import corner_plot, fit_corner, fit_panel


@pytest.fixture(scope="module")
def sersic_fit(sdss_tiny, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("fit") / "fit.h5"
    return fit_file("sersic", sdss_tiny, out, samples=8, chains=2, warmup=8, n_leapfrog=3, restarts=0,
                    max_iter=60, batch_size=64, device="cpu")


def _png_shape(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_corner_plot_layout_and_errors(tmp_path):
    x = np.random.default_rng(0).normal(size=(500, 3))
    out = corner_plot(x, tmp_path / "c.png", names=["a", "b", "c"], truths=[0, 0, 0])
    h, w, _ = _png_shape(out)
    assert h == w  # D x D panels
    with pytest.raises(GalgenInputError, match="draws"):
        corner_plot(x[:, 0], tmp_path / "bad.png")
    with pytest.raises(GalgenInputError, match="names"):
        corner_plot(x, tmp_path / "bad.png", names=["a"])
    x[3, 1] = np.nan
    with pytest.raises(GalgenInputError, match="NaN"):
        corner_plot(x, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_fit_panel_and_corner_from_a_fit_file(sersic_fit, tmp_path):
    h, w, _ = _png_shape(fit_panel(sersic_fit, tmp_path / "panel.png", n=4))
    # 5 rows (observed, model, residual, intrinsic, posterior std) by 4 galaxies: taller than wide
    assert h > w
    h3, w3, _ = _png_shape(fit_panel(sersic_fit, tmp_path / "panel3.png", rows=[5, 1, 7]))
    assert h3 == h and w3 < w  # one galaxy column fewer
    assert _png_shape(fit_corner(sersic_fit, tmp_path / "corner.png", row=2))[0] > 200
    with pytest.raises(GalgenInputError, match="rows"):
        fit_panel(sersic_fit, tmp_path / "x.png", rows=[64])
    with pytest.raises(GalgenInputError, match="row"):
        fit_corner(sersic_fit, tmp_path / "x.png", row=-1)


def test_training_curves_show_the_gan_distances(tmp_path):
    """A GAN run's curves: critic and generator losses, and the validation KS distances
    (logged only in val_log.csv) each get a panel; a VAE-like run gets only its own keys."""
    from galgen.plotting import training_curves
    from galgen.train.logs import TRAIN_LOG, VAL_LOG, CSVLog

    train, val = CSVLog(tmp_path / TRAIN_LOG), CSVLog(tmp_path / VAL_LOG)
    for s in range(1, 11):
        train.add({"step": s, "loss": 1.3, "generator_loss": 0.7, "d_real": 0.1})
    for s in (5, 10):
        val.add({"step": s, "ks_flux": 0.3 / s, "ks_sigma": 0.2, "ks_e": 0.1, "ks_mean": 0.2, "loss": 0.2})
    train.flush()
    val.flush()
    out = training_curves(tmp_path, tmp_path / "curves.png")
    assert _png_shape(out)[1] == 5 * 4 * 110  # loss, generator_loss, ks_flux, ks_sigma, ks_e
    out = training_curves(tmp_path, tmp_path / "two.png", keys=["loss", "ks_flux"])
    assert _png_shape(out)[1] == 2 * 4 * 110
