import collections

import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.models import Decoder
from galgen.train import load_checkpoint, save_checkpoint

CONFIG = {"kind": "decoder", "size": 32, "latent_dim": 8, "width": 8}


class Payload:
    """An arbitrary class: must never be unpickled from a checkpoint."""


def _model():
    torch.manual_seed(0)
    return Decoder(32, in_features=8, width=8)


def test_round_trip_restores_identical_weights_and_state(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path / "ck.pt", model_state=model.state_dict(), config=CONFIG, step=7,
                           optimizer_state=opt.state_dict(), provenance={"data": "sdss_train.h5", "seed": 1},
                           metrics={"loss": 0.5}, rng_state=rng)
    ck = load_checkpoint(path, expect_config=CONFIG)
    other = Decoder(32, in_features=8, width=8)
    other.load_state_dict(ck["model"])
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.Adam(other.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optimizer"])
    assert ck["step"] == 7 and ck["provenance"]["data"] == "sdss_train.h5" and ck["metrics"]["loss"] == 0.5
    assert torch.equal(ck["rng_state"], rng)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "galgen-checkpoint-1", "model": collections.OrderedDict(), "x": Payload()}, path)
    with pytest.raises(GalgenInputError, match="never unpickles"):
        load_checkpoint(path)


def test_other_architecture_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", model_state=_model().state_dict(), config=CONFIG)
    with pytest.raises(GalgenInputError, match=r"another architecture/config \(latent_dim: checkpoint 8 vs model 16"):
        load_checkpoint(path, expect_config={**CONFIG, "latent_dim": 16})
    load_checkpoint(path, expect_config={**CONFIG, "lr": 1.0}, config_keys=("kind", "size", "latent_dim"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(GalgenInputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(GalgenInputError, match="not a galgen checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(GalgenInputError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")


def test_write_is_atomic(tmp_path):
    with pytest.raises(GalgenInputError, match="JSON"):
        save_checkpoint(tmp_path / "ck.pt", model_state={}, config={"bad": object()})
    assert list(tmp_path.iterdir()) == []
