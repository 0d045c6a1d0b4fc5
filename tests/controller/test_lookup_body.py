"""``/lookup`` bodies: token ids are JSON integers in [0, 2^32), everything else a short 422."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmcache_core.controller.routes import OFF_LOOP_BYTES, LookupFastPath, parse_lookup

from .support import PROMPT, ControllerRunner, controller_settings, wait_for

pytestmark = pytest.mark.timeout(60)

TOKEN_MSG = "Token ids should be JSON integers in [0, 4294967296)"

# malformed bodies, each with the exact 422 detail it gets (never the input)
REJECTED = [
    (b'{"tokens": [1.5]}', [{"type": "token_id", "loc": ["body", "tokens", 0], "msg": TOKEN_MSG}]),
    (b'{"tokens": [1, 2, 4294967296]}', [{"type": "token_id", "loc": ["body", "tokens", 2], "msg": TOKEN_MSG}]),
    (b'{"tokens": [0, -1]}', [{"type": "token_id", "loc": ["body", "tokens", 1], "msg": TOKEN_MSG}]),
    (b'{"tokens": [1], "x": 1}', [{"type": "extra_forbidden", "loc": ["body", "x"], "msg": "Extra inputs are not permitted"}]),
    (b'{"tokens": "abc"}', [{"type": "list_type", "loc": ["body", "tokens"], "msg": "Input should be a valid array"}]),
    (b"[1]", [{"type": "model_type", "loc": ["body"], "msg": "Input should be an object"}]),
    (b'{"tokens": [1], "model": 3}', [{"type": "string_type", "loc": ["body", "model"],
                                       "msg": "Input should be a valid string"}]),
    (b'{"model": "m"}', [{"type": "missing", "loc": ["body", "tokens"], "msg": "Field required"}]),
    (b'{"tokens": [], "instance_id": "' + b"i" * 201 + b'"}',
     [{"type": "string_too_long", "loc": ["body", "instance_id"], "msg": "String should have at most 200 characters"}]),
]

# token ids a lax parser would take (numeric strings, floats without a fraction, booleans)
NOT_TOKEN_IDS = ['"1"', "1.0", "true", "false", "null", "-1", "4294967296", "18446744073709551616", "[1]", "{}"]


def test_parse_lookup_reads_token_ids_in_the_uint32_range_as_int64() -> None:
    for body in [{"tokens": PROMPT}, {"tokens": [0, 5, 2**32 - 1], "model": "true", "instance_id": None},
                 {"tokens": [], "instance_id": "inst-a"}]:
        query = parse_lookup(json.dumps(body).encode())
        assert query.tokens.dtype == np.int64 and query.tokens.tolist() == body["tokens"]
        assert (query.model, query.instance_id) == (body.get("model"), body.get("instance_id"))


@pytest.mark.parametrize("token", NOT_TOKEN_IDS)
def test_anything_but_a_json_integer_in_range_is_refused_naming_its_place(controller: ControllerRunner, token: str) -> None:
    raw = f'{{"tokens": [7, {token}, 8]}}'.encode()
    response = controller.client.post("/lookup", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"detail": [{"type": "token_id", "loc": ["body", "tokens", 1], "msg": TOKEN_MSG}]}


def test_malformed_lookup_bodies_get_a_short_422(controller: ControllerRunner) -> None:
    for raw, detail in REJECTED:
        response = controller.client.post("/lookup", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422, raw
        assert response.json() == {"detail": detail}, raw


def test_a_body_with_a_million_bad_items_names_a_few(controller: ControllerRunner) -> None:
    extra = {f"k{i}": i for i in range(100_000)}
    response = controller.client.post("/lookup", json={**extra, "tokens": ["a"] * 1_000_000})
    assert response.status_code == 422
    assert len(response.content) < 2048
    assert [e["loc"] for e in response.json()["detail"]][:2] == [["body", "k0"], ["body", "k1"]]


def test_edge_token_ids_and_bodies_over_the_thread_threshold_are_credited_alike(
    controller: ControllerRunner, make_instance
) -> None:
    inst = make_instance("inst-a")
    inst.store(PROMPT)
    inst.sync()
    expected = wait_for(lambda: controller.lookup(PROMPT), what="instance credited")
    assert controller.lookup([0, 2**32 - 1]) == {}
    # the same body padded past OFF_LOOP_BYTES is parsed and hashed in a worker thread
    raw = json.dumps({"tokens": PROMPT, "instance_id": "inst-a"}).encode()
    padded = raw[:-1] + b" " * OFF_LOOP_BYTES + b"}"
    response = controller.client.post("/lookup", content=padded, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.json()["layout_info"] == expected


def test_the_raw_handler_answers_successes_and_errors_itself(controller: ControllerRunner, make_instance) -> None:
    inst = make_instance("inst-a")
    inst.store(PROMPT)
    inst.sync()
    expected = wait_for(lambda: controller.lookup(PROMPT), what="instance credited")
    fast = LookupFastPath(controller.controller)

    async def serve(body: bytes) -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await fast({"type": "http", "method": "POST", "path": "/lookup"}, body, send)
        return sent

    sent = controller.call(serve, json.dumps({"tokens": PROMPT}).encode())
    assert sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    assert int(dict(sent[0]["headers"])[b"content-length"]) == len(sent[1]["body"])
    assert json.loads(sent[1]["body"])["layout_info"] == expected
    sent = controller.call(serve, b'{"tokens": [1.5]}')
    assert sent[0]["status"] == 422
    assert json.loads(sent[1]["body"]) == {"detail": [{"type": "token_id", "loc": ["body", "tokens", 0], "msg": TOKEN_MSG}]}


def test_too_many_tokens_on_the_raw_path_is_a_413(nats_url: str) -> None:
    with ControllerRunner(nats_url, controller_settings(controller_max_lookup_tokens=4)) as runner:
        response = runner.client.post("/lookup", json={"tokens": [1, 2, 3, 4, 5]})
        assert response.status_code == 413
        assert response.json() == {"detail": "5 tokens is more than controller_max_lookup_tokens (4)"}
