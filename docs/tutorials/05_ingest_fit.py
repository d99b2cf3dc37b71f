"""Tutorial 5: bring your own FITS cutouts into galgen and fit them.

Writes under ./tutorial_out/05_ingest_fit/:
  cutouts/gal_NNN.fits   one galaxy per file, as you might have them: the image in the
                         primary HDU (with PIXSCALE and your own keywords in its header),
                         the PSF in HDU "PSF", the noise variance in HDU "VARIANCE", bad
                         pixels in HDU "MASK"
  observations.h5        the same cutouts in galgen's cutout format
  sersic.h5, sersic.fits Sersic fits of every galaxy: fit file and catalog
  sersic_fits.png        observed, model, (data - model)/sigma, intrinsic

The same from the shell:
  galgen ingest cutouts/*.fits --out observations.h5 --survey mine --header-keys OBJID TRUEFLUX
  galgen fit --model sersic --data observations.h5 --out sersic.h5
"""

import os
from pathlib import Path

import galsim
import numpy as np
from astropy.io import fits
from astropy.table import Table

from galgen.data import read_cutouts
from galgen.data.ingest import ingest_fits
from galgen.inference.fit import fit_file
from galgen.plotting import fit_panel

QUICK = os.environ.get("GALGEN_QUICK") == "1"  # the test suite runs every tutorial at reduced size
N = 12 if QUICK else 48
SCALE = 0.396       # arcsec/pixel
SIZE = 48           # stamp, pixels
PSF_SIZE = 25       # PSF image, pixels
SKY_VAR = 30.0**2   # sky + read noise variance per pixel, ADU^2
GAIN = 4.7          # e-/ADU: the galaxy's own Poisson noise

out = Path("tutorial_out/05_ingest_fit")
(out / "cutouts").mkdir(parents=True, exist_ok=True)

# 1. Make FITS cutouts the way a pipeline would deliver them: Sersic galaxies drawn by
#    GalSim, convolved with a Moffat PSF and the pixel, with sky and Poisson noise.
#    galgen's PSF convention: the PSF *without* the pixel response, centred on pixel
#    (P//2, P//2), unit sum ("no_pixel"; a delivered PSF that includes the pixel would
#    be counted twice). The variance plane is the one the noise was drawn from.
rng = np.random.default_rng(2024)
files = []
for i in range(N):
    flux = 10 ** rng.uniform(4.0, 5.0)
    hlr, n = rng.uniform(0.8, 2.2), rng.uniform(0.8, 3.5)
    g1, g2 = rng.uniform(-0.35, 0.35, 2)
    fwhm = rng.uniform(1.0, 1.8)
    psf = galsim.Moffat(beta=3.5, fwhm=fwhm)
    gal = galsim.Sersic(n=n, half_light_radius=hlr, flux=flux).shear(g1=g1, g2=g2)
    noiseless = galsim.Convolve(gal, psf).drawImage(nx=SIZE, ny=SIZE, scale=SCALE, use_true_center=False).array
    variance = SKY_VAR + np.clip(noiseless, 0, None) / GAIN
    image = noiseless + rng.normal(0.0, np.sqrt(variance))
    psf_img = psf.drawImage(nx=PSF_SIZE, ny=PSF_SIZE, scale=SCALE, method="no_pixel", use_true_center=False).array
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if i % 4 == 3:  # a cosmic ray: flagged in the mask, left out of every likelihood
        y, x = rng.integers(5, SIZE - 5, 2)
        image[y, x - 2:x + 3] += 5000.0
        mask[y, x - 2:x + 3] = 1

    header = fits.Header()
    header["PIXSCALE"] = (SCALE, "arcsec/pixel")
    header["BUNIT"] = "adu"
    header["OBJID"] = 1000 + i
    header["TRUEFLUX"], header["TRUEHLR"], header["TRUEN"] = flux, hlr, n
    header["TRUEG1"], header["TRUEG2"], header["PSFFWHM"] = g1, g2, fwhm
    hdus = fits.HDUList([fits.PrimaryHDU(image.astype(np.float32), header=header),
                         fits.ImageHDU((psf_img / psf_img.sum()).astype(np.float32), name="PSF"),
                         fits.ImageHDU(variance.astype(np.float32), name="VARIANCE"),
                         fits.ImageHDU(mask, name="MASK")])
    path = out / "cutouts" / f"gal_{i:03d}.fits"
    hdus.writeto(path, overwrite=True)
    files.append(path)

# 2. Ingest: every file is validated (shapes, PSF normalisation and centring, finite
#    variance) before anything is written; header keywords become catalog columns.
#    The pixel scale comes from pixel_scale=, else the WCS, else PIXSCALE.
obs = ingest_fits(files, out / "observations.h5", pixel_scale=SCALE, survey="my-survey",
                  header_keys=("OBJID", "TRUEFLUX", "TRUEHLR", "TRUEN", "TRUEG1", "TRUEG2"))
arrays, cat, attrs = read_cutouts(obs)
print(f"ingested {len(cat)} cutouts: observed {arrays['observed'].shape}, psf {arrays['psf'].shape}, "
      f"{attrs['pixel_scale']}\"/pixel, masked pixels {int(np.sum(cat['n_masked']))}")

# 3. Fit a Sersic profile (flux, hlr, n, shear, centre) to each galaxy by Levenberg-Marquardt,
#    convolved with its own PSF. The model is built for the file's stamp and pixel scale.
fit = fit_file("sersic", obs, out / "sersic.h5", device="cpu", seed=0)
fitcat = Table.read(fit.with_suffix(".fits"))
fit_panel(fit, out / "sersic_fits.png", n=6)

# The model is the truth here, so chi2/dof ~ 1 (within sqrt(2/dof) ~ 0.03 per galaxy) and
# the parameters come back within their noise. exp(log_scale) is the total flux of the
# (untruncated) profile; flux_map is the light of the MAP image inside the stamp.
total_flux = np.exp(np.asarray(fitcat["log_scale"], float))
t = Table({"OBJID": cat["OBJID"], "chi2_dof": fitcat["chi2_dof"],
           "flux/true": total_flux / cat["TRUEFLUX"], "hlr": fitcat["param_hlr"], "true hlr": cat["TRUEHLR"],
           "n": fitcat["param_n"], "true n": cat["TRUEN"]})
for c in t.colnames[1:]:
    t[c].info.format = ".3f"
t.pprint(max_lines=-1, max_width=-1)

# Key numbers
print(f"galaxies: {len(fitcat)}, converged: {int(np.sum(fitcat['status'] == 0))}")
print(f"chi2/dof: median {np.median(fitcat['chi2_dof']):.3f}, range {np.min(fitcat['chi2_dof']):.3f}"
      f"-{np.max(fitcat['chi2_dof']):.3f}")
print(f"total flux / true: median {np.median(total_flux / cat['TRUEFLUX']):.4f}")
print(f"hlr / true: median {np.median(fitcat['param_hlr'] / cat['TRUEHLR']):.4f}; "
      f"n - true n: median {np.median(fitcat['param_n'] - cat['TRUEN']):+.3f}")
print(f"shear g1 - true: rms {np.sqrt(np.mean((fitcat['param_g1'] - cat['TRUEG1']) ** 2)):.4f}")
