"""Instance ids in bus subjects: distinct ids never share a subject, and one too long for a
subject is a configuration error."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from lmcache_core.config import load_settings
from lmcache_core.errors import ConfigError
from lmcache_core.wire import (
    MAX_TOPIC_TOKEN,
    PROTOCOL_VERSION,
    HashingParams,
    WorkerRegistration,
    command_topic,
    events_topic,
    heartbeat_topic,
    register_topic,
    topic_token,
)

from .support import PROMPT, ControllerRunner, wait_for

pytestmark = pytest.mark.timeout(120)

CPU = "LocalCPUBackend"
#: what a NATS subject token may hold: no separator, no wildcard, no whitespace
TOKEN = re.compile(r"[A-Za-z0-9_\-%]+")


def test_plain_ids_stay_readable_and_others_are_escaped_byte_by_byte() -> None:
    assert topic_token("lmcache_default_instance") == "lmcache_default_instance"
    assert topic_token("vllm-demo-7") == "vllm-demo-7"
    assert topic_token("a.b") == "a%2Eb"
    assert topic_token("a%2Eb") == "a%252Eb"
    assert topic_token("é *>") == "%C3%A9%20%2A%3E"
    assert topic_token("") == "%"
    assert PROTOCOL_VERSION >= 2  # the encoding changed with version 2


@pytest.mark.parametrize("one, other", [("a.b", "x612e62"), ("a.b", "a%2Eb"), ("", "%"), ("a b", "a%20b")])
def test_ids_that_shared_a_subject_before_have_their_own(one: str, other: str) -> None:
    for topic in (command_topic, events_topic, heartbeat_topic, register_topic):
        assert topic(one, 0) != topic(other, 0)


@given(st.text(), st.text())
def test_the_encoding_is_injective_and_yields_one_wildcard_free_token(one: str, other: str) -> None:
    assert TOKEN.fullmatch(topic_token(one))
    if one != other:
        assert topic_token(one) != topic_token(other)


def test_an_instance_id_too_long_for_a_subject_is_a_config_error_naming_the_key() -> None:
    assert load_settings(lmcache_instance_id="i" * MAX_TOPIC_TOKEN).lmcache_instance_id == "i" * MAX_TOPIC_TOKEN
    for too_long in ["i" * (MAX_TOPIC_TOKEN + 1), "é" * 40]:  # 40 x 2 bytes, escaped to 3 characters each
        with pytest.raises(ConfigError) as caught:
            load_settings(lmcache_instance_id=too_long)
        message = str(caught.value)
        assert "config key 'lmcache_instance_id'" in message
        assert f"at most {MAX_TOPIC_TOKEN} bytes" in message


def test_a_registration_with_an_id_too_long_for_a_subject_does_not_parse() -> None:
    hashing = HashingParams(scheme="xxh3-64-chain/v1", chunk_size=4)
    fields = dict(worker_id=0, epoch="e", model_name="m", kv_dtype="bf16", hashing=hashing, locations=[CPU])
    WorkerRegistration(instance_id="i" * MAX_TOPIC_TOKEN, **fields)
    with pytest.raises(ValidationError, match="too long for a message-bus subject"):
        WorkerRegistration(instance_id="i" * (MAX_TOPIC_TOKEN + 1), **fields)


def test_clearing_one_of_two_ids_that_shared_a_subject_leaves_the_other(
    controller: ControllerRunner, make_instance
) -> None:
    dotted = make_instance("a.b")
    literal = make_instance("x612e62")
    for inst in (dotted, literal):
        inst.store(PROMPT)
        inst.sync()
    wait_for(lambda: set(controller.lookup(PROMPT)) == {"a.b", "x612e62"}, what="both instances credited")
    response = controller.client.post("/clear", json={"instance_id": "a.b", "location": CPU})
    assert response.status_code == 200 and response.json()["num_tokens"] == len(PROMPT)
    assert dotted.engine.inventory()[CPU] == []
    assert len(literal.engine.inventory()[CPU]) == 3  # 12 tokens in chunks of 4: untouched
    counts = controller.holder_counts()
    assert counts[("a.b", 0, CPU)] == 0 and counts[("x612e62", 0, CPU)] == 3
