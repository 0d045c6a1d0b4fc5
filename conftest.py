"""How ``make test`` spreads the suite over pytest-xdist workers (``-n 2``).

A worker takes a whole unit of work at a time: every test file is one unit (its module
fixtures are set up once), except that all the files whose tests start real vLLM processes
(``test_vllm_*.py``) form a single unit, run one after another on one worker while the other
workers run the quick tests; two vLLM starts at once would slow each other down on a small
machine.
"""

from __future__ import annotations

from typing import Any

import pytest

VLLM_UNIT = "vllm"


def work_unit(nodeid: str) -> str:
    """The unit a test belongs to: its file, or ``VLLM_UNIT``."""
    path = nodeid.split("::", 1)[0]
    return VLLM_UNIT if path.rsplit("/", 1)[-1].startswith("test_vllm_") else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)
