"""Raw ASGI pieces shared by the API guard and the ``/lookup`` fast path: reading a request body
within bounds, replaying it to the application, sending a JSON answer, refusing a websocket.

``read_body`` is what keeps a hostile body from hurting the controller: one declared larger than
the limit (``Content-Length``) is refused before a byte of it is read, one streamed without a
length (chunked) is refused as soon as it passes the limit, and one that has not fully arrived
by the deadline is refused too. The caller answers with ``connection: close`` so the client stops
sending (uvicorn would otherwise read the rest of the body to reuse the connection).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio
from starlette.types import Message, Receive, Scope, Send

from lmcache_core.controller.errors import RequestBodyTimeoutError, RequestTooLargeError

_JSON_TYPE = (b"content-type", b"application/json")
#: the header a refusal adds: the unread rest of the body must not keep the connection busy
CLOSE = (b"connection", b"close")


def declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, or None when it has none (chunked, or no body)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses these before the app sees them
    return None


async def read_body(scope: Scope, receive: Receive, limit: int, timeout: float, accepts: str) -> bytes | None:
    """The whole body of an HTTP request, or None when the client went away first.

    ``RequestTooLargeError`` for a body over ``limit`` bytes (from its declared length before
    reading, or as it streams), ``RequestBodyTimeoutError`` when it is not complete within
    ``timeout`` seconds; ``accepts`` says what the endpoint takes ("/lookup accepts at most ...").
    """
    declared = declared_length(scope)
    if declared is not None and declared > limit:
        raise RequestTooLargeError(f"request body too large ({declared} bytes): {accepts}")
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(timeout):
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestTooLargeError(f"request body too large: {accepts}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    raise RequestBodyTimeoutError(
        f"the request body did not arrive within {timeout:g} s (controller_request_timeout)"
    )


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body once, then defers to the real one."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _json(body: bytes | dict[str, Any]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """``body`` encoded (unless it is already) and its content headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return data, [_JSON_TYPE, (b"content-length", str(len(data)).encode())]


async def send_json(
    send: Send, status: int, body: bytes | dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """One complete JSON response (``body`` already encoded, or a dict to encode)."""
    data, content = _json(body)
    await send({"type": "http.response.start", "status": status, "headers": [*content, *headers]})
    await send({"type": "http.response.body", "body": data})


async def deny_websocket(scope: Scope, send: Send, status: int, body: dict[str, Any]) -> None:
    """Refuse a websocket handshake: with an HTTP answer where the server can send one, else
    a close before accepting (which servers answer with 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        data, content = _json(body)
        await send({"type": "websocket.http.response.start", "status": status, "headers": content})
        await send({"type": "websocket.http.response.body", "body": data})
    else:
        await send({"type": "websocket.close", "code": 1008})
