"""Shared fixtures: small simulated cutout files made once per test session."""

import pytest

from galgen.simulate import simulate


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sim")


@pytest.fixture(scope="session")
def sdss_small(sim_dir):
    """60 SDSS galaxies, 48x48 stamps, seed 7."""
    return simulate(sim_dir / "sdss_small.h5", survey="sdss", n=60, stamp=48, seed=7)


@pytest.fixture(scope="session")
def sdss_fit(sim_dir):
    """120 SDSS galaxies on 64x64 stamps, for flux, noise and size checks."""
    return simulate(sim_dir / "sdss_fit.h5", survey="sdss", n=120, stamp=64, seed=11)


@pytest.fixture(scope="session")
def sdss_tiny(sim_dir):
    """64 SDSS galaxies on 32x32 stamps with 15x15 PSFs: fast training tests."""
    return simulate(sim_dir / "sdss_tiny.h5", survey="sdss", n=64, stamp=32, seed=5, psf_size=15)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: small convolutions run much faster on one thread than on two contended ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def pipeline_script():
    """A loader of ``pipelines/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "pipelines"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
