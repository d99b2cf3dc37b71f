"""Tutorial 4: fit observed galaxies with the pretrained VAE and with a Sersic profile.

Writes under ./tutorial_out/04_fit/:
  galaxies.h5                 simulated SDSS galaxies to fit (the truth is in their catalog)
  vae.h5, vae.fits            MAP fits of every galaxy with the VAE: fit file and catalog
  sersic.h5, sersic.fits      the same with a single Sersic profile
  sersic_post.h5, .fits      Sersic posteriors of the first few galaxies (importance sampling)
  vae_fits.png, sersic_fits.png   observed, model, (data - model)/sigma, intrinsic
  corner.png                  posterior of flux, hlr, e1, e2 of the first galaxy

The same from the shell:
  galgen simulate --survey sdss --n 64 --stamp 64 --psf-size 33 --seed 42 --out galaxies.h5
  galgen fit --model sdss-vae --data galaxies.h5 --out vae.h5
  galgen fit --model sersic --data galaxies.h5 --out sersic.h5
  galgen fit --model sersic --data galaxies.h5 --samples 100 --limit 4 --out sersic_post.h5
"""

import os
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table

from galgen.data import CutoutFile, FitFile
from galgen.inference.derived import derived_quantities
from galgen.inference.fit import fit_file
from galgen.plotting import fit_corner, fit_panel
from galgen.simulate import simulate

QUICK = os.environ.get("GALGEN_QUICK") == "1"  # the test suite runs every tutorial at reduced size
N = 16 if QUICK else 64
N_POSTERIOR = 2 if QUICK else 4

out = Path("tutorial_out/04_fit")
out.mkdir(parents=True, exist_ok=True)

# Galaxies the pretrained VAE never saw (another seed than its training set), on its
# grid: 64x64 SDSS stamps, 33x33 PSFs.
data = simulate(out / "galaxies.h5", survey="sdss", n=N, stamp=64, psf_size=33, seed=42)

# MAP fits: the VAE's latent code and flux scale (Adam, starting from the encoder's
# guess), and the classical baseline, a Sersic profile (flux, radius, index, shear,
# centre) by Levenberg-Marquardt. Both are convolved with each galaxy's own PSF.
vae_fit = fit_file("sdss-vae", data, out / "vae.h5", device="cpu", seed=0)
sersic_fit = fit_file("sersic", data, out / "sersic.h5", device="cpu", seed=0)

# Posteriors for the first galaxies only (limit=), 4 x 100 draws, with the default
# posterior="is": importance sampling about the Laplace approximation (a Gaussian at the
# MAP), checked by its PSIS Pareto k (< 0.7: the weighted draws are reliable), and NUTS
# for galaxies where k stays high. Here for the Sersic model's 7 parameters (seconds).
# The same call with "sdss-vae" works, but its 16-d latent posteriors mostly fail the
# k check and go to NUTS: minutes per galaxy on a CPU.
post_fit = fit_file("sersic", data, out / "sersic_post.h5", samples=100, chains=4, limit=N_POSTERIOR,
                    device="cpu", seed=0)

# The FITS catalogs: one row per galaxy.
vae_cat = Table.read(vae_fit.with_suffix(".fits"))
sersic_cat = Table.read(sersic_fit.with_suffix(".fits"))
post_cat = Table.read(post_fit.with_suffix(".fits"))


def show(table, columns, rows=5):
    t = table[columns][:rows]
    for c in t.colnames:
        if t[c].dtype.kind == "f":
            t[c].info.format = ".4g"
    t.pprint(max_width=-1, max_lines=-1)


show(vae_cat, ["index", "chi2_dof", "status_name", "flux_map", "hlr_map", "e1_map", "e2_map"])
show(sersic_cat, ["index", "chi2_dof", "param_hlr", "param_n", "flux_map", "hlr_map"])
show(post_cat, ["index", "flux_lo68", "flux_median", "flux_hi68", "hlr_lo68", "hlr_median", "hlr_hi68",
                "posterior_method", "pareto_k"])

# Residual maps from the fit file: (data - model) / sigma is pure noise where the model
# explains the galaxy; structure left in it (spiral arms, knots) is what a model misses.
with FitFile(vae_fit) as f:
    resid = f.read("normalized_residual")          # (N, 64, 64)
    model = f.read("model")                        # MAP model of each observation
    intrinsic = f.read("intrinsic")                # MAP PSF-free galaxy
with FitFile(sersic_fit) as f:
    sersic_resid = f.read("normalized_residual")
with FitFile(post_fit) as f:
    post_std = f.read("posterior_std")             # posterior predictive std of the model image
print(f"residual maps {resid.shape}, model {model.shape}, intrinsic {intrinsic.shape}, "
      f"posterior std {post_std.shape}")

fit_panel(vae_fit, out / "vae_fits.png", n=6)
fit_panel(sersic_fit, out / "sersic_fits.png", n=6)

# Compare with the truth of the simulation: the catalog's total flux and half-light
# radius of the profile, and the same four quantities measured the way the fits measure
# them (on the noise-free intrinsic image: flux, circular hlr, unweighted distortion e1, e2).
with CutoutFile(data) as f:
    truth = f.catalog
    true_intrinsic = torch.as_tensor(f.read("intrinsic"), dtype=torch.float64)
    scale = f.pixel_scale / f.oversampling
true_derived = derived_quantities(true_intrinsic, scale).numpy()   # (N, 4): flux, hlr, e1, e2
flux_t, hlr_t = np.asarray(truth["flux"]), np.asarray(truth["hlr"])
fit_corner(post_fit, out / "corner.png", row=0, truths=list(true_derived[0]))


def ratio(col, t):
    """Median and half the 16-84% spread of fitted / true."""
    r = np.asarray(col, float) / t
    return np.median(r), 0.5 * np.subtract(*np.percentile(r, [84, 16]))


idx = np.asarray(post_cat["index"])
inside = (np.asarray(post_cat["flux_lo95"]) <= flux_t[idx]) & (flux_t[idx] <= np.asarray(post_cat["flux_hi95"]))

# Key numbers
print(f"galaxies fitted: {N} (posteriors for {N_POSTERIOR})")
for name, cat, r in (("VAE", vae_cat, resid), ("Sersic", sersic_cat, sersic_resid)):
    fr, fs = ratio(cat["flux_map"], flux_t)
    hr, hs = ratio(cat["hlr_map"], hlr_t)
    mr, ms = ratio(cat["hlr_map"], true_derived[:, 1])
    de = np.hypot(cat["e1_map"] - true_derived[:, 2], cat["e2_map"] - true_derived[:, 3])
    print(f"{name:>6}: median chi2/dof {np.median(cat['chi2_dof']):.3f}, "
          f"converged {np.mean(np.asarray(cat['status']) == 0):.2f}, residual rms {np.sqrt(np.mean(r ** 2)):.3f}")
    print(f"{'':>6}  flux/true {fr:.3f} +- {fs:.3f}; hlr/catalog hlr {hr:.3f} +- {hs:.3f}; "
          f"hlr/measured true hlr {mr:.3f} +- {ms:.3f}; median |e - e_true| {np.median(de):.3f}")
print(f"Sersic posterior: Pareto k {np.round(np.asarray(post_cat['pareto_k'], float), 2).tolist()} (< 0.7: "
      f"importance sampling is reliable), method {list(post_cat['posterior_method'])}")
print(f"Sersic posterior: 95% flux interval holds the true flux for {inside.sum()} of {len(idx)} galaxies; "
      f"median 68% flux width {np.median(post_cat['flux_hi68'] - post_cat['flux_lo68']) / np.median(flux_t[idx]):.4f} "
      f"of the flux")
