"""Tutorial 1: simulate a training set with GalSim and look at it.

Writes under ./tutorial_out/01_simulate/:
  sdss_train.h5   the cutout file (observed, noiseless, intrinsic images, PSFs, variance, mask, truth catalog)
  cutouts.png     a grid: one column per galaxy, one row per dataset
  summary.txt     counts, the noise check and the size check

The same simulation from the shell:
  galgen simulate --survey sdss --n 256 --stamp 64 --psf-size 33 --seed 1 --out sdss_train.h5
  galgen summary sdss_train.h5
  galgen preview sdss_train.h5 --out cutouts.png
"""

import os
from pathlib import Path

import numpy as np

from galgen.data import CutoutFile
from galgen.evaluation import format_summary, summarize_cutouts
from galgen.plotting import cutout_grid
from galgen.simulate import simulate

QUICK = os.environ.get("GALGEN_QUICK") == "1"  # the test suite runs every tutorial at reduced size
N = 48 if QUICK else 256

out = Path("tutorial_out/01_simulate")
out.mkdir(parents=True, exist_ok=True)

# Bulge + disk galaxies with star-forming knots, drawn from the SDSS population catalog,
# observed with per-galaxy Moffat PSFs and CCD noise of SDSS r-band imaging.
# workers > 1 renders in parallel processes (then guard the script with
# `if __name__ == "__main__":`); the arrays do not depend on it.
path = simulate(out / "sdss_train.h5", survey="sdss", n=N, stamp=64, psf_size=33, seed=1, workers=1)

with CutoutFile(path) as f:
    print(f)                                   # datasets present and the number of galaxies
    attrs = f.attrs
    print(f"survey {attrs['survey']} ({attrs['band']} band), {f.pixel_scale}\"/pixel, "
          f"zero point {attrs['zero_point']} mag for 1 ADU, sky {attrs['sky_level']:.1f} ADU/pixel")
    observed = f.read("observed")              # (N, 64, 64) float32 ADU, sky-subtracted
    noiseless = f.read("noiseless")            # the same without noise
    intrinsic = f.read("intrinsic", slice(0, 8))  # PSF-free galaxies of the first 8
    psf = f.read("psf", 0)                     # (33, 33) PSF of galaxy 0, unit sum
    cat = f.catalog                            # astropy Table, one row per galaxy

print(f"observed {observed.shape}, intrinsic {intrinsic.shape}, psf {psf.shape} (sum {psf.sum():.4f})")
print(cat["index", "mag", "hlr", "bt", "flux", "psf_fwhm"][:5])

# The noise check: (observed - noiseless)^2 / variance is about 1 per pixel;
# the size check compares adaptive moments of disks with their catalog half-light radius.
summary = summarize_cutouts(path)
text = format_summary(summary)
(out / "summary.txt").write_text(text)
print(text)

cutout_grid(path, out / "cutouts.png", n=8)

# Key numbers
flux_in_stamp = noiseless.sum((1, 2)) / np.asarray(cat["flux"])
print(f"galaxies: {len(cat)}")
print(f"median r magnitude: {np.median(cat['mag']):.2f}, median half-light radius: {np.median(cat['hlr']):.2f} arcsec")
print(f"median S/N: {summary['snr_median']:.1f}")
print(f"chi2 per pixel of the noise: {summary['chi2_per_pixel']:.3f}  (1 = variance plane is right)")
print(f"median fraction of the flux inside the stamp: {np.median(flux_in_stamp):.3f}")
print(f"wrote {path}, {out / 'cutouts.png'}, {out / 'summary.txt'}")
