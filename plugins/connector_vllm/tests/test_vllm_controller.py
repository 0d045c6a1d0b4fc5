"""``make demo``'s walkthrough, run as a subprocess against real vLLM servers and a controller.

``examples/vllm_walkthrough.py`` starts ``lmcache_controller`` (with its embedded
``nats-server``) and vLLM's OpenAI-compatible server with the connector. Here it runs on the
tiny Llama with Llama 3's vocabulary and random, well-scaled weights (``--model``), so identical
outputs mean the loaded KV was right:

* part 1, LMCache's documented walkthrough in each of its two ``example.yaml`` forms, the
  connector named by ``kv_connector`` + ``kv_connector_module_path`` only, the docs' 12-token
  prompt: /lookup credits 12 tokens at LocalCPUBackend, /clear answers 12, /lookup is ``{}``;
* part 2 (with the first form): a 1,100-token prompt completed, looked up (1,100 tokens at
  LocalCPUBackend), completed again (1,099 tokens loaded), cleared from CPU (disk still holds
  it), cleared from disk (nobody does), and recomputed with the same output.

The test reads the answers from the file ``--result-json`` names.
"""

from __future__ import annotations

import json
import re
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
DOCS_INSTANCE = "lmcache_default_instance"
N = 1100
#: the whole walkthrough, vLLM starts included, on a loaded 2-core machine (with the stop
#: below it stays under the suite's 600 s per-test timeout)
RUN_TIMEOUT = 420.0


@dataclass
class Walkthrough:
    """What the walkthrough printed, its exit status, and the answers it checked."""

    output: str
    returncode: int
    answers: dict[str, Any]


def run_walkthrough(work: Path, model: Path, *args: str) -> Walkthrough:
    result_file, output_file = work / "answers.json", work / "output.txt"
    with output_file.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(WALKTHROUGH), "--model", str(model), "--instance-id", INSTANCE,
             "--start-timeout", "300", "--result-json", str(result_file), *args],
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
    return Walkthrough(output, proc.returncode, json.loads(result_file.read_text()))


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory, llama3_vocab_model: Path) -> Iterator[Walkthrough]:
    yield run_walkthrough(tmp_path_factory.mktemp("walkthrough"), llama3_vocab_model, "--yaml-form", "push")


def test_walkthrough_exits_zero_and_reports_every_answer_as_expected(walkthrough: Walkthrough) -> None:
    assert walkthrough.returncode == 0, walkthrough.output[-6000:]
    assert walkthrough.answers["ok"] is True
    assert walkthrough.output.rstrip().endswith("finished: every answer as expected")
    # make demo points operators at the controller's web page
    assert re.search(r"^# the controller's web page .*: http://[^ ]+:\d+/$", walkthrough.output, re.M)


def check_lmcache_docs_part(answers: dict[str, Any]) -> None:
    """LMCache's documented answers: 12 tokens credited, 12 cleared, then nothing."""
    docs = answers["lmcache"]
    assert docs["completions"][0] is not None  # vLLM answered the request
    assert docs["lookups"][0] == {DOCS_INSTANCE: ["LocalCPUBackend", 12]}
    assert docs["clears"] == [12]
    assert docs["lookups"][1] == {}


def test_lmcache_walkthrough_verbatim_credits_clears_and_forgets_all_12_tokens(walkthrough: Walkthrough) -> None:
    check_lmcache_docs_part(walkthrough.answers)
    output = walkthrough.output
    assert "controller_url:" in output and "distributed_url:" in output and "lmcache_worker_port:" in output
    assert '\'{"kv_connector":"LMCacheConnectorV1","kv_connector_module_path":"lmcache_connector_vllm.connector","kv_role":"kv_both"}\'' in output
    assert '"num_tokens": 12' in output


def test_lmcache_walkthrough_with_the_pull_form_of_its_yaml(
    tmp_path: Path, llama3_vocab_model: Path
) -> None:
    run = run_walkthrough(tmp_path, llama3_vocab_model, "--yaml-form", "pull", "--part", "lmcache")
    assert run.returncode == 0, run.output[-6000:]
    check_lmcache_docs_part(run.answers)
    for key in ("controller_pull_url:", "lmcache_worker_ports:", "p2p_host:", "p2p_init_ports:"):
        assert key in run.output
    assert "controller_url:" not in run.output


def test_controller_lookup_credits_the_vllm_instance_with_every_prompt_token(
    walkthrough: Walkthrough,
) -> None:
    long = walkthrough.answers["long"]
    assert long["completions"][0]["cached_tokens"] == 0
    assert long["lookups"][0] == {INSTANCE: ["LocalCPUBackend", N]}


def test_second_completion_is_served_from_the_cache_with_identical_tokens(
    walkthrough: Walkthrough,
) -> None:
    first, second = walkthrough.answers["long"]["completions"][:2]
    assert second["cached_tokens"] == N - 1
    assert second["token_ids"] == first["token_ids"]


def test_clearing_the_cpu_tier_leaves_the_prompt_credited_to_disk(walkthrough: Walkthrough) -> None:
    long = walkthrough.answers["long"]
    assert long["clears"][0] == N
    assert long["lookups"][1] == {INSTANCE: ["LocalDiskBackend", N]}


def test_clearing_the_disk_tier_too_empties_the_lookup(walkthrough: Walkthrough) -> None:
    long = walkthrough.answers["long"]
    assert long["clears"][1] == N
    assert long["lookups"][2] == {}


def test_after_clear_the_prompt_is_recomputed_with_identical_tokens(
    walkthrough: Walkthrough,
) -> None:
    completions = walkthrough.answers["long"]["completions"]
    assert completions[2]["cached_tokens"] == 0
    assert completions[2]["token_ids"] == completions[0]["token_ids"]
