"""``lmcache controller``: the controller's HTTP API from a shell.

    lmcache controller lookup --tokens 1,2,3
    lmcache controller clear --instance I --location LocalCPUBackend
    lmcache controller pin --instance I --location LocalCPUBackend --tokens 1,2,3   # unpin: the same
    lmcache controller move --instance I --from LocalCPUBackend --to LocalDiskBackend [--tokens ...] [--copy]
    lmcache controller compress --instance I --method zstd --location LocalCPUBackend [--tokens ...]
    lmcache controller workers [--instance I [--worker W]]
    lmcache controller stats

``--url`` (default ``$LMCACHE_CONTROLLER_API_URL``, else ``http://localhost:9000``) names the
controller's HTTP API, ``--api-token`` (default ``$LMCACHE_CONTROLLER_API_TOKEN``) its bearer
token. ``--tokens`` takes comma-separated ids, or ``-`` to read them from stdin (a JSON array
or comma-separated). ``--json`` prints the controller's answer as it came; otherwise a few
readable lines. An error answer, or no answer, is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from lmcache_core.cli_nats import parse_tokens
from lmcache_core.errors import LMCacheError

URL_ENV = "LMCACHE_CONTROLLER_API_URL"
TOKEN_ENV = "LMCACHE_CONTROLLER_API_TOKEN"
DEFAULT_URL = "http://localhost:9000"
#: validation problems an error line lists at most
_MAX_PROBLEMS = 5


class ControllerRequestError(LMCacheError):
    """The controller could not be reached, or answered with an error."""


# --- talking to the controller --------------------------------------------------------------------


def _tokens(text: str) -> list[int]:
    """``--tokens``: ``1,2,3``, or ``-`` for stdin (a JSON array or comma-separated ids)."""
    if text != "-":
        return parse_tokens(text)
    data = sys.stdin.read().strip()
    if data.startswith("["):
        try:
            tokens = json.loads(data)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"stdin is not a JSON array of token ids: {exc}") from None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise argparse.ArgumentTypeError("stdin should hold a JSON array of integer token ids")
        return tokens
    return parse_tokens(data)


def _describe_error(status: int, body: Any) -> str:
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # a 422: the first problems, with where they are
        detail = "; ".join(
            f"{'.'.join(str(p) for p in problem.get('loc', ()))}: {problem.get('msg', '')}"
            for problem in detail[:_MAX_PROBLEMS]
            if isinstance(problem, dict)
        )
    text = f"the controller answered {status}: {detail if detail else str(body)[:200]}"
    if status == 401:
        text += f" (give --api-token or ${TOKEN_ENV})"
    return text


def call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None,
         params: dict[str, Any] | None = None) -> Any:
    """One request to the controller; its JSON answer, or ``ControllerRequestError``."""
    import httpx  # the controller's own dependency; imported here so `lmcache plugins` stays light

    headers = {"Authorization": f"Bearer {args.api_token}"} if args.api_token else {}
    url = args.url.rstrip("/")
    try:
        with httpx.Client(base_url=url, timeout=args.timeout, headers=headers) as client:
            response = client.request(method, path, json=body, params=params)
    except httpx.HTTPError as exc:
        raise ControllerRequestError(f"cannot reach the controller at {url}: {exc or type(exc).__name__}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = response.text
    if response.status_code >= 400:
        raise ControllerRequestError(_describe_error(response.status_code, answer))
    if not isinstance(answer, (dict, list)):
        raise ControllerRequestError(f"the controller at {url} answered {path} with something not JSON")
    return answer


def _emit(args: argparse.Namespace, answer: Any, human: Callable[[Any], str]) -> int:
    print(json.dumps(answer) if args.json else human(answer), flush=True)
    return 0


def _per_worker(answer: dict[str, Any]) -> str:
    per = answer.get("num_tokens_per_worker")
    if not per:
        return ""
    return " (per rank: " + ", ".join(f"{rank}: {n}" for rank, n in per.items()) + ")"


def _done(verb: str, where: str) -> Callable[[dict[str, Any]], str]:
    """The readable line of an answer ``{event_id, num_tokens, ...}``."""
    return lambda a: f"{verb} {a['num_tokens']} tokens {where}{_per_worker(a)} (event {a['event_id']})"


# --- the subcommands ------------------------------------------------------------------------------


def _cmd_lookup(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tokens": args.tokens}
    if args.model:
        body["model"] = args.model
    if args.instance:
        body["instance_id"] = args.instance

    def human(answer: dict[str, Any]) -> str:
        layout = answer["layout_info"]
        if not layout:
            return f"no instance holds a prefix of these {len(args.tokens)} tokens"
        return "\n".join(f"{inst}: {tokens} of {len(args.tokens)} tokens, most at {loc}"
                         for inst, (loc, tokens) in layout.items())

    return _emit(args, call(args, "POST", "/lookup", body), human)


def _cmd_clear(args: argparse.Namespace) -> int:
    answer = call(args, "POST", "/clear", {"instance_id": args.instance, "location": args.location})
    return _emit(args, answer, _done("cleared", f"from {args.location} of {args.instance}"))


def _cmd_pin(args: argparse.Namespace) -> int:
    body = {"instance_id": args.instance, "location": args.location, "tokens": args.tokens}
    answer = call(args, "POST", f"/{args.action}", body)
    return _emit(args, answer, _done(f"{args.action}ned", f"at {args.location} of {args.instance}"))


def _cmd_move(args: argparse.Namespace) -> int:
    target = args.to_instance or args.instance
    body: dict[str, Any] = {
        "old_position": [args.instance, args.source],
        "new_position": [target, args.target],
        "should_copy": args.copy,
    }
    if args.tokens is not None:
        body["tokens"] = args.tokens
    verb = "copied" if args.copy else "moved"
    return _emit(args, call(args, "POST", "/move", body), _done(verb, f"from {args.source} to {args.target} of {target}"))


def _cmd_compress(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"instance_id": args.instance, "method": args.method, "location": args.location}
    if args.tokens is not None:
        body["tokens"] = args.tokens
    answer = call(args, "POST", f"/{args.action}", body)
    return _emit(args, answer, _done(f"{args.action}ed", f"at {args.location} of {args.instance} ({args.method})"))


def _age(unix: float) -> str:
    return f"{max(0.0, time.time() - unix):.1f} s ago" if unix else "never"


def _cmd_workers(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("instance_id", args.instance), ("worker_id", args.worker)) if v is not None}

    def human(answer: dict[str, Any]) -> str:
        workers = answer["workers"] if "workers" in answer else [answer]  # both given: one worker
        if not workers:
            return "no workers registered"
        rows = [("INSTANCE", "WORKER", "IP", "PORT", "KEYS", "LAST HEARTBEAT")]
        rows += [(w["instance_id"], str(w["worker_id"]), w["ip"] or "-", str(w["port"]), str(w["key_count"]),
                  _age(w["last_heartbeat_time"])) for w in workers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

    return _emit(args, call(args, "GET", "/controller/workers", params=params), human)


def _cmd_stats(args: argparse.Namespace) -> int:
    def human(answer: dict[str, Any]) -> str:
        lines = [f"{answer['total_key_count']} keys, {answer['total_worker_count']} workers, "
                 f"{answer['total_instance_count']} instances"]
        lines += [f"{i['instance_id']}: {i['key_count']} keys, {i['worker_count']} workers" for i in answer["instances"]]
        return "\n".join(lines)

    return _emit(args, call(args, "GET", "/controller/key-stats"), human)


# --- the parser -----------------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get(URL_ENV) or DEFAULT_URL,
                        help=f"the controller's HTTP API (default: ${URL_ENV}, else {DEFAULT_URL})")
    common.add_argument("--api-token", default=os.environ.get(TOKEN_ENV),
                        help=f"its bearer token (default: ${TOKEN_ENV})")
    common.add_argument("--json", action="store_true", help="print the controller's JSON answer")
    common.add_argument("--timeout", type=_positive, default=60.0, help="seconds to wait for an answer")
    return common


def register(sub: Any) -> None:
    """Add ``lmcache controller ...`` to the ``lmcache`` command's subparsers."""
    parser = sub.add_parser("controller", help="call the cache controller's HTTP API",
                            description="Call the cache controller's HTTP API (see `lmcache controller ACTION -h`).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = [_common()]

    def action(name: str, func: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, parents=common, help=text, description=text)
        p.set_defaults(func=func)
        return p

    def instance(p: argparse.ArgumentParser) -> None:
        p.add_argument("--instance", required=True, help="instance id")

    def location(p: argparse.ArgumentParser) -> None:
        p.add_argument("--location", required=True, help="storage location, e.g. LocalCPUBackend")

    p = action("lookup", _cmd_lookup, "which instances hold a prefix of the tokens, and where")
    p.add_argument("--tokens", type=_tokens, required=True, help="token ids: 1,2,3 or - (stdin)")
    p.add_argument("--model", help="only instances serving this model")
    p.add_argument("--instance", help="only this instance")
    p = action("clear", _cmd_clear, "empty one location of an instance (pinned chunks too)")
    instance(p)
    location(p)
    for name, text in (("pin", "protect the tokens' chunks at a location from eviction"),
                       ("unpin", "make pinned chunks evictable again")):
        p = action(name, _cmd_pin, text)
        instance(p)
        location(p)
        p.add_argument("--tokens", type=_tokens, required=True, help="token ids: 1,2,3 or - (stdin)")
    p = action("move", _cmd_move, "move (or copy) chunks between two locations of an instance")
    instance(p)
    p.add_argument("--from", dest="source", required=True, help="location the chunks are at")
    p.add_argument("--to", dest="target", required=True, help="location they go to")
    p.add_argument("--to-instance", help="another instance (needs peer-to-peer: refused for now)")
    p.add_argument("--tokens", type=_tokens, help="token ids: 1,2,3 or - (stdin); default: every chunk")
    p.add_argument("--copy", action="store_true", help="leave the chunks at --from too")
    for name, text in (("compress", "re-encode chunks at a location with a codec"),
                       ("decompress", "decode chunks at a location back to plain tensors")):
        p = action(name, _cmd_compress, text)
        instance(p)
        location(p)
        p.add_argument("--method", required=True, help="codec name, e.g. zstd")
        p.add_argument("--tokens", type=_tokens, help="token ids: 1,2,3 or - (stdin); default: every chunk")
    p = action("workers", _cmd_workers, "registered workers with their key counts")
    p.add_argument("--instance", help="only this instance's workers")
    p.add_argument("--worker", type=int, help="only this rank")
    action("stats", _cmd_stats, "keys and workers per instance, and in total")
