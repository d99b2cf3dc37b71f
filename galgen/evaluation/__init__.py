"""Evaluation: morphology measurements, summaries of cutout files, quality of trained models."""

from .morphology import hsm_moments, observed_statistics
from .quality import evaluate_models, generated_observations, reconstruction_chi2, survey_noise
from .statistics import STATISTICS, morphology_statistics, power_spectrum
from .report import format_summary, summarize_cutouts

__all__ = ["hsm_moments", "observed_statistics", "summarize_cutouts", "format_summary", "evaluate_models", "generated_observations",
           "survey_noise",
           "morphology_statistics", "reconstruction_chi2",
           "STATISTICS", "power_spectrum"]
