"""The auto-encoder trained briefly through the physics layer on simulated SDSS cutouts."""

import numpy as np
import torch

from galgen.data import CutoutDataset
from galgen.models import AutoEncoder
from galgen.physics import Observation


def test_training_through_the_physics_layer_reduces_the_loss(sdss_small):
    torch.manual_seed(0)
    ds = CutoutDataset(sdss_small)
    loader = torch.utils.data.DataLoader(ds, batch_size=20, shuffle=True)
    scale = ds.attrs["pixel_scale"]
    sky_sigma = float(np.sqrt(ds.attrs["sky_level"] / ds.attrs["gain"]))
    peak = float(np.median([ds[i]["observed"].max() for i in range(len(ds))]))
    ae = AutoEncoder(48, latent_dim=8, width=8, input_scale=sky_sigma, flux_scale=peak / 4)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    epoch_loss = []
    for epoch in range(25):
        total = 0.0
        for batch in loader:
            obs = Observation.from_batch(batch, pixel_scale=scale)
            opt.zero_grad()
            loss = ae.loss(batch["observed"], obs)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch["observed"])
        epoch_loss.append(total / len(ds))
    assert epoch_loss[-1] < 0.7 * epoch_loss[0], epoch_loss
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=20)))
    obs = Observation.from_batch(batch, pixel_scale=scale)
    score = ae.anomaly_score(batch["observed"], obs)
    # an empty model explains the data worse than the trained reconstruction
    empty = obs.noise.chi2(batch["observed"], torch.zeros_like(batch["observed"])) / (48 * 48)
    assert torch.median(score) < torch.median(empty)
    assert ae.denoise(batch["observed"], obs).shape == (20, 48, 48)
