"""Survey presets: pixel scale, photometric zero point, PSF and noise, as data.

The presets live in ``surveys.yaml`` beside this module, each number with its
literature source; :func:`load_survey` reads a preset by name or a user's YAML file of
the same form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from ..errors import GalgenInputError

__all__ = ["PSFSpec", "Survey", "load_survey", "available_surveys", "survey_observation"]

_PSF_MODELS = ("moffat", "kolmogorov", "gaussian", "airy")


@dataclass(frozen=True)
class PSFSpec:
    """Distribution of per-galaxy PSFs of a survey.

    Parameters
    ----------
    model : {'moffat', 'kolmogorov', 'gaussian', 'airy'}
        Profile family (GalSim's ``Moffat``, ``Kolmogorov``, ``Gaussian`` or ``Airy``).
    fwhm : float
        Median FWHM in arcsec (for ``airy``, informational: the size follows from
        ``lam_nm`` and ``diam_m``).
    fwhm_scatter : float
        Standard deviation of ln(FWHM) from galaxy to galaxy.
    fwhm_range : tuple of float
        Clip range of the FWHM in arcsec.
    g_rms : float
        Rms of each reduced-shear component of the PSF ellipticity.
    beta : float, optional
        Moffat index (``moffat`` only).
    lam_nm, diam_m, obscuration : float, optional
        Wavelength (nm), aperture diameter (m) and linear central obscuration
        (``airy`` only).
    """

    model: str
    fwhm: float
    fwhm_scatter: float = 0.0
    fwhm_range: tuple = (0.0, math.inf)
    g_rms: float = 0.0
    beta: float | None = None
    lam_nm: float | None = None
    diam_m: float | None = None
    obscuration: float = 0.0

    def __post_init__(self):
        if self.model not in _PSF_MODELS:
            raise GalgenInputError(f"psf.model: expected one of {_PSF_MODELS}, got {self.model!r}")
        if not self.fwhm > 0:
            raise GalgenInputError(f"psf.fwhm: must be > 0 arcsec, got {self.fwhm!r}")
        if self.fwhm_scatter < 0 or self.g_rms < 0:
            raise GalgenInputError("psf.fwhm_scatter and psf.g_rms must be >= 0")
        object.__setattr__(self, "fwhm_range", tuple(float(x) for x in self.fwhm_range))
        if self.model == "moffat" and not (self.beta and self.beta > 1.1):
            raise GalgenInputError(f"psf.beta: a Moffat PSF needs beta > 1.1, got {self.beta!r}")
        if self.model == "airy" and not (self.lam_nm and self.diam_m):
            raise GalgenInputError("psf: an Airy PSF needs lam_nm and diam_m")

    def draw(self, rng: np.random.Generator) -> dict:
        """Draw one galaxy's PSF parameters.

        Parameters
        ----------
        rng : numpy.random.Generator

        Returns
        -------
        dict
            ``psf_fwhm`` (arcsec), ``psf_g1``, ``psf_g2``.
        """
        fwhm = self.fwhm * math.exp(self.fwhm_scatter * rng.standard_normal())
        fwhm = float(np.clip(fwhm, *self.fwhm_range))
        g1, g2 = (self.g_rms * rng.standard_normal(2)).tolist()
        return {"psf_fwhm": fwhm, "psf_g1": g1, "psf_g2": g2}

    def build(self, psf_fwhm: float, psf_g1: float = 0.0, psf_g2: float = 0.0):
        """Return the GalSim PSF for drawn parameters.

        Parameters
        ----------
        psf_fwhm : float
            FWHM in arcsec (ignored for ``airy``).
        psf_g1, psf_g2 : float
            Reduced-shear ellipticity of the PSF.

        Returns
        -------
        galsim.GSObject
            A unit-flux PSF profile.
        """
        import galsim

        if self.model == "moffat":
            psf = galsim.Moffat(beta=self.beta, fwhm=psf_fwhm)
        elif self.model == "kolmogorov":
            psf = galsim.Kolmogorov(fwhm=psf_fwhm)
        elif self.model == "gaussian":
            psf = galsim.Gaussian(fwhm=psf_fwhm)
        else:
            psf = galsim.Airy(lam=self.lam_nm, diam=self.diam_m, obscuration=self.obscuration,
                              scale_unit=galsim.arcsec)
        if psf_g1 or psf_g2:
            psf = psf.shear(g1=psf_g1, g2=psf_g2)
        return psf


@dataclass(frozen=True)
class Survey:
    """An imaging survey: detector, photometry, PSF distribution and noise.

    Parameters
    ----------
    name : str
        Preset name or file stem.
    description : str
        One line about the survey and exposure.
    band : str
        Filter.
    pixel_scale : float
        Detector pixel scale in arcsec/pixel.
    zero_point : float
        AB magnitude of a source yielding 1 ADU in total over the exposure.
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise in electrons rms per pixel.
    sky_mag : float
        Sky surface brightness in AB mag/arcsec^2.
    psf : PSFSpec
        Per-galaxy PSF distribution.
    catalog : str
        Default population catalog (a file name in ``galgen.catalogs`` or a path).
    sources : tuple of str
        Literature sources of the numbers.

    Examples
    --------
    >>> sdss = load_survey("sdss")
    >>> round(float(sdss.flux(18.0)))  # ADU of an r = 18 galaxy
    12589
    >>> round(sdss.sky_level, 1)  # ADU per pixel
    136.6
    """

    name: str
    description: str
    band: str
    pixel_scale: float
    zero_point: float
    gain: float
    read_noise: float
    sky_mag: float
    psf: PSFSpec
    catalog: str = "sdss_population.ecsv"
    sources: tuple = field(default=())

    def __post_init__(self):
        for attr in ("pixel_scale", "gain"):
            if not getattr(self, attr) > 0:
                raise GalgenInputError(f"survey {self.name!r}: {attr} must be > 0, got {getattr(self, attr)!r}")
        if self.read_noise < 0:
            raise GalgenInputError(f"survey {self.name!r}: read_noise must be >= 0")
        object.__setattr__(self, "sources", tuple(self.sources))

    def flux(self, mag):
        """Total counts (ADU) of a source of AB magnitude ``mag``.

        Parameters
        ----------
        mag : float or array_like
            AB magnitude in the survey band.

        Returns
        -------
        float or numpy.ndarray
            ``10**(-0.4 * (mag - zero_point))``.
        """
        return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - self.zero_point))

    @property
    def sky_level(self) -> float:
        """Sky level in ADU per detector pixel."""
        return float(self.flux(self.sky_mag) * self.pixel_scale**2)

    @property
    def sky_variance(self) -> float:
        """Noise variance of an empty pixel in ADU^2 (sky Poisson + read noise)."""
        return self.sky_level / self.gain + (self.read_noise / self.gain) ** 2

    def to_dict(self) -> dict:
        """Return the survey as a plain dict (the YAML form)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["psf"] = {f.name: getattr(self.psf, f.name) for f in fields(self.psf)}
        d["psf"]["fwhm_range"] = list(d["psf"]["fwhm_range"])
        d["sources"] = list(self.sources)
        return d


def _presets() -> dict:
    text = resources.files("galgen.simulate").joinpath("surveys.yaml").read_text()
    return yaml.safe_load(text)


def available_surveys() -> list[str]:
    """Names of the bundled survey presets.

    Returns
    -------
    list of str
    """
    return sorted(_presets())


def _from_dict(name: str, d: dict, origin: str) -> Survey:
    if not isinstance(d, dict):
        raise GalgenInputError(f"{origin}: a survey must be a mapping, got {type(d).__name__}")
    allowed = {f.name for f in fields(Survey)}
    unknown = set(d) - allowed
    if unknown:
        raise GalgenInputError(f"{origin}: unknown survey key(s) {sorted(unknown)}; allowed {sorted(allowed)}")
    required = {"description", "band", "pixel_scale", "zero_point", "gain", "read_noise", "sky_mag", "psf"}
    missing = required - set(d)
    if missing:
        raise GalgenInputError(f"{origin}: missing survey key(s) {sorted(missing)}")
    psf = d["psf"]
    if not isinstance(psf, dict):
        raise GalgenInputError(f"{origin}: 'psf' must be a mapping")
    psf_allowed = {f.name for f in fields(PSFSpec)}
    unknown = set(psf) - psf_allowed
    if unknown:
        raise GalgenInputError(f"{origin}: unknown psf key(s) {sorted(unknown)}; allowed {sorted(psf_allowed)}")
    try:
        return Survey(name=d.get("name", name), **{k: v for k, v in d.items() if k not in ("psf", "name")},
                      psf=PSFSpec(**psf))
    except GalgenInputError as exc:
        raise GalgenInputError(f"{origin}: {exc}") from None
    except TypeError as exc:
        raise GalgenInputError(f"{origin}: {exc}") from None


def load_survey(survey) -> Survey:
    """Return a survey preset by name, or load one from a YAML file.

    Parameters
    ----------
    survey : str, os.PathLike or Survey
        A preset name (see :func:`available_surveys`), a path to a YAML file holding one
        survey mapping with the keys of ``surveys.yaml``, or a :class:`Survey`.

    Returns
    -------
    Survey

    Raises
    ------
    GalgenInputError
        If the name is unknown, the file is missing or its content is invalid.
    """
    if isinstance(survey, Survey):
        return survey
    presets = _presets()
    key = str(survey)
    if key in presets:
        return _from_dict(key, presets[key], f"survey preset {key!r}")
    path = Path(key)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise GalgenInputError(f"--survey: no such file {path}")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise GalgenInputError(f"{path}: not valid YAML ({exc})") from None
        return _from_dict(path.stem, d, str(path))
    raise GalgenInputError(
        f"--survey: unknown survey {key!r}; presets are {sorted(presets)}, or give a YAML file"
    )


def survey_observation(survey, *, psf_fwhm: float | None = None, psf_size: int = 33, stamp: int = 64,
                       oversampling: int = 1, dtype=None, device=None):
    """A survey preset's observation with its median PSF and CCD noise.

    Parameters
    ----------
    survey : str or Survey
        Preset name, YAML file or :class:`Survey`.
    psf_fwhm : float, optional
        PSF FWHM in arcsec (default: the survey's median).
    psf_size : int, optional
        PSF grid size in intrinsic pixels.
    stamp : int, optional
        Detector stamp size.
    oversampling : int, optional
        Intrinsic pixels per detector pixel.
    dtype : torch.dtype, optional
        Of the PSF (default float32).
    device : optional
        Of the PSF.

    Returns
    -------
    galgen.physics.Observation
        With the PSF drawn by GalSim (no pixel response, at the intrinsic scale) and
        :class:`~galgen.physics.CCDNoise` (sky, gain, read noise).

    Examples
    --------
    >>> obs = survey_observation("sdss", stamp=32)  # doctest: +SKIP
    """
    import torch

    from ..physics import CCDNoise, Observation, psf_from_galsim

    sv = load_survey(survey)
    profile = sv.psf.build(psf_fwhm or sv.psf.fwhm)
    psf = psf_from_galsim(profile, psf_size, sv.pixel_scale / oversampling, dtype=dtype or torch.float32,
                          device=device)
    noise = CCDNoise(sv.sky_level, sv.gain, sv.read_noise)
    return Observation(psf, pixel_scale=sv.pixel_scale, oversampling=oversampling, stamp=stamp, noise=noise)
