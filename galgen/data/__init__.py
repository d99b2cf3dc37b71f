"""Data I/O: the atomic HDF5 writer, the cutout and fit formats, the observation loader, merging, FITS ingest."""

from .atomic import atomic_output
from .cutouts import (
    DATASETS,
    REQUIRED_DATASETS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    CutoutFile,
    CutoutWriter,
    read_cutouts,
)
from .fitfile import FIT_DATASETS, FIT_SCHEMA, FIT_SCHEMA_VERSION, FitFile, FitWriter
from .merge import merge_cutouts, merge_fits, merge_shards
from .store import HDF5File, HDF5Writer, output_is_current

__all__ = [
    "atomic_output",
    "HDF5Writer",
    "HDF5File",
    "DATASETS",
    "REQUIRED_DATASETS",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "CutoutFile",
    "CutoutWriter",
    "FIT_SCHEMA",
    "FIT_SCHEMA_VERSION",
    "FIT_DATASETS",
    "FitWriter",
    "FitFile",
    "CutoutDataset",
    "ObservationLoader",
    "observation_from_cutouts",
    "merge_shards",
    "merge_cutouts",
    "merge_fits",
    "output_is_current",
    "read_cutouts",
]


def __getattr__(name):
    # CutoutDataset and the observation loader need torch; import it lazily so that the simulator and the I/O
    # functions work (and fork safely) without loading torch.
    if name == "CutoutDataset":
        from .dataset import CutoutDataset

        return CutoutDataset
    if name in ("ObservationLoader", "observation_from_cutouts"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
