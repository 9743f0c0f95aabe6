"""The HTTP side of a request: reading and decoding its JSON body within the limits, and watching its
connection while it waits for the model, so that work for a client that went away is dropped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..errors import ApiError
from .limits import Limits
from .protocol import shown

LARGE_BODY_BYTES = 1024 * 1024  # decoded in the thread pool, so that the event loop keeps answering
# Longer integer literals decode as floats (so infinity): no field takes them, and int() of a long literal
# costs time quadratic in its length (Python refuses past 4,300 digits, with a ValueError).
MAX_INT_DIGITS = 1000

T = TypeVar("T")


def _decode_int(literal: str) -> int | float:
    return int(literal) if len(literal) <= MAX_INT_DIGITS else float(literal)


def decode_json(raw: bytes, invalid_status: int):
    """The parsed body: 400 if it is not JSON (or nested too deeply to parse); ``invalid_status`` if a key of
    the top-level object repeats, since which value counts would be a guess. Repeats inside a field's value
    are left to that field's type (no field takes an object) or ignored with an unknown field, as TEI does."""
    repeated = []

    def object_pairs(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):  # which key: the first one seen twice
            seen: set = set()
            for key, _ in pairs:
                if key in seen:
                    repeated.append((obj, key))
                    break
                seen.add(key)
        return obj

    try:
        body = json.loads(raw, object_pairs_hook=object_pairs, parse_int=_decode_int)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply to parse as JSON") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    for obj, key in repeated:
        if obj is body:
            raise ApiError(invalid_status, f"{shown(key)} appears more than once in the request body", key[:100])
    return body


def too_large(limit: int, size: int | None = None) -> ApiError:
    told = "" if size is None else f" {size:,} bytes,"  # a chunked body's size is not known
    return ApiError(413, f"request body is{told} past the limit of {limit:,} bytes (--payload-limit)")


async def read_json(request: Request, invalid_status: int, limit: int = Limits.payload_limit):
    """The request's JSON body; 415 for another content type, 413 past ``limit`` bytes (told by Content-Length
    before anything is read, else once the bytes read pass it), 400 for bad JSON, ``invalid_status`` for a
    repeated key."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
    length = int(request.headers.get("content-length") or 0)  # uvicorn refuses a malformed one before this
    if length > limit:
        raise too_large(limit, length)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a chunked body has no Content-Length to check up front
            raise too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if size > LARGE_BODY_BYTES:
        return await run_in_threadpool(decode_json, raw, invalid_status)
    return decode_json(raw, invalid_status)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _disconnected(receive) -> None:
    # once the body is read, receive() returns when the client disconnects (anything else it returns is empty)
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled (which takes a queued
    request off the queue) and ClientGone raised. Call it after the body is read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    if task.done():
        watch.cancel()
        return task.result()
    task.cancel()
    await asyncio.wait((task,))  # let the cancellation reach the queue before answering
    raise ClientGone
