"""How the suite splits over pytest-xdist workers (test/conftest.py): the tests that start
torch.distributed processes share one scope wherever they live, and no other file joins it."""

from __future__ import annotations

import ast
import re

from conftest import ALSO_DISTRIBUTED, REPO, TEST_DIR, xdist_scope


def test_scopes_by_directory_and_file():
    assert xdist_scope("test/distributed/test_cfg_parallel.py::test_x[none]") == "distributed"
    assert xdist_scope("test/server/test_jobs.py::TestA::test_y") == "server"
    assert xdist_scope("test/pipeline/test_hunyuan.py::test_z") == "test/pipeline/test_hunyuan.py"
    assert xdist_scope(ALSO_DISTRIBUTED[0]) == "distributed"


def test_every_test_that_starts_several_processes_is_in_the_distributed_scope():
    """Outside test/distributed/, a test asking for more than one process is listed in
    ALSO_DISTRIBUTED (and every listed test exists, so a rename cannot drop it silently)."""
    starting = set()
    for path in TEST_DIR.rglob("test_*.py"):
        if path.parent.name == "distributed":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and re.search(r"num_gpus=[2-9]", ast.unparse(node)):
                starting.add(f"{path.relative_to(REPO).as_posix()}::{node.name}")
    assert starting == set(ALSO_DISTRIBUTED)
