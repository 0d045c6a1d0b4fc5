"""``make demo``'s walkthrough, run as a subprocess against a real vLLM server and controller.

``examples/vllm_walkthrough.py`` starts ``lmcache_controller`` (with its embedded
``nats-server``) and vLLM's OpenAI-compatible server with the connector by its registered name
(``enable_controller: true``). Here it runs once for the module on the tiny Llama with random,
well-scaled weights (``--model``), so identical outputs mean the loaded KV was right:

1. complete a 1,100-token prompt (stored), 2. /lookup credits the instance with 1,024 tokens in
LocalCPUBackend, 3. complete it again (loaded from the cache), 4. /clear LocalCPUBackend, /lookup
credits LocalDiskBackend, 5. /clear LocalDiskBackend, /lookup is empty, 6. complete it again
(recomputed). The test reads the answers from the file ``--result-json`` names.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmcache_connector_vllm.demo import stop_process

WALKTHROUGH = Path(__file__).resolve().parents[3] / "examples" / "vllm_walkthrough.py"
INSTANCE = "vllm-serve-test"
HIT = 1024
#: the whole walkthrough, vLLM start included, on a loaded 2-core machine (with the stop
#: below it stays under the suite's 600 s per-test timeout)
RUN_TIMEOUT = 420.0


@dataclass
class Walkthrough:
    """What the walkthrough printed, its exit status, and the answers it checked."""

    output: str
    returncode: int
    answers: dict[str, Any]


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Walkthrough]:
    work = tmp_path_factory.mktemp("walkthrough")
    result_file, output_file = work / "answers.json", work / "output.txt"
    with output_file.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(WALKTHROUGH), "--model", str(tiny_model), "--instance-id", INSTANCE,
             "--start-timeout", "300", "--result-json", str(result_file)],
            stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # SIGTERM lets the walkthrough stop vLLM and the controller itself
            stop_process(proc, signal.SIGTERM, timeout=150)
    output = output_file.read_text(errors="replace")
    assert result_file.exists(), f"the walkthrough wrote no answers ({proc.returncode}):\n{output[-6000:]}"
    yield Walkthrough(output, proc.returncode, json.loads(result_file.read_text()))


def test_walkthrough_exits_zero_and_reports_every_answer_as_expected(walkthrough: Walkthrough) -> None:
    assert walkthrough.returncode == 0, walkthrough.output[-6000:]
    assert walkthrough.answers["ok"] is True
    assert walkthrough.output.rstrip().endswith("finished: every answer as expected")


def test_controller_lookup_credits_the_vllm_instance_with_the_stored_prompt(
    walkthrough: Walkthrough,
) -> None:
    assert walkthrough.answers["completions"][0]["cached_tokens"] == 0
    assert walkthrough.answers["lookups"][0] == {INSTANCE: ["LocalCPUBackend", HIT]}


def test_second_completion_is_served_from_the_cache_with_identical_tokens(
    walkthrough: Walkthrough,
) -> None:
    first, second = walkthrough.answers["completions"][:2]
    assert second["cached_tokens"] == HIT
    assert second["token_ids"] == first["token_ids"]


def test_clearing_the_cpu_tier_leaves_the_prompt_credited_to_disk(walkthrough: Walkthrough) -> None:
    assert walkthrough.answers["clears"][0] == HIT
    assert walkthrough.answers["lookups"][1] == {INSTANCE: ["LocalDiskBackend", HIT]}


def test_clearing_the_disk_tier_too_empties_the_lookup(walkthrough: Walkthrough) -> None:
    assert walkthrough.answers["clears"][1] == HIT
    assert walkthrough.answers["lookups"][2] == {}


def test_after_clear_the_prompt_is_recomputed_with_identical_tokens(
    walkthrough: Walkthrough,
) -> None:
    first, after_clear = walkthrough.answers["completions"][0], walkthrough.answers["completions"][2]
    assert after_clear["cached_tokens"] == 0
    assert after_clear["token_ids"] == first["token_ids"]
