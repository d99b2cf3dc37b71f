"""The command-line interface: stages, help, errors, the demo pipeline."""

import subprocess
import sys

import numpy as np
import pytest

from galgen.cli import build_parser, main
from galgen.data import CutoutFile, read_cutouts


@pytest.mark.parametrize("stage", ["simulate", "merge", "ingest", "run", "summary", "preview"])
def test_every_stage_has_help_and_out(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text or stage == "summary"


def test_simulate_shards_and_merge_via_cli(tmp_path, capsys):
    for k in range(2):
        assert main(["simulate", "--n", "10", "--stamp", "24", "--seed", "4", "--shard", f"{k}/2",
                     "--out", str(tmp_path / "part_{k}of{N}.h5")]) == 0
    assert (tmp_path / "part_0of2.h5").exists() and (tmp_path / "part_1of2.h5").exists()
    assert main(["merge", str(tmp_path / "part_1of2.h5"), str(tmp_path / "part_0of2.h5"),
                 "--out", str(tmp_path / "all.h5")]) == 0
    assert main(["simulate", "--n", "10", "--stamp", "24", "--seed", "4", "--out", str(tmp_path / "one.h5")]) == 0
    a, _, _ = read_cutouts(tmp_path / "all.h5")
    b, _, _ = read_cutouts(tmp_path / "one.h5")
    for key in a:
        assert np.array_equal(a[key], b[key])


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--n", "4", "--shard", "3/2"], "--shard"),
    (["simulate", "--n", "4", "--survey", "nope"], "unknown survey 'nope'"),
    (["merge", "missing.h5"], "missing.h5: no such file"),
    (["summary", "missing.h5"], "missing.h5: no such file"),
])
def test_bad_input_exits_2_with_named_problem(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    if argv[0] != "summary":
        argv = argv + ["--out", str(tmp_path / "o.h5")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o.h5").exists()


def test_argparse_rejects_non_positive_n(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["simulate", "--n", "0", "--out", "x.h5"])
    assert exc.value.code == 2
    assert "--n" in capsys.readouterr().err


def test_run_pipeline_and_summary(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("name: tiny\nsimulate:\n  n: 12\n  stamp: 32\n  seed: 2\nreport:\n  n_grid: 4\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "chi2_per_pixel" in out
    png = tmp_path / "run" / "report" / "cutouts.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "report" / "summary.json").exists()
    with CutoutFile(tmp_path / "run" / "cutouts.h5") as f:
        assert len(f) == 12
    assert main(["summary", str(tmp_path / "run" / "cutouts.h5")]) == 0
    assert "n_galaxies" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("simulate:\n  n: many\n", "simulate.n: expected an integer"),
    ("simulate:\n  colour: red\n", "unknown key"),
    ("simulate: [1, 2\n", "not valid YAML"),
    ("simulate:\n  n: 0\n", "simulate.n must be >= 1"),
])
def test_bad_pipeline_config(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(cfg) in err


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "galgen", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("galgen ")
