"""The CSV training log: the writer's rows read back by the one reader, resumed up to a step."""

import pytest

from galgen.train.logs import TRAIN_LOG, CSVLog, read_log


def test_log_round_trip_union_of_columns_and_resume(tmp_path):
    log = CSVLog(tmp_path / TRAIN_LOG)
    log.add({"step": 1, "loss": "0.5"})
    log.add({"step": 2, "loss": "0.25", "lr": "0.001"})
    log.add({"step": 3, "loss": "0.125"})
    log.flush()
    assert (tmp_path / TRAIN_LOG).read_text().splitlines()[0] == "step,loss,lr"
    assert read_log(tmp_path / TRAIN_LOG) == [{"step": "1", "loss": "0.5", "lr": ""},
                                             {"step": "2", "loss": "0.25", "lr": "0.001"},
                                             {"step": "3", "loss": "0.125", "lr": ""}]
    resumed = CSVLog(tmp_path / TRAIN_LOG)
    resumed.load(2)
    assert [r["step"] for r in resumed.rows] == ["1", "2"]


def test_missing_log(tmp_path):
    assert read_log(tmp_path / "nope.csv", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_log(tmp_path / "nope.csv")
    log = CSVLog(tmp_path / "nope.csv")
    log.load(5)
    assert log.rows == []
