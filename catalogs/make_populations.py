#!/usr/bin/env python
"""Generate the population catalogs bundled with galgen (``catalogs/*.ecsv``).

Usage::

    python catalogs/make_populations.py            # rewrites both catalogs
    python catalogs/make_populations.py --check    # regenerates in memory, compares

The distributions and their literature sources are those of
:class:`galgen.simulate.population.PopulationModel` (listed in each file's header).
The outputs are deterministic: the same seed gives the same rows.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from galgen.simulate.population import PopulationModel, generate_population

HERE = Path(__file__).resolve().parent

CATALOGS = {
    # SDSS main galaxy sample depth (r < 17.77, Strauss et al. 2002, AJ 124, 1810).
    "sdss_population.ecsv": dict(n=30000, seed=20260101, band="r",
                                 model=PopulationModel(mag_range=(14.0, 17.77))),
    # Faint population for LSST / HST-COSMOS-like presets (COSMOS I < 25, Leauthaud+07):
    # the same relations extrapolated to 20 < m < 25.
    "deep_population.ecsv": dict(n=30000, seed=20260102, band="r/F814W",
                                 model=PopulationModel(mag_range=(20.0, 25.0))),
}


def build(name):
    spec = CATALOGS[name]
    t = generate_population(spec["n"], spec["seed"], spec["model"], band=spec["band"])
    t.meta["script"] = "catalogs/make_populations.py"
    t.meta["name"] = name
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = p.parse_args(argv)
    from astropy.table import Table

    status = 0
    for name in CATALOGS:
        t = build(name)
        path = HERE / name
        if args.check:
            disk = Table.read(path)
            same = all(np.allclose(np.asarray(disk[c], float), np.asarray(t[c], float)) for c in t.colnames)
            print(f"{name}: {'identical' if same else 'DIFFERS'}")
            status |= not same
        else:
            t.write(path, format="ascii.ecsv", overwrite=True)
            print(f"wrote {path} ({len(t)} rows)")
    return status


if __name__ == "__main__":
    sys.exit(main())
