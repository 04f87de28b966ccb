"""A small bounded run of benchmark/server_load.py: clients that outnumber the queue bound create,
poll, download and delete over loopback, and nothing is lost."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmark"))

import server_load  # noqa: E402


def test_clients_beyond_the_queue_bound_lose_nothing(tmp_path):
    result = server_load.run_load(clients=5, videos=2, queue_bound=1, data_dir=str(tmp_path / "data"))
    assert result.lost == []
    assert result.created == result.completed == result.downloaded == result.deleted == 10
    assert result.rejected_429 > 0  # the bound was hit, and waiting out Retry-After got every video made
    assert result.videos_listed_after == 0 and result.mp4_files_after == 0
    assert 0 < result.rss_before_mib and 0 < result.rss_after_mib
