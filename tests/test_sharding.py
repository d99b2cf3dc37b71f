import pytest
from hypothesis import given
from hypothesis import strategies as st

from galgen.errors import GalgenInputError
from galgen.sharding import Shard, format_shard_path, parse_shard


def test_parse_valid():
    assert parse_shard("2/4") == Shard(2, 4)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1)
    assert parse_shard(None) == Shard(0, 1)


@pytest.mark.parametrize("spec", ["3/2", "2/2", "-1/2", "1/0", "a/b", "1", "1/2/3", ""])
def test_parse_invalid_names_argument(spec):
    with pytest.raises(GalgenInputError, match="--shard"):
        parse_shard(spec)


@given(n=st.integers(0, 10_000), count=st.integers(1, 64))
def test_shards_partition_range(n, count):
    seen = []
    for k in range(count):
        start, stop = Shard(k, count).bounds(n)
        assert 0 <= start <= stop <= n
        seen.extend(range(start, stop))
    assert seen == list(range(n))


def test_slurm_shard(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert parse_shard("slurm") == Shard(4, 8)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(GalgenInputError, match="SLURM_ARRAY_TASK_ID"):
        parse_shard("slurm")


def test_format_shard_path():
    assert format_shard_path("out/s_{k}of{N}.h5", Shard(3, 10)) == "out/s_3of10.h5"
    assert format_shard_path("plain.h5", Shard(3, 10)) == "plain.h5"
