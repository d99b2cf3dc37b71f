"""Tutorial 6: galgen and GalSim together.

1. A galaxy drawn by a galgen model becomes a GalSim profile (to_interpolated_image):
   shear it, convolve it with a GalSim PSF, draw it on another telescope's pixels.
2. A GalSim PSF becomes a galgen PSF (psf_from_galsim) in a differentiable Observation.
3. galgen's pixel-integrated Sersic (render_sersic) against galsim.Sersic.

Writes under ./tutorial_out/06_galsim_interop/:
  vae_galaxy.fits   the VAE's intrinsic galaxy (64x64, 0.396"/pixel), with PIXSCALE
  scene.fits        a GalSim image: VAE galaxies, sheared, seen with 0.7" seeing on 0.2" pixels, noise
  interop.png       the galaxy, its sheared GalSim rendering, galgen's observation, Sersic residuals
  results.json      the key numbers below
"""

import json
import os
from pathlib import Path

import galsim
import numpy as np
import torch
from astropy.io import fits

import galgen
from galgen.physics import CCDNoise, Observation, psf_from_galsim, render_sersic, to_interpolated_image
from galgen.plotting import asinh_stretch, pyplot, save_figure

QUICK = os.environ.get("GALGEN_QUICK") == "1"  # the test suite runs every tutorial at reduced size
N_SCENE = 4 if QUICK else 12
SCALE = 0.396  # the VAE's pixel scale, arcsec

out = Path("tutorial_out/06_galsim_interop")
out.mkdir(parents=True, exist_ok=True)
results = {}

vae = galgen.load_pretrained("sdss-vae")
gen = torch.Generator().manual_seed(11)
with torch.no_grad():
    galaxies = vae.sample(N_SCENE, generator=gen).double()   # (N, 64, 64) intrinsic, ADU
image = galaxies[0].numpy()
fits.PrimaryHDU(image.astype(np.float32), header=fits.Header([("PIXSCALE", SCALE), ("BUNIT", "adu")])).writeto(
    out / "vae_galaxy.fits", overwrite=True)

# --- 1. galgen -> GalSim ------------------------------------------------------------
# The intrinsic image is pixel-integrated at 0.396"; the profile deconvolves that pixel,
# so drawing it back on the same grid returns the image.
profile = to_interpolated_image(image, SCALE)
back = profile.drawImage(nx=64, ny=64, scale=SCALE, use_true_center=False).array
results["roundtrip_max_diff_over_peak"] = float(np.abs(back - image).max() / image.max())

# A weak-lensing shear, 0.7" Kolmogorov seeing, 0.2" pixels (an LSST-like camera): the
# detail the galaxy has is what SDSS resolution allowed the model to learn.
psf_lsst = galsim.Kolmogorov(fwhm=0.7)
lensed = galsim.Convolve(profile.shear(g1=0.05, g2=-0.02), psf_lsst)
stamp = lensed.drawImage(nx=160, ny=160, scale=0.2)
results["intrinsic_flux"] = float(image.sum())
results["galsim_drawn_flux"] = float(stamp.array.sum())
results["flux_ratio"] = results["galsim_drawn_flux"] / results["intrinsic_flux"]

# A little GalSim scene: the VAE galaxies at random places of a 0.2"/pixel field, each
# sheared, convolved with the PSF, plus CCD noise.
rng = galsim.BaseDeviate(5)
ud = galsim.UniformDeviate(rng)
scene = galsim.ImageF(400, 400, scale=0.2)
for img in galaxies.numpy():
    gal = to_interpolated_image(img, SCALE).shear(g1=0.05, g2=-0.02)
    pos = galsim.PositionD(40 + 320 * ud(), 40 + 320 * ud())
    postage = galsim.Convolve(gal, psf_lsst).drawImage(nx=160, ny=160, scale=0.2, center=pos.round())
    bounds = postage.bounds & scene.bounds
    scene[bounds] += postage[bounds]
noiseless_scene_flux = float(scene.array.sum())
scene.addNoise(galsim.CCDNoise(rng, sky_level=400.0, gain=1.0, read_noise=8.8))
fits.PrimaryHDU(scene.array, header=fits.Header([("PIXSCALE", 0.2), ("BUNIT", "adu")])).writeto(
    out / "scene.fits", overwrite=True)
results["scene_flux_ratio"] = noiseless_scene_flux / float(galaxies.sum())

# --- 2. GalSim -> galgen ------------------------------------------------------------
# Any GalSim PSF, drawn with galgen's convention (no pixel response, centre at P//2,
# unit sum), observes galgen galaxies in a differentiable Observation.
psf_profile = galsim.Convolve(galsim.Kolmogorov(fwhm=1.3), galsim.Airy(lam=620, diam=2.5, obscuration=0.3)).shear(
    g1=0.03, g2=0.0)
galsim_obs = galsim.Convolve(profile, psf_profile).drawImage(nx=64, ny=64, scale=SCALE, use_true_center=False).array
for size in (33, 127):
    # the same observation made by galgen: the PSF's light beyond its size x size grid
    # (Kolmogorov and Airy wings) is what makes the two differ; the training sets use 33
    psf = psf_from_galsim(psf_profile, size, SCALE, dtype=torch.float64)
    obs = Observation(psf, pixel_scale=SCALE, stamp=64, noise=CCDNoise(136.6, 4.7, 5.5))
    noiseless, noisy = obs.observe(galaxies[:1], generator=torch.Generator().manual_seed(0))
    results[f"observation_max_diff_over_peak_psf{size}"] = float(
        np.abs(noiseless[0].numpy() - galsim_obs).max() / galsim_obs.max())
results["observation_flux_ratio"] = float(noiseless.sum() / galaxies[0].sum())  # light beyond the stamp is lost
results["observation_chi2_dof"] = float(obs.noise.chi2(noisy, noiseless).sum() / noisy.numel())

# Gradients flow through the whole observation: d(log-likelihood)/d(latent code).
z = vae.sample_latents(1, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
loglike = obs.to(dtype=torch.float32).log_likelihood(vae.decode(z), noisy.float())
(grad,) = torch.autograd.grad(loglike.sum(), z)
results["grad_norm"] = float(grad.norm())

# --- 3. render_sersic against galsim.Sersic ------------------------------------------
sersic_diff = {}
resid_maps = []
for n in (1.0, 2.5, 4.0):
    ours = render_sersic(torch.tensor([1.0], dtype=torch.float64), torch.tensor([n], dtype=torch.float64), 0.2, -0.1,
                         size=48, scale=0.2, flux=1000.0)[0].numpy()
    # GalSim's real-space drawing integrates each pixel (its FFT drawing is ~1e-2 of the
    # peak off in the central pixel of cuspy profiles)
    ref = galsim.Sersic(n, half_light_radius=1.0, flux=1000.0).shear(g1=0.2, g2=-0.1).drawImage(
        nx=48, ny=48, scale=0.2, use_true_center=False, method="real_space").array
    sersic_diff[n] = float(np.abs(ours - ref).max() / ref.max())
    resid_maps.append((ours - ref) / ref.max())
results["sersic_max_rel_diff"] = {str(k): v for k, v in sersic_diff.items()}
(out / "results.json").write_text(json.dumps(results, indent=2))

plt = pyplot()
fig, axes = plt.subplots(1, 6, figsize=(15, 2.8))
sigma = float(obs.noise.variance(noiseless).median().sqrt())
panels = [("VAE galaxy, 0.396\"/pix", asinh_stretch(image)),
          ("GalSim: sheared, 0.7\" PSF, 0.2\"/pix", asinh_stretch(stamp.array)),
          ("galgen Observation (noisy)", asinh_stretch(noisy[0].numpy(), sigma))]
panels += [(f"render_sersic - GalSim (/peak), n={n}", r) for n, r in zip(sersic_diff, resid_maps)]
for ax, (title, img) in zip(axes, panels):
    if title.startswith("render"):
        top = float(np.abs(img).max())
        ax.imshow(img, origin="lower", cmap="RdBu_r", vmin=-top, vmax=top)
    else:
        ax.imshow(img, origin="lower", cmap="magma")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
save_figure(fig, out / "interop.png")

# Key numbers
print(f"round trip galgen -> GalSim -> same grid: max |diff| / peak = {results['roundtrip_max_diff_over_peak']:.2e}")
print(f"sheared, convolved, drawn at 0.2\"/pixel: flux {results['galsim_drawn_flux']:.1f} of "
      f"{results['intrinsic_flux']:.1f} ADU (ratio {results['flux_ratio']:.5f})")
print(f"scene of {N_SCENE} galaxies: flux ratio {results['scene_flux_ratio']:.4f}")
print(f"galgen Observation with a GalSim PSF vs GalSim alone: max |diff| / peak = "
      f"{results['observation_max_diff_over_peak_psf33']:.2e} (33x33 PSF), "
      f"{results['observation_max_diff_over_peak_psf127']:.2e} (127x127 PSF)")
print(f"galgen Observation: flux in the stamp / intrinsic flux {results['observation_flux_ratio']:.4f}; "
      f"chi2/pixel of the noise {results['observation_chi2_dof']:.3f}")
print(f"|d log L / dz| = {results['grad_norm']:.3g}")
for n, d in sersic_diff.items():
    print(f"render_sersic vs galsim.Sersic (n={n}): max |diff| / peak = {d:.2e}")
