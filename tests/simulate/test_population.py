import numpy as np
import pytest
from astropy.table import Table

from galgen.errors import GalgenInputError
from galgen.simulate import (
    CATALOG_COLUMNS,
    PopulationModel,
    composite_hlr,
    generate_population,
    load_catalog,
    select_rows,
)


def test_generation_is_deterministic():
    a = generate_population(500, seed=3)
    b = generate_population(500, seed=3)
    c = generate_population(500, seed=4)
    for col in CATALOG_COLUMNS:
        assert np.array_equal(a[col], b[col])
    assert not np.array_equal(a["mag"], c["mag"])


def test_distributions_follow_the_model():
    model = PopulationModel(mag_range=(14.0, 17.77))
    t = generate_population(20000, seed=1, model=model)
    mag = np.asarray(t["mag"])
    assert mag.min() >= 14.0 and mag.max() <= 17.77
    # number counts dN/dm ~ 10**(0.47 m): counts in the last half-magnitude bin vs a bin
    # one magnitude brighter differ by 10**0.47
    n1 = np.sum((mag > 16.7) & (mag < 17.2))
    n0 = np.sum((mag > 15.7) & (mag < 16.2))
    assert n1 / n0 == pytest.approx(10**0.47, rel=0.1)
    # sizes: median composite hlr of disk galaxies at m~17 near the model's 1.8 arcsec
    sel = (np.abs(mag - 17.0) < 0.2) & (np.asarray(t["bt"]) < 0.2)
    assert np.median(t["hlr"][sel]) == pytest.approx(1.8, rel=0.15)
    # ellipticities in the Miller et al. (2013) range, B/T bimodal
    assert 0 <= t["g_disk"].min() and t["g_disk"].max() <= 0.81
    bt = np.asarray(t["bt"])
    assert np.mean(bt < 0.2) > 0.2 and np.mean(bt > 0.7) > 0.1
    # knots only in disk-dominated galaxies
    assert np.all(np.asarray(t["knot_frac"])[bt > 0.5] == 0)
    assert "references" in t.meta and any("Miller" in r for r in t.meta["references"])


@pytest.mark.parametrize("bt, hd, hb, nb", [(0.0, 2.0, 1.0, 4.0), (1.0, 2.0, 0.7, 4.0), (0.4, 2.0, 0.8, 4.0),
                                            (0.7, 1.5, 0.5, 2.5)])
def test_composite_hlr_matches_galsim(bt, hd, hb, nb):
    import galsim

    parts = []
    if bt > 0:
        parts.append(galsim.Sersic(nb, half_light_radius=hb, trunc=6 * hb, flux_untruncated=False, flux=bt))
    if bt < 1:
        parts.append(galsim.Sersic(1.0, half_light_radius=hd, trunc=3 * hd, flux_untruncated=False, flux=1 - bt))
    # radius enclosing half the light of a fine GalSim rendering (a 16 arcsec box holds it all)
    scale, size = 0.01, 1600
    img = galsim.Add(parts).drawImage(nx=size, ny=size, scale=scale, method="no_pixel").array.ravel()
    y, x = (np.indices((size, size)) - (size / 2 - 0.5)) * scale
    r = np.hypot(x, y).ravel()
    order = np.argsort(r)
    cum = np.cumsum(img[order]) / img.sum()
    ref = r[order][np.searchsorted(cum, 0.5)]
    assert float(composite_hlr(bt, hd, hb, nb)) == pytest.approx(ref, rel=3e-3)


def test_bundled_catalogs_are_valid_and_reproducible():
    import importlib.util
    from pathlib import Path

    for name in ("sdss_population.ecsv", "deep_population.ecsv"):
        t = load_catalog(name)
        assert len(t) >= 20000
        assert t["hlr"].unit == "arcsec"
    script = Path(__file__).resolve().parents[2] / "catalogs" / "make_populations.py"
    spec = importlib.util.spec_from_file_location("make_populations", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0  # the script regenerates the bundled files exactly


def test_load_catalog_errors(tmp_path):
    with pytest.raises(GalgenInputError, match="no such file"):
        load_catalog(tmp_path / "nope.ecsv")
    t = generate_population(10, seed=0)
    t.remove_column("bt")
    path = tmp_path / "cat.ecsv"
    t.write(path)
    with pytest.raises(GalgenInputError, match=r"missing column\(s\) \['bt'\]"):
        load_catalog(path)
    t = generate_population(10, seed=0)
    t["g_disk"][0] = 1.5
    with pytest.raises(GalgenInputError, match="g_disk"):
        load_catalog(t)
    bad = tmp_path / "bad.ecsv"
    bad.write_text("this is not a table\x00\x01")
    with pytest.raises(GalgenInputError, match=str(bad)):
        load_catalog(bad)


def test_select_rows():
    a = select_rows(100, 50, seed=1)
    assert len(set(a)) == 50  # without replacement when the catalog is large enough
    assert np.array_equal(a, select_rows(100, 50, seed=1))
    b = select_rows(10, 50, seed=1)
    assert len(b) == 50 and b.max() < 10
    assert isinstance(Table, type)
