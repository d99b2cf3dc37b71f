"""Evaluation: morphology measurements and summaries of cutout files."""

from .morphology import hsm_moments
from .report import format_summary, summarize_cutouts

__all__ = ["hsm_moments", "summarize_cutouts", "format_summary"]
