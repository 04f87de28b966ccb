"""``--job-store`` URLs: what each names, and the password kept out of whatever shows one."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang.multimodal_gen.errors import UserError
from sglang.multimodal_gen.runtime.entrypoints.store_url import parse_job_store_url, redact_url


@pytest.mark.parametrize("url, path", [
    ("sqlite:///jobs.sqlite3", Path("jobs.sqlite3")),  # relative, as SQLAlchemy writes it
    ("sqlite:///data/jobs.db", Path("data/jobs.db")),
    ("sqlite:////srv/videos/jobs.db", Path("/srv/videos/jobs.db")),  # absolute: four slashes
])
def test_sqlite_urls_name_a_file(url, path):
    parsed = parse_job_store_url(url)
    assert (parsed.kind, parsed.path, parsed.shared) == ("sqlite", path, False)


@pytest.mark.parametrize("url", ["postgresql://u:p@db:5432/jobs", "postgres://db/jobs",
                                 "postgresql:///jobs?host=/run/postgresql"])
def test_postgres_urls_are_shared(url):
    assert parse_job_store_url(url).shared


@pytest.mark.parametrize("url, message", [
    ("sqlite://", "names no SQLite file"),
    ("sqlite:jobs.db", "names no SQLite file"),
    ("mysql://root:hunter2@db/jobs", "'mysql://root:***@db/jobs' is not a job store URL"),
    ("/srv/jobs.sqlite3", "is not a job store URL; use sqlite:///path"),
    ("postgresql://u:hunter2@/jobs", "names no host"),
])
def test_a_url_that_names_no_store_is_one_line(url, message):
    with pytest.raises(UserError) as raised:
        parse_job_store_url(url)
    assert message in str(raised.value) and "hunter2" not in str(raised.value)


@pytest.mark.parametrize("url, shown", [
    ("postgresql://sglang:s3cret@db:5432/jobs", "postgresql://sglang:***@db:5432/jobs"),
    ("postgresql://sglang:p%40ss@db/jobs?sslmode=require", "postgresql://sglang:***@db/jobs?sslmode=require"),
    ("postgresql://db/jobs?user=u&password=s3cret", "postgresql://db/jobs?user=u&password=***"),
    ("postgresql://sglang@db/jobs", "postgresql://sglang@db/jobs"),
])
def test_the_password_is_redacted(url, shown):
    assert redact_url(url) == shown
    assert str(parse_job_store_url(url)) == shown
