"""Inference with trained models: batched MAP fits (Levenberg-Marquardt, Adam), importance-sampled and
HMC/NUTS posteriors, diagnostics, ``galgen fit``.

See :doc:`/inference`.
"""

from .derived import DERIVED_NAMES, credible_intervals, derived_quantities
from .diagnostics import ess_bulk, ess_tail, split_rhat, summarize_chains
from .fit import (POSTERIOR_METHODS, FitWriter, PosteriorResult, draw_log_scale, fit_file, fit_summary,
                  marginal_log_prob, posterior_images, posterior_log_prob, sample_posterior, thin_draws)
from .hmc import HMCResult, hmc_sample
from .importance import importance_sample, laplace_approximation, psis
from .map import OPTIMIZERS, STATUS, MAPResult, fit_map, initial_log_scale, latent_log_prior, map_codes

__all__ = ["fit_map", "map_codes", "MAPResult", "STATUS", "latent_log_prior", "initial_log_scale", "sample_posterior",
           "thin_draws", "hmc_sample", "HMCResult", "split_rhat", "ess_bulk", "ess_tail", "summarize_chains",
           "fit_file", "FitWriter", "posterior_log_prob", "marginal_log_prob", "draw_log_scale", "posterior_images", "derived_quantities",
           "credible_intervals", "DERIVED_NAMES", "OPTIMIZERS", "POSTERIOR_METHODS", "PosteriorResult",
           "importance_sample", "laplace_approximation", "psis", "fit_summary"]
