"""GalSim simulation of galaxy cutouts: populations, survey presets, rendering."""

from .population import (
    CATALOG_COLUMNS,
    PopulationModel,
    composite_hlr,
    generate_population,
    load_catalog,
    select_rows,
)
from .morphology import (
    MORPHOLOGIES,
    MORPHOLOGY_COLUMNS,
    ModulatedDisk,
    MorphologyModel,
    draw_morphology,
    galaxy_components,
    has_morphology,
    morphology_label,
)
from .render import describe_galaxy, draw_integrated, galaxy_profile, render_galaxy
from .simulator import draw_truth, simulate
from .surveys import PSFSpec, Survey, available_surveys, load_survey, survey_observation

__all__ = [
    "CATALOG_COLUMNS",
    "PopulationModel",
    "composite_hlr",
    "generate_population",
    "load_catalog",
    "select_rows",
    "PSFSpec",
    "Survey",
    "available_surveys",
    "survey_observation",
    "load_survey",
    "describe_galaxy",
    "draw_integrated",
    "galaxy_profile",
    "render_galaxy",
    "draw_truth",
    "simulate",
    "MORPHOLOGIES",
    "MORPHOLOGY_COLUMNS",
    "ModulatedDisk",
    "MorphologyModel",
    "draw_morphology",
    "galaxy_components",
    "has_morphology",
    "morphology_label",
]
