"""FITS ingest: round trip, PSF/noise HDU variants, cropping, and every bad input named."""

import warnings

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from galgen.data import read_cutouts
from galgen.data.ingest import ingest_fits
from galgen.errors import GalgenInputError

SCALE = 0.396


def _header(scale=SCALE, size=33):
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRPIX1"] = h["CRPIX2"] = size // 2 + 1
    h["CRVAL1"], h["CRVAL2"] = 150.0, 2.0
    h["CDELT1"], h["CDELT2"] = -scale / 3600, scale / 3600
    h["CUNIT1"] = h["CUNIT2"] = "deg"
    return h


def _psf(size=25, fwhm=1.4):
    img = galsim.Moffat(beta=3.5, fwhm=fwhm).drawImage(nx=size, ny=size, scale=SCALE, method="no_pixel",
                                                       use_true_center=False).array
    return (img / img.sum()).astype(np.float32)


def _write(path, seed=0, size=33, psf=True, noise="VARIANCE", image=None, psf_img=None, header=None, mask=None,
           extra=None):
    rng = np.random.default_rng(seed)
    gal = galsim.Convolve(galsim.Exponential(half_light_radius=1.0, flux=5e3), galsim.Moffat(beta=3.5, fwhm=1.4))
    img = gal.drawImage(nx=size, ny=size, scale=SCALE, use_true_center=False).array + rng.normal(0, 3, (size, size))
    if image is not None:
        img = image
    hdr = _header(size=size) if header is None else header
    hdr["OBJID"] = 1000 + seed
    hdus = [fits.PrimaryHDU(img.astype(np.float32), header=hdr)]
    if psf:
        hdus.append(fits.ImageHDU(_psf() if psf_img is None else psf_img, name="PSF"))
    var = np.full(img.shape, 9.0, np.float32)
    if noise == "VARIANCE":
        hdus.append(fits.ImageHDU(var, name="VARIANCE"))
    elif noise == "IVAR":
        ivar = 1 / var
        ivar[8, :] = 0
        hdus.append(fits.ImageHDU(ivar, name="IVAR"))
    if mask is not None:
        hdus.append(fits.ImageHDU(mask.astype(np.uint8), name="MASK"))
    for h in extra or ():
        hdus.append(h)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return img.astype(np.float32)


def test_round_trip(tmp_path):
    files, images = [], []
    for i in range(5):
        p = tmp_path / f"g{i}.fits"
        images.append(_write(p, seed=i))
        files.append(p)
    out = ingest_fits(files, tmp_path / "obs.h5", survey="sdss", header_keys=("OBJID",))
    arrays, cat, attrs = read_cutouts(out)
    assert np.array_equal(arrays["observed"], np.stack(images))
    assert np.all(arrays["variance"] == 9.0) and np.all(arrays["mask"] == 0)
    assert np.allclose(arrays["psf"], _psf()[None], atol=1e-7)
    assert attrs["pixel_scale"] == pytest.approx(SCALE, rel=1e-6)
    assert attrs["source"] == "ingest" and attrs["oversampling"] == 1 and attrs["survey"] == "sdss"
    assert list(cat["source_file"]) == [str(f) for f in files]
    assert list(cat["OBJID"]) == [1000, 1001, 1002, 1003, 1004]
    assert len(Table.read(out, path="catalog")) == 5


def test_weight_hdu_shared_psf_and_crop(tmp_path):
    p = tmp_path / "g.fits"
    img = _write(p, psf=False, noise="IVAR")
    shared = tmp_path / "psf.fits"
    fits.PrimaryHDU(_psf()).writeto(shared)
    out = ingest_fits([p], tmp_path / "o.h5", psf=shared, stamp=21)
    arrays, cat, _ = read_cutouts(out)
    assert arrays["observed"].shape == (1, 21, 21)
    good = arrays["mask"][0] == 0
    assert np.array_equal(arrays["observed"][0][good], img[16 - 10:16 + 11, 16 - 10:16 + 11][good])
    assert np.all(arrays["observed"][0][~good] == 0)
    assert np.unravel_index(arrays["observed"][0].argmax(), (21, 21)) == (10, 10)  # centre kept at S//2
    assert np.allclose(arrays["variance"][0][arrays["mask"][0] == 0], 9.0, rtol=1e-6)
    assert arrays["mask"][0][2].all() and cat["n_masked"][0] == 21  # the ivar = 0 row is masked


def test_nan_pixels_masked_or_refused(tmp_path):
    img = _write(tmp_path / "clean.fits")
    img[5, 7] = np.nan
    img[6, 8] = np.inf
    _write(tmp_path / "nan.fits", image=img)
    with pytest.warns(UserWarning, match=r"nan\.fits: masked 2 pixel"):
        out = ingest_fits([tmp_path / "nan.fits"], tmp_path / "o.h5")
    arrays, _, _ = read_cutouts(out)
    assert arrays["mask"][0, 5, 7] and arrays["mask"][0, 6, 8] and arrays["observed"][0, 5, 7] == 0
    assert np.all(np.isfinite(arrays["observed"]))
    with pytest.raises(GalgenInputError, match=r"nan\.fits: 2 pixel"):
        ingest_fits([tmp_path / "nan.fits"], tmp_path / "o2.h5", nonfinite="raise")
    assert not (tmp_path / "o2.h5").exists()


def test_psf_normalisation(tmp_path):
    _write(tmp_path / "g.fits", psf_img=_psf() * 0.8)
    with pytest.raises(GalgenInputError, match=r"g\.fits: PSF \(HDU 'PSF'\) sums to 0\.8"):
        ingest_fits([tmp_path / "g.fits"], tmp_path / "o.h5")
    out = ingest_fits([tmp_path / "g.fits"], tmp_path / "o.h5", normalize_psf=True)
    arrays, _, _ = read_cutouts(out)
    assert arrays["psf"][0].sum() == pytest.approx(1.0, abs=1e-5)


def _bad_cases(tmp_path):
    nan_psf = _psf()
    nan_psf[3, 3] = np.nan
    off = np.roll(_psf(), 4, axis=1)
    cases = {
        "missing image HDU": (dict(image_hdu="SCI"), {}, "no image HDU 'SCI'"),
        "missing PSF": (dict(), dict(psf=False), "no PSF HDU 'PSF'"),
        "NaN PSF": (dict(), dict(psf_img=nan_psf), "PSF (HDU 'PSF') contains NaN"),
        "off-centre PSF": (dict(), dict(psf_img=off), "is not centred"),
        "no noise": (dict(), dict(noise=None), "neither a variance HDU"),
        "variance shape": (dict(variance_hdu="VAR2"), dict(noise=None, extra=[fits.ImageHDU(np.ones((5, 5)), name="VAR2")]),
                           "variance shape (5, 5) differs"),
        "no pixel scale": (dict(), dict(header=fits.Header()), "no pixel scale"),
        "all NaN": (dict(), dict(image=np.full((33, 33), np.nan)), "every pixel is masked"),
    }
    return cases


@pytest.mark.parametrize("case", ["missing image HDU", "missing PSF", "NaN PSF", "off-centre PSF", "no noise",
                                  "variance shape", "no pixel scale", "all NaN"])
def test_bad_input_names_file_and_writes_nothing(tmp_path, case):
    kwargs, write_kwargs, message = _bad_cases(tmp_path)[case]
    path = tmp_path / "bad.fits"
    _write(path, **write_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GalgenInputError) as err:
            ingest_fits([path], tmp_path / "o.h5", **kwargs)
    assert str(path) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()


def test_bad_files_and_mismatches(tmp_path):
    text = tmp_path / "notes.fits"
    text.write_text("not a fits file at all")
    with pytest.raises(GalgenInputError, match=r"notes\.fits: not a readable FITS file"):
        ingest_fits([text], tmp_path / "o.h5")
    with pytest.raises(GalgenInputError, match=r"missing\.fits: no such file"):
        ingest_fits([tmp_path / "missing.fits"], tmp_path / "o.h5")
    _write(tmp_path / "a.fits")
    _write(tmp_path / "b.fits", size=31)
    with pytest.raises(GalgenInputError, match=r"b\.fits: cutout is \(31, 31\)"):
        ingest_fits([tmp_path / "a.fits", tmp_path / "b.fits"], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_rerun_is_a_noop_and_other_args_need_overwrite(tmp_path):
    _write(tmp_path / "a.fits")
    out = ingest_fits([tmp_path / "a.fits"], tmp_path / "o.h5")
    mtime = out.stat().st_mtime_ns
    ingest_fits([tmp_path / "a.fits"], out)
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(GalgenInputError, match="output exists"):
        ingest_fits([tmp_path / "a.fits"], out, survey="other")
    ingest_fits([tmp_path / "a.fits"], out, survey="other", overwrite=True)
    assert read_cutouts(out)[2]["survey"] == "other"


def test_cli_ingest(tmp_path):
    from galgen.cli import main

    _write(tmp_path / "a.fits")
    assert main(["ingest", str(tmp_path / "a.fits"), "--out", str(tmp_path / "o.h5"), "--survey", "sdss",
                 "--header-keys", "OBJID"]) == 0
    assert main(["ingest", str(tmp_path / "zzz.fits"), "--out", str(tmp_path / "p.h5")]) == 2
