"""Fixtures of the core's tests (shared ones live in lmcache_core.testing)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

OUTSIDE_PLUGIN = Path(__file__).parent / "outside_plugin" / "lmcache_test_thirdloc.py"


@pytest.fixture
def outside_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Installs the test-only plugin as a real distribution with an ``lmcache`` entry point.

    Its dist-info and module go in a fresh directory put on ``sys.path`` (and ``PYTHONPATH``
    for subprocesses), which is what ``pip install`` amounts to for entry-point discovery.
    """
    site = tmp_path / "site"
    info = site / "lmcache_test_thirdloc-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lmcache-test-thirdloc\nVersion: 0.3\n"
    )
    (info / "entry_points.txt").write_text("[lmcache]\nthirdloc = lmcache_test_thirdloc\n")
    shutil.copy(OUTSIDE_PLUGIN, site / OUTSIDE_PLUGIN.name)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    yield site
    sys.modules.pop("lmcache_test_thirdloc", None)
