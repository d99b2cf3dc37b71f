"""Inference with trained models: batched MAP fits, HMC posteriors, diagnostics, ``galgen fit``.

See :doc:`/inference`. The parametric Sersic baseline, derived quantities with credible
intervals and calibration are still to come.
"""

from .diagnostics import ess_bulk, ess_tail, split_rhat, summarize_chains
from .fit import FitWriter, fit_file, posterior_log_prob
from .hmc import HMCResult, hmc_sample
from .map import STATUS, MAPResult, fit_map, latent_log_prior

__all__ = ["fit_map", "MAPResult", "STATUS", "latent_log_prior", "hmc_sample", "HMCResult", "split_rhat",
           "ess_bulk", "ess_tail", "summarize_chains", "fit_file", "FitWriter", "posterior_log_prob"]
