"""``/lookup`` bodies: the C-speed parser for plain ones and the validating one for the rest agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmcache_core.controller.routes import LookupFastPath, _plain_lookup_body, _validated_lookup_body

from .support import PROMPT, ControllerRunner, controller_settings, wait_for

pytestmark = pytest.mark.timeout(60)

# bodies the plain parser declines, each with the exact 422 detail the validating parser gives
REJECTED = [
    (b'{"tokens": [1.5]}', {"type": "int_from_float", "loc": ["body", "tokens", 0],
                            "msg": "Input should be a valid integer, got a number with a fractional part", "input": 1.5}),
    (b'{"tokens": [9223372036854775808]}', {"type": "int64_range", "loc": ["body", "tokens"],
                                            "msg": "token ids must fit in a signed 64-bit integer", "input": None}),
    (b'{"tokens": [-9223372036854775809]}', {"type": "int64_range", "loc": ["body", "tokens"],
                                             "msg": "token ids must fit in a signed 64-bit integer", "input": None}),
    (b'{"tokens": [1], "x": 1}', {"type": "extra_forbidden", "loc": ["body", "x"],
                                  "msg": "Extra inputs are not permitted", "input": 1}),
    (b'{"tokens": "abc"}', {"type": "list_type", "loc": ["body", "tokens"], "msg": "Input should be a valid array",
                            "input": "abc"}),
    (b"[1]", {"type": "model_type", "loc": ["body"], "msg": "Input should be an object", "input": [1]}),
    (b'{"tokens": [1], "model": 3}', {"type": "string_type", "loc": ["body", "model"],
                                      "msg": "Input should be a valid string", "input": 3}),
    (b'{"model": "m"}', {"type": "missing", "loc": ["body", "tokens"], "msg": "Field required",
                         "input": {"model": "m"}}),
]


def test_plain_parser_reads_int64_tokens_and_filters_like_the_validating_one() -> None:
    for body in [{"tokens": PROMPT}, {"tokens": [0, -5, 2**63 - 1, -(2**63)], "model": "m", "instance_id": None},
                 {"tokens": [], "instance_id": "inst-a"}]:
        raw = json.dumps(body).encode()
        plain = _plain_lookup_body(raw)
        assert plain is not None
        slow = _validated_lookup_body(raw)
        assert plain[0].dtype == np.int64 and np.array_equal(plain[0], slow[0])
        assert plain[1:] == slow[1:]


@pytest.mark.parametrize("raw", [raw for raw, _ in REJECTED] + [b"{not json", b'{"tokens": [1.0, "2", true]}'])
def test_plain_parser_declines_every_body_that_is_not_plain(raw: bytes) -> None:
    assert _plain_lookup_body(raw) is None


def test_malformed_lookup_bodies_get_the_validating_parsers_422(controller: ControllerRunner) -> None:
    for raw, error in REJECTED:
        response = controller.client.post("/lookup", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422, raw
        assert response.json() == {"detail": [error]}, raw


def test_lax_tokens_pydantic_accepts_are_credited_like_plain_ones(controller: ControllerRunner, make_instance) -> None:
    inst = make_instance("inst-a")
    inst.store(PROMPT)
    inst.sync()
    expected = wait_for(lambda: controller.lookup(PROMPT), what="instance credited")
    client = controller.client
    # floats with no fraction and numeric strings: the plain parser declines them, pydantic
    # (lax mode, as before) reads them as the same ids
    for tokens in ([float(t) for t in PROMPT], [str(t) for t in PROMPT]):
        response = client.post("/lookup", json={"tokens": tokens, "instance_id": "inst-a", "model": None})
        assert response.status_code == 200
        assert response.json()["layout_info"] == expected
    plain = client.post("/lookup", json={"tokens": PROMPT}).json()
    assert set(plain) == {"event_id", "layout_info"} and plain["layout_info"] == expected


def test_plain_lookups_are_answered_raw_and_the_rest_is_handed_to_the_app_with_its_body(
    controller: ControllerRunner, make_instance
) -> None:
    inst = make_instance("inst-a")
    inst.store(PROMPT)
    inst.sync()
    expected = wait_for(lambda: controller.lookup(PROMPT), what="instance credited")
    fast = LookupFastPath(controller.controller)

    async def serve(chunks: list[bytes], method: str = "POST") -> tuple[list[dict], list[dict]]:
        """One request through the raw handler; (what it sent, what the fallback app received)."""
        pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent: list[dict] = []
        handed: list[dict] = []

        async def receive() -> dict:
            return pending.pop(0)

        async def send(message: dict) -> None:
            sent.append(message)

        async def fallback(scope: dict, receive, send) -> None:
            handed.append(await receive())

        await fast({"type": "http", "method": method, "path": "/lookup"}, receive, send, fallback)
        return sent, handed

    raw = json.dumps({"tokens": PROMPT}).encode()
    sent, handed = controller.call(serve, [raw[:10], raw[10:]])  # a body in two pieces
    assert handed == [] and sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    assert int(dict(sent[0]["headers"])[b"content-length"]) == len(sent[1]["body"])
    assert json.loads(sent[1]["body"])["layout_info"] == expected
    for chunks, method in [([b'{"tokens": [1.5]}'], "POST"), ([b'{"tokens": ', b"[1]}"], "GET")]:
        sent, handed = controller.call(serve, chunks, method)
        assert sent == []
        if method == "POST":  # the whole body, once, as one message
            assert handed == [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        else:  # untouched: the app reads it itself
            assert handed == [{"type": "http.request", "body": chunks[0], "more_body": True}]


def test_a_lookup_that_fails_on_the_raw_path_gets_the_apps_error(nats_url: str) -> None:
    with ControllerRunner(nats_url, controller_settings(controller_max_lookup_tokens=4)) as runner:
        response = runner.client.post("/lookup", json={"tokens": [1, 2, 3, 4, 5]})
        assert response.status_code == 413
        assert response.json() == {"detail": "5 tokens is more than controller_max_lookup_tokens (4)"}
