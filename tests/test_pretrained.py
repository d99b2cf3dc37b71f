"""The pretrained models shipped in the package load safely and draw galaxies."""

import pytest
import torch

import galgen
from galgen.errors import GalgenInputError
from galgen.pretrained import model_card


@pytest.mark.parametrize("name, kind", [("sdss-vae", "vae"), ("sdss-gan", "gan")])
def test_pretrained_model_loads_and_samples(name, kind):
    assert name in galgen.available_pretrained()
    model = galgen.load_pretrained(name)
    assert model.kind == kind and model.config["stamp"] == 64
    assert model.provenance["survey"] == "sdss" and model.provenance["n_train"] >= 45000
    card = model_card(name)
    assert card["kind"] == kind and "galgen simulate" in card["training_data_command"]
    assert card["steps"] == model.run_config["train"]["steps"] or card["steps"] > 0
    a = model.sample(3, generator=torch.Generator().manual_seed(0))
    b = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 64, 64) and bool((a >= 0).all()) and torch.equal(a, b)
    if kind == "vae":
        assert bool(model.latent_flow.fitted)


def test_unknown_pretrained_name():
    with pytest.raises(GalgenInputError, match="not installed"):
        galgen.load_pretrained("hst-diffusion")
