"""Installation script for galgen.

torch is required but deliberately loose (``torch>=2.2``): on a GPU cluster install
the CUDA build that matches your drivers first, then ``pip install -e .``. On a
CPU-only machine, ``make install`` installs the CPU build ``torch==2.13.0`` first.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "galgen" / "_version.py").read_text(), re.M
).group(1)

setup(
    name="galgen",
    version=VERSION,
    description=(
        "Deep generative models of galaxy morphology with a differentiable "
        "physical forward model (PSF, pixels, noise)."
    ),
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    # The population catalogs live at the top level (catalogs/) with their generating
    # script and provenance; they are installed as the data package galgen.catalogs.
    packages=find_packages(include=["galgen", "galgen.*"]) + ["galgen.catalogs"],
    package_dir={"galgen.catalogs": "catalogs"},
    package_data={
        "galgen.catalogs": ["*.ecsv", "README.md"],
        "galgen.simulate": ["surveys.yaml"],
        "galgen": ["py.typed"],
        "galgen.pretrained": ["*.pt", "*.json"],
    },
    install_requires=[
        "torch>=2.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "astropy>=5.3",
        "galsim>=2.5",
        "h5py>=3.8",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "zuko>=1.1",
        "matplotlib>=3.7",
        # the classifier two-sample test of galgen evaluate (gradient boosting on the statistics)
        "scikit-learn>=1.3",
    ],
    extras_require={
        # statmorph: the reference implementation the morphology statistics are validated against
        "test": ["pytest>=7", "hypothesis>=6", "arviz>=0.17", "statmorph>=0.5"],
        "docs": ["sphinx>=7", "numpydoc>=1.6", "myst-parser>=2"],
        # the peer of benchmarks/bench_fit.py: the PyTorch galaxy fitter many users pick today
        "bench": ["astrophot>=0.18"],
    },
    entry_points={"console_scripts": ["galgen = galgen.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Astronomy",
        "Intended Audience :: Science/Research",
    ],
)
