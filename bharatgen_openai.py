#!/usr/bin/env python3
"""bharatgen_openai: an OpenAI-compatible API in front of BharatGen's Param chat model.

Param is served as a Gradio app.  This one file, standard library only (Python 3.9+),
speaks Gradio's HTTP protocol to that app, turns the app's HTML replies into the model's
exact text, and offers that text two ways:

* an SDK shaped like the official ``openai`` package::

      from bharatgen_openai import BharatGenOpenAI
      client = BharatGenOpenAI(base_url="https://<id>.gradio.live/")
      reply = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])
      print(reply.choices[0].message.content)

* an HTTP server with the OpenAI routes (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/responses``, ``/v1/models``), so that any OpenAI client works unchanged::

      python bharatgen_openai.py serve --upstream https://<id>.gradio.live/
      python bharatgen_openai.py serve --demo      # a built-in stand-in upstream

The parts, in the file's order (bottom-up: each uses only those before it):

  Errors ............. one hierarchy; each error is one OpenAI type and HTTP status
  Protocol pieces .... the SSE reader (_iter_sse), the html.parser cleaner (clean_reply,
                       _StreamCleaner), stop sequences, the token estimate
  Token counts ....... _Tokenizer: a Hugging Face tokenizer.json in pure Python (exact)
  Objects ............ dataclasses shaped like the openai SDK's (ChatCompletion, ...)
  Upstream ........... GradioClient over http.client (urllib.request's proxies): its HTTP
                       layer (_HTTP), discovery (_discover), calling (join, stream, cancel);
                       replicas (_UpstreamPool)
  Requests ........... OpenAI messages and sampling mapped onto the app's inputs
  Tools, JSON Schema . tool calls and structured output, checked by a bounded validator
  Engine ............. one generation: the app's snapshots -> thought and answer pieces
  Configuration ...... Config: flags, then the environment, then defaults
  Backend ............ pieces -> chunks (events); a non-streamed answer is them folded
  SDK ................ BharatGenOpenAI and AsyncBharatGenOpenAI
  Server pieces ...... keys, rate limits, metrics
  HTTP serving ....... http.server's ThreadingHTTPServer and handler, strict and bounded
  Gateway ............ GatewayServer: the /v1 routes, the page, /health, /metrics
  Demo upstream ...... DemoUpstream: a stand-in Param app speaking Gradio's protocol
  Benchmark .......... bench: the gateway beside direct calls to the same app
  Command line ....... main(): serve, chat, info, bench, demo
  Data ............... the page's HTML, CSS and script; the demo's canned texts

Security: the server binds 127.0.0.1 by default.  Give it API keys (``--api-key`` or
``BHARATGEN_API_KEYS``) before exposing it; keys are compared in constant time.  Request
framing is strict (RFC 9112): anything ambiguous is refused and the connection closed.
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = [
    # errors
    "BharatGenError", "APIError", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "MethodNotAllowedError", "RequestTooLargeError", "RequestTimeoutError",
    "RateLimitError", "InternalServerError", "ServerOverloadedError", "UpstreamError",
    "UpstreamOverloadedError",
    "APIConnectionError", "APITimeoutError", "UpstreamTimeout",
    # protocol pieces
    "CleanReply", "clean_reply", "estimate_tokens",
    # objects
    "ChatCompletion", "Choice", "ChatCompletionMessage", "ChatCompletionChunk",
    "ChunkChoice", "ChoiceDelta", "CompletionUsage", "CompletionTokensDetails",
    "ChatCompletionMessageToolCall", "ChoiceDeltaToolCall", "Function",
    "Model", "ModelList", "Completion", "CompletionChoice", "Embedding", "EmbeddingUsage",
    "CreateEmbeddingResponse",
    # upstream, SDK, server
    "GradioClient", "BharatGenOpenAI", "AsyncBharatGenOpenAI", "Stream", "AsyncStream",
    "Config", "GatewayServer", "DemoUpstream", "main",
]

import base64
import contextlib
import dataclasses
import errno
import functools
import hashlib
import heapq
import html
import http.client
import http.server
import io
import itertools
import json
import logging
import math
import os
import queue
import re
import selectors
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import unicodedata
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

DEFAULT_MODEL = "bharatgen-param-17b"      # the id the Param gateway's documents use
_DEMO_EMBEDDING = "bharatgen-demo-embedding"   # the demo upstream's embedding model
DEFAULT_ENDPOINT = "chat_fn_1"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant. You think step-by-step."
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 1024
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 50
DEFAULT_PORT = 8000
MAX_HEAD_BYTES = 64 * 1024                 # a request's header fields, in all
MAX_BODY_BYTES = 4 * 1024 * 1024           # a request body
MAX_EVENT_BYTES = 8 * 1024 * 1024          # one upstream SSE line, and one event
MAX_UPSTREAM_BODY = 16 * 1024 * 1024       # an upstream /config, /info or error body
REASONING_MODES = ("separate", "inline", "none")
PROTOCOLS = ("auto", "queue", "call")

_log = logging.getLogger("bharatgen_openai")
_log.addHandler(logging.NullHandler())     # a library logs; the program using it shows the logs
_access_log = logging.getLogger("bharatgen_openai.access")


###############################################################################
# Errors #######################################################################
###############################################################################

class BharatGenError(Exception):
    """Root of every error this module raises.

    Each subclass maps to one OpenAI error ``type``, one ``code`` and one HTTP status,
    here and nowhere else; :meth:`to_dict` gives the OpenAI error body.
    """

    status: int = 500
    type: str = "server_error"
    code: Optional[str] = None
    retry_after: Optional[int] = None

    def __init__(self, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, status: Optional[int] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: Dict[str, str] = dict(headers or {})
        if self.retry_after is not None:
            self.headers.setdefault("Retry-After", str(self.retry_after))

    @property
    def status_code(self) -> int:
        """The HTTP status, as the openai SDK names it."""
        return self.status

    def to_dict(self) -> Dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


APIError = BharatGenError  # the openai SDK's name for its root error


class BadRequestError(BharatGenError, ValueError):
    """The request is malformed or asks for something this server cannot do (400)."""
    status = 400
    type = "invalid_request_error"


class RequestTooLargeError(BadRequestError):
    """The request body is larger than the server accepts (413)."""
    status = 413
    code = "request_too_large"


class RequestTimeoutError(BadRequestError):
    """The client sent its request too slowly (408)."""
    status = 408
    code = "request_timeout"


class AuthenticationError(BharatGenError):
    """No API key, or one the server does not know (401)."""
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(BharatGenError):
    """The request may not be served as it came (403)."""
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFoundError(BharatGenError):
    """Unknown route or model (404)."""
    status = 404
    type = "invalid_request_error"


class MethodNotAllowedError(BharatGenError):
    """A known route asked with the wrong HTTP method (405)."""
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimitError(BharatGenError):
    """Too many requests (429)."""
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class InternalServerError(BharatGenError):
    """A fault in this server (500)."""


class ServerOverloadedError(BharatGenError):
    """This server is at its concurrency limit, or shutting down (503)."""
    status = 503
    code = "server_overloaded"
    retry_after = 1


class UpstreamError(InternalServerError):
    """The Gradio app failed or answered something unusable (502)."""
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamOverloadedError(UpstreamError):
    """The Gradio app's queue is full (503); retrying later may help."""
    status = 503
    code = "upstream_overloaded"
    retry_after = 1


class APIConnectionError(BharatGenError, ConnectionError):
    """The Gradio app could not be reached, or dropped the connection (502); as in the
    openai SDK, not an :class:`InternalServerError`."""
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class APITimeoutError(APIConnectionError, TimeoutError):
    """The Gradio app did not answer in time (504)."""
    status = 504
    code = "upstream_timeout"


UpstreamTimeout = APITimeoutError


###############################################################################
# Protocol pieces: SSE, the HTML cleaner, stop sequences, token counts #########
###############################################################################

def _iter_sse(read: Callable[[], bytes], limit: int = MAX_EVENT_BYTES) -> Iterator[Tuple[str, str]]:
    """Yield ``(event, data)`` of a server-sent event stream.

    ``read`` returns the next bytes (``b""`` at the end).  Linear in the bytes: each
    block is searched once, and a line cut across blocks is joined once.  A line or an
    event of over ``limit`` bytes raises :class:`UpstreamError`.  Follows the WHATWG
    rules that matter: ``event``/``data`` fields, multi-line data joined by ``\\n``,
    comments (``:``) ignored, ``\\r\\n`` line ends, dispatch on a blank line.
    """
    pending: List[bytes] = []              # the start of a line cut by the block's end
    held, event, data, size = 0, "", [], 0
    while True:
        block = read()
        ended = not block
        block = block or b"\n\n"                # the end dispatches what is pending
        start = 0
        while True:
            end = block.find(b"\n", start)
            if end < 0:
                break
            raw = block[start:end]
            if pending:
                raw, pending, held = b"".join(pending) + raw, [], 0
            start = end + 1
            try:
                line = raw.rstrip(b"\r").decode("utf-8")
            except UnicodeDecodeError:
                raise UpstreamError("the Gradio app sent an event that is not UTF-8") from None
            if not line:
                if data or event:
                    yield event or "message", "\n".join(data)
                event, data, size = "", [], 0
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value[:1] == " " else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
                size += len(value) + 1             # an empty line still costs a "\n"
        if start < len(block):
            pending.append(block[start:])
            held += len(block) - start
        if held > limit or size > limit:
            raise UpstreamError("the Gradio app sent an event of over %d bytes (the limit)" % limit)
        if ended:
            return


_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # stateless


def _json_bytes(obj: Any) -> bytes:
    """Compact JSON as UTF-8; a lone surrogate (valid in JSON text, not in UTF-8) stays the
    JSON escape it came as."""
    return _COMPACT_JSON.encode(obj).encode("utf-8", "backslashreplace")


def _printable(text: Any) -> str:
    """``text`` with every character that is not printable escaped (control characters,
    line separators), for a line of a text log."""
    return repr(str(text))[1:-1]


def _json_line(obj: Any) -> str:
    """JSON for a log line: text in any script kept, but every character that is not
    printable (U+2028, C1 controls, bidi overrides) escaped, as the text format does."""
    return re.sub(r"[^\x20-\x7e]", lambda m: m.group() if m.group().isprintable() else
                  json.dumps(m.group())[1:-1], json.dumps(obj, ensure_ascii=False))


def _sse(obj: Any, event: Optional[str] = None) -> bytes:
    """One server-sent event carrying ``obj`` as compact JSON (or a literal string)."""
    payload = obj if isinstance(obj, str) else _COMPACT_JSON.encode(obj)
    head = "event: %s\n" % event if event else ""
    return ("%sdata: %s\n\n" % (head, payload)).encode("utf-8", "backslashreplace")


def _primed(items: Iterator[Any]) -> Iterator[Any]:
    """``items`` with its first item taken now, so that a failure before any output is
    raised here, where the caller can still answer it with its own status."""
    items = iter(items)
    first = next(items, _primed)

    def rest() -> Iterator[Any]:
        try:
            if first is not _primed:
                yield first
            yield from items
        finally:
            getattr(items, "close", lambda: None)()
    return rest()


class _TagReader(HTMLParser):
    """Reads the name and attributes of the first start tag it is fed."""

    tag: Optional[str] = None
    attrs: Dict[str, str] = {}             # replaced, never changed in place

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        if self.tag is None:
            self.tag, self.attrs = tag, {k: v or "" for k, v in attrs}

    handle_startendtag = handle_starttag


def _parse_tag(text: str) -> Tuple[Optional[str], Dict[str, str]]:
    """Name and attributes of the start tag ``text`` (``<details class='x'>``)."""
    reader = _TagReader()
    reader.feed(text)
    reader.close()
    return reader.tag, reader.attrs


_DETAILS_RE = re.compile(r"\s*<details\b[^>]*>", re.I)
_SUMMARY_RE = re.compile(r"\s*<summary\b[^>]*>.*?</summary>", re.I | re.S)
_DETAILS_END = "</details>"
_PARTIAL_TAG_RE = re.compile(r"<(?:d|de|det|deta|detai|detail|di|(?:details|div)"
                             r"(?:[\s/][^>]*)?)?\Z", re.I)
# The tags the app's tail may hold, by stage: the debug block's opening (its style has
# "opacity"), what the block holds, after it, the latency line's opening (its style has
# "color:#666"), what it holds, after it.
_TAIL_TAGS = (("<details",), ("<summary", "</summary>", "<pre", "</pre>", "</details>"),
              ("<div",), ("</div>",), ())


def _tail_state(text: str, start: int) -> Optional[str]:
    """Whether ``text[start:]`` is the app's tail: ``"complete"``, ``"partial"`` (the
    start of one, cut by the end of the text), or ``None``.

    The tail is the debug block, then the latency line (either may be missing): their
    tags in that order, only whitespace around them, and inside them text without ``<``
    (the app escapes it).  Model text is never parsed here: it just fails to fit."""
    stage, pos = (0 if text.startswith("<details", start) else 2), start
    while True:
        lt = text.find("<", pos)
        if stage in (0, 2, 4) and text[pos:lt if lt >= 0 else len(text)].strip():
            return None                            # text where only whitespace may stand
        if lt < 0:
            return "complete" if stage in (2, 4) else "partial"
        gt = text.find(">", lt)
        tag = (text[lt:] if gt < 0 else text[lt:gt + 1]).lower()
        if "<" in tag[1:]:
            return None
        if gt < 0:                                 # a tag still being written
            fits = any(t.startswith(tag) or (tag.startswith(t) and t[1] != "/")
                       for t in _TAIL_TAGS[stage])
            return "partial" if fits else None
        name, attrs = _parse_tag(tag)
        found = next((t for t in _TAIL_TAGS[stage]
                      if tag == t or (t[1] != "/" and "<" + (name or "") == t)), None)
        style = attrs.get("style", "").replace(" ", "")
        if found is None or (stage in (0, 2) and
                             ("opacity" if stage == 0 else "color:#666") not in style):
            return None
        stage = {0: 1, 2: 3, 3: 4}.get(stage, 2 if found == "</details>" else 1)
        pos = gt + 1


def _tail_start(text: str, final: bool) -> Optional[int]:
    """Where the app's tail begins in the answer region ``text``, if it has one: for a
    final snapshot a complete tail at its end; else also the start of one still being
    written, or a tag still being written (text that must be held back)."""
    for tag in ("<details", "<div"):               # only the last of each can be the tail
        i = text.rfind(tag)
        state = _tail_state(text, i) if i >= 0 else None
        if state == "complete" or (state == "partial" and not final):
            return i
    i = text.rfind("<")
    if not final and i >= 0 and _PARTIAL_TAG_RE.match(text, i):
        return i
    return None


@dataclass
class CleanReply:
    """The model's text found in one assistant HTML reply.

    ``answer`` is verbatim (no unescaping); ``thought`` is unescaped.  The ``*_done``
    flags say whether more may still be written to each part.
    """

    answer: str
    thought: str
    thought_done: bool = True
    answer_done: bool = True


def _split_thought(html_text: str, final: bool = True) -> Tuple[str, bool, Optional[int], bool]:
    """``(thought, closed, where the answer begins, whether the app's tail may end it)``;
    the answer's start is ``None`` while the thought (or, before the end, a tag that may
    open it) is still being written.  Only the Param app, whose replies open with its
    thought block, ends them with a tail; Gradio's own thought messages come as
    ``class='thought message'`` (see :func:`_reply_from_output`) and have none."""
    m = _DETAILS_RE.match(html_text)
    attrs = _parse_tag(m.group().strip())[1] if m else {}
    classes = attrs.get("class", "").split()
    if m is None or "thought" not in classes:     # no thought block, or (before the end) its start
        partial = m is None and not final and _PARTIAL_TAG_RE.match(html_text.lstrip())
        return ("", False, None, True) if partial else ("", True, 0, False)
    s = _SUMMARY_RE.match(html_text, m.end())
    body = s.end() if s else m.end()
    end = html_text.find(_DETAILS_END, body)
    if end < 0:                                       # still thinking
        return html.unescape(html_text[body:]).strip(), False, None, True
    thought = html.unescape(html_text[body:end]).strip()
    pos = end + len(_DETAILS_END)
    if "open" in attrs and not html_text[pos:].strip():   # still thinking
        return thought, False, None, True
    for _ in range(2):                                # the "\n\n" separator
        if html_text.startswith("\n", pos):
            pos += 1
    return thought, True, pos, "message" not in classes


def clean_reply(html_text: str) -> CleanReply:
    """Split the Param app's assistant HTML into the thought and the exact answer.

    The thought is the ``<details>`` block at the start whose class contains ``thought``;
    the answer follows it, up to the app's tail at the end: the debug ``<details>``
    (style with ``opacity``) and the latency ``<div>`` (style with ``color:#666``), found
    by their place and shape (:func:`_tail_state`).  The answer is cut out, never parsed,
    unescaped or re-serialized, so an answer about HTML (``<div>``, ``a < b``, an unclosed
    ``<span``, even the app's own markup) comes through whole.
    """
    thought, closed, pos, tail = _split_thought(html_text)
    if pos is None:
        return CleanReply("", thought, False, False)
    region = html_text[pos:]
    end = _tail_start(region, final=True) if tail else None
    if end is None:
        return CleanReply(region, thought, closed, False)
    for _ in range(2):                                # the "\n\n" separator before the tail
        if region.endswith("\n", 0, end):
            end -= 1
    return CleanReply(region[:end], thought, True, True)


def _stable_prefix(text: str) -> str:
    """The part of a growing text that no later update can change.

    Holds back a tag still being written (``<det``), then trailing whitespace (it may
    be the separator before the debug block) and U+FFFD (a half-written character).
    """
    i = text.rfind("<")
    if i >= 0 and _PARTIAL_TAG_RE.match(text, i):
        text = text[:i]
    return text.rstrip().rstrip("\ufffd").rstrip()


class _StreamCleaner:
    """Turns a reply's successive HTML snapshots into thought and answer deltas.

    Only text that no later snapshot can change is released: the answer is held back
    from wherever the app's tail could be starting, so the deltas joined equal
    :func:`clean_reply` of the final snapshot.  Once the answer streams, an update that
    only appends (a queue ``append`` diff, or a ``/call`` snapshot extending the last)
    is taken from the held-back text and the new text alone: the work per update does
    not grow with the answer.  Anything else is cleaned from the whole snapshot.
    """

    def __init__(self) -> None:
        self.thought = ""
        self._answer: List[str] = []      # the answer released so far, in pieces
        self._sent = 0                    # its length
        self._snapshot: List[str] = []    # the latest snapshot, in pieces (joined when needed)
        self._size = 0                    # its length
        self._held: Optional[str] = None  # the answer not released yet, once appends suffice
        self._tail = True                 # the app may end the reply with its tail
        self._holding = 0                 # updates the held text has waited for a tail
        self.diverged = False

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    def _whole(self) -> str:
        if len(self._snapshot) > 1:
            self._snapshot = ["".join(self._snapshot)]
        return self._snapshot[0] if self._snapshot else ""

    def update(self, html_text: str, final: bool = False) -> Tuple[str, str]:
        """Feed the latest whole snapshot; return the new ``(thought, answer)`` text."""
        if (self._held is not None and not final and len(html_text) >= self._size
                and html_text.startswith(self._whole())):
            return self.append(html_text[self._size:])
        self._snapshot, self._size = [html_text], len(html_text)
        return self._clean(html_text, final)

    def append(self, text: str) -> Tuple[str, str]:
        """Feed text appended to the last snapshot; return the new ``(thought, answer)``."""
        self._snapshot.append(text)
        self._size += len(text)
        if self._held is None:
            return self._clean(self._whole(), False)
        self._held += text
        return "", self._take()

    def _take(self) -> str:
        """Release the held-back answer up to where the tail could begin, less trailing
        whitespace (the tail's separator) and U+FFFD (a half-written character)."""
        held = self._held or ""
        end = _tail_start(held, final=False) if self._tail else None
        self._holding = self._holding + 1 if end is not None else 0
        if self._holding > 32:           # the app's tail comes in one update, not in dozens
            end = None
        stable = held[:len(held) if end is None else end].rstrip().rstrip("\ufffd").rstrip()
        self._held = held[len(stable):]
        return self._release(stable)

    def _release(self, text: str) -> str:
        if text:
            self._answer.append(text)
            self._sent += len(text)
        return text

    def _clean(self, html_text: str, final: bool) -> Tuple[str, str]:
        thought, closed, pos, self._tail = _split_thought(html_text, final)
        thought = thought if (closed or final) else _stable_prefix(thought)
        t_delta = ""
        if len(thought) > len(self.thought):
            if thought.startswith(self.thought):
                t_delta, self.thought = thought[len(self.thought):], thought
            else:
                self._diverge("thought")
        self._held = None
        if pos is None:
            return t_delta, ""
        region = html_text[pos:]
        if final:
            answer = clean_reply(html_text).answer
            if len(answer) > self._sent and answer.startswith(self.answer):
                return t_delta, self._release(answer[self._sent:])
            if answer != self.answer:
                self._diverge("answer")
            return t_delta, ""
        if not region.startswith(self.answer):
            self._diverge("answer")
            return t_delta, ""
        if not region:
            return t_delta, ""
        self._held = region[self._sent:]        # appends suffice from now on
        return t_delta, self._take()

    def _diverge(self, name: str) -> None:
        if not self.diverged:
            _log.warning("upstream rewrote %s text already sent; keeping what was sent", name)
        self.diverged = True


class _StopCutter:
    """Cuts a streamed text before the first of the stop sequences.

    Holds back the longest tail that could still grow into a stop sequence, so a stop
    split across two deltas is still caught and nothing after it is released.  Linear
    in the text: each piece is searched with the held tail only (under ``MAX_STOP``
    characters, the longest stop a request may give).
    """

    MAX_STOP = 256

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add ``text``; return what can be released now."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = 0                           # the longest tail that begins a stop
        for stop in self.stops:
            start = buf.find(stop[0], max(0, len(buf) - len(stop) + 1))
            while start >= 0 and len(buf) - start > keep:
                if stop.startswith(buf[start:]):
                    keep = len(buf) - start
                    break
                start = buf.find(stop[0], start + 1)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The end of the text: release what was held."""
        held, self.held = self.held, ""
        return "" if self.stopped else held


# Token estimator: counts by script, calibrated against tiktoken's o200k_base.  Its
# patterns are compiled on first use (re caches them): their Unicode ranges cost a tenth
# of the module's import.  Each class is found in one C-level pass over the text.
_INDIC = "\u0900-\u0DFF\uA8E0-\uA8FF\u1CD0-\u1CFF"
_CJK = "\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF\uF900-\uFAFF"
_LATIN, _PUNCT = "A-Za-z\u00C0-\u024F", "!-/:-@\\[-`{-~"

# Characters per token for the Indic blocks, by script (o200k_base has many Devanagari
# merges, fewer for the southern scripts): (the block's end, the rate).
_INDIC_CHARS_PER_TOKEN = (
    (0x0980, 3.0),   # Devanagari
    (0x0A00, 2.4),   # Bengali
    (0x0B00, 2.2),   # Gurmukhi, Gujarati
    (0x0B80, 2.0),   # Oriya
    (0x0C00, 2.7),   # Tamil
    (0x0D00, 2.2),   # Telugu, Kannada
    (0x0E00, 2.2),   # Malayalam, Sinhala
)


def estimate_tokens(text: str) -> int:
    """Estimate how many tokens ``text`` takes, by script; far closer than ``len/4``.

    Latin words cost one token up to about eight letters, more beyond; digits go in
    threes; Indic scripts by a per-script rate; CJK about one per character; runs of
    punctuation (code) about one per three characters; a run of white space one (a
    single space none); anything else one, or two past U+2000.
    """
    if not text:
        return 0
    words = re.findall("[%s]+" % _LATIN, text)
    total = len(words) + sum(len(w) - 8 for w in words if len(w) > 8) / 4.0
    total += sum((len(s) + 2) // 3 for s in re.findall("[0-9]+|[%s]+" % _PUNCT, text))
    total += sum(max(1.0, len(s) / next((r for end, r in _INDIC_CHARS_PER_TOKEN if ord(s[0]) < end),
                                        2.2)) for s in re.findall("[%s]+" % _INDIC, text))
    total += 0.8 * sum(map(len, re.findall("[%s]+" % _CJK, text)))
    total += sum(1 + s.count("\n") // 4 for s in re.findall(r"\s+", text) if s != " ")
    total += sum(1 if ord(c) < 0x2000 else 2 for c in re.findall(
        "[^%s0-9%s%s\\s%s]" % (_LATIN, _INDIC, _CJK, _PUNCT), text))
    return int(round(total))


class _Estimate:
    """The token counter when the model's tokenizer is not given: :func:`estimate_tokens`."""

    name = "estimate"
    count = staticmethod(estimate_tokens)

    @staticmethod
    def cut(text: str, n: int) -> str:
        """The longest start of ``text`` of at most ``n`` tokens (a binary search)."""
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if estimate_tokens(text[:mid]) <= n else (lo, mid - 1)
        return text[:lo]


###############################################################################
# Token counts: a Hugging Face tokenizer.json applied in pure Python ##########
###############################################################################

# Gives the ids of Hugging Face `tokenizers` (tested id for id against it) for the added
# tokens, normalizers, pre-tokenizers and BPE / Unigram models of GPT-2, Llama and
# SentencePiece conversions.  Not applied: the post-processor (BOS/EOS templates are not the
# text's tokens), truncation, padding.  Each char of a normalized piece carries the index of
# the original char it stands for, moved as tokenizers moves its alignments, so that a
# token's end offset is the library's.

_TOKENIZER_FILE_LIMIT = 64 << 20  # bytes: the largest tokenizer.json read
_WORD_CACHE_SIZE = 1 << 16        # pre-token words whose tokens are kept (LRU)
_LONG_WORD = 256                  # chars: a longer word is not cached (a BPE one is cut before
                                  # its "▁" runs first, where that is exact)
_WHITE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    map(chr, range(0x2000, 0x200B)))  # Unicode White_Space: Rust's \s and char::is_whitespace
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_BYTE_CHARS = {b: chr(256 + i) for i, b in enumerate(  # GPT-2's stand-ins for unprintable bytes
    b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or b >= 174))}
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_Aligned = Tuple[str, Sequence[int]]  # normalized text; per char, its original char's index
_Regex = Tuple["re.Pattern[str]", bool]  # compiled; True: astral chars matched by stand-ins
_Added = Dict[str, Tuple[int, bool, bool, bool]]  # content: id, single_word, lstrip, rstrip


@functools.lru_cache(maxsize=1)
def _category_runs() -> List[Tuple[int, int, str]]:
    """(first, last, category) of each run of code points of one Unicode category."""
    runs: List[Tuple[int, int, str]] = []
    for cat, group in itertools.groupby(map(unicodedata.category, map(chr, range(0x110000)))):
        first = runs[-1][1] + 1 if runs else 0
        runs.append((first, first + len(list(group)) - 1, cat))
    return runs


@functools.lru_cache(maxsize=None)
def _category_class(categories: str, bmp: bool = False) -> str:
    """Regex class body of the code points (under U+10000 if ``bmp``) whose category starts
    with one of the space-separated ``categories``: how ``\\p{..}`` is translated."""
    want, top = tuple(categories.split()), 0xFFFF if bmp else 0x10FFFF
    return "".join("\\U%08x-\\U%08x" % (a, min(b, top)) for a, b, cat in _category_runs()
                   if cat.startswith(want) and a <= top)


@functools.lru_cache(maxsize=1)
def _stand_ins() -> Dict[str, str]:
    """Per Unicode category, its last char under U+10000."""
    return {cat: chr(min(b, 0xFFFF)) for a, b, cat in _category_runs() if a <= 0xFFFF}


def _finditer(rx: _Regex, text: str) -> Iterator["re.Match[str]"]:
    """Matches of a pattern.  Python's re tries a class's ranges above U+FFFF one by one, so a
    pattern with only ASCII literals keeps the first 64K chars of its classes, and each astral
    char is matched as the stand-in of its category (one char for one: the same spans)."""
    if rx[1] and _ASTRAL.search(text):
        text = _ASTRAL.sub(lambda m: _stand_ins()[unicodedata.category(m.group())], text)
    return rx[0].finditer(text)


def _onig(pattern: str) -> _Regex:
    """Compile an Oniguruma pattern (tokenizers' regex engine) with ``re``: ``\\p{..}``,
    ``\\P{..}`` become classes from unicodedata, ``\\s``, ``\\S`` mean Unicode White_Space."""
    bmp, out, depth = pattern.isascii() and not re.search(r"\\[xuUN0-7]", pattern), [], 0
    for tok in re.findall(r"\\[pP]\{\w+\}|\\[pP]\w|\\.|\[\^?|\]|[^\\\[\]]+", pattern, re.S):
        kind, name = tok[:2], tok[3:-1] if "{" in tok else tok[2:]
        if kind not in ("\\p", "\\P", "\\s", "\\S"):
            depth += (tok[0] == "[") - (tok == "]" and depth > 0)
            out.append(tok)
            continue
        if kind in ("\\P", "\\S") and depth or kind[1] in "pP" and name not in {
                c[:k] for *_, c in _category_runs() for k in (1, 2)}:
            raise ValueError("unsupported regex class %s%s" % (tok, " inside [...]" * bool(depth)))
        body = re.escape(_WHITE) if kind[1] in "sS" else _category_class(name, bmp)
        out.append(body if depth else ("[^%s]" if kind[1] in "PS" else "[%s]") % body)
    try:
        return re.compile("".join(out)), bmp
    except re.error as e:
        raise ValueError("regex %r: %s" % (pattern, e)) from None


def _edit(src: Sequence[int], items: List[Tuple[str, int]]) -> _Aligned:
    """Apply (char, change) edits as tokenizers' NormalizedString.transform does: a char with
    change <= 0 takes the next old char's alignment and skips -change more; change 1 inserts
    a char sharing the previous old char's alignment."""
    chars, new, i = [], [], 0
    for c, d in items:
        new.append(src[i - 1 if d > 0 and i else i])
        i += 1 - d if d <= 0 else 0
        chars.append(c)
    return "".join(chars), new


def _nf(form: str, text: str, src: Sequence[int]) -> _Aligned:
    """NFC/NFD/NFKC/NFKD with the changes of the unicode-normalization-alignments crate:
    decompose, sort marks by combining class, then (C forms) recompose."""
    if unicodedata.is_normalized(form, text):
        return text, src
    ccc, nfd = unicodedata.combining, form[:-1] + "D"
    dec = [(d, int(k > 0)) for c in text for k, d in enumerate(unicodedata.normalize(nfd, c))]
    run = list(itertools.accumulate(int(not ccc(d)) for d, _ in dec))  # marks sort within a run
    items = [dec[i] for i in sorted(range(len(dec)), key=lambda i: (run[i], ccc(dec[i][0])))]
    if form[-1] == "C":
        out, comp, held, last = [], None, [], -1  # held: marks blocked from the composee
        for c, d in items:
            cc = ccc(c)
            pair = comp and last < cc and _compose(comp[0], c)
            if pair:
                comp = (pair, comp[1] + d - 1)
            elif comp and cc:
                held.append((c, d))
                last = cc
            elif cc:
                out.append((c, d))
            else:
                out += ([comp] if comp else []) + held
                comp, held, last = (c, d), [], -1
        items = out + ([comp] if comp else []) + held
    return _edit(src, items)


@functools.lru_cache(maxsize=4096)
def _compose(a: str, b: str) -> Optional[str]:
    """The primary composite of ``a`` and ``b``, if there is one."""
    c = unicodedata.normalize("NFC", a + b)
    return c if len(c) == 1 else None


def _lowercase(text: str, src: Sequence[int]) -> _Aligned:
    """Lowercase char by char, as Rust's char::to_lowercase (no final-sigma rule)."""
    low = text.lower()
    if len(low) == len(text) and "\u03a3" not in text:
        return low, src
    return _edit(src, [(x, int(k > 0)) for c in text for k, x in enumerate(c.lower())])


def _strip(left: bool, right: bool, text: str, src: Sequence[int]) -> _Aligned:
    """Strip Unicode White_Space; the chars kept keep their alignment."""
    a = len(text) - len(text.lstrip(_WHITE)) if left else 0
    b = len(text.rstrip(_WHITE)) if right else len(text)
    return text[a:b], src[a:b]


def _replace(rx: _Regex, content: str, text: str, src: Sequence[int]) -> _Aligned:
    """Replace each match by ``content``, whose chars share the alignment of the match's last."""
    old = rx[0].pattern[-1:]
    if len(content) == 1 and old and re.escape(old) == rx[0].pattern:  # one char for one char:
        return text.replace(old, content), src                          # the same alignments
    chars, new, prev = [], [], 0
    for m in _finditer(rx, text):
        chars += [text[prev:m.start()], content]
        new += list(src[prev:m.start()]) + [src[max(m.end() - 1, 0)]] * len(content)
        prev = m.end()
    return ("".join(chars) + text[prev:], new + list(src[prev:])) if chars and text else (text, src)


def _prepend(s: str, text: str, src: Sequence[int]) -> _Aligned:
    """Prepend ``s``, aligned with the first char (nothing on an empty piece)."""
    return (s + text, [src[0]] * len(s) + list(src)) if text else (text, src)


class _Charsmap:
    """SentencePiece's precompiled_charsmap: a darts-clone double array of UTF-8 keys whose
    values index NUL-ended replacements.  Applied as tokenizers' Precompiled normalizer: a
    grapheme under 6 bytes as a whole, else char by char (graphemes: a char and its marks,
    which is exact where it matters, for clusters under 6 bytes)."""

    def __init__(self, blob: bytes) -> None:
        size = struct.unpack_from("<I", blob)[0] if len(blob) >= 4 else 0
        if size < 4 or size % 4 or size + 4 > len(blob):
            raise ValueError("precompiled_charsmap is not a SentencePiece charsmap")
        self._units = struct.unpack_from("<%dI" % (size // 4), blob, 4)
        self._text = blob[4 + size:]
        self._text.decode()  # UnicodeDecodeError (a ValueError) if it is not UTF-8
        self._cluster = re.compile("\r\n|[^\\x00-\\x1f\\x7f-\\x9f\u2028\u2029][%s\u200c\u200d"
                                   "\U0001f3fb-\U0001f3ff]+" % _category_class("M"))
        self._char = functools.lru_cache(maxsize=4096)(self._lookup)

    def _lookup(self, key: str) -> Optional[str]:
        """The replacement of the shortest key that starts ``key`` (darts' first result)."""
        units, pos = self._units, self._units[0] >> 10 << ((self._units[0] & 512) >> 6)
        for c in key.encode():
            pos ^= c
            unit = units[pos] if pos < len(units) else 0
            if not c or unit & 0x800000FF != c:
                return None
            pos ^= unit >> 10 << ((unit & 512) >> 6)
            if unit >> 8 & 1:
                start = units[pos] & 0x7FFFFFFF
                end = self._text.find(b"\0", start)
                return self._text[start:end if end >= 0 else None].decode()
        return None

    def __call__(self, text: str, src: Sequence[int]) -> _Aligned:
        whole = {m.start(): m.group() for m in self._cluster.finditer(text)
                 if len(m.group().encode()) < 6 and self._lookup(m.group()) is not None}
        if not whole and all(self._char(c) is None for c in set(text)):
            return text, src
        items: List[Tuple[str, int]] = []
        i = 0
        while i < len(text):
            part = whole.get(i) or text[i]
            new = self._char(part)
            items += [(c, 0) for c in (part if new is None else new)]
            diff = 0 if new is None else len(new) - len(part)
            if diff > 0:  # tokenizers: the last chars are the added ones; a removal is told
                items[-diff:] = [(c, 1) for c, _ in items[-diff:]]
            elif diff < 0 and items:  # by the char before, even one of an earlier part
                items[-1] = (items[-1][0], items[-1][1] + diff)
            i += len(part)
        return _edit(src, items)


def _split(text: str, src: Sequence[int], rx: _Regex, matches: bool = True, gaps: bool = True
           ) -> List[_Aligned]:
    """The words of a piece: each match of ``rx`` and each gap between matches (if kept)."""
    out, prev = [], 0
    for m in _finditer(rx, text):
        a, b = m.span()
        out += [(text[prev:a], src[prev:a])] if gaps and a > prev else []
        out += [(text[a:b], src[a:b])] if matches and b > a else []
        prev = b
    return out + [(text[prev:], src[prev:])] if gaps and prev < len(text) else out


def _spaced(rep: str, scheme: str, rx: Optional[_Regex], text: str, src: Sequence[int]
            ) -> List[_Aligned]:
    """The ByteLevel (``rep`` " ") and Metaspace pre-tokenizers: spaces become ``rep``, ``rep``
    goes before a piece that lacks it (always, or at the text's start), then the words of
    ``rx``.  ByteLevel's bytes-to-chars step is done by the model, per cached word."""
    text = text.replace(" ", rep)
    if not text.startswith(rep) and (scheme == "always" or scheme == "first" and src[0] == 0):
        text, src = _prepend(rep, text, src)
    return _split(text, src, rx) if rx else [(text, src)]


def _one_of(value: Any, allowed: Sequence[Any], what: str) -> Any:
    """``value`` if it is ``allowed``; else ValueError."""
    if value not in allowed:
        raise ValueError("unsupported %s %r" % (what, value))
    return value


def _pattern(p: Dict[str, str]) -> _Regex:
    """A Split/Replace pattern: {"String": literal} or {"Regex": Oniguruma pattern}."""
    return (re.compile(re.escape(p["String"])), False) if "String" in p else _onig(p["Regex"])


_NORMALIZERS: Dict[str, Callable[[Dict[str, Any]], Callable[[str, Sequence[int]], _Aligned]]] = {
    **{f: lambda n: functools.partial(_nf, n["type"]) for f in ("NFC", "NFKC", "NFD", "NFKD")},
    "Lowercase": lambda n: _lowercase,
    "Prepend": lambda n: functools.partial(_prepend, n["prepend"]),
    "Strip": lambda n: functools.partial(_strip, n["strip_left"], n["strip_right"]),
    "Replace": lambda n: functools.partial(_replace, _pattern(n["pattern"]), n["content"]),
    "Precompiled": lambda n: _Charsmap(base64.b64decode(n["precompiled_charsmap"] or "")),
}


def _pre_tokenizer(p: Dict[str, Any]) -> Callable[[str, Sequence[int]], List[_Aligned]]:
    """One pre-tokenizer from its spec, as a function from a piece to its words."""
    if p["type"] == "ByteLevel":
        rx = _onig(_GPT2_SPLIT) if p.get("use_regex", True) else None
        scheme = "always" if p.get("add_prefix_space", True) else "never"
        return functools.partial(_spaced, " ", scheme, rx)
    if p["type"] == "Metaspace":  # its split: a word per "▁[^▁]*"
        rep = p["replacement"]
        rx = re.compile("%s[^%s]*|[^%s]+" % ((re.escape(rep),) * 3)), False
        scheme = _one_of(p.get("prepend_scheme", "always"), ("always", "first", "never"), "scheme")
        scheme = "never" if p.get("add_prefix_space") is False else scheme
        return functools.partial(_spaced, rep, scheme, rx if p.get("split", True) else None)
    if p["type"] == "Split":  # Isolated keeps the matches and the gaps, Removed one of them
        keep = _one_of(p["behavior"], ("Isolated", "Removed"), "Split behavior") == "Isolated"
        return functools.partial(_split, rx=_pattern(p["pattern"]), matches=keep or p["invert"],
                                 gaps=keep or not p["invert"])
    raise ValueError("unsupported %r" % p["type"])


class _Tokenizer:
    """A tokenizer.json applied in pure Python: ``encode`` gives each token's id and the end of
    the text it covers (in chars of the original text); ``count`` how many tokens there are."""

    @classmethod
    def load(cls, source: Union[str, "os.PathLike[str]", Dict[str, Any]]) -> "_Tokenizer":
        """Read a tokenizer.json (a path or the parsed dict); ValueError names what is wrong."""
        if not isinstance(source, dict):
            if os.path.getsize(source) > _TOKENIZER_FILE_LIMIT:
                raise ValueError("tokenizer.json: larger than %d bytes" % _TOKENIZER_FILE_LIMIT)
            try:
                with open(source, encoding="utf-8") as f:
                    source = json.load(f)
            except ValueError as e:  # also UnicodeDecodeError
                raise ValueError("tokenizer.json: not JSON: %s" % e) from None
        if not isinstance(source, dict):
            raise ValueError("tokenizer.json: not a JSON object")
        self = cls()
        for part in ("model", "normalizer", "pre_tokenizer", "added_tokens"):
            try:
                getattr(self, "_load_" + part)(source.get(part))
            except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
                why = "missing %s" % e if isinstance(e, KeyError) else str(e)
                raise ValueError("tokenizer.json: bad %s: %s" % (part, why)) from None
        self._word = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(self._tokenize_word)
        return self

    def _load_model(self, m: Dict[str, Any]) -> None:
        """BPE (vocab; merges as "a b" or ["a", "b"]) or Unigram (vocab of [piece, score])."""
        kind, self._byte_ids = m.get("type") or ("BPE" if "merges" in m else "Unigram"), None
        if kind == "Unigram":
            self._pieces = {str(p): (i, _serde_float(s)) for i, (p, s) in enumerate(m["vocab"])}
            self._unk, self._model, self._cut = m.get("unk_id"), self._unigram, None
            if self._unk is not None and not 0 <= self._unk < len(m["vocab"]):
                raise ValueError("unk_id %r is not in the vocab" % self._unk)
            self._unk_score = min(s for _, s in self._pieces.values()) - 10.0  # tokenizers' penalty
            self._longest = max(map(len, self._pieces))  # chars: Viterbi looks no further
            if m.get("byte_fallback"):
                self._byte_ids = [self._pieces.get("<0x%02X>" % b, (None,))[0] for b in range(256)]
            return
        if _one_of(kind, ("BPE",), "model") and m.get("dropout"):
            raise ValueError("BPE dropout is random")
        v = self._vocab = {str(k): int(i) for k, i in m["vocab"].items()}
        pre = m.get("continuing_subword_prefix") or ""
        self._suffix = m.get("end_of_word_suffix") or ""
        self._prefix, self._merges, crossing, self._model = pre, {}, False, self._bpe
        for rank, pair in enumerate(p for p in m["merges"] if not str(p).startswith("#version")):
            a, b = pair.split(" ") if isinstance(pair, str) else pair
            ab = a + b[len(pre):]
            if not (a in v and b in v and ab in v):
                raise ValueError("merge %r: a token not in the vocab" % (pair,))
            self._merges[v[a], v[b]] = (rank, v[ab])
            crossing = crossing or "\u2581" in ab.lstrip("\u2581")  # has "x▁"
        if m.get("unk_token") is not None and m["unk_token"] not in v:
            raise ValueError("unk_token %r is not in the vocab" % m["unk_token"])
        self._unk, self._fuse = v.get(m.get("unk_token")), m.get("fuse_unk")
        self._ignore = m.get("ignore_merges")
        if m.get("byte_fallback"):
            self._byte_ids = [v.get("<0x%02X>" % b) for b in range(256)]
        exact = "\u2581" in v and not (crossing or pre or self._suffix or self._ignore)
        self._cut = re.compile("\u2581*[^\u2581]+|\u2581+") if exact else None  # none spans "x▁"

    def _load_normalizer(self, n: Optional[Dict[str, Any]]) -> None:
        """The normalizers, in order (a Sequence flattened)."""
        self._norms = [_NORMALIZERS[n["type"]](n) if n["type"] in _NORMALIZERS else _unsupported(n)
                       for n in _flatten(n, "normalizers")]

    def _load_pre_tokenizer(self, p: Optional[Dict[str, Any]]) -> None:
        """The pre-tokenizers, in order; ByteLevel (last) makes the model see bytes."""
        pres = _flatten(p, "pretokenizers")
        self._bytes = any(p["type"] == "ByteLevel" for p in pres)
        if self._bytes and pres[-1]["type"] != "ByteLevel":
            raise ValueError("ByteLevel must be the last pre-tokenizer")
        self._pres = [_pre_tokenizer(p) for p in pres]
        self._cut = None if self._bytes else self._cut

    def _load_added_tokens(self, added: Optional[List[Dict[str, Any]]]) -> None:
        """Added tokens: those not normalized are found in the raw text, the others in each
        normalized piece (their content normalized the same way); the longest first."""
        raw: _Added = {}
        norm: _Added = {}
        for t in added or []:
            text, normalized = t["content"], t.get("normalized", not t.get("special"))
            key = self._normalize(text, range(len(text)))[0] if normalized else text
            if text:
                (norm if normalized else raw)[key] = (int(t["id"]), bool(t.get("single_word")),
                                                      bool(t.get("lstrip")), bool(t.get("rstrip")))
        longest_first = (sorted(t, key=len, reverse=True) for t in (raw, norm))
        self._raw, self._norm = ((re.compile("|".join(map(re.escape, keys))) if keys else None, t)
                                 for keys, t in zip(longest_first, (raw, norm)))
        self._word_char = re.compile("[%s\u200c\u200d]" % _category_class("L M Nd Nl Pc")) if any(
            t[1] for t in list(raw.values()) + list(norm.values())) else None  # Rust's \w

    def _normalize(self, text: str, src: Sequence[int]) -> _Aligned:
        """Apply the normalizers."""
        for f in self._norms:
            text, src = f(text, src)
        return text, src

    def _split_added(self, text: str, src: Sequence[int], rx: Optional["re.Pattern[str]"],
                     table: _Added) -> Iterator[Tuple[Optional[int], str, Sequence[int]]]:
        """Cut out the added tokens (id, or None for plain text) as AddedVocabulary does."""
        prev = 0
        for m in rx.finditer(text) if rx else ():
            (a, b), (tid, single, lstrip, rstrip) = m.span(), table[m.group()]
            word = self._word_char
            if single and (a and word.match(text, a - 1) or word.match(text, b)):
                continue
            while lstrip and a > prev and text[a - 1] in _WHITE:
                a -= 1
            while rstrip and b < len(text) and text[b] in _WHITE:
                b += 1
            if prev < a:
                yield None, text[prev:a], src[prev:a]
            yield tid, text[a:b], src[a:b]
            prev = b
        if prev < len(text):
            yield None, text[prev:], src[prev:]

    def _words(self, text: str) -> Iterator[Tuple[Optional[int], str, Sequence[int]]]:
        """Added tokens (with their id) and pre-token words (id None), in order."""
        for tid, piece, src in self._split_added(text, range(len(text)), *self._raw):
            for tid, part, psrc in [(tid, piece, src)] if tid is not None else self._split_added(
                    *self._normalize(piece, src), *self._norm):
                words = [(part, psrc)]
                for f in self._pres if tid is None else ():
                    words = [w for p in words for w in f(*p)]
                for word, wsrc in words:
                    if tid is None and self._cut and len(word) > _LONG_WORD:
                        yield from ((None, m.group(), wsrc[m.start():m.end()])
                                    for m in self._cut.finditer(word))
                    else:
                        yield tid, word, wsrc

    def encode(self, text: str) -> List[Tuple[int, int]]:
        """Each token's id and the end, in chars of ``text``, of the text it covers (a token from
        inside a char, as byte fallback makes, ends where that char ends)."""
        return [tok for tid, word, src in self._words(text) for tok in ([(tid, src[-1] + 1)]
                if tid is not None else [(t, src[k] + 1) for t, k in self._tokens(word)])]

    name = "tokenizer"                      # what x-token-counter says

    def cut(self, text: str, n: int) -> str:
        """The longest start of ``text`` of at most ``n`` tokens (a character split by
        byte tokens is left out whole)."""
        ends = [end for _, end in self.encode(text)]
        if len(ends) <= n:
            return text
        while n > 0 and ends[n - 1] == ends[n]:
            n -= 1
        return text[:ends[n - 1]] if n > 0 else ""

    def count(self, text: str) -> int:
        """How many tokens ``text`` is (no BOS/EOS)."""
        return sum(len(self._tokens(w)) if tid is None else 1 for tid, w, _ in self._words(text))

    def _tokens(self, word: str) -> Sequence[Tuple[int, int]]:
        """A word's tokens, cached unless the word is long."""
        return self._word(word) if len(word) <= _LONG_WORD else self._tokenize_word(word)

    def _tokenize_word(self, word: str) -> Tuple[Tuple[int, int], ...]:
        """A word's tokens: (id, index in ``word`` of the last char it covers)."""
        chars = word.encode().decode("latin-1").translate(_BYTE_CHARS) if self._bytes else word
        at = [k for k, c in enumerate(word) for _ in c.encode()] if chars != word else None
        return tuple((t, at[j] if at else j) for t, j in self._model(chars))

    def _bpe(self, word: str) -> List[Tuple[int, int]]:
        """Byte-pair merges, lowest rank first and leftmost on ties, as tokenizers' Word does."""
        v, n, fb, syms, unk = self._vocab, len(word), self._byte_ids, [], None
        if self._ignore and word in v:
            return [(v[word], n - 1)]
        for j, c in enumerate(word):
            s = (self._prefix if j else "") + c + (self._suffix if j == n - 1 else "")
            got = [fb[b] for b in s.encode()] if fb and s not in v else [None]  # byte fallback
            if s in v:
                syms += ([unk] if unk else []) + [(v[s], j)]
                unk = None
            elif None not in got:
                syms += [(b, j) for b in got]
            elif self._unk is not None:  # unknown chars in a row make one token if fuse_unk
                syms += [unk] if unk and not self._fuse else []
                unk = (self._unk, j)
        syms += [unk] if unk else []
        ids, ends, m = [t for t, _ in syms], [e for _, e in syms], len(syms)
        nxt, prv, get = list(range(1, m + 1)), list(range(-1, m)), self._merges.get  # prv[m]: spare
        heap = [(r[0], i, r[1]) for i in range(m - 1) for r in [get((ids[i], ids[i + 1]))] if r]
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j >= m or (get((ids[i], ids[j])) or (0, None))[1] != new:
                continue  # an outdated pair
            ids[i], ends[i], ids[j], nxt[i] = new, ends[j], None, nxt[j]
            prv[nxt[i]] = i
            for a in (prv[i], i):
                r = get((ids[a], ids[nxt[a]])) if a >= 0 and nxt[a] < m else None
                if r:
                    heapq.heappush(heap, (r[0], a, r[1]))
        return [(t, e) for t, e in zip(ids, ends) if t is not None]

    def _unigram(self, word: str) -> List[Tuple[int, int]]:
        """Viterbi over the pieces' scores (ties to the earlier start), unknown chars fused."""
        n, pieces, unk, fb = len(word), self._pieces, self._unk, self._byte_ids
        score, start, ids = [0.0] * (n + 1), [-1] * (n + 1), [0] * (n + 1)
        for i in range(n):
            for e in range(i + 1, min(n, i + self._longest) + 1):
                hit = pieces.get(word[i:e])
                if hit and (start[e] < 0 or hit[1] + score[i] > score[e]):
                    score[e], start[e], ids[e] = hit[1] + score[i], i, hit[0]
            if word[i] not in pieces and unk is None:
                raise ValueError("Unigram: %r is unknown and there is no unk_id" % word[i])
            through = score[i] + self._unk_score  # a char no piece covers alone: unknown
            if word[i] not in pieces and (start[i + 1] < 0 or through > score[i + 1]):
                score[i + 1], start[i + 1], ids[i + 1] = through, i, unk
        spans: List[List[int]] = []
        e = n
        while e > 0:
            if spans and ids[e] == unk and spans[-1][2]:
                spans[-1][0] = start[e]
            else:
                spans.append([start[e], e, ids[e] == unk])
            e = start[e]
        out: List[Tuple[int, int]] = []
        for s, e, _ in reversed(spans):
            hit = pieces.get(word[s:e])
            got = [fb[b] for b in word[s:e].encode()] if fb and not hit else [None]  # byte fallback
            out += [(b, e - 1) for b in got] if None not in got else [
                (hit[0] if hit else unk, e - 1)]
        return out


def _serde_float(x: float) -> float:
    """``x`` as tokenizers holds it: serde_json (without float_roundtrip) reads the digits of its
    shortest text as an integer, then multiplies or divides once by a power of ten, at times
    1 ulp off the true value; Unigram's near-ties are decided by that value."""
    m = re.fullmatch(r"(-?)(\d+)(?:\.(\d+))?(?:e([+-]?\d+))?", repr(float(x)))
    if not m:  # inf or nan
        return float(x)
    frac = m.group(3) or ""
    e, f = int(m.group(4) or 0) - len(frac), float(int(m.group(2) + frac))
    f = f * float("1e%d" % e) if e >= 0 else f / float("1e%d" % -e)
    return -f if m.group(1) else f


def _flatten(spec: Optional[Dict[str, Any]], key: str) -> List[Dict[str, Any]]:
    """A normalizer or pre-tokenizer spec as a list (a Sequence's parts, each flattened)."""
    if not spec:
        return []
    if spec["type"] != "Sequence":
        return [spec]
    return [x for part in spec[key] for x in _flatten(part, key)]


def _unsupported(spec: Dict[str, Any]) -> Any:
    """Refuse a normalizer or pre-tokenizer this code does not reproduce."""
    raise ValueError("unsupported %r" % spec["type"])


###############################################################################
# Objects shaped like the openai SDK's #########################################
###############################################################################

def _extension(default: Any = None) -> Any:
    """A dataclass field that is left out of the JSON while it is ``None``.

    Used for fields OpenAI does not define (``reasoning_content``), so that
    :meth:`_Object.to_dict` gives exactly the OpenAI JSON when they are unused.
    """
    return field(default=default, metadata={"omit_none": True})


@functools.lru_cache(maxsize=None)
def _json_fields(cls: type) -> Tuple[Tuple[str, bool], ...]:
    """``(name, omit_none)`` of each field, worked out once per class (a hot path)."""
    return tuple((f.name, bool(f.metadata.get("omit_none"))) for f in dataclasses.fields(cls))


class _Object:
    """Base of the response objects: attribute access plus OpenAI-exact JSON."""

    def to_dict(self) -> Dict[str, Any]:
        """The object as the OpenAI API's JSON (a fresh dict)."""
        out: Dict[str, Any] = {}
        for name, omit_none in _json_fields(type(self)):
            value = getattr(self, name)
            if value is None:
                if omit_none:
                    continue
            elif isinstance(value, (_Object, list, dict)):
                value = _to_json(value)
            out[name] = value
        return out

    def model_dump(self, **_: Any) -> Dict[str, Any]:
        """Alias of :meth:`to_dict`, as pydantic (and so the openai SDK) names it."""
        return self.to_dict()

    def model_dump_json(self, **_: Any) -> str:
        """The JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def _to_json(value: Any) -> Any:
    if isinstance(value, _Object):
        return value.to_dict()
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


@dataclass
class CompletionTokensDetails(_Object):
    """How many of the completion tokens were reasoning."""
    reasoning_tokens: int = 0


@dataclass
class CompletionUsage(_Object):
    """Token counts of one request (estimated: the upstream reports none)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: Optional[CompletionTokensDetails] = _extension()


@dataclass
class Function(_Object):
    """The function a tool call names, and its arguments as JSON text."""
    name: Optional[str] = _extension()
    arguments: str = ""


@dataclass
class ChatCompletionMessageToolCall(_Object):
    """One tool call of an assistant message."""
    id: str = ""
    type: str = "function"
    function: Function = field(default_factory=Function)


@dataclass
class ChoiceDeltaToolCall(_Object):
    """A streamed piece of a tool call: the first names it, the next add arguments."""
    index: int = 0
    id: Optional[str] = _extension()
    type: Optional[str] = _extension()
    function: Optional[Function] = _extension()


@dataclass
class ChatCompletionMessage(_Object):
    """The assistant's message in a non-streamed chat completion."""
    role: str = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None
    annotations: List[Any] = field(default_factory=list)
    tool_calls: Optional[List[ChatCompletionMessageToolCall]] = _extension()
    reasoning_content: Optional[str] = _extension()


@dataclass
class Choice(_Object):
    """One choice of a chat completion."""
    index: int = 0
    message: ChatCompletionMessage = field(default_factory=ChatCompletionMessage)
    finish_reason: Optional[str] = "stop"
    logprobs: Optional[Any] = None


@dataclass
class _Completions(_Object):
    """The fields, in their order, of a chat completion, its chunks and a text completion:
    each of those names the type of its choices and sets ``object``."""
    id: str = ""
    choices: List[Any] = field(default_factory=list)
    created: int = 0
    model: str = DEFAULT_MODEL
    object: str = ""
    system_fingerprint: Optional[str] = None
    usage: Optional[CompletionUsage] = None


@dataclass
class ChatCompletion(_Completions):
    """A non-streamed chat completion (``object: "chat.completion"``)."""
    choices: List[Choice] = field(default_factory=list)
    object: str = "chat.completion"


@dataclass
class ChoiceDelta(_Object):
    """What one streamed chunk adds to a choice."""
    role: Optional[str] = _extension()
    content: Optional[str] = _extension()
    tool_calls: Optional[List[ChoiceDeltaToolCall]] = _extension()
    reasoning_content: Optional[str] = _extension()


@dataclass
class ChunkChoice(_Object):
    """One choice of a streamed chunk."""
    index: int = 0
    delta: ChoiceDelta = field(default_factory=ChoiceDelta)
    finish_reason: Optional[str] = None
    logprobs: Optional[Any] = None


@dataclass
class ChatCompletionChunk(_Completions):
    """One streamed piece of a chat completion (``object: "chat.completion.chunk"``)."""
    choices: List[ChunkChoice] = field(default_factory=list)
    object: str = "chat.completion.chunk"


@dataclass
class CompletionChoice(_Object):
    """One choice of a legacy text completion."""
    index: int = 0
    text: str = ""
    finish_reason: Optional[str] = "stop"
    logprobs: Optional[Any] = None


@dataclass
class Completion(_Completions):
    """A legacy text completion (``object: "text_completion"``), streamed or not."""
    choices: List[CompletionChoice] = field(default_factory=list)
    object: str = "text_completion"


@dataclass
class Model(_Object):
    """One served model, as ``/v1/models`` lists it."""
    id: str = DEFAULT_MODEL
    created: int = 0
    object: str = "model"
    owned_by: str = "bharatgen"
    display_name: Optional[str] = _extension()
    # for the page (GET /v1/models): the built-in demo? the app's slider ranges? images?
    demo: Optional[bool] = _extension()
    limits: Optional[Dict[str, List[float]]] = _extension()
    images: Optional[bool] = _extension()


@dataclass
class ModelList(_Object):
    """The answer of ``/v1/models``; iterable like the SDK's page."""
    data: List[Model] = field(default_factory=list)
    object: str = "list"

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)


@dataclass
class Embedding(_Object):
    """One vector of an embeddings answer: floats, or base64 of little-endian float32s."""
    index: int = 0
    embedding: Any = field(default_factory=list)
    object: str = "embedding"


@dataclass
class EmbeddingUsage(_Object):
    """The tokens an embeddings request took."""
    prompt_tokens: int = 0
    total_tokens: int = 0


@dataclass
class CreateEmbeddingResponse(_Object):
    """The answer of ``/v1/embeddings``."""
    data: List[Embedding] = field(default_factory=list)
    model: str = DEFAULT_MODEL
    object: str = "list"
    usage: EmbeddingUsage = field(default_factory=EmbeddingUsage)


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


_FINGERPRINT = "fp_bharatgen_" + __version__.replace(".", "_")


###############################################################################
# Upstream: a Gradio client over http.client ###################################
###############################################################################

# OpenAI-side roles, and the app parameter names that take each of them.
_ROLE_NAMES = {
    "message": ("message", "msg", "prompt", "input", "query", "question", "user_message",
                "text", "user_input"),
    "system": ("system_prompt", "system_message", "system", "sys_prompt", "instructions"),
    "temperature": ("temperature", "temp"),
    "max_tokens": ("max_tokens", "max_new_tokens", "max_length", "max_output_tokens",
                   "max_completion_tokens", "max_tokens_to_generate"),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
}
_ENDPOINT_PREFERENCE = ("chat_fn_1", "chat", "chat_fn", "respond")
# The Param app's inputs, used when the app does not describe itself.
_PARAM_LAYOUT = (("message", None), ("history", []), ("system", DEFAULT_SYSTEM_PROMPT),
                 ("temperature", DEFAULT_TEMPERATURE), ("max_tokens", DEFAULT_MAX_TOKENS),
                 ("top_p", DEFAULT_TOP_P), ("top_k", DEFAULT_TOP_K))
PROTOCOLS = ("auto", "queue", "call")


@dataclass
class _AppInfo:
    """What :meth:`GradioClient.discover` learned of the app."""
    prefix: str
    version: str
    protocol: str
    endpoint: str
    history_format: str            # "parts" (Gradio 6), "messages" (5), "pairs" (4)
    inputs: List[Tuple[str, Any]] = field(default_factory=lambda: list(_PARAM_LAYOUT))
    parameters: List[Dict[str, Any]] = field(default_factory=list)
    fn_index: Optional[int] = None
    use_queue: bool = False
    send_state: bool = True
    limits: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # role -> slider range
    embedding: Optional[str] = None        # an endpoint that takes text and returns JSON

    @property
    def roles(self) -> List[str]:
        return [role for role, _ in self.inputs]

    @property
    def has_history(self) -> bool:
        """False for a ``gr.ChatInterface``, which keeps its history in a State."""
        return "history" in self.roles

    def mapping(self) -> str:
        """Where each OpenAI field goes in this app, in a line (``info`` and the log)."""
        return ", ".join("%s -> %s" % (f, "its input" if f in self.roles else
                                       "the message" if f in ("system", "history") else "nowhere")
                         for f in ("system", "history", "temperature", "max_tokens", "top_p",
                                   "top_k"))


def _normalize_base_url(url: str) -> str:
    """The app's root URL from whatever users paste: root, ``/gradio_api``, a Space."""
    url = url.strip()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", url):               # owner/space
        url = "https://huggingface.co/spaces/" + url
    m = re.match(r"https?://huggingface\.co/spaces/([\w.-]+)/([\w.-]+)", url)
    if m:
        host = ("%s-%s" % m.groups()).lower().replace("_", "-").replace(".", "-")
        url = "https://%s.hf.space" % host
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    path = re.sub(r"(/info)?(/config)?(/gradio_api)?\Z", "", parts.path.rstrip("/"))  # each once
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _redact(url: str) -> str:
    """``url`` fit to show or log: no ``user:password@``, no token in the query."""
    url = re.sub(r"//[^/@\s]*@", "//***@", url)
    return re.sub(r"(?i)([?&;][^=&\s]*(?:token|key|sig|secret|pass|auth)[^=&\s]*=)[^&;#\s]*",
                  r"\1***", url)


def _message_text(content: Any) -> str:
    """The text of a chatbot message's content: a string or a list of parts."""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content
                       if isinstance(p, dict) and p.get("type", "text") == "text")
    return content if isinstance(content, str) else (content.get("text") or "") if isinstance(
        content, dict) else ""


def _reply_from_output(output: Any) -> str:
    """The newest reply in a Gradio chat output (``[chatbot, textbox]``), as HTML.

    The chatbot value is the whole conversation; the reply is its last turn: the
    assistant messages after the last user one (none yet, before they appear).  A
    ``gr.ChatInterface`` returns the reply itself: a string, a message, or a list of them.
    Messages whose ``metadata`` has a ``title`` are Gradio's way to show the model
    thinking: they become the thought block the cleaner reads (open while ``pending``).
    """
    value = output[0] if isinstance(output, list) and output else output
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "value" in value:      # Gradio 4 "update" dicts
        value = value["value"]
    if isinstance(value, dict) and "content" in value:    # one gr.ChatMessage
        value = [value]
    if isinstance(value, list) and value and isinstance(value[-1], (list, tuple)) \
            and len(value[-1]) == 2:
        return value[-1][1] if isinstance(value[-1][1], str) else ""          # pairs
    if isinstance(value, list) and (not value or isinstance(value[-1], dict)):
        turn = list(itertools.takewhile(lambda m: isinstance(m, dict) and m.get(
            "role", "assistant") == "assistant", reversed(value)))[::-1]
        thoughts = [m for m in turn if (m.get("metadata") or {}).get("title")]
        answer = "\n\n".join(_message_text(m.get("content")) for m in turn if m not in thoughts)
        if not thoughts:
            return answer
        pending = not answer and any(m["metadata"].get("status") == "pending" for m in thoughts)
        return "<details class='thought message'%s><summary></summary>\n\n%s\n\n</details>\n\n%s" % (
            " open" if pending else "",
            html.escape("\n\n".join(_message_text(m.get("content")) for m in thoughts)), answer)
    raise UpstreamError("the Gradio app returned an output this client cannot read: %s"
                        % json.dumps(output, ensure_ascii=False)[:200])


def _reply_path(output: Any) -> Optional[List[Any]]:
    """The path of the reply's text inside output 0 (for spotting appends), if it has one."""
    value = output[0] if isinstance(output, list) and output else None
    if isinstance(value, str):
        return []
    if isinstance(value, list) and value:
        last = value[-1]
        if isinstance(last, dict) and last.get("role") == "assistant" \
                and not (last.get("metadata") or {}).get("title"):      # not a thought
            content = last.get("content")
            if isinstance(content, str):
                return [len(value) - 1, "content"]
            if isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict) \
                    and isinstance(content[0].get("text"), str):
                return [len(value) - 1, "content", 0, "text"]
        if isinstance(last, list) and len(last) == 2 and isinstance(last[1], str):
            return [len(value) - 1, 1]
    return None


def _is_append_to(diffs: Any, path: List[Any]) -> bool:
    """True if a queue update only appends a string at ``path`` of output 0."""
    return (isinstance(diffs, list) and bool(diffs) and isinstance(diffs[0], list)
            and len(diffs[0]) == 1 and len(diffs[0][0]) == 3 and diffs[0][0][0] == "append"
            and diffs[0][0][1] == path and isinstance(diffs[0][0][2], str)
            and not any(diffs[1:]))


def _upstream_error_message(payload: Any) -> str:
    """The message of a Gradio error (``/call`` event data or queue output)."""
    if isinstance(payload, dict):
        payload = payload.get("error") or payload.get("message")
    if isinstance(payload, str) and payload.strip():
        return "the Gradio app reported an error: " + payload.strip()
    return "the Gradio app failed without a message (it may hide errors; see its logs)"


def _apply_diff(value: Any, diff: List[Any]) -> Any:
    """Apply a queue-protocol diff (``[[op, path, value], ...]``) as Gradio's clients do."""
    for op, path, new in diff:
        if op not in ("replace", "append", "add", "delete")[:4 if path else 2]:
            raise UpstreamError("the Gradio app sent a diff this client cannot apply: %r" % op)
        if not path:
            value = new if op == "replace" else value + new
            continue
        target = functools.reduce(lambda t, key: t[key], path[:-1], value)
        last = int(path[-1]) if isinstance(target, list) and op in ("add", "delete") else path[-1]
        if op == "replace" or (op == "add" and not isinstance(target, list)):
            target[last] = new
        elif op == "append":
            target[last] += new
        elif op == "add":
            target.insert(last, new)
        else:
            del target[last]
    return value


class _TimedSocket:
    """A socket whose reads are bounded twice: each waits at most ``idle`` seconds, and
    none goes past the ``deadline`` set by :meth:`arm` (a total).  The module's one
    timeout mechanism, for the gateway's clients (request head and body) and for the
    upstream (response head, first output, silence between events).  Anything else is
    passed to the socket, so http.client takes it for one."""

    def __init__(self, sock: socket.socket, idle: Optional[float]) -> None:
        self.sock, self.idle = sock, idle
        self.readers, self.closing = 0, False
        self.deadline: Optional[float] = None
        self.received = 0                  # bytes read since the last arm()

    def arm(self, seconds: Optional[float]) -> None:
        """Bound the reads from now on to ``seconds`` in all (``None``: idle bound only)."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.received = 0

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        self.readers += 1
        return io.BufferedReader(_TimedReader(self))

    def close(self) -> None:
        """Closed when its readers are too (as ``socket.makefile``'s are): http.client
        closes a connection whose response says so while that response is still read."""
        self.closing = True
        if not self.readers:
            self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class _TimedReader(io.RawIOBase):
    """The raw reads of a :class:`_TimedSocket`."""

    def __init__(self, timed: _TimedSocket) -> None:
        self.timed = timed

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.timed.readers -= 1
            if self.timed.closing:
                self.timed.close()                 # closes the socket once no reader is left
        super().close()

    def readinto(self, buf: Any) -> int:
        timed = self.timed
        wait = timed.idle
        if timed.deadline is not None:
            left = timed.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the time allowed has passed")
            wait = left if wait is None else min(wait, left)
        if wait != timed.sock.gettimeout():      # a system call: only when it changes
            timed.sock.settimeout(wait)
        n = timed.sock.recv_into(buf)
        timed.received += n
        return n


class _Timed:
    """Mixed into http.client's connections: reads go through a :class:`_TimedSocket`."""

    sock: Any
    timeout: float

    def connect(self) -> None:
        super().connect()                  # type: ignore[misc]
        self.sock = _TimedSocket(self.sock, self.timeout)


class _HTTPConnection(_Timed, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Timed, http.client.HTTPSConnection):
    pass


def _net_error(exc: BaseException, timed_out: str, failed: str) -> BharatGenError:
    """The one place a socket error becomes an API error: a timeout is an
    :class:`APITimeoutError`, any other an :class:`APIConnectionError` saying why."""
    if isinstance(exc, BharatGenError):
        return exc
    if isinstance(exc, socket.timeout):
        return APITimeoutError(timed_out)
    return APIConnectionError("%s: %s" % (failed, exc))


class _HTTP:
    """A Gradio client's HTTP layer: http.client connections to one app, kept alive
    between calls (64 at rest at most), through the proxy ``urllib.request``'s settings
    name (``HTTP(S)_PROXY``, ``NO_PROXY``); every read bounded by a :class:`_TimedSocket`."""

    def __init__(self, url: str, connect_timeout: float, timeout: float, max_body: int,
                 token: Optional[str]) -> None:
        parts = urllib.parse.urlsplit(url)
        self.shown = _redact(url)                # shown and logged; credentials kept apart
        self.connect_timeout, self.timeout, self.max_body = connect_timeout, timeout, max_body
        self.token = token                       # a Hugging Face token, for private Spaces
        self.basic = self._basic(parts) if parts.username else None   # user:password@ in the URL
        self.https = parts.scheme == "https"
        self.host, self.root = parts.hostname or "127.0.0.1", parts.path
        self.port = parts.port or (443 if self.https else 80)
        self._tls = ssl.create_default_context() if self.https else None
        proxy = urllib.request.getproxies().get(parts.scheme)
        self.proxy = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy) \
            if proxy and not urllib.request.proxy_bypass(self.host) else None
        self.proxy_headers: Dict[str, str] = {"Proxy-Authorization": self._basic(self.proxy)} \
            if self.proxy is not None and self.proxy.username else {}
        self._idle: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @staticmethod
    def _basic(parts: urllib.parse.SplitResult) -> str:
        """The basic credentials of a URL's ``user:password@``."""
        user, password = urllib.parse.unquote(parts.username or ""), parts.password or ""
        return "Basic " + base64.b64encode(
            ("%s:%s" % (user, urllib.parse.unquote(password))).encode()).decode()

    def connection(self) -> http.client.HTTPConnection:
        """A kept-alive connection at rest, or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        host, port = (self.proxy.hostname or "", self.proxy.port or 80) if self.proxy \
            else (self.host, self.port)
        if not self.https:
            return _HTTPConnection(host, port, timeout=self.connect_timeout)
        conn = _HTTPSConnection(host, port, timeout=self.connect_timeout, context=self._tls)
        if self.proxy is not None:
            conn.set_tunnel(self.host, self.port, self.proxy_headers)
        return conn

    def release(self, conn: http.client.HTTPConnection,
                resp: Optional[http.client.HTTPResponse]) -> None:
        """Keep ``conn`` for the next call if its last response was read to the end."""
        if resp is not None and resp.isclosed() and conn.sock is not None:
            with self._lock:
                if len(self._idle) < 64:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        """Close the kept-alive connections at rest."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def exchange(self, conn: http.client.HTTPConnection, method: str, path: str,
                 body: Optional[Any] = None, content_type: str = "application/json"
                 ) -> Tuple[http.client.HTTPResponse, _TimedSocket]:
        """Send one request and read the response head, within ``connect_timeout`` each
        (1xx responses included).  A GET that fails on a kept-alive connection is sent
        once more on a new one; a POST never is: it may have reached the app, and a
        second would be a second job."""
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"User-Agent": "bharatgen_openai/" + __version__, "Accept-Encoding": "identity"}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = headers["X-HF-Authorization"] = "Bearer " + self.token
        elif self.basic:
            headers["Authorization"] = self.basic
        target = self.root + path
        if self.proxy is not None and not self.https:         # a plain proxy takes the URL
            target = "http://%s:%d%s" % (self.host, self.port, target)
            headers.update(self.proxy_headers)
        if conn.sock is not None:    # closed by the app while it rested? (it reads as
            try:                     # ready: the end, or bytes nobody asked for)
                with selectors.DefaultSelector() as ready:    # (select.select fails past
                    ready.register(conn.sock.sock, selectors.EVENT_READ)  # descriptor 1023)
                    dropped = bool(ready.select(0))
            except (OSError, ValueError):
                dropped = True
            if dropped:
                conn.close()                          # http.client connects it again
            else:
                conn.sock.settimeout(self.connect_timeout)    # for sending the request
        retry = method == "GET" and conn.sock is not None
        while True:
            try:
                conn.request(method, target, data, headers)
                timed = conn.sock            # kept: a response that closes drops conn.sock
                timed.arm(self.connect_timeout)
                resp = conn.getresponse()
                _log.debug("upstream %s %s%s: HTTP %d", method, self.shown, path, resp.status)
                return resp, timed
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if retry and not isinstance(exc, socket.timeout):
                    retry = False
                    continue
                if isinstance(exc, (ValueError, http.client.InvalidURL)):
                    raise UpstreamError("cannot send the request to the Gradio app: %s"
                                        % exc) from None
                raise _net_error(exc, "the Gradio app at %s did not answer within %ss" % (
                    self.shown, self.connect_timeout), "cannot reach the Gradio app at "
                    + self.shown) from None

    def read_body(self, resp: http.client.HTTPResponse, timed: _TimedSocket) -> bytes:
        """A whole response body, at most ``max_body`` bytes, within ``timeout``."""
        timed.arm(self.timeout)
        try:
            raw = resp.read(self.max_body + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _net_error(exc, "the Gradio app did not answer within %ss" % self.timeout,
                             "the Gradio app dropped the connection") from None
        if len(raw) > self.max_body:       # unread: the connection is closed, not kept
            raise UpstreamError("the Gradio app sent a body of over %d bytes (the limit)"
                                % self.max_body)
        return raw

    def call(self, method: str, path: str, body: Any = None,
             content_type: str = "application/json") -> Tuple[int, bytes]:
        """``(status, body)`` of one request."""
        conn, resp = self.connection(), None
        try:
            resp, timed = self.exchange(conn, method, path, body, content_type)
            return resp.status, self.read_body(resp, timed)
        finally:
            self.release(conn, resp)

    def json(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        """``(status, JSON or None)`` of one request."""
        status, raw = self.call(method, path, body)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None


# -- discovery: what the app offers, from /config and <prefix>/info --------------------------

def _discover(client: "GradioClient") -> _AppInfo:
    """Read ``/config`` and ``<prefix>/info``: the API prefix, the chat (or embedding)
    endpoint, its inputs (mapped to OpenAI fields by name, the rest filled with the
    app's defaults), their ranges, the history format and the protocol."""
    http, endpoint, protocol, kind = client.http, client.endpoint, client.protocol, client.kind
    status, config = http.json("GET", "/config")
    if status in (401, 403):
        raise UpstreamError("the Gradio app at %s refused access (HTTP %d); for a private "
                            "Space set HF_TOKEN" % (http.shown, status))
    config = config if status == 200 and isinstance(config, dict) else {}
    prefix = ((config.get("api_prefix") if config else client._prefix_hint) or "").rstrip("/")
    version = str(config.get("version") or "")
    status, api = http.json("GET", prefix + "/info")
    named = api.get("named_endpoints") if status == 200 and isinstance(api, dict) else None
    named = {k.strip("/"): v for k, v in (named or {}).items() if isinstance(v, dict)}
    if not config and not named:
        openai = http.json("GET", "/v1/models")[1]       # this gateway, or a peer of it?
        raise UpstreamError("%s does not answer as a Gradio app: neither /config nor %s/info "
                            "describes one%s" % (http.shown, prefix, "; it answers as an OpenAI "
                            "API: did you mean %s/v1?" % http.shown if isinstance(openai, dict) and (
                                isinstance(openai.get("data"), list) or "invalid_api_key" in str(
                                    openai.get("error"))) else ""))
    chat = _pick_endpoint(named)

    def components(e: Dict[str, Any], key: str) -> List[Any]:
        return [p.get("component") for p in e.get(key) or []]
    embedding = next((n for n, e in named.items()             # text (or a list) in, numbers out
                      if (n != chat or chat not in _ENDPOINT_PREFERENCE)     # not a chat's
                      and components(e, "parameters") in (["Textbox"], ["Json"])
                      and components(e, "returns") == ["Json"]), None)
    if kind == "embedding" and not (endpoint or embedding):
        raise NotFoundError("the Gradio app at %s has no endpoint that takes text and returns "
                            "JSON (embeddings); name one with 'endpoint'" % http.shown,
                            param="model", code="model_not_found")
    endpoint = endpoint or (embedding if kind == "embedding" else chat)
    parameters = list(named.get(endpoint, {}).get("parameters") or [])
    deps = [(d.get("id", i), d) for i, d in enumerate(config.get("dependencies") or [])
            if isinstance(d, dict) and d.get("api_name") == endpoint][:1]
    fn_index, dep = deps[0] if deps else (None, {})
    components = {c.get("id"): c for c in config.get("components") or [] if isinstance(c, dict)}
    types = [str(components.get(i, {}).get("type", "")).lower() for i in dep.get("inputs") or []]
    inputs = _layout(parameters, types, client.param_names)
    m = re.fullmatch(r"sse_v(\d+)", str(config.get("protocol") or ""))
    queue_ok = bool(m and int(m.group(1)) >= 3 and fn_index is not None)
    if protocol == "queue" and not queue_ok:
        raise UpstreamError("the Gradio app at %s does not offer the queue protocol "
                            "(protocol %r)" % (http.shown, config.get("protocol")))
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2]) or (6, 31)
    props = [components.get(i, {}).get("props") or {} for i, t in zip(dep.get("inputs") or [],
                                                                         types) if t != "state"]
    use_queue = queue_ok and protocol != "call"
    return _AppInfo(prefix=prefix, version=version, protocol=str(config.get("protocol") or ""),
                    endpoint=endpoint, history_format=_history_format(parameters, numbers[0]),
                    inputs=inputs, parameters=parameters, fn_index=fn_index,
                    use_queue=use_queue, limits=_limits(inputs, parameters, props),
                    embedding=embedding,
                    send_state=use_queue or numbers < (6, 18))  # /call wants State placeholders


def _pick_endpoint(named: Dict[str, Any]) -> str:
    """A known chat endpoint's name, else the one taking a Textbox and a Chatbot."""
    known = [name for name in _ENDPOINT_PREFERENCE if name in named]
    chats = [n for n, e in named.items()
             if {"Textbox", "Chatbot"} <= {p.get("component") for p in e.get("parameters") or []}]
    if known or len(chats) == 1:
        return (known or chats)[0]
    return next(iter(named)) if len(named) == 1 else DEFAULT_ENDPOINT


def _layout(parameters: List[Dict[str, Any]], dep_types: List[str],
            param_names: Dict[str, str]) -> List[Tuple[str, Any]]:
    """Each input's role, in order: an OpenAI field, the history, a State, or a default."""
    if not parameters:
        return list(_PARAM_LAYOUT)
    names = {alias: role for role, aliases in _ROLE_NAMES.items() for alias in aliases}
    names.update({v: k for k, v in param_names.items()})
    roles: List[Tuple[str, Any]] = []
    for p in parameters:
        name, component = str(p.get("parameter_name") or ""), str(p.get("component"))
        role = "history" if component == "Chatbot" else "multimodal" if \
            component.lower() == "multimodaltextbox" else names.get(name, "default")
        roles.append(("default" if role in (r for r, _ in roles) else role,
                      p.get("parameter_default") if p.get("parameter_has_default") else None))
    if not any(r in ("message", "multimodal") for r, _ in roles):
        for i, (role, default) in enumerate(roles):
            if role == "default" and parameters[i].get("component") == "Textbox":
                roles[i] = ("message", default)
                break
    if len(dep_types) > len(roles):              # State inputs, which /info leaves out
        it = iter(roles)
        roles = [("state", None) if t == "state" else next(it, ("state", None)) for t in dep_types]
    return roles


def _limits(inputs: List[Tuple[str, Any]], parameters: List[Dict[str, Any]],
            props: List[Dict[str, Any]]) -> Dict[str, Tuple[float, float]]:
    """The range of each sampling slider: from ``/info`` ("numeric value between 1 and
    8192"), else from the component's ``minimum``/``maximum`` in ``/config``."""
    limits: Dict[str, Tuple[float, float]] = {}
    roles = [role for role, _ in inputs if role != "state"]
    for i, (role, p) in enumerate(zip(roles, parameters)):
        kind = p.get("type") if isinstance(p.get("type"), dict) else {}
        m = re.search(r"between\s+(-?[\d.]+(?:e[-+]?\d+)?)\s+and\s+(-?[\d.]+(?:e[-+]?\d+)?)",
                      str(kind.get("description") or ""))
        bounds = m.groups() if m else ((props[i].get("minimum"), props[i].get("maximum"))
                                       if i < len(props) else (None, None))
        try:
            lo, hi = float(bounds[0]), float(bounds[1])   # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if lo <= hi and role in ("temperature", "max_tokens", "top_p", "top_k"):
            limits[role] = (lo, hi)
    return limits


def _history_format(parameters: List[Dict[str, Any]], major: int) -> str:
    """How the app's Chatbot takes a history: as ``/info``'s example shows it, else by
    the Gradio version: parts (6), messages (5), pairs (4)."""
    for p in parameters:
        example = p.get("example_input") if p.get("component") == "Chatbot" else None
        if isinstance(example, list) and example and isinstance(example[0], (list, tuple)):
            return "pairs"
        if isinstance(example, list) and example and isinstance(example[0], dict):
            return "parts" if isinstance(example[0].get("content"), list) else "messages"
    return "parts" if major >= 6 else "messages" if major == 5 else "pairs"


def _history(history: Sequence[Tuple[str, str]], fmt: str) -> List[Any]:
    """The conversation so far in the format the app's Chatbot accepts."""
    if fmt == "pairs":
        pairs: List[List[Optional[str]]] = []
        for role, text in history:
            if role == "user" or not pairs or pairs[-1][1] is not None:
                pairs.append([text, None] if role == "user" else [None, text])
            else:
                pairs[-1][1] = text
        return pairs
    return [{"role": r, "content": t if fmt == "messages" else [{"type": "text", "text": t}]}
            for r, t in history]


# -- calling: a job joined, its events streamed, cancelled if left unfinished --------------

def _vector(value: Any) -> List[float]:
    """An embedding as an app returns it: a list of at most 65,536 finite numbers (or a
    list holding one such list)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list) or not 0 < len(value) <= 65536 or not all(
            type(x) in (int, float) and math.isfinite(x) for x in value):
        raise UpstreamError("the Gradio app's embedding is not a list of numbers: %s"
                            % json.dumps(value)[:100])
    return [float(x) for x in value]


def _call_message(event: str, payload: str) -> Any:
    """A ``/call`` event as the queue message it stands for (its output whole), or None."""
    if event == "error":
        try:
            detail = json.loads(payload) if payload else None
        except ValueError:
            detail = payload
        return {"msg": "unexpected_error", "message": detail}
    if event not in ("generating", "complete"):
        return None
    try:
        output = json.loads(payload)
    except ValueError:
        raise UpstreamError("the Gradio app sent a malformed %s event: %r"
                            % (event, payload[:200])) from None
    if output is None:
        raise UpstreamError("the Gradio app cancelled the job")
    return {"msg": "process_" + ("generating" if event == "generating" else "completed"),
            "output": {"data": output}}


@dataclass
class _Progress:
    """How far one upstream job has come."""
    outputs: int = 0               # output events so far: each is due within the timeout
    done: bool = False             # its last event was read


class GradioClient:
    """Calls one chat endpoint of a Gradio app and streams the reply's HTML.

    ``base_url`` may be the app's root, its ``/gradio_api`` URL or a Hugging Face Space
    (``owner/space``).  :meth:`discover` learns once what the app offers.  Replies stream
    over the queue protocol (``/queue/join``, diffs) when the app offers it, else over
    ``/call``.  ``hf_token`` is sent as a bearer token (private Spaces), and so is
    ``HF_TOKEN`` to Hugging Face's hosts only; ``user:password@`` in the URL as basic auth.
    """

    def __init__(self, base_url: str, *, endpoint: Optional[str] = None,
                 timeout: float = 120.0, connect_timeout: float = 10.0,
                 first_event_timeout: Optional[float] = None, protocol: str = "auto",
                 param_names: Optional[Dict[str, str]] = None,
                 hf_token: Optional[str] = None, max_event_bytes: int = MAX_EVENT_BYTES,
                 max_body: int = MAX_UPSTREAM_BODY, kind: str = "chat") -> None:
        if protocol not in PROTOCOLS:
            raise ValueError("protocol must be one of %s, not %r" % (", ".join(PROTOCOLS), protocol))
        url = _normalize_base_url(base_url)
        hf_host = re.match(r"https://([\w.-]+\.)?(hf\.space|huggingface\.co)(:\d+)?(/|$)", url)
        self.http = _HTTP(url, connect_timeout, timeout, max_body, hf_token if hf_token
                          is not None or not hf_host else os.environ.get("HF_TOKEN"))
        self.base_url, self.endpoint = self.http.shown, endpoint.strip("/") if endpoint else None
        self.timeout, self.first_event_timeout = timeout, first_event_timeout or timeout
        self.protocol, self.param_names, self.kind = protocol, dict(param_names or {}), kind
        self.max_event_bytes = max_event_bytes
        self._prefix_hint = "/gradio_api" if base_url.rstrip("/").endswith("/gradio_api") else ""
        self._info: Optional[_AppInfo] = None
        self._reading: Optional[Tuple[threading.Event, List[Any]]] = None   # under way
        self._lock = threading.Lock()
        self.bytes_read = 0                      # of event streams (the server's /metrics)
        self._embedding = threading.BoundedSemaphore(8)   # embedding jobs at once

    def __repr__(self) -> str:
        return "GradioClient(%r, endpoint=%r)" % (self.base_url, self.endpoint)

    def close(self) -> None:
        """Close the keep-alive connections at rest."""
        self.http.close()

    def takes(self, role: str) -> bool:
        """Whether the app has an input for ``role`` (an OpenAI field: ``max_tokens``...)."""
        return role in self.discover().roles

    def discover(self, refresh: bool = False) -> _AppInfo:
        """What the app offers (read once, then kept; ``refresh`` reads it again).  Calls
        that come while it is read wait for that reading, and share its result or its
        error: a silent app costs them one timeout, not one each."""
        with self._lock:
            if self._info is not None and not refresh:
                return self._info
            first, (done, found) = self._reading is None, self._reading or (threading.Event(), [])
            self._reading = done, found
        if first:
            try:
                found.append(_discover(self))
            except BharatGenError as exc:
                found.append(exc)
            with self._lock:
                self._reading, self._info = None, found[0] if isinstance(
                    found[0], _AppInfo) else self._info
            done.set()
        done.wait()
        if isinstance(found[0], BharatGenError):
            raise found[0]
        return found[0]

    def stream(self, message: str, history: Sequence[Tuple[str, str]] = (), *,
               system_prompt: Optional[str] = None, temperature: Optional[float] = None,
               max_tokens: Optional[int] = None, top_p: Optional[float] = None,
               top_k: Optional[int] = None, images: Sequence[Tuple[str, str]] = (),
               uploads: Optional["_Uploads"] = None) -> Iterator[Tuple[str, bool, bool]]:
        """Call the chat endpoint; yield ``(text, is_final, is_append)`` for every update:
        the reply's whole HTML, or (``is_append``) only what was appended to it.

        Values left ``None`` take the app's defaults; ``images`` (URL, where) go to a
        multimodal input's files, each uploaded once to this app (kept in ``uploads``).
        Closing the generator closes the event stream and asks Gradio to cancel the job.
        """
        info = self.discover()
        if images and "multimodal" not in info.roles:
            raise BadRequestError("%s is an image, but this model's app takes text only"
                                  % images[0][1], param=images[0][1],
                                  code="unsupported_content_type")
        uploads = _Uploads() if uploads is None else uploads
        with uploads.lock:            # the request's n calls and repairs upload an image once
            for url, where in images:
                if (self.base_url, url) not in uploads:
                    uploads[self.base_url, url] = self._upload(info, url, where)
        data = self._data(info, message, history, {
            "system": system_prompt, "temperature": temperature, "max_tokens": max_tokens,
            "top_p": top_p, "top_k": top_k}, [uploads[self.base_url, url] for url, _ in images])
        progress = _Progress()
        return self._queue_updates(self._job(info, data, progress), progress,
                                   call=not info.use_queue)

    def embed(self, texts: Sequence[str], gone: Callable[[], bool] = lambda: False
              ) -> List[List[float]]:
        """The app's vectors of ``texts``: one call with the list when its endpoint takes
        JSON, else one call a text, eight of this app's at a time (whatever the requests),
        none started once the client is ``gone``."""
        info = self.discover()

        def output(data: List[Any]) -> Any:
            """The last output (its first value) of one job."""
            with self._embedding:
                if gone():
                    raise ConnectionAbortedError("the client went away")
                progress, value = _Progress(), None
                updates = self._queue_updates(self._job(info, data, progress), progress, lambda
                                              output: output[0] if isinstance(output, list) and
                                              output else output, not info.use_queue)
                try:
                    for value, _, _ in updates:
                        pass
                    return value
                finally:
                    updates.close()
        if info.parameters and info.parameters[0].get("component") == "Json":
            vectors = output([list(texts)])
            if not isinstance(vectors, list) or len(vectors) != len(texts):
                raise UpstreamError("the Gradio app answered %d texts with %s" % (
                    len(texts), json.dumps(vectors)[:100]))
        else:
            import concurrent.futures
            with concurrent.futures.ThreadPoolExecutor(min(8, len(texts))) as pool:
                vectors = list(pool.map(lambda text: output(
                    self._data(info, text, (), {}, [])), texts))
        return [_vector(v) for v in vectors]

    def _data(self, info: _AppInfo, message: str, history: Sequence[Tuple[str, str]],
              values: Dict[str, Any], files: Sequence[Dict[str, Any]]) -> List[Any]:
        """The endpoint's inputs: OpenAI values where given, the app's defaults elsewhere
        (a value out of a slider's range would fail there: a 400 before calling).  A
        system prompt or a history the app has no input for is folded into the message."""
        system = None if "system" in info.roles else values.get("system")
        if system or (history and not info.has_history):
            lines = ["System: " + system] if system else []
            lines += ["%s: %s" % ("User" if r == "user" else "Assistant", t)
                      for r, t in (history if not info.has_history else ())]
            message = "\n\n".join(lines + ["User: " + message])
        data: List[Any] = []
        for role, default in info.inputs:
            value = values.get(role)
            lo, hi = info.limits.get(role, (value, value))
            if value is not None and not lo <= value <= hi:
                raise BadRequestError("%s=%g is %s than this model accepts (%s %g)" % (
                    role, value, "more" if value > hi else "less", "at most" if value > hi
                    else "at least", hi if value > hi else lo), param=role, code="invalid_value")
            data += [] if role == "state" and not info.send_state else [{
                "message": message, "multimodal": {"text": message, "files": list(files)},
                "history": _history(history, info.history_format) if role == "history" else None,
            }.get(role, default if value is None else value)]
        return data

    def _upload(self, info: _AppInfo, url: str, where: str) -> Dict[str, Any]:
        """An image for a multimodal input: a ``data:`` URL uploaded to the app (Gradio's
        upload route), an http(s) URL handed over for the app to fetch."""
        meta = {"_type": "gradio.FileData"}
        if re.match(r"https?://", url, re.I):
            name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] or "image"
            return {"path": url, "url": url, "orig_name": name, "meta": meta}
        if not re.match(r"data:image/[\w.+-]+[;,]", url, re.I):
            raise BadRequestError("%s must be an image as a data: URL, or an http(s) URL" % where,
                                  param=where, code="invalid_value")
        try:
            with urllib.request.urlopen(url) as decoded:     # data: URLs only: no network
                data, kind = decoded.read(), decoded.headers.get_content_type()
        except (ValueError, OSError):
            raise BadRequestError("%s is not a valid data: URL" % where, param=where,
                                  code="invalid_value") from None
        name, boundary = "image." + (kind.split("/")[-1] if kind.startswith("image/") else
                                     "bin"), os.urandom(16).hex()
        status, raw = self.http.call("POST", info.prefix + "/upload", b"".join([
            b"--%s\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%s\"\r\n"
            b"Content-Type: %s\r\n\r\n" % (boundary.encode(), name.encode(), kind.encode()),
            data, b"\r\n--%s--\r\n" % boundary.encode()]), "multipart/form-data; boundary="
            + boundary)
        try:
            path = json.loads(raw)[0]
            assert status == 200 and isinstance(path, str)
        except (ValueError, LookupError, TypeError, AssertionError):
            raise UpstreamError("the Gradio app refused the upload of %s (HTTP %d): %s"
                                % (where, status, raw[:200].decode("utf-8", "replace")))
        return {"path": path, "orig_name": name, "mime_type": kind, "meta": meta}

    def _join(self, conn: http.client.HTTPConnection, path: str, body: Any) -> str:
        """POST a job; its ``event_id``.  503 is a full queue."""
        resp, timed = self.http.exchange(conn, "POST", path, body)
        raw = self.http.read_body(resp, timed)
        if resp.status == 503:
            raise UpstreamOverloadedError("the Gradio app's queue is full; try again later")
        if resp.status != 200:
            raise UpstreamError("the Gradio app refused the call to /%s (HTTP %d): %s"
                                % (path.rsplit("/", 1)[-1], resp.status,
                                   raw.decode("utf-8", "replace").strip()[:300]))
        try:
            return str(json.loads(raw)["event_id"])
        except (ValueError, KeyError, TypeError):
            raise UpstreamError("the Gradio app answered the call without an event_id: %r"
                                % raw[:200]) from None

    def _cancel(self, info: _AppInfo, session_hash: str, event_id: str) -> None:
        """Ask Gradio to stop a job now (best effort, in the background)."""
        def post() -> None:
            try:
                self.http.call("POST", info.prefix + "/cancel", {
                    "session_hash": session_hash, "fn_index": info.fn_index, "event_id": event_id})
            except BharatGenError:
                pass
        if info.fn_index is not None:
            threading.Thread(target=post, daemon=True, name="bharatgen-cancel").start()

    def _job(self, info: _AppInfo, data: List[Any],
             progress: _Progress) -> Iterator[Tuple[str, str]]:
        """Submit a job (``/queue/join``, or ``/call``) and yield the events of its stream:
        the first output within ``first_event_timeout``, then each silence within
        ``timeout``; a socket failure becomes the matching API error.  A finished job's
        stream is read to its end (briefly) so that its connection can be kept; a job
        left unfinished is cancelled."""
        conn, session, event_id, resp, count = self.http.connection(), os.urandom(6).hex(), None, None, [0]

        def read() -> bytes:
            block = resp.read1(65536)
            count[0] += len(block)
            return block
        try:
            if info.use_queue:
                event_id = self._join(conn, info.prefix + "/queue/join", {
                    "data": data, "fn_index": info.fn_index, "session_hash": session,
                    "event_data": None, "trigger_id": None})
                path = "%s/queue/data?session_hash=%s" % (info.prefix, session)
            else:
                path = "%s/call/%s" % (info.prefix, info.endpoint)
                event_id = session = self._join(conn, path, {"data": data})
                path += "/" + urllib.parse.quote(event_id, safe="")
            resp, timed = self.http.exchange(conn, "GET", path)
            if resp.status != 200:
                raise UpstreamError("the Gradio app refused the event stream (HTTP %d)"
                                    % resp.status)
            timed.idle = self.timeout
            timed.arm(self.first_event_timeout)
            seen, quiet, since = 0, 0, time.monotonic()
            for event in _iter_sse(read, self.max_event_bytes):
                yield event
                if progress.outputs != seen:   # the next output is due within the timeout;
                    seen, quiet, since = progress.outputs, 0, time.monotonic()
                    timed.arm(self.timeout)    # heartbeats and trickled bytes do not count
                    continue
                quiet += 1                     # events with no output: at most 200 a second
                if quiet > 1000 and quiet > 200 * (time.monotonic() - since):
                    raise UpstreamError("the Gradio app sent %d events with no output in a "
                                        "row" % quiet)
        except (OSError, http.client.HTTPException) as exc:
            raise _net_error(exc, "the Gradio app sent no output for %ss" % self.timeout
                             if progress.outputs else "the Gradio app sent no output within "
                             "%ss" % self.first_event_timeout,
                             "the Gradio app dropped the stream") from None
        finally:
            if progress.done and resp is not None and not resp.isclosed():
                try:
                    timed.arm(min(self.timeout, 1.0))
                    while read():
                        pass
                except (OSError, http.client.HTTPException):
                    pass
            with self._lock:
                self.bytes_read += count[0]
            self.http.release(conn, resp if progress.done else None)
            if event_id is not None and not progress.done:
                self._cancel(info, session, event_id)

    @staticmethod
    def _queue_updates(events: Iterator[Tuple[str, str]], progress: _Progress,
                       reply: Callable[[Any], Any] = _reply_from_output, call: bool = False
                       ) -> Iterator[Tuple[Any, bool, bool]]:
        """A job's updates (``reply`` of each output): the queue protocol's whole output,
        then the ``process_generating`` diffs applied (appends to the reply passed on as
        they are); with ``call``, the ``/call`` API's events, each holding the whole output
        (read as the queue messages they stand for: :func:`_call_message`)."""
        try:
            outputs: Any = None
            path: Optional[List[Any]] = None      # where the reply text sits in output 0
            appended: List[str] = []              # appends to it not yet applied to outputs
            for event, payload in events:
                if call:
                    msg = _call_message(event, payload)
                else:
                    try:
                        msg = json.loads(payload)
                    except ValueError:
                        raise UpstreamError("the Gradio app sent a malformed queue message: %r"
                                            % payload[:200]) from None
                kind = msg.get("msg") if isinstance(msg, dict) else None
                if kind in ("process_generating", "process_completed"):
                    progress.outputs += 1
                if kind == "process_generating":
                    got = (msg.get("output") or {}).get("data")
                    if not call and path is not None and _is_append_to(got, path):
                        appended.append(got[0][0][2])     # kept aside: no copy of the reply
                        yield got[0][0][2], False, True
                        continue
                    if outputs is None or call:
                        outputs = got
                    else:
                        if appended:
                            outputs[0] = _apply_diff(outputs[0], [["append", path, "".join(appended)]])
                            appended.clear()
                        outputs = [_apply_diff(o, d) for o, d in zip(outputs, got)]
                    path = _reply_path(outputs)
                    yield reply(outputs), False, False
                elif kind == "process_completed":
                    progress.done = True
                    output = msg.get("output") or {}
                    if not msg.get("success", True) or output.get("error") is not None:
                        raise UpstreamError(_upstream_error_message(output))
                    if output.get("data") is None:
                        raise UpstreamError("the Gradio app cancelled the job")
                    yield reply(output["data"]), True, False
                    return
                elif kind == "unexpected_error":
                    progress.done = True
                    raise UpstreamError(_upstream_error_message(msg.get("message")))
                elif kind == "close_stream":
                    break
            raise APIConnectionError("the Gradio app ended the stream before the reply was complete")
        finally:
            events.close()          # type: ignore[attr-defined]


@dataclass
class _Replica:
    """One upstream of a pool, with its health."""
    client: GradioClient
    down_until: float = 0.0
    failures: int = 0
    last_error: Optional[str] = None
    busy: bool = False            # set aside because its queue was full, not unreachable

    def state(self) -> Dict[str, Any]:
        up = self.down_until <= time.monotonic()
        return {"url": self.client.base_url,                                 # no credentials
                "status": "up" if up else "busy" if self.busy else "down",
                "failures": self.failures, "last_error": self.last_error}


class _UpstreamPool:
    """Replicas of one model: round-robin over the healthy ones, retry before output.

    A replica that cannot be reached or times out before any output is marked down for
    a back-off period (doubling, capped); one whose queue is full is set aside as busy
    for a second (it answers, so it does not make the gateway unhealthy).  Either way
    the request moves to the next one.  Once output has started, a failure is the
    client's to see.
    """

    MAX_BACKOFF = 60.0                   # the longest a replica is marked down for

    def __init__(self, clients: Sequence[GradioClient], backoff: float = 5.0) -> None:
        if not clients:
            raise ValueError("an upstream pool needs at least one upstream")
        self.replicas = [_Replica(c) for c in clients]
        self.backoff = backoff
        self._next = 0
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return ", ".join(r.client.base_url for r in self.replicas)

    def states(self) -> List[Dict[str, Any]]:
        return [r.state() for r in self.replicas]

    def takes(self, role: str) -> bool:
        """:meth:`GradioClient.takes` of the replicas (they serve one app)."""
        return self.replicas[0].client.takes(role)

    def _order(self) -> List[_Replica]:
        """The replicas to try, in order: the healthy ones round-robin, then the rest."""
        now = time.monotonic()
        with self._lock:
            up = [r for r in self.replicas if r.down_until <= now]
            start = self._next % len(up) if up else 0
            self._next += 1
        return up[start:] + up[:start] + [r for r in self.replicas if r.down_until > now]

    def _mark(self, replica: _Replica, error: Optional[BharatGenError]) -> None:
        with self._lock:
            if error is None:
                replica.failures, replica.down_until, replica.last_error = 0, 0.0, None
                replica.busy = False
                return
            replica.last_error = error.message
            replica.busy = isinstance(error, UpstreamOverloadedError)
            if replica.busy:
                delay = min(self.backoff, 1.0)
            else:
                replica.failures += 1
                delay = min(self.MAX_BACKOFF, self.backoff * 2 ** (replica.failures - 1))
            replica.down_until = time.monotonic() + delay
        _log.warning("upstream %s %s for %.0fs: %s", replica.client.base_url,
                     "set aside as busy" if replica.busy else "marked down", delay,
                     _printable(error.message))

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Tuple[str, bool, bool]]:
        """:meth:`GradioClient.stream` on the first replica that gives output."""
        return self._first(lambda client: _primed(client.stream(*args, **kwargs)))

    def embed(self, texts: Sequence[str], gone: Callable[[], bool]) -> List[List[float]]:
        """:meth:`GradioClient.embed` on the first replica that answers."""
        return self._first(lambda client: client.embed(texts, gone))

    def _first(self, call: Callable[[GradioClient], Any]) -> Any:
        error: Optional[BharatGenError] = None
        for replica in self._order():
            try:
                result = call(replica.client)
            except (APIConnectionError, UpstreamOverloadedError) as exc:
                self._mark(replica, exc)
                error = exc
                continue
            self._mark(replica, None)
            return result
        assert error is not None
        raise error


###############################################################################
# Requests: validation and the mapping of a conversation onto the app ##########
###############################################################################

_TEXT_PART_TYPES = ("text", "input_text", "output_text")
_MAX_IMAGES = 16                            # in the new message
_MEDIA_PART_TYPES = ("image_url", "input_image", "input_audio", "audio", "file", "input_file",
                     "image", "video")


def _bad(message: str, param: Optional[str], code: Optional[str] = None) -> BadRequestError:
    return BadRequestError(message, param=param, code=code or "invalid_value")


def _number(body: Dict[str, Any], name: str, lo: float, hi: float,
            integer: bool = False) -> Optional[float]:
    """``body[name]`` checked to be a number in ``[lo, hi]`` (``None`` when absent)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _bad("%r must be %s, not %s" % (name, "an integer" if integer else "a number",
                                              json.dumps(value)[:50]), name, "invalid_type")
    if not lo <= value <= hi:
        raise _bad("%r must be between %s and %s; got %s" % (name, lo, hi, value), name)
    return value


def _content_text(content: Any, param: str, allow_none: bool = False,
                  images: Optional[List[Tuple[str, str]]] = None) -> str:
    """The text of a message's ``content``: a string or a list of text parts.  With an
    ``images`` list, image parts are taken too (their URL and place go there)."""
    if content is None:
        if allow_none:
            return ""
        raise _bad("%s is required" % param, param, "missing_required_parameter")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("%s must be a string or a list of content parts" % param, param, "invalid_type")
    texts = []
    for i, part in enumerate(content):
        where = "%s[%d]" % (param, i)
        kind = part.get("type") if isinstance(part, dict) else None
        url = part.get("image_url") if kind in ("image_url", "input_image") else None
        url = url.get("url") if isinstance(url, dict) else url
        if kind in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif images is not None and isinstance(url, str):
            if len(images) == _MAX_IMAGES:     # each is uploaded to the app
                raise _bad("a message may hold at most %d images" % _MAX_IMAGES, where,
                           "too_many_images")
            images.append((url, where))
        elif kind in _MEDIA_PART_TYPES:
            raise _bad("%s is a %r part, but this model takes text only" % (where, kind),
                       where, "unsupported_content_type")
        elif kind == "refusal":
            texts.append(str(part.get("refusal") or ""))
        else:
            raise _bad("%s must be a content part like {\"type\": \"text\", \"text\": \"...\"}"
                       % where, where, "invalid_type")
    return "".join(texts)


@dataclass
class _Conversation:
    """A chat mapped onto the app's inputs: system prompt, history, new message."""
    system: Optional[str]
    history: List[Tuple[str, str]]
    message: str
    prompt_tokens: int = 0
    images: List[Tuple[str, str]] = field(default_factory=list)   # (URL, where) of the message's
    uploads: "_Uploads" = field(default_factory=lambda: _Uploads())


class _Uploads(dict):
    """A request's images as uploaded to each app: ``(app URL, image URL) -> file``."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_GO_ON = "Go on from your last reply."              # the new turn after an assistant's
_GO_ON_FORMAT = "Give your last reply again, in the output format."


def _conversation(messages: Any, param: str = "messages", max_messages: int = 1 << 30,
                  max_chars: int = 1 << 62, shaped: bool = False,
                  count: Callable[[str], int] = estimate_tokens) -> _Conversation:
    """Validate OpenAI ``messages`` and map them onto (system, history, message).

    System and developer messages, wherever they stand, are joined into the system
    prompt; consecutive messages of one role are joined.  A conversation that ends on
    the assistant's turn has it in the history, and a fixed line as the new message
    (the app has no "continue this message"): :data:`_GO_ON`, or with a format
    (``shaped``) :data:`_GO_ON_FORMAT`.
    """
    if not isinstance(messages, list) or not messages:
        raise _bad("%r must be a non-empty list of messages" % param, param,
                   "invalid_type" if not isinstance(messages, list) else "invalid_value")
    if len(messages) > max_messages:
        raise _bad("%d messages is more than this server takes (%d)" % (len(messages), max_messages),
                   param, "too_many_messages")
    system, turns, called = [], [], {}          # called: tool call id -> the function's name
    images: List[Tuple[str, str]] = []           # of the user turn under way
    tokens, chars = 3, 0
    for i, msg in enumerate(messages):
        role, text = _turn(msg, "%s[%d]" % (param, i), called, turns, images)
        tokens, chars = tokens + 4 + count(text), chars + len(text)
        if chars > max_chars:
            raise _bad("the messages are longer than this server takes (%d characters)" % max_chars,
                       param, "context_length_exceeded")
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + text)
        else:
            turns.append((role, text))
    if not turns:
        raise _bad("the messages need a user message, not only system messages", param)
    if turns[-1][0] == "assistant":
        if next(m for m in reversed(messages) if m.get("role") == "assistant").get("tool_calls"):
            raise _bad("the last message calls tools: send each call's result in a 'tool' "
                       "message after it", param, "invalid_value")
        _no_earlier_images(images)
        turns.append(("user", _GO_ON_FORMAT if shaped else _GO_ON))
    return _Conversation("\n\n".join(system) if system else None, turns[:-1], turns[-1][1],
                         tokens, images)


def _turn(msg: Any, where: str, called: Dict[str, str], turns: List[Tuple[str, str]],
          images: List[Tuple[str, str]]) -> Tuple[str, str]:
    """One message as ``(role, text)`` of the app's turns: a tool's result is the user's
    turn, an assistant's calls are ``<tool_call>`` blocks.  A user message's images go to
    ``images`` (those of an earlier user turn are refused: the app takes images with
    the new message only)."""
    if not isinstance(msg, dict):
        raise _bad("%s must be an object with 'role' and 'content'" % where, where, "invalid_type")
    role = msg.get("role")
    if role not in _ROLES:
        raise _bad("%s.role must be one of 'system', 'developer', 'user', 'assistant', "
                   "'tool'; got %s" % (where, json.dumps(role)[:40]), where + ".role")
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        raise _bad("%s.tool_call_id is required: the id of the call it answers" % where,
                   where + ".tool_call_id", "missing_required_parameter")
    if role == "tool" and msg["tool_call_id"] not in called:
        raise _bad("%s answers the tool call %s, which no earlier assistant message made"
                   % (where, json.dumps(msg["tool_call_id"])[:80]), where + ".tool_call_id",
                   "invalid_value")
    if role == "user" and turns and turns[-1][0] != "user":
        _no_earlier_images(images)
    text = _content_text(msg.get("content"), where + ".content", allow_none=role == "assistant",
                         images=images if role == "user" else None)
    if role == "assistant" and msg.get("tool_calls") is not None:
        return role, "\n".join(filter(None, [text] + _calls_text(msg["tool_calls"], where, called)))
    if role in ("tool", "function"):                      # a result, as the model reads one
        return "user", "<tool_response>\n%s\n</tool_response>" % json.dumps(
            {"name": msg.get("name") or called.get(msg.get("tool_call_id")), "content": text},
            ensure_ascii=False)
    return role, text


def _no_earlier_images(images: List[Tuple[str, str]]) -> None:
    """Images came in a user turn that is not the new message: a 400."""
    if images:
        raise _bad("%s is an image in an earlier message; the app takes images with the new "
                   "message only" % images[0][1], images[0][1], "unsupported_content_type")


def _calls_text(calls: Any, where: str, called: Dict[Any, str]) -> List[str]:
    """An assistant message's ``tool_calls`` as the ``<tool_call>`` blocks the model wrote."""
    if not isinstance(calls, list):
        raise _bad("%s.tool_calls must be a list" % where, where + ".tool_calls", "invalid_type")
    blocks = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", ""), str) or not isinstance(call.get("id"), str):
            raise _bad("%s.tool_calls[%d] must be {\"id\": ..., \"type\": \"function\", "
                       "\"function\": {\"name\": ..., \"arguments\": \"<JSON>\"}}" % (where, i),
                       "%s.tool_calls[%d]" % (where, i), "invalid_value")
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (ValueError, RecursionError):
            args = fn["arguments"]
        called[call["id"]] = fn["name"]
        blocks.append("<tool_call>\n%s\n</tool_call>" % json.dumps(
            {"name": fn["name"], "arguments": args}, ensure_ascii=False))
    return blocks


@dataclass
class _Sampling:
    """The sampling settings sent to the app, and what shapes the answer afterwards."""
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_tokens: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    n: int = 1
    max_tokens_param: str = "max_tokens"        # the name the client used for it


_IGNORED_NUMBERS = (("presence_penalty", -2, 2, False), ("frequency_penalty", -2, 2, False),
                    ("repetition_penalty", 0, 10, False), ("min_p", 0, 1, False),
                    ("seed", -(1 << 63), (1 << 64) - 1, True))


def _sampling(body: Dict[str, Any], max_tokens_names: Sequence[str]) -> _Sampling:
    """Validate the sampling fields shared by every generation endpoint."""
    s = _Sampling(temperature=_number(body, "temperature", 0, 2),
                  top_p=_number(body, "top_p", 0, 1))
    top_k = _number(body, "top_k", -1, 1000, integer=True)
    s.top_k = None if top_k is None or top_k <= 0 else int(top_k)
    for name in max_tokens_names:                 # later names win (max_completion_tokens)
        value = _number(body, name, 1, 1 << 20, integer=True)
        if value is not None:
            s.max_tokens, s.max_tokens_param = int(value), name
    s.n = int(_number(body, "n", 1, 16, integer=True) or 1)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) for x in stop):
        raise _bad("'stop' must be a string or a list of up to 4 strings", "stop")
    s.stop = list(stop)
    if any(len(x) > _StopCutter.MAX_STOP for x in s.stop):
        raise _bad("a stop sequence may have at most %d characters" % _StopCutter.MAX_STOP, "stop")
    for name, lo, hi, integer in _IGNORED_NUMBERS:
        _number(body, name, lo, hi, integer)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise _bad("logprobs are not available: the upstream app does not report them",
                   "logprobs", "unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]) or body.get("audio"):
        raise _bad("this model produces text only", "modalities", "unsupported_parameter")
    return s


def _flag(body: Dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad("%r must be a boolean" % name, name, "invalid_type")
    return default if value is None else value


def _include_usage(body: Dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    return _flag(opts or {}, "include_usage")


###############################################################################
# Tools and JSON Schema: the answer's shape, checked within bounds #############
###############################################################################

_JSON_TYPES: Dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: type(v) is int or (type(v) is float and v.is_integer()),
    "number": lambda v: type(v) in (int, float)}


def _canonical(value: Any) -> str:
    """A JSON value's text, equal for equal values: ``true`` is not ``1``, ``1`` is ``1.0``."""
    def norm(v: Any) -> Any:
        if type(v) is float and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return [norm(x) for x in v] if isinstance(v, list) else v
    return json.dumps(norm(value), sort_keys=True)


def _shown(value: Any) -> str:
    """A short view of a JSON value for an error message (a long one is not dumped whole)."""
    if isinstance(value, (dict, list)) and value:
        return "an object" if isinstance(value, dict) else "an array"
    return json.dumps(value[:60] if isinstance(value, str) else value)[:60]


def _is_multiple(v: Any, m: Any) -> bool:
    """``v`` is a multiple of ``m``: within 1e-9 for floats, exactly where floats overflow."""
    if type(v) is int and type(m) is int:
        return v % m == 0
    try:
        q = v / m
        return abs(q - round(q)) < 1e-9
    except (OverflowError, ValueError):       # 1e308 / 5e-324: exact, as fractions
        import fractions
        return fractions.Fraction(v) % fractions.Fraction(m) == 0


def _resolve(root: Any, ref: str) -> Any:
    """The schema a local ``$ref`` (``#`` or ``#/a/b``, JSON-pointer escapes) points to, or
    None."""
    target = root
    for part in ref[2:].split("/") if ref.startswith("#/") else [] if ref == "#" else [None]:
        part = part and part.replace("~1", "/").replace("~0", "~")
        target = target.get(part) if isinstance(target, dict) and part is not None else None
    return target if isinstance(target, (dict, bool)) else None


_PATTERN_WORKER = r"""
import json, re, sys
compiled = {}
for line in sys.stdin:
    pattern, text = json.loads(line)
    try:
        if pattern not in compiled:
            compiled = compiled if len(compiled) < 256 else {}
            compiled[pattern] = re.compile(pattern)
        sys.stdout.write("1\n" if compiled[pattern].search(text) else "0\n")
    except Exception:
        sys.stdout.write("e\n")
    sys.stdout.flush()
"""


class _Patterns:
    """Matches schema patterns against model text in warm worker processes.

    Python's ``re`` backtracks, holds the GIL and cannot be interrupted: ``^(a+)+$`` on 30
    characters would freeze every thread.  A worker is killed and replaced when a match
    passes its deadline.  At most ``workers`` match at once (a request waits its turn
    within its deadline); where no worker can run, nothing is matched (``None``).
    """

    def __init__(self, workers: int = 4) -> None:
        self._idle: List[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(workers)

    def search(self, pattern: str, text: str, deadline: float) -> Optional[bool]:
        """Whether ``pattern`` is found in ``text``; None if that cannot be said by
        ``deadline`` (a ``time.monotonic()``) or Python cannot compile the pattern.  Every
        worker busy until the deadline is the server's load: :class:`ServerOverloadedError`."""
        if deadline <= time.monotonic():
            return None
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ServerOverloadedError("the workers that check patterns are all busy; retry "
                                        "shortly", code="server_overloaded")
        proc, answer = None, b""
        try:
            with self._lock:
                proc = self._idle.pop() if self._idle else None
            if proc is None:
                import subprocess
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _PATTERN_WORKER],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL)
            proc.stdin.write(_json_bytes([pattern, text]) + b"\n")
            proc.stdin.flush()
            with selectors.DefaultSelector() as ready:
                ready.register(proc.stdout, selectors.EVENT_READ)
                if ready.select(max(0.0, deadline - time.monotonic())):
                    answer = proc.stdout.readline()
        except (OSError, ValueError):
            pass
        finally:
            if answer in (b"1\n", b"0\n", b"e\n"):
                with self._lock:
                    self._idle.append(proc)
            elif proc is not None:
                self._end(proc)
            self._slots.release()
        return {b"1\n": True, b"0\n": False}.get(answer)

    def close(self) -> None:
        """End the idle workers."""
        with self._lock:
            idle, self._idle = self._idle, []
        for proc in idle:
            self._end(proc)

    @staticmethod
    def _end(proc: Any) -> None:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


class _Unchecked(Exception):
    """A check that could not be finished: over its budget, or a pattern not matched."""


# The schema keywords the validator checks, in the order it checks them: for each, what
# its value must be (a predicate), or which schemas it holds ("one", "list", "map").
_IS_COUNT, _IS_NUMBER = (lambda v: type(v) is int and v >= 0), (lambda v: type(v) in (int, float))
_KEYWORDS: Dict[str, Any] = {
    "$ref": lambda v: isinstance(v, str),
    "type": lambda v: all(isinstance(k, str) and k in _JSON_TYPES
                          for k in (v if isinstance(v, list) and v else [v])),
    "enum": lambda v: isinstance(v, list), "const": lambda v: True,
    "minimum": _IS_NUMBER, "maximum": _IS_NUMBER,
    "exclusiveMinimum": lambda v: _IS_NUMBER(v) or isinstance(v, bool),
    "exclusiveMaximum": lambda v: _IS_NUMBER(v) or isinstance(v, bool),
    "multipleOf": lambda v: _IS_NUMBER(v) and v > 0,
    "minLength": _IS_COUNT, "maxLength": _IS_COUNT, "minItems": _IS_COUNT,
    "maxItems": _IS_COUNT, "minProperties": _IS_COUNT, "maxProperties": _IS_COUNT,
    "pattern": lambda v: isinstance(v, str), "uniqueItems": lambda v: isinstance(v, bool),
    "anyOf": "list", "oneOf": "list", "allOf": "list", "not": "one",
    "if": "one", "then": "one", "else": "one",
    "required": lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v),
    "dependentRequired": lambda v: isinstance(v, dict) and all(
        isinstance(x, list) and all(isinstance(k, str) for k in x) for x in v.values()),
    "propertyNames": "one", "properties": "map", "patternProperties": "map",
    "additionalProperties": "one", "prefixItems": "list", "items": "one", "contains": "one",
    "minContains": _IS_COUNT, "maxContains": _IS_COUNT,
    "$defs": "map", "definitions": "map",
}
# Annotations: they say what a value means, not what it may be (``format`` included).
_SCHEMA_NOTES = {"title", "description", "default", "format", "examples", "$schema", "$id",
                 "$comment", "deprecated", "readOnly", "writeOnly", "discriminator", "nullable",
                 "strict", "contentMediaType", "contentEncoding"}


class _Schema:
    """A JSON Schema a request brings (a tool's parameters, a response format), read once:
    malformed keywords are a 400 naming ``param``; keywords the validator does not check
    are ignored, or a 400 under ``strict``; each ``enum`` is made canonical once.

    :meth:`error` checks a value in time polynomial in schema size x value size: each
    (subschema, place in the value) pair is checked once (so ``anyOf`` over ``$ref`` cannot
    multiply), within ``STEPS`` pairs and ``SECONDS`` (pattern matching included).
    """

    STEPS = 200_000            # (subschema, place) pairs one check may visit
    SECONDS = 1.0              # what one check of a reply may take, its patterns included
    MAX_PATTERN = 1000         # characters of a pattern; a longer one is not checked
    MAX_MATCHED = 10_000       # characters of a string a pattern is applied to

    def __init__(self, schema: Any, param: str, strict: bool = False,
                 patterns: Optional[_Patterns] = None, at: str = "",
                 deadline: Optional[float] = None) -> None:
        self.root, self.param, self.strict, self.patterns = schema, param, strict, patterns
        self.deadline = deadline or time.monotonic() + self.SECONDS   # to compile patterns
        self.enums: Dict[int, Tuple[Any, str]] = {}  # id(enum or const) -> (set, message)
        self.plans: Dict[int, List[Any]] = {}        # id(subschema) -> its checks, in order
        self.pattern_chars = 0
        problem = self._read(schema, at or param, 0)
        if problem:
            raise _bad(problem, param, "invalid_schema")

    def _read(self, schema: Any, at: str, depth: int) -> Optional[str]:
        if isinstance(schema, bool):
            return None
        if not isinstance(schema, dict) or depth > 64:
            return "%s must be a JSON Schema object (at most 64 levels deep)" % at
        for key, value in schema.items():
            rule, where = _KEYWORDS.get(key), "%s.%s" % (at, key)
            if rule is None:
                if self.strict and key not in _SCHEMA_NOTES:
                    return "%s: this server cannot check the keyword %r" % (at, key)
                continue
            subs = {"one": lambda: [(where, value)],
                    "list": lambda: [("%s[%d]" % (where, i), v) for i, v in enumerate(value)],
                    "map": lambda: [("%s.%s" % (where, k), v) for k, v in value.items()]}
            ok = (isinstance(value, {"list": list, "map": dict}.get(rule, object))
                  and (rule != "list" or bool(value))) if isinstance(rule, str) else rule(value)
            if not ok:
                return "%s is not a valid %r" % (where, key)
            for sub_at, sub in subs[rule]() if isinstance(rule, str) else ():
                problem = self._read(sub, sub_at, depth + 1)
                if problem:
                    return problem
            for name in (value if key == "patternProperties" else [value] if key == "pattern"
                         else ()):
                problem = self._pattern_problem(name, where)
                if problem:
                    return problem
            if key in ("enum", "const"):
                items = value if key == "enum" else [value]
                self.enums[id(value)] = (frozenset(map(_canonical, items)), (
                    " one of " if key == "enum" else " ") + json.dumps(value)[:200])
        self.plans[id(schema)] = list(dict.fromkeys(
            _SCHEMA_CHECKS[k] for k in _KEYWORDS if k in schema and k in _SCHEMA_CHECKS))
        return None

    def _pattern_problem(self, pattern: str, where: str) -> Optional[str]:
        """A schema's patterns: 64 KB in all at most.  One Python cannot compile (ECMA-262
        syntax it lacks) is not checked, or under ``strict`` is a 400; it is compiled in a
        pattern worker, as costly patterns take long to compile too."""
        self.pattern_chars += len(pattern)
        if self.pattern_chars > 1 << 16:
            return "%s: the schema's patterns are over 64 KB in all" % where
        ok = not self.strict or len(pattern) <= self.MAX_PATTERN and self.patterns is not None \
            and self.patterns.search(pattern, "", self.deadline) is not None
        return None if ok else "%s: the pattern %r cannot be checked here" % (where, pattern[:100])

    def error(self, value: Any, at: str = "$") -> Optional[str]:
        """Why ``value`` does not fit the schema, or None if it does."""
        state = {"memo": {}, "steps": 0, "deadline": time.monotonic() + self.SECONDS}
        try:
            return self._check(value, self.root, at, state)
        except RecursionError:            # a schema or a value nested past Python's stack
            return "it is nested too deeply to check"
        except _Unchecked as exc:
            if exc.args[0] is None:
                return "it is too large to check against the schema (%d steps, %gs)" % (
                    self.STEPS, self.SECONDS)
            raise _bad("%s: %s" % (self.param, exc.args[0]), self.param, "invalid_schema") from None

    def _match(self, pattern: str, text: str, state: Dict[str, Any]) -> bool:
        self._spend(state)
        found = self.patterns.search(pattern, text, state["deadline"]) if (
            self.patterns is not None and len(text) <= self.MAX_MATCHED
            and len(pattern) <= self.MAX_PATTERN) else None
        if found is None and self.strict:
            raise _Unchecked("the pattern %r could not be matched within %gs"
                             % (pattern[:100], self.SECONDS))
        return found is not False                    # None: not checked, taken as it is

    def _spend(self, state: Dict[str, Any]) -> None:
        """One step of the budget: ``STEPS`` in all, ``SECONDS`` looked at every 256."""
        state["steps"] += 1
        if state["steps"] > self.STEPS or (state["steps"] % 256 == 0
                                           and time.monotonic() > state["deadline"]):
            raise _Unchecked(None)

    def _check(self, value: Any, schema: Any, at: str, state: Dict[str, Any]) -> Optional[str]:
        if schema is True or schema is False:
            return None if schema else "%s is not allowed" % at
        memo, key = state["memo"], (id(schema), id(value), at)   # the place: the value's
        if key in memo:                                          # object (and its path)
            return "%s: the schema loops" % at if memo[key] is None else memo[key] or None
        self._spend(state)
        memo[key] = None                             # under way: met again, it loops
        error = next(filter(None, (check(self, value, schema, at, state)
                                   for check in self.plans[id(schema)])), None)
        memo[key] = error or ""
        return error


def _check_ref(v: _Schema, value: Any, schema: Dict[str, Any], at: str, state: Any) -> Optional[str]:
    target = _resolve(v.root, schema["$ref"])
    if not isinstance(target, bool) and (id(target) not in v.plans
                                         or state["memo"].get((id(target), id(value), at),
                                                              "") is None):
        return "%s: the schema's $ref %r cannot be followed" % (at, schema["$ref"])
    return v._check(value, target, at, state)


def _check_properties(v: _Schema, value: Any, schema: Dict[str, Any], at: str,
                      state: Any) -> Optional[str]:
    """``required``, ``dependentRequired``, ``propertyNames``, ``properties``,
    ``patternProperties`` and ``additionalProperties``, once for an object."""
    if not isinstance(value, dict):
        return None
    for name in schema.get("required") or ():
        if name not in value:
            return "%s is missing the required property %r" % (at, name)
    for name, needs in (schema.get("dependentRequired") or {}).items():
        for other in needs if name in value else ():
            if other not in value:
                return "%s has %r, so it needs the property %r" % (at, name, other)
    props, patterns = schema.get("properties") or {}, schema.get("patternProperties") or {}
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        where = "%s.%s" % (at, name)
        if "propertyNames" in schema:
            error = v._check(name, schema["propertyNames"], where + " (its name)", state)
            if error:
                return error
        subs = [props[name]] if name in props else []
        subs += [s for p, s in patterns.items() if v._match(p, name, state)]
        for sub in subs or [extra]:
            error = v._check(item, sub, where, state)
            if error:
                return error if subs or extra is not False else \
                    "%s is not a property the schema allows" % where
    return None


def _check_items(v: _Schema, value: Any, schema: Dict[str, Any], at: str,
                 state: Any) -> Optional[str]:
    """``prefixItems``, ``items``, ``contains``, ``minContains`` and ``maxContains``, once."""
    if not isinstance(value, list):
        return None
    first = schema.get("prefixItems") or []
    for i, item in enumerate(value):
        error = v._check(item, first[i] if i < len(first) else schema.get("items", True),
                         "%s[%d]" % (at, i), state)
        if error:
            return error
    if "contains" in schema:
        n = sum(not v._check(item, schema["contains"], "%s[%d]" % (at, i), state)
                for i, item in enumerate(value))
        low, high = schema.get("minContains", 1), schema.get("maxContains", n)
        if not low <= n <= high:
            return "%s should hold %s %d items that fit its 'contains' schema, not %d" % (
                at, "at least" if n < low else "at most", low if n < low else high, n)
    return None


def _check_bounds(v: _Schema, value: Any, schema: Dict[str, Any], at: str,
                  state: Any) -> Optional[str]:
    """The numeric bounds and the length, item and property counts, once."""
    if type(value) in (int, float):
        for key, ok in (("minimum", lambda b: value >= b), ("maximum", lambda b: value <= b),
                        ("exclusiveMinimum", lambda b: value > b),
                        ("exclusiveMaximum", lambda b: value < b),
                        ("multipleOf", lambda b: _is_multiple(value, b))):
            bound = schema.get(key)
            if type(bound) in (int, float) and not ok(bound):
                return "%s should be %s %s" % (at, key, bound)
    kind = {str: "Length", list: "Items", dict: "Properties"}.get(type(value))
    for key, sign in (("min%s" % kind, 1), ("max%s" % kind, -1)) if kind else ():
        if key in schema and (len(value) - schema[key]) * sign < 0:
            return "%s should have a %s of %d" % (at, key, schema[key])
    return None


# How each keyword is checked: (validator, value, schema, place, state) -> an error or None.
# Keywords checked together (the bounds, an object's, an array's) share one check.
_SCHEMA_CHECKS: Dict[str, Callable[..., Optional[str]]] = {
    "$ref": _check_ref,
    "type": lambda v, value, s, at, _: None if any(
        _JSON_TYPES[k](value) for k in (s["type"] if isinstance(s["type"], list) else [s["type"]]))
    else "%s should be of type %s, not %s" % (at, " or ".join(
        s["type"] if isinstance(s["type"], list) else [s["type"]]), _shown(value)),
    "enum": lambda v, value, s, at, _: None if _canonical(value) in v.enums[id(s["enum"])][0]
    else "%s should be%s" % (at, v.enums[id(s["enum"])][1]),
    "const": lambda v, value, s, at, _: None if _canonical(value) in v.enums[id(s["const"])][0]
    else "%s should be%s" % (at, v.enums[id(s["const"])][1]),
    **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                     "minLength", "maxLength", "minItems", "maxItems", "minProperties",
                     "maxProperties"), _check_bounds),
    "pattern": lambda v, value, s, at, state: None if not isinstance(value, str) or v._match(
        s["pattern"], value, state) else "%s should match the pattern %r" % (at, s["pattern"]),
    "uniqueItems": lambda v, value, s, at, _: "%s should hold no item twice" % at if (
        s["uniqueItems"] and isinstance(value, list)
        and len(set(map(_canonical, value))) < len(value)) else None,
    "anyOf": lambda v, value, s, at, state: "%s fits none of the schemas it may take" % at if all(
        v._check(value, sub, at, state) for sub in s["anyOf"]) else None,
    "oneOf": lambda v, value, s, at, state: None if sum(
        not v._check(value, sub, at, state) for sub in s["oneOf"]) == 1
    else "%s should fit exactly one of the schemas it may take" % at,
    "allOf": lambda v, value, s, at, state: next(filter(None, (
        v._check(value, sub, at, state) for sub in s["allOf"])), None),
    "not": lambda v, value, s, at, state: None if v._check(value, s["not"], at, state)
    else "%s should not fit the schema it is told not to" % at,
    "if": lambda v, value, s, at, state: v._check(value, s.get(
        "else" if v._check(value, s["if"], at, state) else "then", True), at, state),
    **dict.fromkeys(("required", "dependentRequired", "propertyNames", "properties",
                     "patternProperties", "additionalProperties"), _check_properties),
    **dict.fromkeys(("prefixItems", "items", "contains"), _check_items),
}


def _no_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


_JSON_STRICT = json.JSONDecoder(parse_constant=_no_constant)     # NaN, Infinity: not JSON


def _json_in(text: str) -> Optional[Tuple[Any, str]]:
    """``(value, its JSON text)`` of the first JSON object or array in a reply: inside
    a code fence if there is one, else the first ``{`` or ``[`` that starts one."""
    fence = re.search(r"```(?:json)?\s*\n(.*?)```", text, re.S)
    text = fence.group(1) if fence else text
    for tries, m in enumerate(re.finditer(r"[{\[]", text)):
        if tries == 64 or tries * len(text) > 1 << 22:   # 64 starts, 4M characters read
            break
        try:
            value, end = _JSON_STRICT.raw_decode(text, m.start())
        except (ValueError, RecursionError):
            continue
        return value, text[m.start():end]
    return None


_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_CALL_OPEN = "<tool_call>"
_CALL_BLOCK = re.compile(r"<tool_call>\s*(\{.*?)(?:</tool_call>|\Z)", re.S)  # a JSON object in it
_REPAIR = "Your last reply was not valid: %s. Reply again, correctly."


@dataclass
class _Shape:
    """What a request asks of the answer's shape: tool calls and structured output.

    The model is told in the system prompt (Hermes-style ``<tool_call>`` blocks, the
    convention open models know best); what comes back is checked against the tools'
    and the format's JSON Schemas, with ``repairs`` more turns to fix a bad reply.
    """
    tools: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> function spec
    checks: Dict[str, _Schema] = field(default_factory=dict)       # name -> its parameters'
    choice: str = "auto"             # auto, required, none, or the one tool's name
    parallel: bool = True
    fmt: Optional[Dict[str, Any]] = None    # {"schema": ..., "strict": bool, "check": _Schema}
    repairs: int = 1
    streamed: bool = True            # else the answer is held whole until it is checked

    @property
    def calls(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def hold_all(self) -> bool:
        """Whether no text can go out before the reply is checked whole."""
        return self.fmt is not None or (self.calls and self.choice != "auto") or not self.streamed

    def instructions(self) -> str:
        """What the system prompt adds so that the model answers in shape."""
        parts = []
        if self.calls:
            specs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                              for f in self.tools.values())
            must = {"auto": "", "required": " You must call at least one function."}.get(
                self.choice, " You must call the function %r." % self.choice)
            parts.append(
                "# Tools\n\nYou may call one or more functions to assist with the user query."
                "%s%s\n\nYou are provided with function signatures within <tools></tools> XML "
                "tags:\n<tools>\n%s\n</tools>\n\nFor each function call, return a json object "
                "with function name and arguments within <tool_call></tool_call> XML tags:\n"
                "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
                "</tool_call>" % (must, "" if self.parallel else " Call at most one function.",
                                  specs))
        if self.fmt is not None:
            schema = self.fmt["schema"]
            parts.append("# Output format\n\nReply with JSON only, no other text: " + (
                "one JSON value valid against this JSON Schema:\n" + json.dumps(
                    schema, ensure_ascii=False) if schema else "one JSON object."))
        return "\n\n".join(parts)

    def check(self, text: str) -> Tuple[Optional[str], List[Dict[str, str]], Optional[str]]:
        """``(content, calls, error)`` of a whole reply; an error says what to repair."""
        try:
            return self._check(text)
        except RecursionError:            # a schema or a value nested past Python's stack
            return None, [], "it is nested too deeply to check"

    def _check(self, text: str) -> Tuple[Optional[str], List[Dict[str, str]], Optional[str]]:
        if self.calls:
            blocks, rest = _CALL_BLOCK.findall(text), _CALL_BLOCK.sub("", text)
            if not blocks and self.choice != "auto":     # a bare JSON call, when one is due
                found = _json_in(text)
                blocks, rest = ([found[1]], text.replace(found[1], "", 1)) if found else ([], text)
            if blocks or self.choice != "auto":
                calls, error = self._calls(blocks)
                return re.sub(r"```\w*\s*```", "", rest) if error is None else None, calls, error
        if self.fmt is not None:
            found = _json_in(text)
            if found is None:
                return None, [], "it holds no JSON"
            error = self.fmt["check"].error(found[0])
            return (found[1], [], None) if error is None else (None, [], error)
        return text, [], None

    def _calls(self, blocks: List[str]) -> Tuple[List[Dict[str, str]], Optional[str]]:
        if not blocks:
            return [], "it calls no function, and a function call is required"
        if len(blocks) > 1 and not self.parallel:
            return [], "it calls %d functions; call at most one" % len(blocks)
        calls = []
        for block in blocks:
            try:
                call = _JSON_STRICT.decode(block.strip())
            except (ValueError, RecursionError):
                return [], "a tool call is not valid JSON: %s" % block.strip()[:200]
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return [], "a tool call must be a JSON object with \"name\" and \"arguments\""
            name, args = call["name"], call.get("arguments", call.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = _JSON_STRICT.decode(args)
                except (ValueError, RecursionError):
                    return [], "the arguments of %s are not valid JSON" % name
            if name not in self.tools or self.choice not in ("auto", "required", name):
                return [], "%r is not a function you may call here; call one of %s" % (
                    name[:64], ", ".join(self.tools if self.choice in ("auto", "required")
                                         else [self.choice]))
            error = self.checks[name].error(args, at="arguments")
            if error:
                return [], "the call of %s is invalid: %s" % (name, error)
            calls.append({"id": _new_id("call_"), "name": name,
                          "arguments": json.dumps(args, ensure_ascii=False)})
        return calls, None


def _shape(body: Dict[str, Any], repairs: int, patterns: Optional[_Patterns] = None) -> _Shape:
    """The tools, tool choice and response format of a chat request, validated."""
    shape = _Shape(repairs=repairs, parallel=_flag(body, "parallel_tool_calls", True))
    deadline = time.monotonic() + _Schema.SECONDS       # all its patterns compiled by then
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise _bad("%r is the deprecated form of 'tools' and 'tool_choice'; send those"
                       % name, name, "unsupported_parameter")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("'tools' must be a list of tools", "tools", "invalid_type")
    for i, tool in enumerate(tools or ()):
        fn = tool.get("function") if isinstance(tool, dict) else None
        where = "tools[%d]" % i
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _bad("%s must be {\"type\": \"function\", \"function\": {...}}; this server "
                       "calls functions only" % where, where, "invalid_value")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _bad("%s.function.name must be 1 to 64 letters, digits, '_', '.' or '-'"
                       % where, where + ".function.name", "invalid_value")
        shape.checks[name] = _Schema(fn.get("parameters", {}), where + ".function.parameters",
                                     fn.get("strict") is True, patterns, deadline=deadline)
        if name in shape.tools:
            raise _bad("%s repeats the function name %r" % (where, name), where, "invalid_value")
        shape.tools[name] = {k: fn[k] for k in ("name", "description", "parameters") if k in fn}
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _bad("tool_choice of type %s is not supported; send 'none', 'auto', "
                       "'required' or {\"type\": \"function\", ...}" % json.dumps(
                           choice.get("type"))[:40], "tool_choice", "invalid_value")
        choice = (choice.get("function") or {}).get("name") if isinstance(
            choice.get("function"), dict) else choice.get("name")
        if choice not in shape.tools:
            raise _bad("tool_choice names %s, which is not in 'tools'" % json.dumps(choice)[:80],
                       "tool_choice", "invalid_value")
    elif choice not in (None, "auto", "none", "required"):
        raise _bad("'tool_choice' must be 'none', 'auto', 'required' or a named function",
                   "tool_choice", "invalid_value")
    elif choice == "required" and not shape.tools:
        raise _bad("tool_choice 'required' needs 'tools'", "tool_choice", "invalid_value")
    shape.choice = choice or "auto"
    shape.fmt = _format(body.get("response_format"), patterns, deadline)
    return shape


def _format(fmt: Any, patterns: Optional[_Patterns],
            deadline: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """A chat request's ``response_format``: ``{"schema", "strict", "check"}`` when it
    asks for JSON, else None."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad("response_format of type json_schema needs 'json_schema': {\"name\", "
                       "\"schema\", \"strict\"}", "response_format", "missing_required_parameter")
        schema, strict = spec.get("schema") or {"type": "object"}, spec.get("strict") is True
        return {"schema": schema, "strict": strict, "check": _Schema(
            schema, "response_format", strict, patterns, "response_format.json_schema.schema",
            deadline)}
    if kind == "json_object":
        return {"schema": None, "strict": False, "check": _Schema({"type": "object"}, "r")}
    if fmt is not None and kind != "text":
        raise _bad("'response_format' must have type 'text', 'json_object' or 'json_schema'",
                   "response_format", "invalid_value")
    return None


###############################################################################
# The engine: upstream snapshots -> clean deltas, shared by SDK and server #####
###############################################################################

def _after(sent: str, text: str) -> str:
    """What of a later reply's ``text`` is still to go out after ``sent``: what was
    sent already is not sent twice."""
    done, text = sent.strip(), text.strip()
    if done and text.startswith(done):
        text = text[len(done):].lstrip()
    return "\n\n" + text if text and done else text


@dataclass
class _Piece:
    """One step of a generated choice: ``kind`` is reasoning, content, tool_call
    (``call`` holds its id, name and arguments) or finish."""
    index: int
    kind: str
    text: str
    call: Optional[Dict[str, str]] = None


class _Held:
    """Splits an answer into text that may go out now and text held until the whole
    reply is checked: from a possible ``<tool_call>`` on (and trailing white space),
    or all of it."""

    def __init__(self, hold_all: bool) -> None:
        self.held: List[str] = []          # pieces, joined once: a long reply stays linear
        self.holding = hold_all

    @property
    def rest(self) -> str:
        return "".join(self.held)

    def feed(self, text: str) -> str:
        self.held.append(text)
        if self.holding:
            return ""
        rest = self.rest                   # short here: at most a possible call's start
        cut = rest.find(_CALL_OPEN)
        self.holding = cut >= 0
        if cut < 0:                        # a tail that may begin a call is held too
            cut = next((len(rest) - k for k in range(min(len(_CALL_OPEN) - 1, len(rest)), 0, -1)
                        if rest.endswith(_CALL_OPEN[:k])), len(rest))
        cut = len(rest[:cut].rstrip())
        self.held = [rest[cut:]]
        return rest[:cut]


class _Budget:
    """``max_tokens`` kept by the gateway, for an app that cannot limit its answer: the
    thought and the answer (OpenAI counts both) are cut where they reach it."""

    def __init__(self, limit: int, counter: Any = _Estimate) -> None:
        self.left, self.counter = limit, counter

    def take(self, text: str) -> str:
        """What of ``text`` fits: all of it, or its longest start within the budget (each
        piece counted alone: a token across two pieces counts twice, never too few)."""
        n = self.counter.count(text)
        if n <= self.left:
            self.left -= n
            return text
        text, self.left = self.counter.cut(text, self.left).rstrip(), 0
        return text


class _Generation:
    """Runs ``n`` upstream calls for one request and yields their pieces interleaved.

    Each choice's HTML snapshots pass through a :class:`_StreamCleaner` and a
    :class:`_StopCutter`; a stop sequence or :meth:`close` ends the upstream call at
    once.  Streamed and non-streamed answers come from this one path, so they agree.
    """

    def __init__(self, client: Any, conv: _Conversation, sampling: _Sampling,
                 system_default: Optional[str], shape: Optional[_Shape] = None,
                 counter: Any = _Estimate) -> None:
        self.client, self.conv, self.sampling, self.counter = client, conv, sampling, counter
        self.system = conv.system if conv.system is not None else system_default
        self.shape = shape if shape is not None and (shape.calls or shape.fmt) else None
        if self.shape is not None:
            self.system = "\n\n".join(filter(None, [self.system, self.shape.instructions()]))
        self.thought: List[List[str]] = [[] for _ in range(sampling.n)]
        self.answer: List[List[str]] = [[] for _ in range(sampling.n)]
        self._closed = threading.Event()
        self._counts: Dict[Tuple[int, int, int], int] = {}   # see _tokens
        self.gone: Callable[[], bool] = lambda: False   # the client left (the server says)
        self._looked = 0.0

    def _choice(self, index: int) -> Iterator[_Piece]:
        """One choice's pieces; in shape (tools, JSON) after up to ``repairs`` more turns.

        Text that cannot be part of a call streams as it comes in the first reply; a
        repair's text is held, and none already sent is sent twice.  A reply that is
        never in shape is the first reply's text, or a 502 when a call or strict JSON
        is due; a reply cut by ``max_tokens`` is returned as it is, with "length".
        """
        shape, conv = self.shape, self.conv
        if shape is None:
            yield from self._reply(index, conv)
            return
        sent: List[str] = []                      # the content already out
        first, thought = "", False
        for attempt in range(shape.repairs + 1):
            held, reply, finish = _Held(shape.hold_all or attempt > 0), [], "stop"
            apart = thought                       # a repair's thought: a blank line before
            for piece in self._reply(index, conv):
                if piece.kind == "content":
                    reply.append(piece.text)
                    piece = dataclasses.replace(piece, text=held.feed(piece.text))
                    sent.append(piece.text)
                elif piece.kind == "finish":
                    finish = piece.text
                    continue
                elif apart:
                    piece, apart = dataclasses.replace(piece, text="\n\n" + piece.text), False
                thought = thought or piece.kind == "reasoning"
                if piece.text:
                    yield piece
            rest, calls, error = shape.check(held.rest)
            first = first or held.rest
            if error is None or finish == "length":
                text, done = held.rest if error is not None else rest or "", "".join(sent)
                text = text.rstrip() if attempt == 0 and done else _after(done, text)
                break
            _log.debug("reply %d out of shape (%s)", attempt, error)
            if self._closed.is_set():
                return
            conv = dataclasses.replace(conv, message=_REPAIR % error, history=conv.history + [
                ("user", conv.message), ("assistant", "".join(reply))])
        else:                                     # never in shape: no calls, finish "stop"
            if (shape.calls and shape.choice != "auto") or (shape.fmt or {}).get("strict"):
                raise UpstreamError("the model's reply was not valid after %d repair turn(s): %s"
                                    % (shape.repairs, error), code="invalid_model_output")
            text = first.rstrip() if "".join(sent) else first.strip()
        if text:
            yield _Piece(index, "content", text)
        for call in calls:
            yield _Piece(index, "tool_call", "", call)
        yield _Piece(index, "finish", "tool_calls" if calls else finish)

    def _reply(self, index: int, conv: _Conversation) -> Iterator[_Piece]:
        """The pieces of one upstream call: thought, answer (stop sequences cut), finish."""
        s = self.sampling
        try:
            upstream = self.client.stream(
                conv.message, conv.history, system_prompt=self.system,
                temperature=s.temperature, max_tokens=s.max_tokens, top_p=s.top_p,
                top_k=s.top_k, images=conv.images, uploads=conv.uploads)
        except BadRequestError as exc:      # name max_tokens as the client did
            if exc.param == "max_tokens" and s.max_tokens_param != "max_tokens":
                raise BadRequestError(s.max_tokens_param + exc.message[len("max_tokens"):],
                                      param=s.max_tokens_param, code=exc.code) from None
            raise
        cleaner, cutter = _StreamCleaner(), _StopCutter(s.stop)
        marks = len(self.thought[index]), len(self.answer[index])     # this reply's start
        budget = _Budget(s.max_tokens, self.counter) if s.max_tokens and not self.client.takes(
            "max_tokens") else None           # an app that cannot limit its answer

        def out(kind: str, text: str, kept: List[str]) -> Iterator[_Piece]:
            text = budget.take(text) if budget and text else text
            if text:
                kept.append(text)
                yield _Piece(index, kind, text)
        try:
            for html_text, final, appended in upstream:
                thought, answer = cleaner.append(html_text) if appended else \
                    cleaner.update(html_text, final)
                yield from out("reasoning", thought, self.thought[index])
                yield from out("content", cutter.feed(answer) if answer else "", self.answer[index])
                if cutter.stopped or self._closed.is_set() or (budget and budget.left <= 0):
                    break
                if time.monotonic() > self._looked + 0.2:       # nobody to answer: the
                    self._looked = time.monotonic()             # app's job is cancelled
                    if self.gone():
                        raise ConnectionAbortedError("the client went away")
            yield from out("content", cutter.flush(), self.answer[index])
            cut = budget.left <= 0 if budget else self._used_up(index, marks)
            yield _Piece(index, "finish", "length" if cut and not cutter.stopped else "stop")
        finally:
            upstream.close()

    def _used_up(self, index: int, marks: Tuple[int, int]) -> bool:
        """Whether a reply of choice ``index`` (its pieces from ``marks`` on) used up
        ``max_tokens`` by the estimate, give or take 5% (the app's tokenizer is not
        ours): clients continue an answer cut there."""
        limit = self.sampling.max_tokens
        used = self._tokens(self.thought[index], marks[0]) + self._tokens(self.answer[index], marks[1])
        return limit is not None and used >= limit - max(1, limit // 20)

    def _tokens(self, texts: List[str], start: int = 0) -> int:
        """The estimate of ``texts[start:]`` joined: counted once for what there is (the
        finish reason, the answer's usage, the gateway's log and the cache all ask)."""
        key = (id(texts), start, len(texts))
        if key not in self._counts:
            self._counts[key] = self.counter.count("".join(texts[start:]))
        return self._counts[key]

    def __iter__(self) -> Iterator[_Piece]:
        if self.sampling.n == 1:
            yield from self._choice(0)
            return
        pieces: "queue.Queue[Any]" = queue.Queue()

        def run(index: int) -> None:
            try:
                for piece in self._choice(index):
                    pieces.put(piece)
                    if self._closed.is_set():
                        break
            except BaseException as exc:      # handed to the consumer, raised there
                pieces.put(exc)
            finally:
                pieces.put(None)

        for i in range(self.sampling.n):
            threading.Thread(target=run, args=(i,), daemon=True,
                             name="bharatgen-choice-%d" % i).start()
        try:
            for _ in range(self.sampling.n):           # each choice's pieces end with a None
                for item in iter(pieces.get, None):
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            self._closed.set()

    def close(self) -> None:
        """Stop every upstream call (the consumer went away)."""
        self._closed.set()

    def usage(self) -> CompletionUsage:
        """Estimated token counts of the prompt and everything generated so far."""
        reasoning = sum(map(self._tokens, self.thought))
        completion = reasoning + sum(map(self._tokens, self.answer))
        return CompletionUsage(self.conv.prompt_tokens, completion,
                               self.conv.prompt_tokens + completion,
                               CompletionTokensDetails(reasoning))


class _Cache:
    """Finished answers kept for ``ttl`` seconds, at most ``size`` of them and ``max_bytes``
    of text in all (the least recently used go first; an answer over an eighth of that is
    not kept), keyed by everything that shapes an answer and by the API key, so that one
    key never sees another's.  Only whole answers go in: no errors, nothing cut short."""

    def __init__(self, ttl: float, size: int, max_bytes: int = 64 << 20) -> None:
        self.ttl, self.size, self.max_bytes, self.bytes = ttl, size, max_bytes, 0
        self._lock = threading.Lock()
        self._items: Dict[str, Tuple[float, List[_Piece], CompletionUsage, int]] = {}

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Optional[Tuple[List[_Piece], CompletionUsage]]:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None or item[0] < time.monotonic():
                self.bytes -= item[3] if item else 0
                return None
            self._items[key] = item                   # the most recently used, last
            return item[1], item[2]

    def put(self, key: str, pieces: List[_Piece], usage: CompletionUsage) -> None:
        cost = sum(sys.getsizeof(p.text) + 200 for p in pieces)   # 200: the piece around it
        if cost > self.max_bytes // 8:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._items[key] = (time.monotonic() + self.ttl, pieces, usage, cost)
            self.bytes += cost - (old[3] if old else 0)
            while len(self._items) > self.size or self.bytes > self.max_bytes:
                self.bytes -= self._items.pop(next(iter(self._items)))[3]


class _Cached:
    """A generation served from the cache, or passed through and kept when it ends whole."""

    def __init__(self, gen: _Generation, cache: _Cache, key: str) -> None:
        self.gen, self.sampling, self.cache, self.key = gen, gen.sampling, cache, key
        self.found = cache.get(key)

    def __iter__(self) -> Iterator[_Piece]:
        if self.found is not None:                   # each call gets an id of its own
            for piece in self.found[0]:
                yield dataclasses.replace(piece, call=piece.call and dict(
                    piece.call, id=_new_id("call_")))
            return
        runs: List[Tuple[_Piece, List[str]]] = []    # kept joined: one piece for a run
        for piece in self.gen:                        # of one kind in one choice
            last = runs[-1][0] if runs else None
            if last and (last.index, last.kind) == (piece.index, piece.kind) and piece.kind in (
                    "reasoning", "content"):
                runs[-1][1].append(piece.text)
            else:
                runs.append((piece, [piece.text]))
            yield piece
        if sum(p.kind == "finish" for p, _ in runs) == self.sampling.n:
            self.cache.put(self.key, [dataclasses.replace(p, text="".join(t)) for p, t in runs],
                           self.gen.usage())

    def close(self) -> None:
        self.gen.close()

    def usage(self) -> CompletionUsage:
        return self.found[1] if self.found is not None else self.gen.usage()


###############################################################################
# Configuration #################################################################
###############################################################################

@dataclass
class Config:
    """Every setting, filled from flags, then the environment (``BHARATGEN_<NAME>``), then
    these defaults.  ``upstream`` (a list: replicas) also reads ``BHARATGEN_BASE_URL``;
    lists in the environment are comma-separated."""

    upstream: List[str] = field(default_factory=list)
    endpoint: Optional[str] = None
    model: str = DEFAULT_MODEL
    models_file: Optional[str] = None
    system_prompt: Optional[str] = None
    protocol: str = "auto"
    timeout: float = 120.0
    connect_timeout: float = 10.0
    first_event_timeout: Optional[float] = None
    backoff: float = 5.0
    reasoning: str = "separate"
    reasoning_field: str = "reasoning_content"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: List[str] = field(default_factory=list)
    api_key_file: Optional[str] = None
    admin_keys: List[str] = field(default_factory=list)
    allow_no_auth: bool = False
    allowed_hosts: List[str] = field(default_factory=list)     # names, beside localhost
    cors_origins: List[str] = field(default_factory=list)
    trusted_proxies: List[str] = field(default_factory=list)   # addresses or CIDRs
    max_body_bytes: int = MAX_BODY_BYTES
    max_event_bytes: int = MAX_EVENT_BYTES
    max_upstream_body: int = MAX_UPSTREAM_BODY
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 60.0
    max_concurrent: int = 512
    max_connections: int = 1024
    max_client_connections: int = 128
    tool_repairs: int = 1
    cache_ttl: float = 0.0
    cache_size: int = 256
    cache_bytes: int = 64 * 1024 * 1024
    max_messages: int = 2048
    max_chars: int = 1_000_000
    rate_limit_rpm: int = 0
    rate_limit_streams: int = 0
    rate_limit_tpm: int = 0
    tokenizer: Optional[str] = None          # a tokenizer.json: exact token counts
    context_length: int = 0
    grace: float = 30.0
    log_format: str = "text"
    demo: bool = False

    @classmethod
    def load(cls, environ: Optional[Dict[str, str]] = None, **flags: Any) -> "Config":
        """Build a config: ``flags`` that are not ``None`` win over ``environ``
        (default ``os.environ``), which wins over the defaults."""
        env = os.environ if environ is None else environ
        values: Dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            names = ["BHARATGEN_" + f.name.upper()]
            if f.name == "upstream":
                names.append("BHARATGEN_BASE_URL")
            raw = next((env[n] for n in names if env.get(n)), None)
            value, where = flags.get(f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, list) and "List" in str(f.type):    # a repeated flag
                value = ",".join(value)
            if value is None and raw is not None:
                value, where = raw, names[0]
            if value is not None:
                values[f.name] = cls._parse(f, value, where) if isinstance(value, str) else value
        config = cls(**values)
        config.check()
        return config

    @staticmethod
    def _parse(f: "dataclasses.Field[Any]", raw: str, name: str) -> Any:
        """A setting given as text (a flag, the environment) as its field's type."""
        kind = str(f.type)                  # "<class 'int'>", "typing.Optional[float]", ...
        try:
            if "List" in kind:
                return [v.strip() for v in raw.split(",") if v.strip()]
            if "bool" in kind:
                return raw.strip().lower() in ("1", "true", "yes", "on")
            if "int" in kind:
                return int(raw)
            if "float" in kind:
                return float(raw)
        except ValueError:
            raise ValueError("%s=%r is not a valid %s" % (name, raw, kind)) from None
        return raw

    def check(self) -> None:
        """Raise ``ValueError`` for settings that cannot work."""
        for url in self.upstream:
            parts = urllib.parse.urlsplit(_normalize_base_url(url))
            try:
                ok = parts.scheme in ("http", "https") and (parts.port or 1) > 0
            except ValueError:                     # a port that is not a number
                ok = False
            if not ok or not re.fullmatch(r"[\w.:\[\]-]+", parts.hostname or ""):
                raise ValueError("upstream %r is not a URL of a Gradio app (http(s)://host[:port]"
                                 "[/path]) nor a Hugging Face Space (owner/space)" % _redact(url))
        for name, allowed in (("reasoning", REASONING_MODES), ("protocol", PROTOCOLS)):
            if getattr(self, name) not in allowed:
                raise ValueError("%s must be one of %s, not %r"
                                 % (name, ", ".join(allowed), getattr(self, name)))
        if min(self.timeout, self.connect_timeout, self.first_event_timeout or 1,
               self.header_timeout, self.body_timeout, self.send_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if not 0 <= self.port <= 65535:
            raise ValueError("port %r is out of range" % self.port)
        if self.log_format not in ("text", "json"):
            raise ValueError("log format must be text or json, not %r" % self.log_format)
        for name in ("max_body_bytes", "max_concurrent", "max_messages", "max_chars",
                     "max_connections", "max_client_connections", "max_event_bytes",
                     "max_upstream_body", "cache_size", "cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be at least 1" % name)
        if not 0 <= self.tool_repairs <= 5 or self.cache_ttl < 0:
            raise ValueError("tool repairs must be 0 to 5, and the cache TTL not negative")


###############################################################################
# The backend: requests in, chunks out, folded when not streamed ###############
###############################################################################

@dataclass
class _ModelRoute:
    """One served model: its upstream pool and its own defaults."""
    id: str
    pool: _UpstreamPool
    system_prompt: Optional[str] = None
    display_name: Optional[str] = None
    kind: str = "chat"                    # or "embedding"
    truncate: bool = False                # an embedding's vectors may be cut (dimensions)
    counter: Any = _Estimate              # counts tokens: the estimate, or a tokenizer
    context_length: int = 0               # prompt + max_tokens may not pass it (0: no check)


def _load_models(config: Config) -> List[_ModelRoute]:
    """The served models: from ``models_file`` (JSON) if given, else the one in ``config``
    (and the demo upstream's embedding model beside it).

    The file: ``{"models": [{"id", "upstreams": [url, ...], "endpoint", "protocol",
    "params": {openai_field: app_parameter}, "system_prompt", "display_name", "kind":
    "chat" | "embedding", "truncate": bool, "tokenizer", "context_length"}]}``.
    """
    name = config.models_file
    if name:
        try:
            with open(name, encoding="utf-8") as f:
                specs = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError("cannot read the models file %s: %s" % (name, exc)) from None
        specs = specs.get("models") if isinstance(specs, dict) else None
        if not isinstance(specs, list) or not specs:
            raise ValueError("the models file %s needs {\"models\": [...]}" % name)
    elif config.upstream:
        specs = [{"id": config.model, "upstreams": config.upstream}] + [
            {"id": _DEMO_EMBEDDING, "upstreams": config.upstream, "kind": "embedding",
             "truncate": True}] * config.demo
    else:
        raise ValueError("no upstream: give base_url / --upstream, or set BHARATGEN_BASE_URL")
    routes = []
    for m in specs:
        urls = m.get("upstreams") or m.get("upstream") if isinstance(m, dict) else None
        urls = [urls] if isinstance(urls, str) else urls
        kind = m.get("kind", "chat") if isinstance(m, dict) else None
        if kind not in ("chat", "embedding") or not isinstance(m.get("id"), str) or not urls \
                or not all(isinstance(u, str) for u in urls):
            raise ValueError("each model needs an 'id', 'upstreams' (a list of URLs) and a "
                             "'kind' of 'chat' (the default) or 'embedding': %s" % str(m)[:100])
        tokenizer = m.get("tokenizer", config.tokenizer)
        clients = [GradioClient(
            u, endpoint=m.get("endpoint") or config.endpoint, protocol=m.get("protocol") or
            config.protocol, timeout=config.timeout, connect_timeout=config.connect_timeout,
            first_event_timeout=config.first_event_timeout, param_names=m.get("params"),
            max_event_bytes=config.max_event_bytes, max_body=config.max_upstream_body,
            kind=kind) for u in urls]
        routes.append(_ModelRoute(  # the counter: the tokenizer.json's if given, else the estimate
            m["id"], _UpstreamPool(clients, backoff=config.backoff),
            m.get("system_prompt", config.system_prompt), m.get("display_name"), kind,
            m.get("truncate") is True, _Tokenizer.load(tokenizer) if tokenizer else _Estimate,
            int(m.get("context_length", config.context_length))))
    return routes


class _Reasoning:
    """Where the thought goes (``--reasoning``: its own field, inline in ``<think>`` tags,
    or nowhere) and that field's name (``--reasoning-field``)."""

    def __init__(self, mode: str, name: str = "reasoning_content") -> None:
        self.mode, self.name = mode, name
        self._open: Dict[int, bool] = {}

    def apply(self, piece: _Piece) -> Tuple[Optional[str], Optional[str]]:
        """``(reasoning_text, content_text)`` for one piece."""
        if piece.kind == "reasoning":
            if self.mode == "separate":
                return piece.text, None
            if self.mode == "inline":
                opening = "" if self._open.get(piece.index) else "<think>\n"
                self._open[piece.index] = True
                return None, opening + piece.text
            return None, None
        if piece.kind == "content" and self._open.pop(piece.index, False):
            return None, "\n</think>\n\n" + piece.text
        if piece.kind == "finish" and self._open.pop(piece.index, False):
            return None, "\n</think>"
        return None, piece.text if piece.kind == "content" else None

    def rename(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        """A chat object's JSON with the thought's field under its configured name."""
        if self.name != "reasoning_content":
            for choice in obj.get("choices", ()):
                for part in (choice.get("message"), choice.get("delta")):
                    if part and "reasoning_content" in part:
                        part[self.name] = part.pop("reasoning_content")
        return obj


class _Answer:
    """One generation request's answer: its chunks (events, for the Responses API),
    to stream as they come or to fold into the whole object, so that the two agree by
    construction; and what the server records of it (usage, the cache's word)."""

    def __init__(self, gens: List[Any], chunks: Iterator[Any], stream: bool, fold: Callable[
            [Iterator[Any]], Any], reasoning: _Reasoning, cache: Optional[str] = None) -> None:
        self.gens, self.chunks, self.stream, self.fold = gens, chunks, stream, fold
        self.reasoning, self.cache = reasoning, cache
        self.counter, self.reserve = "estimate", 0      # who counts its tokens; at most

    def whole(self) -> Any:
        """The non-streamed object: the chunks folded."""
        try:
            return self.fold(self.chunks)
        finally:
            self.close()

    def close(self) -> None:
        """Stop every upstream call (the client went away, or the answer is whole)."""
        for gen in self.gens:
            gen.close()
        getattr(self.chunks, "close", lambda: None)()


def _usage(gens: List[Any]) -> CompletionUsage:
    """The token counts of ``gens`` added up."""
    counts = [(u.prompt_tokens, u.completion_tokens,
               u.completion_tokens_details.reasoning_tokens)  # type: ignore[union-attr]
              for u in (gen.usage() for gen in gens)]
    prompt, completion, reasoning = (sum(c) for c in zip(*counts)) if counts else (0, 0, 0)
    return CompletionUsage(prompt, completion, prompt + completion,
                           CompletionTokensDetails(reasoning))


def _fold_chat(chunks: Iterator[ChatCompletionChunk]) -> ChatCompletion:
    """A chat completion from its chunks: texts joined, tool calls assembled."""
    whole, found = ChatCompletion(), {}   # index -> ([finish reason], content, thought, calls)
    for chunk in chunks:
        whole.id, whole.created, whole.model, whole.usage = (
            chunk.id, chunk.created, chunk.model, chunk.usage or whole.usage)
        for c in chunk.choices:
            finish, content, thought, calls = found.setdefault(c.index, ([None], [], [], {}))
            content.append(c.delta.content or "")
            thought.append(c.delta.reasoning_content or "")
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(d.index, ChatCompletionMessageToolCall(d.id or ""))
                call.function.name = call.function.name or (d.function and d.function.name)
                call.function.arguments += d.function.arguments if d.function else ""
            finish[0] = c.finish_reason or finish[0]
    whole.choices = [Choice(i, ChatCompletionMessage(
        content="".join(content) or (None if calls else ""), reasoning_content="".join(
            thought) or None, tool_calls=[calls[k] for k in sorted(calls)] or None), finish[0])
        for i, (finish, content, thought, calls) in sorted(found.items())]
    whole.system_fingerprint = _FINGERPRINT
    return whole


def _fold_completion(chunks: Iterator[Completion]) -> Completion:
    """A legacy completion from its chunks: each choice's text joined."""
    whole, texts, finish = Completion(), {}, {}
    for chunk in chunks:
        whole.id, whole.created, whole.model, whole.usage = (
            chunk.id, chunk.created, chunk.model, chunk.usage or whole.usage)
        for c in chunk.choices:
            texts.setdefault(c.index, []).append(c.text)
            finish[c.index] = c.finish_reason or finish.get(c.index)
    whole.choices = [CompletionChoice(i, "".join(texts[i]), finish[i]) for i in sorted(texts)]
    whole.system_fingerprint = _FINGERPRINT
    return whole


def _fold_response(events: Iterator[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """A response from its events: the last one holds it whole."""
    return deque(events, maxlen=1)[0][1]["response"]


_CHAT_ONLY = "is a parameter of /v1/chat/completions and /v1/responses, not of /v1/completions"


class _Backend:
    """Serves the OpenAI operations for the configured models, each in front of its
    Gradio app (or replicas of it)."""

    def __init__(self, config: Config, routes: Optional[List[_ModelRoute]] = None) -> None:
        self.config = config
        self.routes = {r.id: r for r in (routes or _load_models(config))}
        self.created = int(time.time())
        self.cache = _Cache(config.cache_ttl, config.cache_size, config.cache_bytes) \
            if config.cache_ttl else None
        self.patterns = _Patterns()            # schema patterns are matched in workers
        self._embedder: Optional[_UpstreamPool] = None   # see embed()
        self._discovering: Dict[str, threading.Thread] = {}    # model id -> for the page
        self._lock = threading.Lock()

    def clients(self) -> Iterator[GradioClient]:
        """Every upstream client, of every model."""
        pools = [route.pool for route in self.routes.values()] + [self._embedder] * bool(
            self._embedder)
        return (r.client for pool in pools for r in pool.replicas)  # type: ignore[union-attr]

    def close(self) -> None:
        """Close every upstream client's idle connections, and end the pattern workers."""
        self.patterns.close()
        for client in self.clients():
            client.close()

    def model(self, model_id: Optional[str] = None) -> Model:
        """One served model (the default if ``model_id`` is None); :class:`NotFoundError`
        for others."""
        route = self.routes.get(next(iter(self.routes)) if model_id is None else model_id)
        if route is None:
            raise NotFoundError("The model %r does not exist; this server serves %s" % (
                model_id, ", ".join(repr(r) for r in self.routes)), param="model",
                code="model_not_found")
        return Model(id=route.id, created=self.created, display_name=route.display_name,
                     owned_by="bharatgen (demo upstream: canned answers)" if self.config.demo
                     else "bharatgen")

    def models(self, app: bool = False) -> ModelList:
        """The served models; with ``app`` (``GET /v1/models``) also what the page reads
        (extension fields): ``demo``, and the app's slider ``limits`` and ``images`` (a
        multimodal input) once discovery has run or ends within a second."""
        infos, models = self._discovered() if app else {}, [self.model(m) for m in self.routes]
        for m in models:
            info, m.demo = infos.get(m.id), (app and self.config.demo) or None
            if info is not None:
                m.limits = {k: list(v) for k, v in info.limits.items()} or None
                m.images = "multimodal" in info.roles or None
        return ModelList(data=models)

    def _discovered(self) -> Dict[str, _AppInfo]:
        """Each model's app as discovery finds it: read in a thread of its own (one a
        model at a time, from the replica least lately down), waited on a second at most."""
        deadline, waits = time.monotonic() + 1.0, []
        with self._lock:
            for r in self.routes.values():
                thread = self._discovering.get(r.id)
                if all(x.client._info is None for x in r.pool.replicas) and not (
                        thread and thread.is_alive()):
                    client = min(r.pool.replicas, key=lambda x: x.down_until).client
                    thread = self._discovering[r.id] = threading.Thread(target=lambda c=client:
                        self._quietly(c.discover), daemon=True, name="bharatgen-discover")
                    thread.start()
                waits += [thread] if thread else []
        for thread in waits:
            thread.join(max(0.0, deadline - time.monotonic()))
        return {r.id: info for r in self.routes.values() for info in [next((
            x.client._info for x in r.pool.replicas if x.client._info), None)] if info}

    @staticmethod
    def _quietly(call: Callable[[], Any]) -> None:
        """``call()``; a failure is left for a real request to report."""
        try:
            call()
        except BharatGenError as exc:
            _log.debug("%s", exc.message)

    def health(self) -> Tuple[bool, Dict[str, Any]]:
        """``(ok, report)``: ok while every model has a replica up (or only busy)."""
        report = {r.id: r.pool.states() for r in self.routes.values()}
        ok = all(any(s["status"] != "down" for s in states) for states in report.values())
        return ok, report

    def generate(self, op: str, body: Any, key: Optional[str] = None) -> _Answer:
        """``op`` (``chat``, ``completions`` or ``responses``) for a request body: its
        :class:`_Answer`.  ``key`` (an API key's digest) scopes the cache."""
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", None, "invalid_type")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("'model' must be a string", "model", "invalid_type")
        route = self.routes[self.model(model).id]
        if route.kind != "chat":
            raise _bad("%s is an embedding model: ask /v1/embeddings" % route.id, "model",
                       "model_not_supported")
        return getattr(self, "_" + op)(route, body, key)

    def embed(self, body: Any, any_app: bool = False, admit: Callable[[int], Any] = abs,
              gone: Callable[[], bool] = lambda: False) -> CreateEmbeddingResponse:
        """``POST /v1/embeddings``: ``input`` a string or up to 2,048, answered as floats or
        base64.  ``any_app`` (the SDK, in front of one app): a chat model's app is asked.
        ``admit`` is told the tokens before the app is called (the server's limit);
        ``gone`` says the client left."""
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", None, "invalid_type")
        model = body.get("model") or next((r.id for r in self.routes.values()
                                           if r.kind == "embedding"), None)
        if any_app and model not in self.routes:      # the SDK: the app's, whatever the name
            model = None
        route = self.routes[self.model(model if isinstance(model, str) else None).id]
        pool = route.pool
        if route.kind != "embedding":
            if not any_app:
                raise NotFoundError("%s is a chat model and serves no embeddings" % route.id,
                                    param="model", code="model_not_found")
            if self._embedder is None:                   # the same app's embedding endpoint
                self._embedder = _UpstreamPool([GradioClient(
                    u, kind="embedding", timeout=self.config.timeout,
                    connect_timeout=self.config.connect_timeout) for u in self.config.upstream])
            pool = self._embedder
        texts = [body.get("input")] if isinstance(body.get("input"), str) else body.get("input")
        if isinstance(texts, list) and texts and all(type(t) is int or isinstance(t, list)
                                                    for t in texts):
            raise _bad("'input' holds token ids; this server embeds text: send strings (for "
                       "LangChain's OpenAIEmbeddings, check_embedding_ctx_length=False)", "input")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _bad("'input' must be a string or a non-empty list of strings", "input",
                       "invalid_type")
        if len(texts) > 2048 or sum(map(len, texts)) > self.config.max_chars:
            raise _bad("the input is more than this server takes (2048 texts, %d characters)"
                       % self.config.max_chars, "input", "context_length_exceeded")
        fmt, dims = body.get("encoding_format") or "float", _number(body, "dimensions", 1,
                                                                   65536, integer=True)
        if fmt not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        if dims is not None and not route.truncate:
            raise _bad("%s does not take 'dimensions': its vectors are as long as its app makes "
                       "them" % route.id, "dimensions", "unsupported_parameter")
        n = sum(map(route.counter.count, texts))
        admit(n)
        vectors = pool.embed(texts, gone)
        if dims is not None:                           # cut short, then of length 1 again
            vectors = [[x / (math.sqrt(sum(y * y for y in v[:dims])) or 1.0) for x in v[:dims]]
                       for v in vectors]
        return CreateEmbeddingResponse([Embedding(i, v if fmt == "float" else base64.b64encode(
            struct.pack("<%df" % len(v), *v)).decode()) for i, v in enumerate(vectors)],
            route.id, usage=EmbeddingUsage(n, n))

    def _generation(self, route: _ModelRoute, conv: _Conversation, sampling: _Sampling,
                    shape: Optional[_Shape], key: Optional[str], kind: str,
                    body: Dict[str, Any]) -> Any:
        """The generation of one answer; from the cache (when on) if the same request
        came with the same key."""
        gen: Any = _Generation(route.pool, conv, sampling, route.system_prompt, shape,
                               route.counter)
        fits = conv.prompt_tokens + (sampling.max_tokens or 0)
        if route.context_length and fits > route.context_length:
            raise _bad("This model's maximum context length is %d tokens. However, you "
                       "requested %d tokens (%d in the messages, %d in the completion); the "
                       "app's chat template is not counted." % (
                           route.context_length, fits, conv.prompt_tokens,
                           sampling.max_tokens or 0), sampling.max_tokens_param
                       if sampling.max_tokens else "messages", "context_length_exceeded")
        if self.cache is None:
            return gen
        keep = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        return _Cached(gen, self.cache, self.cache.key(route.id, key, kind, keep))

    def _answer(self, gens: List[Any], chunks: Iterator[Any], stream: bool,
                fold: Callable[[Iterator[Any]], Any], reasoning: _Reasoning) -> _Answer:
        found, inner = [getattr(g, "found", False) for g in gens], [getattr(g, "gen", g) for g in gens]
        cache = None if self.cache is None else "miss" if None in found else "hit"
        answer = _Answer(gens, chunks, stream, fold, reasoning, cache)
        answer.counter = inner[0].counter.name         # for --rate-limit-tpm: the most it
        answer.reserve = sum(g.conv.prompt_tokens + g.sampling.n * (   # may take
            g.sampling.max_tokens or DEFAULT_MAX_TOKENS) for g in inner)
        return answer

    # -- chat completions and legacy completions ----------------------------------------

    def _chat(self, route: _ModelRoute, body: Dict[str, Any], key: Optional[str]) -> _Answer:
        """``POST /v1/chat/completions``."""
        shape = _shape(body, self.config.tool_repairs, self.patterns)
        conv = _conversation(body.get("messages"), "messages", self.config.max_messages,
                             self.config.max_chars, shape.fmt is not None, route.counter.count)
        sampling = _sampling(body, ("max_tokens", "max_completion_tokens"))
        stream = shape.streamed = _flag(body, "stream")
        usage = _include_usage(body) or not stream
        gen = self._generation(route, conv, sampling, shape, key, "chat", body)
        reasoning = _Reasoning(self.config.reasoning, self.config.reasoning_field)
        return self._answer([gen], self._chat_chunks(gen, route.id, usage, reasoning), stream,
                            _fold_chat, reasoning)

    @staticmethod
    def _chat_chunks(gen: Any, model: str, usage: bool,
                     reasoning: _Reasoning) -> Iterator[ChatCompletionChunk]:
        stamp = dict(id=_new_id("chatcmpl-"), created=int(time.time()), model=model,
                     system_fingerprint=_FINGERPRINT)

        def chunk(index: int, delta: ChoiceDelta, finish: Optional[str] = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(choices=[ChunkChoice(index, delta, finish)], **stamp)

        pieces, calls = _primed(gen), [0] * gen.sampling.n  # a failure before output raises
        for i in range(gen.sampling.n):
            yield chunk(i, ChoiceDelta(role="assistant", content=""))
        for piece in pieces:
            i, (thought, content) = piece.index, reasoning.apply(piece)
            if thought or content:
                yield chunk(i, ChoiceDelta(content=content, reasoning_content=thought))
            if piece.call:                           # named first, then its arguments
                c, calls[i] = piece.call, calls[i] + 1
                yield chunk(i, ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                    calls[i] - 1, c["id"], "function", Function(c["name"], ""))]))
                yield chunk(i, ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                    calls[i] - 1, function=Function(arguments=c["arguments"]))]))
            if piece.kind == "finish":
                yield chunk(i, ChoiceDelta(), piece.text)
        if usage:
            yield ChatCompletionChunk(usage=gen.usage(), **stamp)

    def _completions(self, route: _ModelRoute, body: Dict[str, Any], key: Optional[str]) -> _Answer:
        """``POST /v1/completions``: the legacy API, ``prompt`` a string or a list."""
        prompts = [body["prompt"]] if isinstance(body.get("prompt"), str) else body.get("prompt")
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(p, str) for p in prompts):
            raise _bad("'prompt' must be a string or a non-empty list of strings", "prompt",
                       "invalid_type" if not isinstance(prompts, list) else "invalid_value")
        if len(prompts) > self.config.max_messages or sum(map(len, prompts)) > self.config.max_chars:
            raise _bad("the prompt is longer than this server takes", "prompt",
                       "context_length_exceeded")
        for name, why in (("suffix", "(fill-in-the-middle) is not supported"),
                          ("best_of", "is not supported"), ("tools", _CHAT_ONLY),
                          ("tool_choice", _CHAT_ONLY), ("response_format", _CHAT_ONLY)):
            if body.get(name) not in (None, "", 1 if name == "best_of" else None):
                raise _bad("%r %s" % (name, why), name, "unsupported_parameter")
        sampling = _sampling(body, ("max_tokens",))
        if len(prompts) * sampling.n > 16:
            raise _bad("%d prompts with n=%d would start %d generations; this server starts at "
                       "most 16 for one request" % (len(prompts), sampling.n,
                                                    len(prompts) * sampling.n), "prompt")
        stream = _flag(body, "stream")
        gens = [self._generation(route, _Conversation(None, [], p, route.counter.count(p)), sampling,
                                 None, key, "completions", dict(body, prompt=p)) for p in prompts]
        reasoning = _Reasoning("inline" if self.config.reasoning == "inline" else "none")
        chunks = self._completion_chunks(gens, prompts, _flag(body, "echo"), route.id,
                                         _include_usage(body) or not stream, reasoning)
        return self._answer(gens, chunks, stream, _fold_completion, reasoning)

    @staticmethod
    def _completion_chunks(gens: List[Any], prompts: List[str], echo: bool, model: str,
                           usage: bool, reasoning: _Reasoning) -> Iterator[Completion]:
        stamp, n = dict(id=_new_id("cmpl-"), created=int(time.time()), model=model,
                        system_fingerprint=_FINGERPRINT), gens[0].sampling.n

        def chunk(index: int, text: str, finish: Optional[str] = None) -> Completion:
            return Completion(choices=[CompletionChoice(index, text, finish)], **stamp)

        for p, gen in enumerate(gens):
            pieces = _primed(gen)
            for i in range(n if echo else 0):
                yield chunk(p * n + i, prompts[p])
            for piece in pieces:
                text = reasoning.apply(piece)[1]
                if text:
                    yield chunk(p * n + piece.index, text)
                if piece.kind == "finish":
                    yield chunk(p * n + piece.index, "", piece.text)
        if usage:
            yield Completion(usage=_usage(gens), **stamp)

    # -- responses ----------------------------------------------------------------------

    def _responses(self, route: _ModelRoute, body: Dict[str, Any], key: Optional[str]) -> _Answer:
        """``POST /v1/responses``: the request mapped onto a chat's, answered as events."""
        for name in ("previous_response_id", "conversation"):
            if body.get(name):
                raise _bad("%r is not supported: this server stores no responses" % name,
                           name, "unsupported_parameter")
        if body.get("response_format") is not None:
            raise _bad("'response_format' is a Chat Completions parameter; the Responses API "
                       "takes text.format", "response_format", "unsupported_parameter")
        text, tools = body.get("text") or {}, body.get("tools")
        if not isinstance(text, dict):
            raise _bad("'text' must be an object like {\"format\": {...}}", "text", "invalid_type")
        fmt = text.get("format")
        chat_body = dict(body, response_format=dict(type="json_schema", json_schema=fmt)
                         if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else fmt,
                         tools=[{"type": t.get("type"), "function": {
                             k: v for k, v in t.items() if k != "type"}} if isinstance(t, dict)
                             else t for t in tools] if isinstance(tools, list) else tools)
        shape = _shape(chat_body, self.config.tool_repairs, self.patterns)
        conv = _conversation(_response_messages(body), "input", self.config.max_messages,
                             self.config.max_chars, shape.fmt is not None, route.counter.count)
        sampling = _sampling(body, ("max_output_tokens",))
        if sampling.n != 1:
            raise _bad("'n' is not a parameter of the Responses API", "n", "unsupported_parameter")
        shape.streamed = _flag(body, "stream")
        gen = self._generation(route, conv, sampling, shape, key, "responses", body)
        base = {"id": _new_id("resp_"), "object": "response", "created_at": int(time.time()),
                "model": route.id, "error": None, "instructions": body.get("instructions"),
                "max_output_tokens": sampling.max_tokens, "metadata": body.get("metadata") or {},
                "parallel_tool_calls": shape.parallel, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": sampling.temperature, "text": {"format": fmt or {"type": "text"}},
                "tool_choice": body.get("tool_choice") or "auto", "tools": tools or [],
                "top_p": sampling.top_p, "truncation": "disabled", "user": body.get("user")}
        events = _response_events(gen, base, self.config.reasoning != "none")
        return self._answer([gen], events, _flag(body, "stream"), _fold_response,
                            _Reasoning(self.config.reasoning))


def _response_messages(body: Dict[str, Any]) -> List[Any]:
    """A Responses request's ``instructions`` and input items as chat messages: function
    calls and their outputs included, reasoning items left out (the app's history holds
    answers only)."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions", "invalid_type")
    messages: List[Any] = [{"role": "system", "content": instructions}] if instructions else []
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("'input' must be a string or a non-empty list of input items", "input",
                   "invalid_type")
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "function_call":
            messages.append({"role": "assistant", "tool_calls": [{
                "id": item.get("call_id"), "type": "function", "function": {
                    "name": item.get("name"), "arguments": item.get("arguments")}}]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content":
                             output if isinstance(output, (str, list)) else json.dumps(output)})
        elif kind == "message":
            messages.append({"role": item.get("role"), "content": item.get("content")})
        elif kind == "item_reference" and not str(item.get("id")).startswith("rs_"):
            raise _bad("input[%d] refers to the item %s, which this server does not keep (it "
                       "stores nothing): send the item itself, or store: false"
                       % (i, json.dumps(item.get("id"))[:80]), "input[%d]" % i, "invalid_value")
        elif kind not in ("reasoning", "item_reference"):   # a thought: left out, by reference
            raise _bad("input[%d] is a %r item; this server takes message, function_call, "
                       "function_call_output, reasoning and item_reference items"
                       % (i, kind or type(item).__name__), "input[%d]" % i, "unsupported_input")
    return messages


def _response_item(kind: str, text: str, status: str = "completed", iid: Optional[str] = None,
                   call: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """An output item: the answer (``message``), the thought (``reasoning``), or a
    ``function_call``."""
    if kind == "function_call":
        call = call or {}
        return {"type": kind, "id": iid or _new_id("fc_"), "call_id": call.get("id"),
                "name": call.get("name"), "arguments": text, "status": status}
    if kind == "reasoning":
        part = {"type": "reasoning_text", "text": text}
        item = {"type": "reasoning", "id": iid or _new_id("rs_"), "summary": []}
    else:
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"type": "message", "id": iid or _new_id("msg_"), "role": "assistant"}
    return dict(item, status=status, content=[] if status == "in_progress" else [part])


_RESPONSE_TEXT = {"message": ("response.output_text", {"logprobs": []}),  # an item's events
                  "reasoning": ("response.reasoning_text", {}),
                  "function_call": ("response.function_call_arguments", {})}


def _response_events(gen: Any, base: Dict[str, Any],
                     thoughts: bool) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """A response's events: an output item for the thought (while it lasts, if
    ``thoughts``), one for the answer, one per function call, each opened, filled by
    deltas and closed; then the response, whole."""
    seq, output, texts, finish = itertools.count(), [], [], []

    def event(kind: str, **data: Any) -> Tuple[str, Dict[str, Any]]:
        return kind, dict(type=kind, sequence_number=next(seq), **data)

    def opened(kind: str, call: Optional[Dict[str, str]] = None) -> Iterator[Any]:
        yield from closed() if output else ()            # the item before, if any
        output.append(_response_item(kind, "", "in_progress", call=call))
        texts.clear()
        yield event("response.output_item.added", output_index=len(output) - 1, item=output[-1])
        if kind != "function_call":
            yield event("response.content_part.added", item_id=output[-1]["id"], content_index=0,
                        output_index=len(output) - 1, part=_response_item(kind, "")["content"][0])

    def closed(status: str = "completed") -> Iterator[Any]:
        last, text = output[-1], "".join(texts)
        item = output[-1] = _response_item(last["type"], text, status, last["id"], {
            "id": last.get("call_id"), "name": last.get("name")})
        where, (name, extra) = dict(item_id=item["id"], output_index=len(output) - 1), \
            _RESPONSE_TEXT[item["type"]]
        if item["type"] == "function_call":
            yield event(name + ".done", name=item["name"], arguments=text, **where)
        else:
            yield event(name + ".done", text=text, content_index=0, **extra, **where)
            yield event("response.content_part.done", part=item["content"][0], content_index=0,
                        **where)
        yield event("response.output_item.done", output_index=len(output) - 1, item=item)

    pieces = _primed(gen)                         # a failure before any output raises here
    pending = dict(base, status="in_progress", output=[], usage=None, incomplete_details=None)
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    for piece in pieces:
        finish += [piece.text] if piece.kind == "finish" else []
        if piece.kind == "finish" or (piece.kind == "reasoning" and not thoughts):
            continue
        kind = {"reasoning": "reasoning", "content": "message"}.get(piece.kind, "function_call")
        if not output or output[-1]["type"] != kind or piece.call:
            yield from opened(kind, piece.call)
        texts.append(piece.call["arguments"] if piece.call else piece.text)
        name, extra = _RESPONSE_TEXT[kind]
        yield event(name + ".delta", item_id=output[-1]["id"], output_index=len(output) - 1,
                    delta=texts[-1], **({} if piece.call else dict(extra, content_index=0)))
    if not any(o["type"] in ("message", "function_call") for o in output):
        yield from opened("message")
    status, u = "incomplete" if "length" in finish else "completed", gen.usage()
    yield from closed(status if output[-1]["type"] == "message" else "completed")
    yield event("response." + status, response=dict(
        base, output=output, status=status, incomplete_details={"reason": "max_output_tokens"}
        if status == "incomplete" else None, usage={     # as the Responses API names them
            "input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {
                "reasoning_tokens": u.completion_tokens_details.reasoning_tokens},  # type: ignore
            "total_tokens": u.total_tokens}))


###############################################################################
# SDK: BharatGenOpenAI and AsyncBharatGenOpenAI ################################
###############################################################################

class Stream:
    """The chunks of a streamed completion (the events of a response); iterate it, or
    use it in ``with``: closing it cancels the upstream call."""

    def __init__(self, answer: Any, convert: Callable[[Any], Any] = lambda item: item) -> None:
        self._answer, self._items, self._convert = answer, iter(answer.chunks), convert

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return self._convert(next(self._items))

    def close(self) -> None:
        """Stop reading; the upstream call is cancelled."""
        self._answer.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _from_dict(cls: Any, data: Any) -> Any:
    """A response object of ``cls`` from an OpenAI API's JSON (unknown fields left out)."""
    import typing
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return cls(data) if isinstance(data, dict) else data

    def inner(kind: Any) -> Any:           # the dataclass in Optional[List[X]], if any
        if dataclasses.is_dataclass(kind):
            return kind
        return next(filter(None, map(inner, getattr(kind, "__args__", ()))), None)

    hints, values = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kind, value = inner(hints[f.name]), data[f.name]
            if kind:
                value = [_from_dict(kind, v) for v in value] if isinstance(value, list) else \
                    _from_dict(kind, value)
            values[f.name] = value
    return cls(**values)


class _Attrs(dict):
    """A Responses API object: a dict whose keys read as attributes too, as the openai
    SDK's objects do (``response.output_text``, ``event.delta``)."""

    def __getattr__(self, name: str) -> Any:
        if name not in self:
            raise AttributeError(name)
        value = self[name]
        if isinstance(value, list):
            return [_Attrs(v) if isinstance(v, dict) else v for v in value]
        return _Attrs(value) if isinstance(value, dict) else value

    @property
    def output_text(self) -> str:
        """The answer's text, all message items joined."""
        return "".join(part.get("text", "") for item in self.get("output") or []
                       if item.get("type") == "message" for part in item.get("content") or []
                       if part.get("type") == "output_text")


# Each operation: its path on an OpenAI-compatible API, what a stream's chunks and the
# whole answer are, and the argument ``create()`` must have.
_OPERATIONS = {"chat": ("/chat/completions", ChatCompletionChunk, ChatCompletion, "messages"),
               "completions": ("/completions", Completion, Completion, "prompt"),
               "responses": ("/responses", _Attrs, _Attrs, "input"),
               "embeddings": ("/embeddings", None, CreateEmbeddingResponse, "input")}
_STATUS_ERRORS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
                  404: NotFoundError, 405: MethodNotAllowedError, 408: RequestTimeoutError,
                  413: RequestTooLargeError, 429: RateLimitError, 503: ServerOverloadedError}


class _OpenAIBackend:
    """The SDK's operations sent to an OpenAI-compatible API (a base URL ending in
    ``/v1``): the SDK is then a zero-dependency client of any such server."""

    def __init__(self, base_url: str, api_key: Optional[str], timeout: float, model: str) -> None:
        self.base_url, self.api_key, self.timeout = _redact(base_url.rstrip("/")), api_key, timeout
        self.model = model                   # sent when a request names none
        parts = urllib.parse.urlsplit(base_url.rstrip("/"))
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._connect = lambda: cls(parts.hostname, parts.port, timeout=timeout)
        self._path = parts.path

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        """The response of one request, its status checked (errors as this module's)."""
        conn = self._connect()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        try:
            conn.request(method, self._path + path,
                         None if body is None else json.dumps(body).encode(), headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _net_error(exc, "%s did not answer within %ss" % (self.base_url, self.timeout),
                             "cannot reach " + self.base_url) from None
        if resp.status != 200:
            raw = resp.read(MAX_UPSTREAM_BODY)
            conn.close()
            try:
                error = json.loads(raw)["error"]
                message, param, code = error["message"], error.get("param"), error.get("code")
            except (ValueError, LookupError, TypeError):
                message, param, code = raw.decode("utf-8", "replace")[:300], None, None
            cls = _STATUS_ERRORS.get(resp.status, InternalServerError)
            raise cls(message, param=param, code=code, status=resp.status)
        resp.conn = conn                                # type: ignore[attr-defined]
        return resp

    def _json(self, cls: Any, method: str, path: str, body: Any = None) -> Any:
        """The answer to one request, as an object of ``cls``."""
        resp = self._request(method, path, body)
        try:
            return _from_dict(cls, json.loads(resp.read(MAX_UPSTREAM_BODY)))
        finally:
            resp.conn.close()

    def _events(self, resp: Any, cls: Any) -> Iterator[Any]:
        try:
            for event, data in _iter_sse(lambda: resp.read1(65536)):
                if data == "[DONE]":
                    return
                item = json.loads(data)
                if isinstance(item, dict) and item.get("error"):
                    raise InternalServerError(str(item["error"].get("message")))
                yield (event, item) if cls is _Attrs else _from_dict(cls, item)
        finally:
            resp.conn.close()

    def generate(self, op: str, body: Dict[str, Any]) -> Any:
        """``op`` of ``body`` on the API: an answer shaped as :class:`_Backend`'s."""
        path, chunk, whole, _ = _OPERATIONS[op]
        body = dict(body, model=body.get("model") or self.model)
        stream = bool(body.get("stream"))
        chunks = self._events(self._request("POST", path, body), chunk) if stream else iter(
            [self._json(whole, "POST", path, body)])
        return _Answer([], chunks, stream, next, _Reasoning("separate"))

    def embed(self, body: Dict[str, Any], any_app: bool = True) -> CreateEmbeddingResponse:
        return self._json(CreateEmbeddingResponse, "POST", "/embeddings", dict(
            body, model=body.get("model") or self.model))

    def models(self) -> ModelList:
        return self._json(ModelList, "GET", "/models")

    def model(self, model_id: str) -> Model:
        return self._json(Model, "GET", "/models/" + urllib.parse.quote(model_id))

    def close(self) -> None:
        pass


class _Resource:
    """``client.chat.completions``, ``client.completions``, ``client.responses`` and
    ``client.models``: each runs one operation (``op``) of the backend."""

    def __init__(self, backend: Any, op: Optional[str] = None) -> None:
        self._backend, self._op = backend, op

    def create(self, **kwargs: Any) -> Any:
        """Create a chat completion, a completion or a response (as the resource is);
        with ``stream=True`` a :class:`Stream` of its chunks or events."""
        if self._op is None or _OPERATIONS[self._op][3] not in kwargs:
            raise TypeError("create() needs the argument %r" % _OPERATIONS.get(
                self._op or "", ("", "", "", "?"))[3])
        body = {k: v for k, v in kwargs.items() if v is not None and k not in (
            "extra_body", "extra_headers", "extra_query", "timeout")}
        body.update(kwargs.get("extra_body") or {})
        if self._op == "embeddings":                     # a request in front of one app
            return self._backend.embed(body, True)
        answer = self._backend.generate(self._op, body)
        events = self._op == "responses"                 # (name, data) pairs
        if answer.stream:
            return Stream(answer, (lambda e: _Attrs(e[1])) if events else lambda c: c)
        return _Attrs(answer.whole()) if events else answer.whole()

    def list(self) -> ModelList:
        """The served models."""
        return self._backend.models()

    def retrieve(self, model: str) -> Model:
        """One served model; :class:`NotFoundError` for others."""
        return self._backend.model(model)


class BharatGenOpenAI:
    """A client shaped like ``openai.OpenAI`` that talks to the Param Gradio app directly.

    ``base_url`` is the Gradio app (default ``BHARATGEN_BASE_URL``).  An ``api_key`` that
    is a Hugging Face token (``hf_...``) is sent to a private Space, as ``HF_TOKEN`` is;
    any other is accepted for compatibility.  A ``base_url`` ending in ``/v1`` is an
    OpenAI-compatible API (this gateway, vLLM, ...): requests go there as they are, with
    ``api_key`` as the bearer key.  Errors are this module's, named as the openai SDK
    names them (``.status_code`` too).
    """

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 model: Optional[str] = None, timeout: Optional[float] = None,
                 endpoint: Optional[str] = None, reasoning: Optional[str] = None,
                 system_prompt: Optional[str] = None, protocol: Optional[str] = None) -> None:
        self.config = Config.load(upstream=base_url, model=model, timeout=timeout,
                                  endpoint=endpoint, reasoning=reasoning,
                                  system_prompt=system_prompt, protocol=protocol)
        self.api_key = api_key
        url = self.config.upstream[0] if self.config.upstream else ""
        if re.search(r"/v1/?$", url):
            backend: Any = _OpenAIBackend(url, api_key, self.config.timeout, self.config.model)
            self.base_url = backend.base_url
        else:
            backend = _Backend(self.config)
            for client in backend.clients():
                if api_key and api_key.startswith("hf_"):
                    client.http.token = api_key
            self.base_url = next(backend.clients()).base_url
        self._backend = backend
        self.chat, self.models = _Resource(backend), _Resource(backend)
        self.chat.completions = _Resource(backend, "chat")     # type: ignore[attr-defined]
        self.completions = _Resource(backend, "completions")
        self.responses = _Resource(backend, "responses")
        self.embeddings = _Resource(backend, "embeddings")

    def close(self) -> None:
        """Close the upstream connections kept alive between calls."""
        self._backend.close()

    def __enter__(self) -> "BharatGenOpenAI":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Await ``fn(*args)`` run in the event loop's default executor.

    asyncio is imported here, not at the top: it is the heaviest import of the module
    (30 ms), and only the async SDK needs it.
    """
    import asyncio
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


class AsyncStream:
    """The chunks of a streamed completion, for ``async for``."""

    _END = object()

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Any:
        item = await _run_in_thread(next, self._stream, self._END)
        if item is self._END:
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        """Stop reading; the upstream call is cancelled."""
        await _run_in_thread(self._stream.close)

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _AsyncWrap:
    """Runs a sync resource's methods in the default executor; streams become AsyncStream."""

    def __init__(self, sync: Any) -> None:
        self._sync = sync

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._sync, name)
        if not callable(target):
            return _AsyncWrap(target)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await _run_in_thread(lambda: target(*args, **kwargs))
            return AsyncStream(result) if isinstance(result, Stream) else result
        return call


class AsyncBharatGenOpenAI:
    """:class:`BharatGenOpenAI` for asyncio: ``await client.chat.completions.create(...)``."""

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 **kwargs: Any) -> None:
        self._sync = BharatGenOpenAI(base_url, api_key, **kwargs)
        self.config, self.base_url = self._sync.config, self._sync.base_url
        for name in ("chat", "completions", "responses", "embeddings", "models"):
            setattr(self, name, _AsyncWrap(getattr(self._sync, name)))

    async def close(self) -> None:
        """Close the upstream connections kept alive between calls."""
        self._sync.close()

    async def __aenter__(self) -> "AsyncBharatGenOpenAI":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


###############################################################################
# Server pieces: keys, rate limits, metrics ####################################
###############################################################################

def _sha256(text: str) -> bytes:
    import hashlib      # only where keys are used: loading OpenSSL's hashes slows the import
    return hashlib.sha256(text.encode("utf-8")).digest()


class _KeyStore:
    """The accepted API keys: given ones plus a key file, re-read by :meth:`reload`.

    Keys are kept only as SHA-256 digests and compared in constant time; a key is known
    by its whole digest (a short prefix is only for showing).  Admin keys (``admin_keys``,
    or a key file line ``admin <key>``) also see every key's usage on the dashboard.
    """

    def __init__(self, keys: Sequence[str] = (), path: Optional[str] = None,
                 admins: Sequence[str] = ()) -> None:
        self._given = [(k, False) for k in keys if k] + [(k, True) for k in admins if k]
        self.path = path
        self._digests: List[Tuple[bytes, bool]] = []
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def reload(self) -> int:
        """Read the key file again (lines; blanks and ``#`` comments skipped)."""
        keys = list(self._given)
        if self.path:
            try:
                with open(self.path, encoding="utf-8") as f:
                    lines = [line.split() for line in f if line.strip() and not
                             line.lstrip().startswith("#")]
            except OSError as exc:
                if self._digests:
                    _log.error("cannot re-read the key file (keeping %d keys): %s",
                               len(self._digests), exc)
                    return len(self._digests)
                raise ValueError("cannot read the key file: %s" % exc) from None
            keys += [(w[-1], w[0] == "admin" and len(w) == 2) for w in lines]
        self._digests = [(_sha256(k), admin) for k, admin in keys]
        return len(self._digests)

    def identify(self, authorization: Optional[str]) -> Tuple[str, bool]:
        """``(the key's digest, is it an admin's)`` for ``Authorization: Bearer <key>``, or
        :class:`AuthenticationError`."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Missing API key: send the header "
                                      "'Authorization: Bearer <key>'")
        import hmac
        given, found = _sha256(token), None
        for digest, admin in self._digests:   # no early exit: time does not say which key
            if hmac.compare_digest(given, digest):
                found = admin
        if found is None:
            raise AuthenticationError("Incorrect API key provided")
        return given.hex(), found


def _duration(seconds: float) -> str:
    """OpenAI's style for reset times: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return "%dms" % max(1, round(seconds * 1000))
    minutes, secs = divmod(int(round(seconds)), 60)
    return "%dm%ds" % (minutes, secs) if minutes else "%ds" % secs


class _RateLimiter:
    """Per-identity limits: a ``unit`` (requests, tokens) a minute, as a token bucket, and
    concurrent streams.  ``0`` disables a limit.  Identities are key digests (or client
    addresses when the server has no keys)."""

    def __init__(self, per_minute: int = 0, streams: int = 0, unit: str = "requests") -> None:
        self.per_minute, self.streams, self.unit = per_minute, streams, unit
        self._buckets: Dict[str, List[float]] = {}
        self._open: Dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, who: str, n: int = 1, what: Optional[str] = None) -> Dict[str, str]:
        """Spend ``n``; the ``x-ratelimit-*`` headers, or :class:`RateLimitError` (``what``
        names what is limited in its message).  ``n`` < 0 gives back what was not used."""
        if not self.per_minute:
            return {}
        rate, now, full = self.per_minute / 60.0, time.monotonic(), float(self.per_minute)
        with self._lock:
            if len(self._buckets) > 10000:             # forget identities at rest
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * rate < self.per_minute}
            tokens, last = self._buckets.get(who, [full, now])
            tokens = min(full, tokens + (now - last) * rate)
            allowed = tokens >= n
            tokens = min(full, tokens - n) if allowed else tokens
            self._buckets[who] = [tokens, now]
        headers = {"x-ratelimit-limit-" + self.unit: str(self.per_minute),
                   "x-ratelimit-remaining-" + self.unit: str(int(tokens)),
                   "x-ratelimit-reset-" + self.unit: _duration((full - tokens) / rate)}
        if not allowed:
            if n > full:
                raise RateLimitError("Request too large: %d %s, and the limit is %d a minute"
                                     % (n, self.unit, self.per_minute), headers=headers)
            wait = (n - tokens) / rate
            raise RateLimitError("Rate limit reached: %d %s per minute; retry in %s"
                                 % (self.per_minute, what or self.unit, _duration(wait)),
                                 headers=dict(headers, **{"Retry-After": str(max(1, int(wait + 0.999)))}))
        return headers

    def settle(self, who: str, n: int) -> None:
        """Spend ``n`` more (less, if negative) than was taken: what a request used."""
        if self.per_minute and n:
            with self._lock:
                tokens, last = self._buckets.get(who, [float(self.per_minute), time.monotonic()])
                self._buckets[who] = [min(float(self.per_minute), tokens - n), last]

    def open_stream(self, who: str) -> None:
        """Count one more open stream, or raise :class:`RateLimitError`."""
        if not self.streams:
            return
        with self._lock:
            if self._open.get(who, 0) >= self.streams:
                raise RateLimitError("Too many concurrent streams: the limit is %d per key"
                                     % self.streams, headers={"Retry-After": "1"})
            self._open[who] = self._open.get(who, 0) + 1

    def close_stream(self, who: str) -> None:
        if self.streams:
            with self._lock:
                self._open[who] = self._open.get(who, 1) - 1
                if not self._open[who]:
                    del self._open[who]


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_KEY_COUNTS = ("requests", "errors", "tokens_in", "tokens_out")     # the monitor's, by key


def _percentile(values: List[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by nearest rank (NaN for none)."""
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class _Metrics:
    """Counters, gauges and histograms, rendered in Prometheus' text format, and a rolling
    window of recent requests for the page's monitor (:meth:`recent`)."""

    HELP = {
        "bharatgen_requests_total": ("counter", "Requests by route and status."),
        "bharatgen_requests_in_flight": ("gauge", "Requests being served."),
        "bharatgen_streams_in_flight": ("gauge", "Streamed responses being sent."),
        "bharatgen_upstream_errors_total": ("counter", "Upstream failures by kind."),
        "bharatgen_upstream_bytes_total": ("counter", "Bytes read from upstream apps."),
        "bharatgen_rate_limited_total": ("counter", "Requests refused by rate limits."),
        "bharatgen_cache_total": ("counter", "Answers served from the cache (hit) or not (miss)."),
        "bharatgen_request_duration_seconds": ("histogram",
                                               "Generation requests, start to last byte."),
        "bharatgen_time_to_first_token_seconds": ("histogram",
                                                  "Streams, request start to first event."),
        "bharatgen_tokens_total": ("counter", "Tokens (estimated) in prompts and out in answers."),
    }
    window = 600.0                     # seconds of requests the monitor summarizes
    bucket = 10.0                      # seconds per point of its chart
    clock = time.time                  # the time of day (a test moves it on)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]] = {}
        self._hists: Dict[str, List[float]] = {}
        self.started = time.time()
        # (time, status, error type, ttft, latency, key, tokens in, tokens out) of recent API
        # requests: bounded by count, so memory stays small (~5 MB) under any load, and a
        # summary of all of them takes ~50 ms.
        self._recent: "deque[Tuple[Any, ...]]" = deque(maxlen=20000)
        self._summary: Tuple[float, Dict[str, Any]] = (0.0, {})   # recent(), kept a second

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items())) if labels else ()
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            h = self._hists.setdefault(name, [0.0] * (len(_LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(_LATENCY_BUCKETS):
                if seconds <= bound:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def set(self, name: str, value: float) -> None:
        """Set a counter kept elsewhere (the upstream clients count their bytes)."""
        with self._lock:
            self._values[name] = {(): value}

    def value(self, name: str, **labels: str) -> float:
        return self.series(name).get(tuple(sorted(labels.items())), 0.0)

    def series(self, name: str) -> Dict[Tuple[Tuple[str, str], ...], float]:
        """A counter's values by their labels (a copy)."""
        with self._lock:
            return dict(self._values.get(name, {}))

    def record(self, route: str, status: int, took: float, *, recent: bool = True,
               ttft: Optional[float] = None, error: Optional[str] = None, key: str = "-",
               tokens: Tuple[int, int] = (0, 0)) -> None:
        """Count one answered request: the one place requests are recorded, for
        ``/metrics`` and (if ``recent``) the monitor's window."""
        self.inc("bharatgen_requests_total", route=route, status=str(status))
        latency = took if route in _GENERATION_ROUTES and status == 200 and not error else None
        if latency is not None:
            self.observe("bharatgen_request_duration_seconds", took)
        for direction, n in zip(("in", "out"), tokens):
            if n:
                self.inc("bharatgen_tokens_total", n, direction=direction)
        if recent:
            with self._lock:
                self._recent.append((self.clock(), status, error, ttft, latency, key) + tokens)

    def recent(self) -> Dict[str, Any]:
        """The monitor's view of the last :attr:`window` seconds: counts, p50/p95 of the
        time to first token and of generation latency, usage by key, and a point every
        :attr:`bucket` seconds for its chart."""
        now = self.clock()
        with self._lock:
            if now - self._summary[0] < 1.0 and len(self._recent) > 2000:
                return self._summary[1]    # a large window is summed at most once a second
            rows = [r for r in self._recent if r[0] > now - self.window]
            full = len(self._recent) == self._recent.maxlen
        by_status: Dict[str, int] = {}
        errors: Dict[str, int] = {}
        keys: Dict[str, Dict[str, int]] = {}
        points = [{"t": round(now - self.window + i * self.bucket), "requests": 0, "errors": 0,
                   "latency": []} for i in range(max(1, int(self.window / self.bucket)))]
        for t, status, error, _, latency, key, tokens_in, tokens_out in rows:
            failed = 400 <= status != 499 or error is not None     # 499: the client left
            by_status[str(status)] = by_status.get(str(status), 0) + 1
            if error:
                errors[error] = errors.get(error, 0) + 1
            if key != "-":
                k = keys.setdefault(key, dict.fromkeys(_KEY_COUNTS, 0))
                for name, n in zip(_KEY_COUNTS, (1, failed, tokens_in, tokens_out)):
                    k[name] += n
            point = points[min(len(points) - 1, int((t - now + self.window) / self.bucket))]
            point["requests"] += 1
            point["errors"] += failed
            if latency is not None:
                point["latency"].append(latency)

        def quantiles(values: List[float]) -> Dict[str, Optional[float]]:
            return {"p50": round(_percentile(values, .5), 4) if values else None,
                    "p95": round(_percentile(values, .95), 4) if values else None}

        for point in points:
            point["latency_p50"] = quantiles(point.pop("latency"))["p50"]
        summary = {"seconds": round(min(self.window, now - rows[0][0]) if full and rows else
                                    self.window), "requests": len(rows), "by_status": by_status,
                "errors": errors, "ttft": quantiles([r[3] for r in rows if r[3] is not None]),
                "latency": quantiles([r[4] for r in rows if r[4] is not None]),
                "tokens_in": sum(r[6] for r in rows), "tokens_out": sum(r[7] for r in rows),
                "keys": keys, "series": points}
        with self._lock:
            self._summary = (now, summary)
        return summary

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in self.HELP.items():
                lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
                if kind == "histogram":
                    h = self._hists.get(name, [0.0] * (len(_LATENCY_BUCKETS) + 2))
                    for bound, n in zip(_LATENCY_BUCKETS, h):
                        lines.append('%s_bucket{le="%s"} %d' % (name, bound, n))
                    lines += ['%s_bucket{le="+Inf"} %d' % (name, h[-1]),
                              "%s_sum %.6f" % (name, h[-2]), "%s_count %d" % (name, h[-1])]
                    continue
                for labels, v in sorted(self._values.get(name, {}).items()):
                    tag = ",".join('%s="%s"' % (k, str(val).replace("\\", "\\\\").replace('"', '\\"')
                                                           .replace("\n", "\\n"))
                                   for k, val in labels)
                    lines.append("%s%s %s" % (name, "{%s}" % tag if tag else "", "%g" % v))
        return "\n".join(lines) + "\n"


###############################################################################
# HTTP serving: http.server's handler, made strict and bounded ################
###############################################################################

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")          # a field name (RFC 9110 5.6.2)
_TOKENS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")              # in a field value (HTAB is fine)
_REQUEST_LINE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\Z")


class _Recorder:
    """Passes ``readline`` on and keeps the lines: the request head as it came, at most
    ``MAX_HEAD_BYTES`` in all (http.server bounds only each line and their number)."""

    def __init__(self, rfile: Any) -> None:
        self.rfile, self.lines, self.left = rfile, [], MAX_HEAD_BYTES

    def readline(self, limit: int = -1) -> bytes:
        line = self.rfile.readline(min(limit, self.left + 1) if limit >= 0 else self.left + 1)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong("a request head of over %d bytes" % MAX_HEAD_BYTES)
        self.lines.append(line)
        return line


class _Handler(http.server.BaseHTTPRequestHandler):
    """http.server's handler with what an API needs: a strict request head (RFC 9112),
    reads under deadlines (the head, then the body), and one writer each for JSON and
    for server-sent events.  The gateway and the demo upstream are its subclasses.

    Request bodies must be sized by one ``Content-Length`` (no OpenAI client sends
    chunked JSON); a body that is not read closes the connection after the answer.
    """

    protocol_version = "HTTP/1.1"
    server_version = "bharatgen_openai/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True     # the head and the body (or each event) leave at once
    header_timeout = 10.0              # seconds for a request line and head, in all
    body_timeout = 30.0                # seconds for a body, in all
    send_timeout = 60.0                # seconds a client may take nothing we write
    body_length = 0                    # bytes of the request body not read yet
    dispatched = False
    expecting = False                  # the client waits for "100 Continue" to send its body
    chunked = False
    bytes_out = 0                      # of the current answer's body
    command: Optional[str] = None      # until a request line is read
    request_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.timed = _TimedSocket(self.connection, None)
        self.rfile = self.timed.makefile("rb")

    def handle_one_request(self) -> None:
        """One request; a head that began but did not arrive within ``header_timeout``
        gets a 408, and is never dispatched."""
        self.timed.arm(self.header_timeout)
        self.dispatched, self.body_length, self.chunked, self.bytes_out = False, 0, False, 0
        self.expecting = False
        super().handle_one_request()
        if not self.dispatched and self.timed.expired and self.timed.received:
            self.send_error(408, "the request did not arrive within %ss" % self.header_timeout)

    def parse_request(self) -> bool:
        """http.server's parsing, then the checks it leaves out (RFC 9112 sections 5, 6).
        A few blank lines before the request line are skipped (RFC 9112 section 2.2)."""
        for _ in range(8):
            if self.raw_requestline not in (b"\r\n", b"\n"):
                break
            self.raw_requestline = self.rfile.readline(65537)
        rfile, self.rfile = self.rfile, _Recorder(self.rfile)
        try:
            ok = super().parse_request()
        finally:
            lines, self.rfile = self.rfile.lines, rfile
        if not ok:
            return False
        problem = self._check_head(lines)
        if problem is None and not hasattr(self, "do_" + self.command):
            problem = 405, "Unsupported method (%r)" % self.command
        if problem is not None:
            self.send_error(*problem)
            return False
        self.dispatched = True
        return True

    def _check_head(self, lines: List[bytes]) -> Optional[Tuple[int, str]]:
        """``(status, message)`` if the request cannot be taken safely, else ``None``."""
        if not _REQUEST_LINE.match(self.requestline):
            return 400, "Bad request line (%r)" % self.requestline[:100]
        if not lines or lines[-1] not in (b"\r\n", b"\n"):
            return 400, "the request head ended early"
        for raw in lines[:-1]:
            text = raw.decode("latin-1")
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
            name, colon, value = text.partition(":")
            if not colon or not _TOKEN.match(name) or _CONTROL.search(value):
                return 400, "Bad header field (%r)" % text[:100]
        get = self.headers.get_all
        if "close" in re.split(r"[ \t]*,[ \t]*", ",".join(get("Connection") or ()).lower()):
            self.close_connection = True
        if self.request_version == "HTTP/1.1" and len(get("Host") or ()) != 1:
            return 400, "an HTTP/1.1 request needs exactly one Host field"
        codings, lengths = get("Transfer-Encoding"), get("Content-Length")
        if codings and lengths:
            return 400, "a request with both Content-Length and Transfer-Encoding"
        if codings:
            if len(codings) == 1 and codings[0].strip().lower() == "chunked":
                return 411, "send the body with a Content-Length (chunked bodies are not taken)"
            return 501, "the transfer coding %r is not supported" % ", ".join(codings)[:100]
        if lengths:
            if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,18}", lengths[0].strip(" \t")):
                return 400, "invalid Content-Length %r" % ", ".join(lengths)[:100]
            self.body_length = int(lengths[0].strip(" \t"))
        return None

    def handle_expect_100(self) -> bool:
        """``100 Continue`` is sent when the body is about to be read, not before the
        request is checked (a refused one never asks for its body)."""
        self.expecting = True
        return True

    def read_body(self, limit: int) -> bytes:
        """The request body, at most ``limit`` bytes, within ``body_timeout``."""
        length, self.body_length = self.body_length, 0
        if length > limit:
            self.close_connection = True
            raise RequestTooLargeError("the request body has %d bytes; the limit is %d"
                                       % (length, limit))
        if self.expecting:
            self.expecting = False
            self.send_response_only(100)
            self.end_headers()
        self.timed.arm(self.body_timeout)
        try:
            body = self.rfile.read(length)
        except socket.timeout:
            self.close_connection = True
            raise RequestTimeoutError("the request body did not arrive within %ss"
                                      % self.body_timeout) from None
        if len(body) < length:
            self.close_connection = True
            raise BadRequestError("the request body ended after %d of %d bytes" % (len(body), length),
                                  code="invalid_body")
        return body

    def send_head(self, status: int, headers: Dict[str, str]) -> None:
        """The status line and header fields, in one write; the connection closes after
        this answer if the client asked, or if a body it sent was not read."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if self.body_length:
            self.close_connection = True
        if self.close_connection and "Connection" not in headers:
            self.send_header("Connection", "close")
        self.connection.settimeout(self.send_timeout)
        self.end_headers()

    def send_body(self, status: int, body: bytes, content_type: str,
                  headers: Optional[Dict[str, str]] = None) -> int:
        """A whole answer (its head only, for HEAD); returns ``status``."""
        head = {"Content-Type": content_type, "Content-Length": str(len(body))}
        self.send_head(status, dict(head, **(headers or {})))
        if self.command != "HEAD":
            self.bytes_out += len(body)
            self.wfile.write(body)
        return status

    def send_json(self, status: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> int:
        return self.send_body(status, _json_bytes(obj), "application/json", headers)

    def start_events(self, headers: Optional[Dict[str, str]] = None) -> None:
        """Begin a ``text/event-stream``: chunked on HTTP/1.1, up to the close on 1.0."""
        self.chunked = self.request_version == "HTTP/1.1"
        head = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        if self.chunked:
            head["Transfer-Encoding"] = "chunked"
        else:
            self.close_connection = True
        self.send_head(200, dict(head, **(headers or {})))

    def send_event(self, data: bytes) -> None:
        """Write one or more whole events (the only write of a stream's body)."""
        if data:
            self.bytes_out += len(data)
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def end_events(self) -> None:
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """A request head refused (by http.server's parser or :meth:`_check_head`), as
        JSON; the connection then closes.  Override it for another error body."""
        self.close_connection = True
        try:
            self.send_json(code, {"detail": message or "bad request"})
        except OSError:
            pass

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Requests are logged by the subclasses that want it."""

    def log_message(self, format: str, *args: Any) -> None:
        """The handler's messages go to the module's logger (debug), escaped."""
        _log.debug("%s %s", self.client_address[0], _printable(format % args))


class _Server(http.server.ThreadingHTTPServer):
    """http.server's ``ThreadingHTTPServer`` (a thread per connection), counting its
    connections; it can serve in the background and stop cleanly."""

    request_queue_size = 1024          # the listen backlog; socketserver's 5 drops bursts
    _thread: Optional[threading.Thread] = None

    def __init__(self, address: Tuple[str, int], handler: Any) -> None:
        self.connections = 0           # open client connections
        self._count_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        """Bind, without the reverse DNS lookup of ``HTTPServer.server_bind``."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._count_lock:
            self.connections += 1      # each accepted connection ends in shutdown_request
        return True

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with self._count_lock:
            self.connections -= 1

    def get_request(self) -> Any:
        """``accept()``; out of file descriptors, said once a minute and backed off a
        tenth of a second (else the loop spins on the waiting connection)."""
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                if time.monotonic() > getattr(self, "_said", -60.0) + 60:
                    self._said = time.monotonic()
                    _log.error("cannot accept connections at %s: %s (the open-file limit; see "
                               "ulimit -n and --max-connections)", self.url, exc.strerror)
                time.sleep(0.1)
            raise

    @property
    def url(self) -> str:
        """The server's base URL, e.g. ``http://127.0.0.1:8000``."""
        host, port = self.server_address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in str(host) else host, port)

    def start(self) -> Any:
        """Serve in a daemon thread and return ``self`` at once."""
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,),
                                        daemon=True, name=type(self).__name__)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up is routine; anything else is logged."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            _log.debug("connection from %s ended: %s", client_address, exc)
        else:
            _log.exception("error while serving %s", client_address)


###############################################################################
# The gateway: an OpenAI-compatible HTTP server ################################
###############################################################################

_MAX_CONTAINERS = 200_000      # objects and arrays a request body may hold (each costs
                               # ~100 bytes parsed: a body of 4 MiB of "{}," would take 100 MB)


def _shutting_down() -> "ServerOverloadedError":
    return ServerOverloadedError("the server is shutting down; the stream was cut off "
                                 "after the grace period", code="server_shutting_down")


# The error code of each status the request head can be refused with.
_HEAD_ERRORS = {405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
                413: "request_too_large", 501: "not_implemented", 503: "server_overloaded"}


class _GatewayHandler(_Handler):
    """Serves the OpenAI routes; one instance (and thread) per connection."""

    server: "GatewayServer"
    _routes = {
        "/": {"GET": "page"},
        "/health": {"GET": "health"},
        "/metrics": {"GET": "metrics"},
        "/v1/dashboard": {"GET": "dashboard"},
        "/v1/models": {"GET": "list_models"},
        "/v1/chat/completions": {"POST": "chat"},
        "/v1/completions": {"POST": "completions"},
        "/v1/responses": {"POST": "responses"},
        "/v1/embeddings": {"POST": "embed"},
    }
    _public = ("/health", "/")                       # no key asked
    _unlimited = ("/health", "/metrics", "/", "/v1/dashboard")   # no rate limit, no slot, not
                                                                 # in the monitor's window
    request_id = ""

    def setup(self) -> None:
        for name in ("header_timeout", "body_timeout", "send_timeout"):     # the server's own
            setattr(self, name, getattr(self.server.config, name))
        super().setup()
        self._extra: Dict[str, str] = {}
        self._answer: Optional[_Answer] = None
        self.client = str(self.client_address[0])
        self.server.count_client(self.client, +1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.count_client(self.client_address[0], -1)

    def handle(self) -> None:
        """Serve the connection, unless the server, or this client's address (a trusted
        proxy's aside), has all the connections it takes."""
        srv, peer = self.server, str(self.client_address[0])
        if srv.connections > srv.max_connections:
            self.send_error(503, "the server has its limit of %d connections open; retry shortly"
                            % srv.max_connections)
        elif srv.clients.get(peer, 0) > srv.config.max_client_connections and \
                not srv.is_trusted(peer):
            self.send_error(503, "this address has its limit of %d connections open; close some"
                            % srv.config.max_client_connections)
        else:
            super().handle()

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """A request head refused, as an OpenAI error; the connection then closes."""
        code = 400 if code == 505 else code             # a client's fault stays 4xx
        self.close_connection = True
        self.request_id = _new_id("req_")
        err = BharatGenError(message or self.responses.get(code, ("bad request",))[0], status=code,
                             code=_HEAD_ERRORS.get(code, "bad_request"))
        err.type = "server_error" if code >= 500 and code != 501 else "invalid_request_error"
        headers = {"x-request-id": self.request_id}
        if code == 503:
            headers["Retry-After"] = "1"
        try:
            self.send_json(code, err.to_dict(), headers)
        except OSError:
            pass

    def do_OPTIONS(self) -> None:
        """CORS preflight: answered without a key, as browsers send none."""
        self.request_id = _new_id("req_")
        asked = self.headers.get("Access-Control-Request-Headers") or ""
        headers = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                   "Access-Control-Allow-Headers":
                       asked if _TOKENS.match(asked) else "authorization, content-type",
                   "Access-Control-Max-Age": "600"}
        self.send_head(204, self._headers(headers if self._cors_origin() else None))

    def _cors_origin(self) -> Optional[str]:
        origin, allowed = self.headers.get("Origin"), self.server.config.cors_origins
        if not origin or not allowed:
            return None
        return "*" if "*" in allowed else origin if origin in allowed else None

    def _headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Headers every response carries: request id, rate limits, CORS."""
        headers = {"x-request-id": self.request_id}
        headers.update(self._extra)
        if self._answer is not None:
            headers["x-token-counter"] = self._answer.counter
            headers.update({"x-cache": self._answer.cache} if self._answer.cache else {})
        origin = self._cors_origin()
        if origin:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = "x-request-id, x-ratelimit-limit-requests, " \
                                                       "x-ratelimit-remaining-requests, retry-after"
            if origin != "*":
                headers["Vary"] = "Origin"
        headers.update(extra or {})
        return headers

    def _path(self) -> str:
        """The route's path: ``//`` and a trailing ``/`` tolerated, ``/v1`` added if left out."""
        path = re.sub(r"/{2,}", "/", urllib.parse.urlsplit(self.path).path).rstrip("/") or "/"
        return "/v1" + path if not path.startswith("/v1/") and "/v1" + path in self._routes \
            else path

    def _route(self, path: str) -> Tuple[Dict[str, str], Optional[str]]:
        """``(methods, model_id)`` for the request; :class:`NotFoundError` if none."""
        if path in self._routes:
            return self._routes[path], None
        m = re.fullmatch(r"/v1/models/(.+)", path)
        if m:
            return {"GET": "get_model"}, urllib.parse.unquote(m.group(1))
        raise NotFoundError("Unknown request URL: %s %s. Please check the URL for typos; "
                            "this server serves /v1/chat/completions, /v1/completions, "
                            "/v1/responses, /v1/embeddings and /v1/models" % (self.command, path[:200]),
                            code="unknown_url")

    # -- one request --------------------------------------------------------------------

    def _client(self) -> str:
        """The client's address: the peer's, or behind a trusted proxy the nearest address
        in ``X-Forwarded-For`` that is not a trusted proxy's."""
        import ipaddress
        trusted = self.server.trusted
        hops = [self.client_address[0]] + [h.strip() for h in reversed(",".join(
            self.headers.get_all("X-Forwarded-For") or ()).split(",")) if h.strip()]
        for hop in hops:
            try:
                address = ipaddress.ip_address(hop)
            except ValueError:                     # not an address: the proxy says so
                return hop[:64]
            if not any(address in net for net in trusted):
                return hop
        return hops[-1]

    def _authenticate(self) -> None:
        """The request's key (its digest) and whether it is an admin's; a wrong key spends
        one of the client address's failed attempts (the rate limit, or 60 a minute)."""
        srv = self.server
        try:
            self._key, self._admin = srv.keys.identify(self.headers.get("Authorization"))
        except AuthenticationError:
            srv.failures.take("ip:" + self.client, 1, "requests with a wrong API key")
            raise
        self._who = "key:" + self._key

    def _check_host(self) -> None:
        """With no API keys, ``Host`` must be an address, ``localhost`` or an
        ``--allowed-host``: any web page the user visits could otherwise reach the
        gateway under a name of its own (DNS rebinding)."""
        import ipaddress
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] \
            if ":" in host else host
        try:
            ipaddress.ip_address(name)
            return
        except ValueError:
            if not host or name == "localhost" or name.endswith(".localhost") \
                    or name in self.server.config.allowed_hosts:
                return
        raise PermissionDeniedError("the Host %r is not a name this server answers to with no "
                                    "API key; give --allowed-host %s, or API keys"
                                    % (host[:100], name[:100] or "NAME"), code="host_not_allowed")

    def _dispatch(self) -> None:
        srv = self.server
        self.request_id = _new_id("req_")
        self.client = self._client() if srv.trusted else str(self.client_address[0])
        self._who = "ip:" + self.client
        self._extra, self._model, self._ttft, self._error = {}, None, None, None
        self._key, self._admin, self._answer = "-", not srv.keys.enabled, None
        started = time.monotonic()
        status, route, slot = 500, "unknown", False
        srv.track(+1)
        try:
            path = self._path()                         # authenticated before it is routed
            if not srv.keys.enabled:
                self._check_host()
            elif path not in self._public:
                self._authenticate()
            methods, model_id = self._route(path)
            route = path if not model_id else "/v1/models/{id}"
            method = "GET" if self.command == "HEAD" else self.command
            if method not in methods:
                raise MethodNotAllowedError("%s is not allowed on %s; use %s"
                                            % (self.command, path, ", ".join(methods)),
                                            headers={"Allow": ", ".join(methods)})
            if srv.draining.is_set() and path not in self._unlimited:   # before the body:
                raise ServerOverloadedError(                             # a proxy resends it
                    "the server is shutting down and takes no new requests; retry (another "
                    "copy behind the load balancer answers)", code="server_shutting_down")
            if path not in self._unlimited:
                self._extra = srv.limiter.take(self._who)
            body = self._request_json() if method == "POST" else None   # before a slot:
            if path not in self._unlimited:                              # a slow body holds none
                slot = srv.slots.acquire(blocking=False)
                if not slot:
                    raise ServerOverloadedError("the server is serving its limit of %d requests; "
                                                "retry shortly" % srv.config.max_concurrent)
            name = methods[method]
            if name == "get_model":
                status = self._respond(srv.backend.model(model_id))
            elif name in _OPERATIONS:
                status = self._generate(name, body)
            else:
                status = getattr(self, "_op_" + name)(body)
        except BharatGenError as exc:
            status = self._send_error(exc)
        except OSError:                                 # the client went away, or took nothing
            self.close_connection, status = True, 499
        except Exception:                               # the catch-all, at the boundary
            if not srv.catch_all:
                raise
            _log.exception("internal error while serving %s %s", self.command,
                           _printable(self.path[:200]))
            status = self._send_error(InternalServerError(
                "internal error in the gateway; request id %s" % self.request_id))
        finally:
            if slot:
                srv.slots.release()
            try:                        # counted out once recorded: none is missed at 0
                self._finish(route, status, time.monotonic() - started)
            finally:
                srv.track(-1)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    def _finish(self, route: str, status: int, took: float) -> None:
        """Metrics and the access-log line of one request."""
        usage = _usage(self._answer.gens) if self._answer else CompletionUsage()
        if self._answer is not None:
            self.server.tokens.settle(self._who, usage.total_tokens - self._answer.reserve)
        self.server.metrics.record(
            route, status, took, recent=route not in self._unlimited, ttft=self._ttft,
            error=self._error, key=self._key, tokens=(usage.prompt_tokens, usage.completion_tokens))
        if self._answer is not None and self._answer.cache and status == 200:
            self.server.metrics.inc("bharatgen_cache_total", result=self._answer.cache)
        fields = {"method": self.command, "path": self.path[:200], "status": status,
                  "model": self._model or "-", "duration": round(took, 4),
                  "ttft": None if self._ttft is None else round(self._ttft, 4),
                  "bytes": self.bytes_out, "request_id": self.request_id, "key": self._key[:12],
                  "client": self.client}
        if self.server.config.log_format == "json":
            _access_log.info(_json_line(fields))
        else:
            _access_log.info('%s "%s %s" %d model=%s %.3fs ttft=%s bytes=%d %s key=%s',
                             _printable(fields["client"]), _printable(self.command),
                             _printable(fields["path"]), status, _printable(fields["model"]),
                             took, "-" if self._ttft is None else "%.3fs" % self._ttft,
                             self.bytes_out, self.request_id, fields["key"])

    def _send_error(self, exc: BharatGenError) -> int:
        headers, self._error = dict(exc.headers), exc.type
        if isinstance(exc, RateLimitError):
            self.server.metrics.inc("bharatgen_rate_limited_total")
        if isinstance(exc, (UpstreamError, APIConnectionError)):
            self.server.metrics.inc("bharatgen_upstream_errors_total", kind=str(exc.code))
            if type(exc) is UpstreamError:
                headers.setdefault("x-should-retry", "false")
        if exc.status in (408, 413):
            self.close_connection = True
        return self.send_json(exc.status, exc.to_dict(), self._headers(headers))

    def _respond(self, obj: Any) -> int:
        return self.send_json(200, obj.to_dict() if isinstance(obj, _Object) else obj,
                              self._headers())

    def _request_json(self) -> Any:
        """The request body's JSON: strict UTF-8, at most :data:`_MAX_CONTAINERS` containers."""
        kind = self.headers.get_content_type()
        if kind != "application/json":     # a web page's plain form or text/plain post
            raise BadRequestError("send the body as JSON with 'Content-Type: application/json' "
                                  "(not %s)" % kind[:100], status=415,
                                  code="unsupported_media_type")
        raw = self.read_body(self.server.config.max_body_bytes)
        if not raw.strip():
            raise _bad("the request has no body; send a JSON object", None, "invalid_body")
        if raw.count(b"{") + raw.count(b"[") > _MAX_CONTAINERS:
            raise _bad("the JSON body holds over %d objects and arrays" % _MAX_CONTAINERS, None,
                       "invalid_json")
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise _bad("the request body is not valid UTF-8", None, "invalid_body") from None
        except RecursionError:
            raise _bad("the JSON body is nested too deeply", None, "invalid_json") from None
        except ValueError as exc:
            raise _bad("could not parse the JSON body: %s" % exc, None, "invalid_json") from None
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            self._model = body["model"][:100]
        return body

    # -- operations ---------------------------------------------------------------------

    def _op_health(self, body: None) -> int:
        """Up or down for anyone (503 ``draining`` from the start of :meth:`GatewayServer.drain`,
        so a load balancer sends no more); the replicas' states only with a valid key (if
        keys are set)."""
        ok, report = self.server.backend.health()
        body: Dict[str, Any] = {"status": "ok" if ok else "unavailable"}
        if self.server.draining.is_set():
            ok, body["status"] = False, "draining"
        try:
            if self.server.keys.enabled:
                self.server.keys.identify(self.headers.get("Authorization"))
            body.update(models=report, demo=self.server.config.demo, version=__version__)
        except AuthenticationError:
            pass
        return self.send_json(200 if ok else 503, body, self._headers())

    def _op_metrics(self, body: None) -> int:
        self.server.metrics.set("bharatgen_upstream_bytes_total", sum(
            c.bytes_read for c in self.server.backend.clients()))
        return self.send_body(200, self.server.metrics.render().encode("utf-8"),
                              "text/plain; version=0.0.4; charset=utf-8", self._headers())

    def _op_page(self, body: None) -> int:
        """The browser page (chat and monitor).  It holds nothing secret; its CSP lets only
        its own inline script and style run, and connect only to this server."""
        csp = "default-src 'none'; connect-src 'self'; img-src data:; base-uri 'none'; " \
              "form-action 'none'; frame-ancestors 'none'"
        for tag in ("script", "style"):
            text = re.search(r"<%s>(.*?)</%s>" % (tag, tag), _PAGE, re.S).group(1)  # type: ignore[union-attr]
            csp += "; %s-src 'sha256-%s'" % (tag, base64.b64encode(_sha256(text)).decode())
        return self.send_body(200, _PAGE.encode("utf-8"), "text/html; charset=utf-8", self._headers(
            {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
             "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}))

    def _op_dashboard(self, body: None) -> int:
        """The monitor's numbers, as JSON: totals since start, the recent window, replicas."""
        srv, m = self.server, self.server.metrics
        by_status: Dict[str, int] = {}
        for labels, n in m.series("bharatgen_requests_total").items():
            route, status = dict(labels)["route"], dict(labels)["status"]
            if route not in self._unlimited:
                by_status[status] = by_status.get(status, 0) + int(n)
        out = {"version": __version__, "uptime_seconds": round(time.time() - m.started, 1),
               "requests_in_flight": srv.in_flight - 1,          # not this one
               "streams_open": int(m.value("bharatgen_streams_in_flight")),
               "totals": {"requests": sum(by_status.values()), "by_status": by_status,
                          "tokens_in": int(m.value("bharatgen_tokens_total", direction="in")),
                          "tokens_out": int(m.value("bharatgen_tokens_total", direction="out")),
                          "upstream_errors": {dict(k)["kind"]: int(n) for k, n in m.series(
                              "bharatgen_upstream_errors_total").items()},
                          "rate_limited": int(m.value("bharatgen_rate_limited_total"))},
               "recent": m.recent(), "models": srv.backend.health()[1]}
        keys = out["recent"]["keys"]                  # a key sees its own row, an admin all
        out["recent"] = dict(out["recent"], keys={k[:12]: v for k, v in keys.items()
                                                  if self._admin or k == self._key})
        if srv.backend.cache is not None:
            out["cache"] = {"hits": int(m.value("bharatgen_cache_total", result="hit")),
                            "misses": int(m.value("bharatgen_cache_total", result="miss")),
                            "size": len(srv.backend.cache), "bytes": srv.backend.cache.bytes}
        return self.send_json(200, out, self._headers({"Cache-Control": "no-store"}))

    def _op_list_models(self, body: None) -> int:
        return self._respond(self.server.backend.models(app=True))

    def _op_embed(self, body: Any) -> int:
        admit = lambda n: self._extra.update(self.server.tokens.take(self._who, n))
        return self._respond(self.server.backend.embed(body, False, admit, self._gone))

    def _generate(self, op: str, body: Any) -> int:
        """A generation route: the answer whole, or streamed as server-sent events
        (``data: [DONE]`` ends a chat or completion; a response ends with its last event)."""
        answer = self.server.backend.generate(op, body, self._key)
        self._extra.update(self.server.tokens.take(self._who, answer.reserve))   # tokens a
        self._answer = answer                    # minute: reserved now, settled in _finish
        for gen in answer.gens:                  # a held or non-streamed answer writes
            getattr(gen, "gen", gen).gone = self._gone   # nothing: the app's job stops too
        if not answer.stream:
            whole = answer.whole()
            return self._respond(answer.reasoning.rename(whole.to_dict()) if op == "chat" else whole)
        if op == "responses":
            return self._stream((_sse(data, event) for event, data in answer.chunks), answer,
                                error_event="error")
        encode = self._chunk_encoder(answer.reasoning) if op == "chat" else \
            (lambda chunk: _sse(chunk.to_dict()))
        return self._stream(map(encode, answer.chunks), answer, done=b"data: [DONE]\n\n")

    def _gone(self) -> bool:
        """Whether the client hung up (its socket reads as ended)."""
        try:
            with selectors.DefaultSelector() as ready:
                ready.register(self.connection, selectors.EVENT_READ)
                return bool(ready.select(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    @staticmethod
    def _chunk_encoder(reasoning: _Reasoning) -> Callable[[ChatCompletionChunk], bytes]:
        """The SSE bytes of one stream's chunks.  A chunk that only adds text to a choice's
        content or reasoning (nearly every one) reuses the bytes rendered around its text
        the first time: one JSON string encoded instead of a dict built and encoded."""
        around: Dict[Tuple[int, str], Tuple[bytes, bytes]] = {}
        mark = "\x00bharatgen-text\x00"

        def encode(chunk: ChatCompletionChunk) -> bytes:
            choice = chunk.choices[0] if len(chunk.choices) == 1 else None
            delta = choice.delta if choice is not None else ChoiceDelta(role="-")
            texts = [(name, text) for name, text in (("content", delta.content), (
                "reasoning_content", delta.reasoning_content)) if text is not None]
            if len(texts) != 1 or not texts[0][1] or delta.role or choice.finish_reason:
                return _sse(reasoning.rename(chunk.to_dict()))
            (name, text), key = texts[0], (choice.index, texts[0][0])
            if key not in around:
                probe = dataclasses.replace(chunk, choices=[dataclasses.replace(
                    choice, delta=ChoiceDelta(**{name: mark}))])
                before, _, after = _sse(reasoning.rename(probe.to_dict())).partition(
                    _json_bytes(mark))
                around[key] = before, after
            return b"%s%s%s" % (around[key][0], _json_bytes(text), around[key][1])
        return encode

    def _send_stream_error(self, exc: BharatGenError, error_event: Optional[str]) -> bool:
        """Send ``exc`` as a stream's last event; True if the client is gone."""
        self._error = exc.type
        if isinstance(exc, (UpstreamError, APIConnectionError)):
            self.server.metrics.inc("bharatgen_upstream_errors_total", kind=str(exc.code))
        body = exc.to_dict()
        if error_event:               # the Responses API's shape: its fields, and "error"
            body = dict(body["error"], error=body["error"], type="error")
        try:
            self.send_event(_sse(body, error_event))
            return False
        except OSError:
            self.close_connection = True
            return True

    def _stream(self, events: Iterator[bytes], source: Any, done: bytes = b"",
                error_event: Optional[str] = None) -> int:
        """Send ``events`` as server-sent events, from this thread.

        The first event is produced before the head, so a failure before any output
        still gets its own status code; a failure after it (or the server shutting down
        past its grace period) is sent as an error event the openai SDK raises on, and
        the stream ends.  A client that takes nothing for ``send_timeout`` is cut off.
        """
        srv, started, began = self.server, time.monotonic(), False
        srv.limiter.open_stream(self._who)
        srv.metrics.inc("bharatgen_streams_in_flight")
        try:
            events = _primed(events)
            self._ttft = time.monotonic() - started
            srv.metrics.observe("bharatgen_time_to_first_token_seconds", self._ttft)
            self.start_events(self._headers({"X-Accel-Buffering": "no"}))
            began = True
            for event in events:
                if srv.closing.is_set():
                    raise _shutting_down()
                self.send_event(event)
        except BharatGenError as exc:
            if not began:
                raise
            _log.warning("stream %s failed after output began: %s", self.request_id,
                         _printable(exc.message))
            if self._send_stream_error(exc, error_event):
                return exc.status
        except OSError:             # the client went away or took nothing for send_timeout
            self.close_connection = True          # (the upstream's failures are
            return 499                            # BharatGenErrors by now)
        except Exception:           # a bug, once output began: an error event, the stream ends
            if not began or not srv.catch_all:
                raise
            _log.exception("stream %s failed after output began", self.request_id)
            if self._send_stream_error(InternalServerError(
                    "internal error in the gateway; request id %s" % self.request_id), error_event):
                return 500
        finally:
            getattr(source, "close", lambda: None)()
            srv.metrics.inc("bharatgen_streams_in_flight", -1)
            srv.limiter.close_stream(self._who)
        try:
            self.send_event(done)
            self.end_events()
        except OSError:
            self.close_connection = True
        return 200


def _open_files(raise_soft: bool = False) -> Optional[int]:
    """The open-file limit (soft; None where there is none), first raised to the hard
    limit if asked and allowed."""
    try:
        import resource
    except ImportError:                    # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_soft and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


class GatewayServer(_Server):
    """The OpenAI-compatible server: one thread per connection, state on the instance.

    ``GatewayServer(config).start()`` serves in a background thread (tests, embedding);
    ``serve_forever()`` serves in the caller's; :meth:`drain` stops it gracefully.
    """

    catch_all = True          # tests may set False to see the real exception

    def __init__(self, config: Config, backend: Optional[_Backend] = None) -> None:
        self.config = config
        self.keys = _KeyStore(config.api_keys, config.api_key_file, config.admin_keys)
        self.metrics = _Metrics()
        self.backend = backend or _Backend(config)
        self.limiter = _RateLimiter(config.rate_limit_rpm, config.rate_limit_streams)
        self.tokens = _RateLimiter(config.rate_limit_tpm, unit="tokens")
        self.failures = _RateLimiter(config.rate_limit_rpm or 60)   # wrong keys, by address
        import ipaddress
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]
        self.slots = threading.BoundedSemaphore(config.max_concurrent)
        self.draining = threading.Event()        # /health and new requests are 503s
        self.closing = threading.Event()         # streams still running are cut off
        self.in_flight = 0
        self.clients: Dict[str, int] = {}        # open connections by client address
        self.max_connections = config.max_connections
        files = _open_files()                    # each connection may hold two descriptors
        if files is not None and 2 * self.max_connections + 128 > files:
            self.max_connections = max(1, (files - 128) // 2)
            _log.warning("--max-connections %d is lowered to %d: the open-file limit is %d "
                         "(ulimit -n)", config.max_connections, self.max_connections, files)
        super().__init__((config.host, config.port), _GatewayHandler)

    def count_client(self, address: str, delta: int) -> None:
        with self._count_lock:
            n = self.clients[address] = self.clients.get(address, 0) + delta
            if n <= 0:
                del self.clients[address]

    def is_trusted(self, address: str) -> bool:
        """Whether ``address`` is a trusted proxy's (``--trusted-proxy``)."""
        import ipaddress
        try:
            return any(ipaddress.ip_address(address) in net for net in self.trusted)
        except ValueError:
            return False

    def track(self, delta: int) -> None:
        """Count requests being served (for :meth:`drain` and the metrics)."""
        with self._count_lock:
            self.in_flight += delta
        self.metrics.inc("bharatgen_requests_in_flight", delta)

    def drain(self, grace: float) -> bool:
        """Drain as a load balancer expects: at once ``/health`` says 503 and each new request
        gets a 503 ``server_shutting_down`` before its body is read (nginx's
        ``proxy_next_upstream http_503`` resends it to another copy), while the listener
        stays open and the requests in flight finish, for up to ``grace`` seconds or until
        :attr:`closing` is set; then stop accepting and cut off the streams still running
        (each gets an error event).  True if none was cut."""
        self.draining.set()
        deadline = time.monotonic() + grace
        while self.in_flight > 0 and time.monotonic() < deadline and not self.closing.is_set():
            time.sleep(0.05)
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.socket.close()
        clean = self.in_flight == 0
        self.closing.set()
        deadline = time.monotonic() + 5
        while self.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return clean

    def server_close(self) -> None:
        super().server_close()
        self.backend.close()


###############################################################################
# The demo upstream: a stand-in Param app speaking Gradio's protocol ###########
###############################################################################


def _demo_instance(schema: Any, root: Any, depth: int = 0) -> Any:
    """A value that fits a JSON Schema: what the demo answers when asked for JSON."""
    if not isinstance(schema, dict) or depth > 16:
        return None
    if "$ref" in schema:
        return _demo_instance(_resolve(root, schema["$ref"]), root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):                    # deep down, null ends a recursive model
            nulls = [s for s in schema[key] if depth > 3 and isinstance(s, dict)
                     and s.get("type") == "null"]
            return _demo_instance((nulls or schema[key])[0], root, depth + 1)
    if "enum" in schema or "const" in schema:
        return schema["const"] if "const" in schema else schema["enum"][0]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        return {k: _demo_instance(v, root, depth + 1)
                for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_demo_instance(schema.get("items", {"type": "string"}), root, depth + 1)]
    low = schema.get("minimum", 0)
    return {"string": "Param", "integer": max(low, 1), "number": max(low, 1.5), "boolean": True,
            "null": None}.get(kind)


def _demo_shaped(message: str, history: Any, system: Any) -> Optional[str]:
    """The reply of a model that calls tools and answers in JSON, when the system prompt
    offers tools (asked about the weather, it calls the weather tool for each city) or
    asks for JSON.  "bad call" or "bad json" in the prompt gets one bad reply first,
    "[[bad-call]]" and "[[bad-json]]" only bad ones."""
    system = system if isinstance(system, str) else ""
    asked, repair = message, message.startswith(_REPAIR.split(":")[0])
    if repair:                               # the request is the last user turn before
        turns = [h for h in history or () if isinstance(h, dict) and h.get("role") == "user"]
        asked = _message_text(turns[-1]["content"]) if turns else ""
    lower = asked.lower()
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", message, re.S)
    if results:
        return "Here is what the tools said: " + "; ".join(
            "%(name)s: %(content)s" % json.loads(r) for r in results)
    tools = [json.loads(line)["function"] for line in
             re.findall(r'^\{"type": "function".*$', system, re.M)]
    weather = next((t for t in tools if "weather" in t["name"]), None)
    must = re.search(r"You must call (?:the function '([^']+)'|at least one function)", system)
    named = next((t for t in tools if must and t["name"] == must.group(1)), None)
    if tools and ("bad call" in lower and not repair or "[[bad-call]]" in lower):
        return '<tool_call>\n{"name": "%s", "arguments": {}}\n</tool_call>' % (
            named or weather or tools[0])["name"]
    asks_weather = weather is not None and "weather" in lower and named in (None, weather)
    if must and not asks_weather and "[[no-call]]" not in lower:
        tool = named or tools[0]                  # told to call: arguments that fit
        params = tool.get("parameters") or {}
        return "<tool_call>\n%s\n</tool_call>" % json.dumps(
            {"name": tool["name"], "arguments": _demo_instance(params, params)})
    if asks_weather:
        arg = next(iter((weather.get("parameters") or {}).get("properties") or {"city": 0}))
        return "Let me check.\n\n" + "\n".join(
            "<tool_call>\n%s\n</tool_call>" % json.dumps({"name": weather["name"],
                                                          "arguments": {arg: city}})
            for city in re.findall(r"\b(?:in|and) ([A-Z]\w+)", asked))
    if "Reply with JSON only" in system:
        if "bad json" in lower and not repair or "[[bad-json]]" in lower:
            return "Sure! {not json"
        m = re.search(r"valid against this JSON Schema:\n(.*)$", system, re.M)
        schema = json.loads(m.group(1)) if m else {"properties": {"answer": {"type": "string"}}}
        return "```json\n%s\n```" % json.dumps(_demo_instance(schema, schema))
    return None


def _demo_reply(message: str, history: Any, system: Any, params: Sequence[Any]) -> Tuple[str, str]:
    """The demo's (thought, answer) for a message: chosen by keywords in the prompt."""
    thought = "The user said: %s. Let me think step by step." % message[:200]
    shaped = _demo_shaped(message, history, system)
    if shaped is not None:
        return thought, shaped
    lower = message.lower()
    m = re.search(r"(\d+) words", lower)
    if m:
        n = min(int(m.group(1)), 20000)
        return thought, " ".join(_DEMO_WORDS[i % len(_DEMO_WORDS)] for i in range(n))
    if "history" in lower:
        return thought, "SYSTEM=%s | HISTORY=%s" % (system, json.dumps(history, sort_keys=True))
    if "params" in lower:
        return thought, "PARAMS temperature=%r max_tokens=%r top_p=%r top_k=%r" % tuple(params)
    for key, answer in _DEMO_ANSWERS:
        if key in lower:
            return thought, answer
    return thought, ("This is the bharatgen_openai demo upstream, not the Param model. "
                     "You said: %s" % message)


def _demo_tokens(text: str) -> Iterator[str]:
    """Cumulative prefixes of ``text``, token by token; a token ending in a non-ASCII
    character first shows up half-written, as U+FFFD, as a real tokenizer's does."""
    done = ""
    for token in re.findall(r"\s*\S+|\s+", text):
        if ord(token[-1]) > 0x7F:
            yield done + token[:-1] + "\ufffd"
        done += token
        yield done


def _demo_html(thought: str, answer: str, max_tokens: Any = None) -> Iterator[str]:
    """The Param app's assistant HTML, snapshot by snapshot, as it streams; the answer
    stops where thought and answer reach ``max_tokens`` (by :func:`estimate_tokens`)."""
    started = time.monotonic()
    for part in _demo_tokens(thought):
        yield _THOUGHT_HEAD % " open" + html.escape(part) + "\n\n</details>"
    closed = _THOUGHT_HEAD % "" + html.escape(thought) + "\n\n</details>\n\n"
    said, used = "", estimate_tokens(thought)
    for part in _demo_tokens(answer):
        if not part.endswith("\ufffd"):            # a whole token: it counts
            used += estimate_tokens(part[len(said):])
            if isinstance(max_tokens, (int, float)) and used > max_tokens:
                break
            said = part
        yield closed + part
    took = time.monotonic() - started
    yield (closed + said + _DEBUG_HEAD + html.escape("<think>%s</think>%s" % (thought, said))
           + _LATENCY % (took, took))


@dataclass
class _DemoJob:
    """One submitted job of the demo upstream."""
    data: List[Any]
    event_id: str
    queue: bool
    cancelled: threading.Event = field(default_factory=threading.Event)
    next_at: float = 0.0       # when its next token is due (a steady rate, like a model's)
    endpoint: str = "chat_fn_1"


class _DemoHandler(_Handler):
    """The routes of a Gradio app: ``/config``, ``info``, ``/call``, the queue, ``cancel``."""

    server: "DemoUpstream"

    def do_GET(self) -> None:
        srv, parts = self.server, urllib.parse.urlsplit(self.path)
        path = parts.path
        m = re.fullmatch(re.escape(srv.prefix) + r"/call/(\w+)/(\w+)", path)
        session = urllib.parse.parse_qs(parts.query).get("session_hash", [""])[0]
        if path.rstrip("/") == "/config":
            self.send_json(200, srv.config_json())
        elif path == srv.prefix + "/info":
            self.send_json(200, srv.info_json())
        elif m and m.group(1) in (srv.endpoint, "embed"):
            self._stream(srv.take(m.group(2)), srv.call_events)
        elif path == srv.prefix + "/queue/data" and srv.queue:
            self._stream(srv.take("session:" + session), srv.queue_events)
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        srv, path = self.server, urllib.parse.urlsplit(self.path).path
        try:
            body = json.loads(self.read_body(1 << 24) or b"null")
        except (ValueError, BharatGenError):
            self.send_json(422, {"detail": [{"type": "json_invalid"}]})
            return
        call = re.fullmatch(re.escape(srv.prefix) + r"/call/(\w+)/?", path)
        join = path == srv.prefix + "/queue/join" and srv.queue
        if path == srv.prefix + "/cancel":
            srv.cancel(body)
            self.send_json(200, {"success": True})
        elif not (join or (call and call.group(1) in (srv.endpoint, "embed"))):
            self.send_body(500, b"Internal Server Error", "text/plain; charset=utf-8")
        elif not isinstance(body, dict) or not isinstance(body.get("data"), list):
            self.send_json(422, {"detail": [{"type": "missing", "loc": ["body", "data"]}]})
        else:
            body["endpoint"] = "embed" if (call.group(1) if call else body.get("fn_index")) in (
                "embed", 2) else srv.endpoint
            self.send_json(*srv.submit(body, bool(join), self.headers))

    def _stream(self, job: Optional[_DemoJob],
                render: Callable[[_DemoJob], Iterator[Optional[bytes]]]) -> None:
        """A job's events, each when it is due; ``None`` from ``render`` drops the connection."""
        self.start_events()
        if job is None:
            self.send_event(b'event: error\ndata: "404: Not Found"\n\n')
            self.end_events()
            return
        with self.server.lock:
            self.server.running[id(job)] = job
        try:
            for event in render(job):
                if event is None:
                    self.close_connection = True
                    return
                self.send_event(event)
            self.end_events()
        except OSError:
            self.close_connection = True
        finally:
            with self.server.lock:
                self.server.running.pop(id(job), None)


class DemoUpstream(_Server):
    """A stand-in for the Param Gradio app (Gradio 6): its routes, events and HTML.

    It answers from the prompt: "hello", "format", "hindi", "tamil", "history" (echoes the
    system prompt and history), "params" (echoes the sampling values), "N words"; one
    token every ``token_delay`` seconds.  ``queue`` offers the queue protocol beside
    ``/call``.  The tests' emulator of other Gradio versions and faults subclasses it.
    """

    version = "6.31.0"
    prefix = "/gradio_api"
    endpoint = "chat_fn_1"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token_delay: float = 0.0,
                 queue: bool = True) -> None:
        self.token_delay, self.queue = token_delay, queue
        self.jobs: Dict[str, _DemoJob] = {}      # submitted, not streamed yet (at most 64)
        self.running: Dict[int, _DemoJob] = {}   # streaming; a job's inputs go when it ends
        self.lock = threading.Lock()
        super().__init__((host, port), _DemoHandler)

    def stop(self) -> None:
        """Stop serving, end the streams still running, release the socket."""
        with self.lock:
            for job in self.running.values():
                job.cancelled.set()
        super().stop()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- what the app says of itself ---------------------------------------------------

    def _inputs(self) -> List[Tuple[int, str, str, Any]]:
        """(component id, type, parameter name, default) of the endpoint's inputs."""
        return [(2, "textbox", "message", None), (1, "chatbot", "chat_history", []),
                (4, "textbox", "system_prompt", DEFAULT_SYSTEM_PROMPT),
                (5, "slider", "temperature", DEFAULT_TEMPERATURE),
                (6, "slider", "max_tokens", DEFAULT_MAX_TOKENS),
                (7, "slider", "top_p", DEFAULT_TOP_P), (8, "slider", "top_k", DEFAULT_TOP_K)]

    def config_json(self) -> Dict[str, Any]:
        """What ``GET /config`` answers (the parts clients read)."""
        inputs = self._inputs()
        dep = {"id": 1, "api_name": self.endpoint, "inputs": [i for i, _, _, _ in inputs],
               "outputs": [1, 2], "backend_fn": True, "queue": True,
               "api_visibility": "public", "connection": "sse"}
        components = []
        for cid, kind, name, default in inputs:
            props = {"label": name, "value": default}
            if kind == "slider":
                props["minimum"], props["maximum"] = _DEMO_SLIDERS[name]
            components.append({"id": cid, "type": kind, "props": props})
        return {"version": self.version, "api_prefix": self.prefix or None,
                "protocol": "sse_v3" if self.queue else "sse_v1", "enable_queue": True,
                "title": "bharatgen_openai demo upstream", "components": components,
                "dependencies": [dict(dep, id=0, api_name="chat_fn"), dep, dict(
                    dep, id=2, api_name="embed", inputs=[9], outputs=[10])]}

    def info_json(self) -> Dict[str, Any]:
        """What ``<prefix>/info`` answers: the endpoint's parameters (no State)."""
        params = [{"label": name, "parameter_name": name, "component": kind.capitalize(),
                   "parameter_has_default": default is not None, "parameter_default": default,
                   "type": {"type": "number", "description": "numeric value between %g and %g"
                            % _DEMO_SLIDERS[name]} if kind == "slider" else {"type": "string"},
                   "python_type": {"type": "Any", "description": ""}}
                  for _, kind, name, default in self._inputs() if kind != "state"]
        endpoint = {"parameters": params, "returns": [{"component": "Chatbot"},
                                                     {"component": "Textbox"}]}
        embed = {"parameters": [{"label": "text", "parameter_name": "text", "component":
                                 "Textbox", "parameter_has_default": False}],
                 "returns": [{"component": "Json"}]}       # the demo's embedding model
        return {"named_endpoints": {"/" + self.endpoint: endpoint, "/chat_fn": endpoint,
                                    "/embed": embed}, "unnamed_endpoints": {}}

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, body: Dict[str, Any], queue: bool, headers: Any) -> Tuple[int, Any]:
        """Take a job (``/call`` or ``queue/join``): ``(status, answer)``."""
        job = _DemoJob(body["data"], os.urandom(16).hex(), queue, endpoint=body.get("endpoint"))
        with self.lock:
            self.jobs["session:" + str(body.get("session_hash")) if queue else job.event_id] = job
            while len(self.jobs) > 64:           # never streamed: the oldest are dropped
                del self.jobs[next(iter(self.jobs))]
        return 200, {"event_id": job.event_id}

    def take(self, key: str) -> Optional[_DemoJob]:
        with self.lock:
            return self.jobs.pop(key, None)

    def cancel(self, body: Any) -> None:
        with self.lock:
            for job in self.running.values():
                if isinstance(body, dict) and job.event_id == body.get("event_id"):
                    job.cancelled.set()

    def _pace(self, job: _DemoJob) -> bool:
        """Wait until the job's next token is due (a steady rate: a late wake-up is made
        up, not added to every later token); False once the job is cancelled."""
        if self.token_delay:
            now = time.monotonic()
            job.next_at = (job.next_at or now) + self.token_delay
            job.cancelled.wait(max(0.0, job.next_at - now))
        return not job.cancelled.is_set()

    # The (thought, answer) for a message: :func:`_demo_reply`'s canned ones.
    reply = staticmethod(_demo_reply)

    def _values(self, job: _DemoJob) -> Dict[str, Any]:
        """The job's inputs by parameter name."""
        return {name: value for (_, _, name, _), value in zip(self._inputs(), job.data)}

    def _steps(self, job: _DemoJob) -> Iterator[Tuple[str, Any]]:
        """What the app does for a job: ``("output", value)`` updates, then ``("done",
        value)`` (``None`` if cancelled); subclasses add ``("error", message)``."""
        if job.endpoint == "embed":            # 16 numbers from the text's SHA-256, of length 1
            raw = [b - 127.5 for b in hashlib.sha256(str(job.data[0]).encode()).digest()[:16]]
            yield "done", [[x / math.sqrt(sum(y * y for y in raw)) for x in raw]] if \
                self._pace(job) else None
            return
        values = self._values(job)
        message = values.get("message") if isinstance(values.get("message"), str) else ""
        history = values.get("chat_history") or []
        params = [values.get(n) for n in ("temperature", "max_tokens", "top_p", "top_k")]
        thought, answer = self.reply(message, history, values.get("system_prompt"), params)
        chat, text = self._chat(history, message), ""
        for text in _demo_html(thought, answer, values.get("max_tokens")):
            if not self._pace(job):
                yield "done", None
                return
            yield "output", self._output(chat, text)
        yield "done", self._output(chat, text)

    def _chat(self, history: List[Any], message: str) -> List[Any]:
        """The conversation so far, as the Chatbot returns it."""
        return [{"role": h["role"], "metadata": None, "content": h["content"], "options": None}
                for h in history] + [{"role": "user", "metadata": None, "options": None,
                                      "content": [{"text": message, "type": "text"}]}]

    def _output(self, chat: List[Any], text: str) -> List[Any]:
        """The endpoint's outputs with the reply ``text``."""
        return [chat + [{"role": "assistant", "metadata": None, "options": None,
                         "content": [{"text": text, "type": "text"}]}], ""]

    def _reply_path(self, output: List[Any]) -> List[Any]:
        """Where the reply text sits inside output 0, for diffs."""
        return [len(output[0]) - 1, "content", 0, "text"]

    def call_events(self, job: _DemoJob) -> Iterator[Optional[bytes]]:
        """The ``/call`` event stream of a job."""
        for kind, value in self._steps(job):
            if kind == "error":
                yield _sse({"error": value, "visible": True}, "error")
                return
            yield _sse(value, "complete" if kind == "done" else "generating")

    def queue_events(self, job: _DemoJob) -> Iterator[Optional[bytes]]:
        """The queue protocol's messages for a job: whole output first, then diffs."""
        def msg(kind: str, **fields: Any) -> bytes:
            return _sse(dict(msg=kind, event_id=job.event_id, **fields))

        yield msg("estimation", rank=0, queue_size=1, rank_eta=0.5)
        yield msg("process_starts", eta=0.5)
        last: Any = None
        for kind, value in self._steps(job):
            if kind == "output":
                data = value
                if last is not None:
                    path, old, new = self._reply_path(value), last[0], value[0]
                    for key in path:
                        old, new = old[key], new[key]
                    data = [[["append", path, new[len(old):]] if new.startswith(old) else
                             ["replace", path, new]], []]
                last = value
                yield msg("process_generating", output={"data": data, "is_generating": True},
                          success=True)
            elif kind == "done":
                yield msg("process_completed", output={"data": value, "is_generating": False},
                          success=True)
            else:               # "error", or a subclass's own step: its bytes, None to drop
                yield msg("process_completed", output={"error": value, "visible": True},
                          success=False) if kind == "error" else value
                return
        yield _sse({"msg": "close_stream", "event_id": None})


###############################################################################
# Benchmark: the gateway beside direct calls to the same upstream ###############
###############################################################################

def _proc_stats(pid: int) -> Tuple[float, float]:
    """CPU seconds used and peak RSS (MB) of a process, from /proc (Linux; nan elsewhere)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open("/proc/%d/status" % pid) as f:
            peak = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
        return cpu, peak / 1024.0
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")


def _spawn(args: List[str], pattern: str, timeout: float = 30) -> Tuple[Any, str]:
    """Run this file with ``args`` in a new process; ``(process, first group of pattern)``
    once ``pattern`` shows on its stderr (which is then drained, so it never blocks)."""
    import subprocess
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args,
                            stderr=subprocess.PIPE, text=True)
    lines: List[str] = []
    while time.monotonic() - started < timeout:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("bench: %s did not start:\n%s" % (args[0], "".join(lines)[-2000:]))


def _via_gateway(url: str, prompt: str, timeout: float, kept: Any,
                 started: float) -> Tuple[float, float]:
    """One streamed chat through the gateway over a kept-alive http.client connection
    (one a thread, as the openai SDK keeps a pool): seconds to the first answer text,
    and in all, from ``started``."""
    conn = getattr(kept, "conn", None)
    if conn is None:
        parts = urllib.parse.urlsplit(url)
        conn = kept.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    body = json.dumps({"model": DEFAULT_MODEL, "stream": True,
                       "messages": [{"role": "user", "content": prompt}]})
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError("HTTP %d: %r" % (resp.status, resp.read()[:200]))
        ttft, seen = None, b""
        for block in iter(lambda: resp.read1(65536), b""):
            if ttft is None:
                seen = seen[-64:] + block
                if re.search(rb'"content":"[^"]', seen):
                    ttft = time.monotonic() - started
            if b'data: {"error"' in block:
                raise RuntimeError(block[block.index(b'data: {"error"'):][:200])
    except BaseException:
        conn.close()
        kept.conn = None
        raise
    total = time.monotonic() - started
    return (total if ttft is None else ttft), total


def _via_direct(client: BharatGenOpenAI, prompt: str, started: float) -> Tuple[float, float]:
    """The same chat through the SDK straight to the upstream, no gateway."""
    ttft = None
    for chunk in client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], stream=True):
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.monotonic() - started
    total = time.monotonic() - started
    return (total if ttft is None else ttft), total


def _load(fn: Callable[[Any, float], Tuple[float, float]], concurrency: int,
          requests: int) -> Dict[str, Any]:
    """``requests`` calls of ``fn`` on ``concurrency`` threads that start together; each
    call's times count from when it was due (the start, or the end of its thread's last
    call), so a load generator slowed by its own work does not flatter the figures."""
    times: List[Tuple[float, float]] = []       # (ttft, total) of each call that worked
    errors: List[str] = []
    left, go = threading.Semaphore(requests), threading.Event()   # a call each acquire

    def worker() -> None:
        kept = threading.local()
        go.wait()
        due = begun
        while left.acquire(blocking=False):
            try:
                times.append(fn(kept, due))     # list.append is atomic: no lock
            except Exception as exc:          # counted and shown, the run goes on
                errors.append(repr(exc)[:200])
            due = time.monotonic()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    begun = time.monotonic()
    go.set()
    for t in threads:
        t.join()
    ttfts = [ttft for ttft, _ in times]
    return {"wall": time.monotonic() - begun, "ttft": _percentile(ttfts, .5),
            "ttft95": _percentile(ttfts, .95),
            "total": _percentile([total for _, total in times], .5), "errors": errors}


_BENCH_ROW = "%5s %-8s %5s %7s %9s %9s %8s %6s %7s %7s"


def _cmd_bench(args: Any) -> int:
    """Load a gateway and the same upstream directly, side by side (alternating which
    goes first); print wall time, TTFT and errors of each, their ratio, and the
    gateway's CPU and peak memory."""
    procs: List[Any] = []
    try:
        upstream = args.upstream
        if not upstream:
            proc, upstream = _spawn(["demo", "--port", "0", "--token-delay",
                                     str(args.token_delay)], r" at (http://\S+)")
            procs.append(proc)
        proc, url = _spawn(["--log-level", "WARNING", "serve", "--upstream", upstream, "--port",
                            "0", "--max-concurrent", "100000", "--max-connections", "100000",
                            "--max-client-connections", "100000"],
                           r"OpenAI API at (http://[\d.:\[\]a-z]+)/v1")
        procs.append(proc)
        direct = BharatGenOpenAI(upstream, timeout=args.timeout)
        print("bharatgen_openai %s bench on %d cores: %s, %d-word streamed answers%s"
              % (__version__, os.cpu_count() or 0, "upstream " + upstream if args.upstream else
                 "demo upstream, %g ms a token" % (args.token_delay * 1000), args.words,
                 "; medians of %d runs, alternating" % args.repeat if args.repeat > 1 else ""))
        print(_BENCH_ROW % ("conc", "path", "reqs", "wall s", "ttft p50", "ttft p95", "tot p50",
                            "errors", "gw cpu", "gw rss"))
        for conc in args.concurrency:
            _bench_level(args, conc, url, direct, proc.pid)
        direct.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
    return 0


def _bench_level(args: Any, conc: int, url: str, direct: Any, gateway_pid: int) -> None:
    """One concurrency's rows: the gateway, direct calls, and their ratio."""
    n, prompt, cpu = max(args.requests or conc, conc), "%d words" % args.words, 0.0
    paths = [("gateway", lambda kept, due: _via_gateway(url, prompt, args.timeout, kept, due)),
             ("direct", lambda kept, due: _via_direct(direct, prompt, due))]
    runs: Dict[str, List[Dict[str, Any]]] = {"gateway": [], "direct": []}
    for i in range(args.repeat):
        for name, fn in (paths if i % 2 == 0 else paths[::-1]):
            before = _proc_stats(gateway_pid)[0]
            runs[name].append(_load(fn, conc, n))
            cpu += _proc_stats(gateway_pid)[0] - before if name == "gateway" else 0
    keys = ("wall", "ttft", "ttft95", "total")
    median = {name: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in keys}
              for name, rs in runs.items()}
    for name in ("gateway", "direct"):
        m, gw = median[name], name == "gateway"
        errors = [e for r in runs[name] for e in r["errors"]]
        print(_BENCH_ROW % (conc, name, n, "%.2f" % m["wall"], "%.0fms" % (m["ttft"] * 1000),
                            "%.0fms" % (m["ttft95"] * 1000), "%.2fs" % m["total"], len(errors),
                            "%.2fs" % (cpu / args.repeat) if gw else "-",
                            "%.0fMB" % _proc_stats(gateway_pid)[1] if gw else "-"))
        for e in errors[:3]:
            print("      error: %s" % e)
    g, d = median["gateway"], median["direct"]
    print(_BENCH_ROW % (conc, "ratio", "", *("%.3fx" % (g[k] / d[k]) for k in keys), "", "", ""))


###############################################################################
# Command line ##################################################################
###############################################################################

def _config_from_args(args: Any) -> Config:
    """A :class:`Config` from parsed flags, the environment and the defaults."""
    if getattr(args, "demo", None) and getattr(args, "upstream", None):
        raise ValueError("--demo and --upstream each name the upstream: give one of them")
    return Config.load(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)})


def _start_demo(config: Config, token_delay: float, out: Any = None) -> DemoUpstream:
    """The built-in demo upstream, in this process; said to ``out`` (if given)."""
    demo = DemoUpstream(token_delay=token_delay).start()
    config.upstream, config.models_file, config.demo = [demo.url], None, True
    if out is not None:
        print(_DEMO_SAYS % demo.url, file=out, flush=True)
    return demo


_DEMO_SAYS = ("DEMO: serving canned answers from the built-in demo upstream at %s; this is NOT "
              "the Param model. Give --upstream URL (or BHARATGEN_BASE_URL) for the real one.")


def _is_loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _cmd_serve(args: Any) -> int:
    config = _config_from_args(args)
    if config.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_JSONFormatter())
    if not (config.api_keys or config.api_key_file or config.allow_no_auth
            or _is_loopback(config.host)):
        raise SystemExit("error: refusing to serve on %s with no API key: anyone on the network "
                         "could use it. Give --api-key, --api-key-file or BHARATGEN_API_KEYS, "
                         "or --allow-no-auth if that is really what you want." % config.host)
    _open_files(raise_soft=True)
    with contextlib.ExitStack() as cleanup:          # the server is closed, then the demo
        demo = None
        if args.demo or not (config.upstream or config.models_file):
            demo = cleanup.enter_context(_start_demo(config, args.token_delay))  # said below
        try:
            server = cleanup.enter_context(GatewayServer(config))
        except OSError as exc:                       # most often: the port is taken
            print("error: cannot listen on %s port %d: %s; choose another with --port (0 picks "
                  "a free one)" % (config.host, config.port, exc.strerror or exc),
                  file=sys.stderr)
            return 2
        if demo is not None:                         # once the port is ours
            print(_DEMO_SAYS % demo.url, file=sys.stderr, flush=True)
        for route in server.backend.routes.values():
            print("bharatgen_openai %s: OpenAI API at %s/v1, model %r in front of %s"
                  % (__version__, server.url, route.id, route.pool.base_url),
                  file=sys.stderr, flush=True)
        print("chat and monitor in a browser: %s/" % server.url, file=sys.stderr, flush=True)
        if not server.keys.enabled:
            print("WARNING: no API key configured; anyone who can reach %s can use it. Set "
                  "--api-key or BHARATGEN_API_KEYS." % server.url, file=sys.stderr, flush=True)
        stop = _on_signals(server)
        server.start()
        threading.Thread(target=_announce, args=(server,), daemon=True).start()
        while not stop.wait(0.5):
            pass
        print("stopping: /health and new requests get 503; letting requests in flight finish "
              "(up to %gs)" % config.grace, file=sys.stderr, flush=True)
        clean = server.drain(config.grace)
        print("stopped%s" % ("" if clean else "; streams still running were cut off"),
              file=sys.stderr, flush=True)
    return 0


def _on_signals(server: GatewayServer) -> threading.Event:
    """An event SIGTERM and SIGINT set: the first drains, the second cuts off the streams,
    the third exits.  SIGHUP re-reads the API keys."""
    import signal
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        if stop.is_set() and server.closing.is_set():
            os._exit(130)
        if stop.is_set():
            print("stopping now: cutting off the streams", file=sys.stderr, flush=True)
            server.closing.set()
        stop.set()
    for name in ("SIGTERM", "SIGINT"):
        signal.signal(getattr(signal, name), on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: _log.info("reloaded %d API keys",
                                                          server.keys.reload()))
    return stop


class _JSONFormatter(logging.Formatter):
    """One JSON object a line, with a timestamp: the access log's fields, or the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        message = record.getMessage()
        if record.name == _access_log.name and message.startswith("{"):
            line.update(json.loads(message))
        else:
            line["message"] = message
        return _json_line(line)


def _announce(server: GatewayServer) -> None:
    """Discover each upstream once at start: log what was found, or warn (the server
    serves on; the app may come up later)."""
    for route in server.backend.routes.values():
        for replica in route.pool.replicas:
            try:
                info = replica.client.discover()
                _log.info("model %r: %s is Gradio %s, endpoint /%s; %s", route.id,
                          replica.client.base_url, info.version or "?", info.endpoint,
                          info.mapping() if route.kind == "chat" else "embeddings")
            except BharatGenError as exc:          # down (if unreachable) until it answers
                route.pool._mark(replica, exc) if isinstance(exc, APIConnectionError) else \
                    _log.warning("model %r: %s", route.id, _printable(exc.message))


def _cmd_demo(args: Any) -> int:
    with DemoUpstream(args.host, args.port, token_delay=args.token_delay) as demo:
        print("demo upstream (a stand-in Gradio app, not the Param model) at %s" % demo.url,
              file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            demo.serve_forever(0.2)
    return 0


def _cmd_info(args: Any) -> int:
    """What each upstream offers, and where each OpenAI field goes in it."""
    config = _config_from_args(args)
    with _start_demo(config, 0.0, sys.stderr) if config.demo else contextlib.nullcontext():
        if not (config.upstream or config.models_file):
            raise SystemExit("info: give --upstream URL (or set BHARATGEN_BASE_URL), or --demo")
        for route in _load_models(config):
            for replica in route.pool.replicas:
                client = replica.client
                try:
                    info = client.discover()
                except BharatGenError as exc:
                    raise SystemExit("info: %s" % exc.message) from None
                finally:
                    client.close()
                print("model:          %s" % route.id)
                print("app:            %s" % client.base_url)
                print("gradio:         %s, API at %s" % (info.version or "version unknown",
                                                         info.prefix or "the root"))
                print("protocol:       %s (%s)" % (info.protocol or "unknown", "queue, with diffs"
                                                   if info.use_queue else "/call, whole output"))
                print("chat endpoint:  /%s%s" % (info.endpoint, "" if info.fn_index is not None
                                                 else "  (not listed in /config)"))
                print("history:        %s" % ("sent as " + info.history_format if info.has_history
                                              else "not an input: folded into the message"))
                print("openai fields:  %s" % info.mapping())
                if info.embedding:
                    print("embeddings:     /%s (text in, JSON numbers out)" % info.embedding)
                print("inputs:")
                params = iter(info.parameters)
                for role, default in info.inputs:
                    p = {} if role == "state" else next(params, {})
                    what = {"state": "(State: null placeholder)", "default": "the app's default "
                            "%r" % (default,)}.get(role, "<- OpenAI %s" % role)
                    if role in info.limits:
                        what += " (%g to %g)" % info.limits[role]
                    print("  %-16s %-10s %s" % (p.get("parameter_name", "-"),
                                                p.get("component", ""), what))
                print()
    return 0


_CHAT_HELP = ("/reset forgets the conversation, /help shows this, /exit (or Ctrl-D) leaves; "
              "Ctrl-C stops an answer; a pasted text is one message; a space first sends one "
              "that begins with /")


def _cmd_chat(args: Any) -> int:
    config = _config_from_args(args)
    with contextlib.ExitStack() as cleanup:        # undone last first: the demo stops last
        if args.demo or not config.upstream:
            cleanup.callback(_start_demo(config, args.token_delay, sys.stderr).stop)
        client = cleanup.enter_context(BharatGenOpenAI(
            config.upstream[0], os.environ.get("OPENAI_API_KEY"), model=config.model,
            timeout=config.timeout, endpoint=config.endpoint,
            system_prompt=config.system_prompt, protocol=config.protocol))
        history: List[Dict[str, str]] = []
        if "log_level" not in vars(args):   # a failure is said once, as "error: ...", not
            cleanup.callback(_log.setLevel, _log.level)   # also as the replica's warning
            _log.setLevel(logging.ERROR)
        if args.prompt:
            _chat_turn(client, history, " ".join(args.prompt), args)
            return 0
        with contextlib.suppress(ImportError):
            __import__("readline")      # line editing and history for input(), where it exists
        if isinstance(client._backend, _Backend):       # the app answers, or we say so now
            for upstream in client._backend.clients():
                upstream.discover()
        else:
            client.models.list()
        print("Chatting with %s at %s. %s." % (config.model, client.base_url, _CHAT_HELP),
              file=sys.stderr)
        while True:
            try:
                raw = _read_turn()
                line = raw.strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:                 # at the prompt: a new prompt
                print()
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history.clear()
                print("(conversation forgotten)", file=sys.stderr)
            elif raw.startswith("/"):                 # a space first sends a message
                print(("" if line in ("/help", "/?") else "unknown command %s; " % line.split()[0])
                      + _CHAT_HELP, file=sys.stderr)
            elif line:
                try:
                    _chat_turn(client, history, line, args)
                except BharatGenError as exc:         # said, and the session goes on
                    print("error: %s" % exc.message, file=sys.stderr)


def _read_turn() -> str:
    """One turn at the prompt: the lines typed, or pasted together (lines that are there
    already when one is read belong to it)."""
    lines = [input(">>> ")]
    if sys.stdin.isatty():
        with selectors.DefaultSelector() as waiting:
            waiting.register(sys.stdin, selectors.EVENT_READ)
            while waiting.select(0.05):
                lines.append(input())
    return "\n".join(lines)


def _chat_turn(client: BharatGenOpenAI, history: List[Dict[str, str]], prompt: str,
               args: Any) -> None:
    """Stream one answer to the terminal; remember the turn unless it failed.  Ctrl-C
    stops the answer (the upstream job is cancelled) and keeps what came."""
    dim = sys.stdout.isatty()
    opening, closing = ("\x1b[2m", "\x1b[0m\n\n") if dim else ("[thinking] ", "\n\n")
    answer: List[str] = []
    thinking = False
    stream = client.chat.completions.create(
        messages=history + [{"role": "user", "content": prompt}], stream=True,
        temperature=args.temperature, max_tokens=args.max_tokens)
    try:
        with stream:
            for chunk in stream:
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.reasoning_content and args.show_reasoning:
                        sys.stdout.write(("" if thinking else opening) + delta.reasoning_content)
                        thinking = True
                    if delta.content:
                        sys.stdout.write((closing if thinking else "") + delta.content)
                        answer.append(delta.content)
                        thinking = False
                    sys.stdout.flush()
    except KeyboardInterrupt:
        answer.append(" [stopped]")
        sys.stdout.write(answer[-1])
    finally:                                # an answer (or a thought) ends its line
        sys.stdout.write(("\x1b[0m" if thinking and dim else "") + ("\n" if answer or thinking
                                                                      else ""))
        sys.stdout.flush()
    history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(
        answer).replace(" [stopped]", "")}]


# The commands' flags that set a Config field, with their help; "--first-event-timeout" sets
# first_event_timeout, and its text is parsed as the environment's BHARATGEN_* values are.
_UPSTREAM_FLAGS = (
    ("upstream", "the Gradio app: its root, /gradio_api URL, or owner/space; repeat it (or "
                 "give a comma list) for replicas (env BHARATGEN_UPSTREAM or BHARATGEN_BASE_URL); "
                 "for chat also an OpenAI-compatible API's /v1 URL (key in OPENAI_API_KEY)"),
    ("endpoint", "the app's chat endpoint (default: discovered; chat_fn_1 for the Param app)"),
    ("protocol", "queue (diffs), call (whole output each update), or auto (default)"),
    ("model", "the model's name in the API (default %s)" % DEFAULT_MODEL),
    ("system_prompt", "used when a request has no system message"),
    ("timeout", "seconds of upstream silence allowed between events (default 120)"),
    ("first_event_timeout", "seconds to wait for the first output (default: --timeout)"),
    ("connect_timeout", "seconds to connect upstream and get an answer's head (default 10)"),
    ("demo", "use the built-in demo upstream (canned answers)"),
)
_SERVE_FLAGS = (
    ("host", "address to bind (default 127.0.0.1)"),
    ("port", "port (default %d; 0 picks a free one)" % DEFAULT_PORT),
    ("api_keys", "accepted bearer key; repeatable (env BHARATGEN_API_KEYS, comma list)"),
    ("api_key_file", "more keys, one a line ('admin KEY' for an admin key); re-read on SIGHUP"),
    ("admin_keys", "a key that also sees every key's usage on the dashboard; repeatable "
                   "(env BHARATGEN_ADMIN_KEYS)"),
    ("allow_no_auth", "serve a non-loopback address with no key (refused otherwise)"),
    ("allowed_hosts", "with no key, a name the server answers to in Host besides localhost "
                      "and addresses; repeatable"),
    ("cors_origins", "let browser pages from ORIGIN call the API; repeatable; * for any"),
    ("trusted_proxies", "a reverse proxy's address or CIDR (repeatable): requests from it are "
                        "counted and logged by the client address in its X-Forwarded-For"),
    ("models_file", "a JSON file declaring several models and their upstreams"),
    ("reasoning", "where the thought goes: its own field (separate, default), inline in "
                  "<think> tags, or none"),
    ("reasoning_field", "name of that field (default reasoning_content)"),
    ("max_concurrent", "requests served at once; beyond it 503 (default 512)"),
    ("max_connections", "client connections open at once; beyond it 503 (default 1024)"),
    ("max_client_connections", "connections one client address may hold open (a trusted "
                               "proxy's: any); beyond it 503 (default 128)"),
    ("max_messages", "messages a request may hold (default 2048)"),
    ("max_chars", "characters a request's messages may hold (default 1000000)"),
    ("max_body_bytes", "request body limit (default 4 MiB)"),
    ("max_event_bytes", "the largest upstream event taken (default 8 MiB); beyond it 502"),
    ("header_timeout", "seconds a client has to send its request line and headers (default 10)"),
    ("body_timeout", "seconds a client has to send its body (default 30)"),
    ("send_timeout", "seconds a client may take nothing of an answer before it is cut off "
                     "(default 60)"),
    ("tool_repairs", "more turns a reply out of shape (a bad tool call or JSON) gets to "
                     "fix it, 0 to 5 (default 1)"),
    ("cache_ttl", "seconds an answer is kept and served again for the same request and "
                  "key (default 0: no cache)"),
    ("cache_size", "answers the cache holds, least recently used dropped (default 256)"),
    ("cache_bytes", "memory the cache's answers may take, in all (default 64 MiB); an answer "
                    "over an eighth of it is not kept"),
    ("rate_limit_rpm", "requests a minute per key (default: none)"),
    ("rate_limit_streams", "concurrent streams per key (default: none)"),
    ("rate_limit_tpm", "tokens a minute per key: the prompt and max_tokens reserved when a "
                       "request comes, what it used counted when it ends (default: none)"),
    ("tokenizer", "the model's tokenizer.json (Hugging Face): exact token counts (default: "
                  "an estimate)"),
    ("context_length", "prompt plus max_tokens allowed, in tokens (Param's: 4096; default: "
                       "no check)"),
    ("grace", "on SIGTERM, seconds to let streams finish (default 30)"),
    ("log_format", "access log format: text (default) or json"),
)
_FLAG_NAMES = {"api_keys": "--api-key", "cors_origins": "--cors-origin", "models_file": "--config",
               "trusted_proxies": "--trusted-proxy", "admin_keys": "--admin-key",
               "allowed_hosts": "--allowed-host"}


def _add_flags(parser: Any, flags: Sequence[Tuple[str, str]]) -> None:
    """Add the flags of Config fields: repeatable for lists, on/off for booleans."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(Config)}
    for name, text in flags:
        flag = _FLAG_NAMES.get(name) or "--" + name.replace("_", "-")
        names = [flag, "--base-url"] if name == "upstream" else [flag]
        if kinds[name] == "bool":
            parser.add_argument(*names, dest=name, action="store_true", default=None, help=text)
        else:
            parser.add_argument(*names, dest=name, metavar=flag.split("-")[-1].upper(),
                                action="append" if "List" in kinds[name] else "store", help=text)


def _parser() -> Any:
    """The command line: ``serve``, ``chat``, ``info``, ``bench``, ``demo``."""
    import argparse
    parser = argparse.ArgumentParser(prog="bharatgen_openai", allow_abbrev=False, description=(
        "An OpenAI-compatible API in front of BharatGen's Param Gradio app."))
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    log_level = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for p, where in ((log_level, ""), (parser, " (also after the command)")):
        p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       default=argparse.SUPPRESS, help="default: INFO" + where)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, text: str, func: Callable[[Any], int], answers: bool = True) -> Any:
        """A command; the upstream's flags, those that shape answers only if it has some."""
        p = sub.add_parser(name, help=text, description=text, parents=[log_level],
                           allow_abbrev=False)
        p.set_defaults(func=func)
        if answers is not None:
            _add_flags(p, [f for f in _UPSTREAM_FLAGS if answers or f[0] not in (
                "system_prompt", "first_event_timeout")])
        if answers is not False:
            p.add_argument("--token-delay", type=float, default=0.02,
                           help="the demo upstream's pause per token, seconds (default 0.02)")
        return p

    _add_flags(command("serve", "run the OpenAI-compatible server", _cmd_serve), _SERVE_FLAGS)
    p = command("chat", "chat in the terminal (one prompt, or interactive)", _cmd_chat)
    p.add_argument("prompt", nargs="*", help="the prompt; none opens an interactive session")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the app's)")
    p.add_argument("--max-tokens", type=int, help="the longest answer (default: the app's)")
    p.add_argument("--show-reasoning", action="store_true", help="print the thought, dimmed")
    _add_flags(command("info", "show what the upstream app offers", _cmd_info, answers=False),
               [flag for flag in _SERVE_FLAGS if flag[0] == "models_file"])
    p = command("bench", "measure what the gateway adds to calling the app directly", _cmd_bench,
                answers=None)

    def int_list(text: str) -> List[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError("expected numbers separated by commas: %r" % text)
    p.add_argument("--upstream", metavar="URL",
                   help="a real Gradio app (default: a demo upstream in its own process)")
    p.add_argument("--concurrency", type=int_list, default=[1, 16, 64, 256],
                   help="streams at once, a comma list (default 1,16,64,256)")
    p.add_argument("--requests", type=int, help="requests per run (default: the concurrency)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each path, alternating which goes first; medians shown")
    p.add_argument("--words", type=int, default=100, help="answer length in words (default 100)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p = command("demo", "run only the demo upstream (a stand-in Gradio app)", _cmd_demo, None)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks one)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (see :func:`_parser`); tests call it with their ``argv``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except BharatGenError as exc:
        raise SystemExit("error: %s" % exc.message) from None
    except ValueError as exc:           # bad settings, from flags or the environment
        parser.error(str(exc))
    return 1


###############################################################################
# Data: the page, and the demo upstream's texts ###############################
###############################################################################


# Served at "/": inline HTML, CSS and script, nothing fetched from elsewhere.  Model text
# only ever becomes text nodes (the markdown renderer builds elements, never HTML); an API
# key, when the server asks for one, is kept in the tab's sessionStorage.
_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark"><title>bharatgen_openai</title>
<style>
:root{--bg:#fff;--fg:#1c1c22;--mute:#62626f;--line:#d9d9e1;--card:#f1f1f5;--acc:#2453c9;--on-acc:#fff;
  --err:#c2282f;--warn:#985f00;font:15px/1.5 system-ui,sans-serif;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#141519;--fg:#e7e7ec;--mute:#9d9daa;--line:#34353e;
  --card:#202128;--acc:#7ba3ff;--on-acc:#0d1020;--err:#ff6b70;--warn:#f2b84b}}
*{box-sizing:border-box} [hidden]{display:none!important}
body{margin:0;height:100vh;height:100dvh;display:flex;flex-direction:column;overflow:hidden;
  background:var(--bg);color:var(--fg)}
button,input,select,textarea{font:inherit;color:inherit;background:var(--card);border:1px solid var(--line);
  border-radius:6px;padding:.3em .65em}
button{cursor:pointer} button:disabled{opacity:.45;cursor:default} input:invalid{border-color:var(--err)}
:focus-visible{outline:2px solid var(--acc);outline-offset:1px}
button.on,#send{background:var(--acc);border-color:var(--acc);color:var(--on-acc)}
.icon,.acts button{background:none;border-color:transparent;color:var(--mute)}
.icon:hover,.acts button:hover{border-color:var(--line);color:var(--fg)}
.mute{color:var(--mute);font-size:.85em}
header,#keyform,#bar{display:flex;flex-wrap:wrap;gap:.4em;align-items:center;padding:.4em 1em;
  border-bottom:1px solid var(--line)}
header nav{display:flex;gap:.3em;margin-right:auto} header button{padding:.2em .55em;font-size:.93em}
#key{flex:1 1 17em;max-width:26em}
#chat{flex:1;min-height:0;display:flex;position:relative}
#side{flex:none;width:16em;display:flex;flex-direction:column;gap:.5em;padding:.6em;overflow-y:auto;
  background:var(--bg);border-right:1px solid var(--line)}
#chat:not(.side) #side{display:none}
@media (max-width:760px){#side{position:absolute;z-index:2;inset:0 auto 0 0;width:min(19em,85%);
  box-shadow:0 0 2em #0007}}
#chats{list-style:none;margin:0;padding:0}
#chats li{display:flex;align-items:center;border-radius:6px}
#chats li[aria-current]{background:var(--card)}
#chats .open{flex:1;min-width:0;text-align:left;background:none;border-color:transparent;overflow:hidden;
  text-overflow:ellipsis;white-space:nowrap}
#chats input{flex:1;min-width:0} #chats .sure{color:var(--err)}
#conv{flex:1;min-width:0;display:flex;flex-direction:column}
#setbtn{margin-left:auto;font-size:1.15em;padding:0 .4em} #model{max-width:100%}
.badge{font-size:.75em;font-weight:600;letter-spacing:.06em;text-transform:uppercase;color:var(--warn);
  border:1px solid currentColor;border-radius:99px;padding:0 .6em}
#settings{display:grid;grid-template-columns:repeat(auto-fit,minmax(8em,1fr));gap:.5em .8em;padding:.5em 1em .8em;
  border-bottom:1px solid var(--line);max-height:45%;overflow-y:auto}
#settings .wide{grid-column:1/-1}
label{display:flex;flex-direction:column;gap:.15em;font-size:.85em;color:var(--mute)}
label input,label textarea{color:var(--fg);font-size:1.05em;min-width:0}
#log{flex:1;min-height:0;overflow-y:auto;overflow-anchor:none}
#turns,#empty,#ask{width:100%;max-width:50em;margin:0 auto;padding:0 1em}
#turns{padding-top:.3em} #empty{text-align:center;padding-top:25vh}
#turns:not(:empty)+#empty{display:none}
.msg{margin:1em 0;overflow-wrap:anywhere}
.user{width:fit-content;max-width:85%;margin-left:auto}
.user .text{white-space:pre-wrap;background:var(--card);border-radius:12px;padding:.45em .9em}
.acts{display:flex;gap:.1em;margin-top:.2em} .user .acts{justify-content:flex-end}
.acts button{font-size:.8em;padding:.05em .5em}
.busy .regen,.busy .edit{visibility:hidden}
.error{color:var(--err);border:1px solid var(--err);border-radius:8px;padding:.5em .9em;white-space:pre-wrap}
.thought{color:var(--mute);font-size:.9em;margin-bottom:.4em} summary{cursor:pointer;width:fit-content}
.thought>div{white-space:pre-wrap;border-left:2px solid var(--line);padding-left:.8em;margin:.3em 0}
.answer>:first-child{margin-top:0} .answer>:last-child{margin-bottom:0}
.answer p,.answer li{white-space:pre-line} .answer li>ul,.answer li>ol{margin:.2em 0}
.answer a{color:var(--acc)} .answer h3,.answer h4{margin:1em 0 .4em}
blockquote{margin:.8em 0;padding:0 0 0 .9em;border-left:3px solid var(--line);color:var(--mute)}
.code{border:1px solid var(--line);border-radius:6px;margin:.8em 0;overflow:hidden}
.code>div{display:flex;justify-content:space-between;align-items:center;padding:0 .2em 0 .8em;font-size:.8em;
  color:var(--mute);background:var(--card);border-bottom:1px solid var(--line)}
pre{margin:0;padding:.6em .8em;overflow-x:auto}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
:not(pre)>code{background:var(--card);border-radius:4px;padding:.05em .3em}
.tablewrap{overflow-x:auto;margin:.8em 0}
table{border-collapse:collapse;font-size:.9em} #monitor table{width:100%}
td,th{text-align:left;padding:.25em .6em;border-bottom:1px solid var(--line);vertical-align:top}
th{white-space:nowrap} td{overflow-wrap:anywhere} td .url{overflow-wrap:normal}
th.c,td.c{text-align:center} th.r,td.r{text-align:right}
.offscreen{position:fixed;left:-9999px;top:0}
.imgs{display:flex;flex-wrap:wrap;gap:.4em;justify-content:flex-end;margin-bottom:.3em}
.imgs img,#attached img{max-height:7em;max-width:100%;border-radius:6px;display:block}
#attached{display:flex;flex-wrap:wrap;gap:.4em} #attached span{display:flex;align-items:flex-start}
#ask{position:relative;flex:none;padding-top:.5em;padding-bottom:.8em}
#ask .row{display:flex;gap:.4em;align-items:flex-end} #ask .row>button{min-height:2.6em}
#prompt{flex:1;min-width:0;resize:none;field-sizing:content;min-height:2.6em;max-height:12em}
#editing{display:flex;gap:.5em;align-items:center;margin-bottom:.3em}
#jump{position:absolute;bottom:100%;left:50%;transform:translateX(-50%);border-radius:99px;
  box-shadow:0 .2em .8em #0003}
#monitor{flex:1;min-height:0;overflow-y:auto} #monitor>div{max-width:62em;margin:0 auto;padding:.8em 1em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(10em,1fr));gap:.6em}
.card{background:var(--card);border-radius:8px;padding:.5em .8em}
.card b{display:block;font-size:1.2em} .card span{font-size:.8em;color:var(--mute)}
canvas{display:block;width:100%;height:170px;margin-top:1em;background:var(--card);border-radius:8px}
.tables{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(24em,100%),1fr));gap:0 1.5em}
section{overflow-x:auto} .tables .all{grid-column:1/-1} h3{font-size:.95em;margin:1.1em 0 .3em}
</style></head><body>
<header><b>bharatgen_openai</b><nav><button id="tab-chat" class="on">Chat</button>
<button id="tab-monitor">Monitor</button></nav><button id="keybtn">API key</button></header>
<form id="keyform" hidden><input id="key" type="password" aria-label="API key"
placeholder="API key (kept in this tab only)" autocomplete="off"><button>Use</button>
<span id="keymsg" class="mute"></span></form>
<main id="chat"><aside id="side" aria-label="Chats"><button id="new" type="button">+ New chat</button>
<ul id="chats"></ul><p class="mute">Chats are kept in this browser (the latest 50).</p></aside>
<div id="conv"><div id="bar"><button id="sidebtn" class="icon" type="button" aria-label="Chats"
aria-controls="side">&#9776;</button><select id="model" aria-label="Model"></select>
<span id="demo" class="badge" title="The built-in demo upstream: canned answers, not the Param model"
hidden>demo</span><button id="setbtn" class="icon" type="button" aria-controls="settings"
aria-expanded="false" aria-label="Settings" title="Settings">&#9881;</button></div>
<div id="settings" hidden>
<label>Temperature <input id="temperature" type="number" step="0.01" placeholder="default"></label>
<label>Max tokens <input id="max_tokens" type="number" step="1" placeholder="default"></label>
<label>Top-p <input id="top_p" type="number" step="0.01" placeholder="default"></label>
<label class="wide">System prompt<textarea id="system" rows="2" placeholder="(the model's default)">
</textarea></label></div>
<div id="log" tabindex="0" aria-label="Conversation"><div id="turns" role="log"></div>
<p id="empty" class="mute"></p></div>
<form id="ask"><button id="jump" type="button" hidden>&#8595; Latest</button>
<div id="editing" class="mute" hidden>Editing a question: it and what follows are replaced.
<button id="canceledit" class="icon" type="button">Cancel (Esc)</button></div><div id="attached"></div>
<div class="row"><button id="attach" class="icon" type="button" aria-label="Attach an image"
title="Attach an image" hidden>+</button><input id="file" type="file" accept="image/*" multiple hidden>
<textarea id="prompt" rows="1" aria-label="Message" placeholder="Message (Enter sends, Shift+Enter: new line)">
</textarea><button id="send">Send</button><button id="stop" type="button" hidden disabled>Stop</button>
</div></form></div></main>
<main id="monitor" hidden><div><p id="updated" class="mute">loading...</p><div id="cards" class="cards"></div>
<canvas id="chart"></canvas><p class="mute">Bars: requests per 10 s (red: errors); line: latency p50.</p>
<div id="tables" class="tables"></div></div></main>
<script>
"use strict";
const $ = id => document.getElementById(id);
const KEY = "bharatgen_openai.key", CHATS = "bharatgen_openai.chats", PREFS = "bharatgen_openai.prefs";
// Chats are kept in localStorage: at most MAX_CHATS of them and MAX_CHARS characters of JSON (well
// inside the ~5 MB a site gets), the least recently used dropped first. Attached images are not
// kept, only their count. The API key stays in sessionStorage (this tab only).
const MAX_CHATS = 50, MAX_CHARS = 2000000, SETTINGS = ["system", "temperature", "max_tokens", "top_p"];
// URLs are relative (v1/models), so the page works under a path prefix behind a proxy
// (a proxy mapping host/llm/ to /); opened as .../llm without the slash, they go under its last segment.
const BASE = location.pathname.endsWith("/") ? "" : location.pathname.split("/").pop() + "/";
let models = [], chats = [], chat = null, controller = null, timer = null;
let stick = true, lastTop = 0, editing = -1, attached = [];
function el(tag, cls, text) {                   // an element; text only ever as textContent
  const e = Object.assign(document.createElement(tag), cls ? {className: cls} : {});
  if (text != null) e.textContent = String(text);
  return e;
}
function button(text, onclick, cls, label) {
  const b = Object.assign(el("button", cls, text), {type: "button", onclick});
  if (label) [b.title, b.ariaLabel] = [label, label];
  return b;
}
const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");
// -- the API: the key as a bearer, errors as the server gave them
async function api(path, body, signal) {
  const headers = {"Content-Type": "application/json"}, key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  const r = await fetch(BASE + path, {method: body ? "POST" : "GET", headers, signal,
                                      body: body && JSON.stringify(body)});
  if (r.ok) return r;
  let detail = null;
  try { detail = (await r.json()).error; } catch (_) {}
  const e = apiError(detail || {message: r.statusText}, r.status);
  if (r.status === 401) askKey(e.message);
  throw e;
}
const apiError = (detail, status) => Object.assign(new Error(detail.message), {detail, status});
function errorText(e) {
  const d = e.detail || {}, tags = [e.status, d.type, d.code].filter(x => x != null);
  return (tags.length ? tags.join(" · ") + ": " : "") + e.message;
}
async function* events(r) {                      // the JSON data of each server-sent event
  const reader = r.body.getReader(), decoder = new TextDecoder();
  for (let buffer = "";;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let at = 0;
    for (let i; (i = buffer.indexOf("\n\n", at)) >= 0; at = i + 2) {
      const data = buffer.slice(at, i).split("\n").filter(l => l.startsWith("data:"))
        .map(l => l.slice(5).replace(/^ /, "")).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
    buffer = buffer.slice(at);
  }
}
function askKey(message) {
  [$("keyform").hidden, $("keymsg").textContent] = [false, message || ""];
  $("key").focus();
}
// -- markdown, as elements and text nodes (model text is never HTML). An answer is cut into
// blocks at blank lines outside code fences; a finished block is drawn once and only the last,
// open one is drawn again as text streams in. The regular expressions are anchored to a line
// or match one character (none backtracks beyond linear time); inline closers are found by
// forward searches, cached; nesting is capped at DEPTH.
const DEPTH = 6, FENCE = /^\s*(`{3,}|~{3,})/, ITEM = /^(\s*)([-*+]|\d{1,9}[.)])(\s+|$)/;
const HEADING = /^\s{0,3}(#{1,6})(\s+|$)/, SCHEMES = ["http:", "https:", "mailto:"];
function renderer(target) {                     // draw(text, done): text only ever grows
  let start = 0, scan = 0, fence = "", open = [];
  const finish = (text, end) => end > start && target.append(blocks(text.slice(start, end).split("\n"), 0));
  return (text, done) => {
    open.forEach(n => n.remove());
    for (let nl; (nl = text.indexOf("\n", scan)) >= 0; scan = nl + 1) {
      const line = text.slice(scan, nl), m = FENCE.exec(line);
      if (fence ? closes(line, fence) : !m && !line.trim()) {
        finish(text, fence ? nl : scan);
        [start, fence] = [nl + 1, ""];
      } else if (!fence && m) fence = m[1];
    }
    const rest = blocks(done ? [] : text.slice(start).split("\n"), 0);
    if (done) finish(text, text.length), start = text.length;
    open = [...rest.childNodes];
    target.append(rest);
  };
}
function closes(line, fence) {
  const t = line.trim();
  return t.length >= fence.length && t === fence[0].repeat(t.length);
}
function blocks(lines, depth) {
  const out = document.createDocumentFragment();
  for (let i = 0, m; i < lines.length;) {
    const line = lines[i], t = line.trim();
    if (!t) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const fence = m[1], indent = line.indexOf(fence[0]), code = [];
      while (++i < lines.length && !closes(lines[i], fence)) code.push(dedent(lines[i], indent));
      i++;
      out.append(codeBlock(code.join("\n"), line.slice(indent + fence.length).trim().split(" ")[0]));
    } else if ((m = HEADING.exec(line))) {
      let text = line.slice(m[0].length).trimEnd(), j = text.length;
      while (j && text[j - 1] === "#") j--;
      if (!j || text[j - 1] === " ") text = text.slice(0, j).trimEnd();    // closing #s
      out.append(inline(el("h" + Math.min(6, m[1].length + 2)), text));
      i++;
    } else if (rule(t)) {
      out.append(el("hr"));
      i++;
    } else if (t[0] === ">") {
      const inner = [];
      for (let q; i < lines.length && (q = lines[i].trim())[0] === ">"; i++)
        inner.push(q.slice(q[1] === " " ? 2 : 1));
      const quote = out.appendChild(el(depth < DEPTH ? "blockquote" : "p"));
      quote.append(depth < DEPTH ? blocks(inner, depth + 1) : inner.join("\n"));
    } else if (ITEM.test(line)) {
      i = list(lines, i, depth, out);
    } else if (i + 1 < lines.length && t.includes("|") && delimiters(lines[i + 1])) {
      i = mdTable(lines, i, out);
    } else {
      const para = [line];
      while (++i < lines.length && lines[i].trim() && !starts(lines, i, true) &&
             !(lines[i].includes("|") && delimiters(lines[i + 1] || ""))) para.push(lines[i]);
      out.append(inline(el("p"), para.map(l => l.trim()).join("\n")));
    }
  }
  return out;
}
const dedent = (line, n) => line.slice(Math.min(n, line.length - line.trimStart().length));
function starts(lines, i, para) {               // does lines[i] begin a block (one a paragraph yields to)?
  const l = lines[i], t = l.trim();
  if (FENCE.test(l) || HEADING.test(l) || t[0] === ">" || rule(t)) return true;
  return ITEM.test(l) && !(para && /^\d/.test(t) && !/^1[.)]/.test(t));  // a list that starts at 1
}
function rule(t) {                              // ---, ***, ___ (spaces between allowed)
  const c = t.replace(/ /g, "");
  return c.length >= 3 && "-*_".includes(c[0]) && c === c[0].repeat(c.length);
}
function list(lines, i, depth, out) {           // items at one indent; deeper lines are theirs
  const first = ITEM.exec(lines[i]), indent = first[1].length, ordered = /\d/.test(first[2]);
  const node = out.appendChild(el(ordered ? "ol" : "ul"));
  if (ordered && parseInt(first[2]) !== 1) node.start = parseInt(first[2]);
  for (let m; i < lines.length && (m = ITEM.exec(lines[i])) && m[1].length <= indent + 1 &&
              m[1].length >= indent && /\d/.test(m[2]) === ordered;) {
    const inner = Math.min(m[1].length + m[2].length + Math.max(1, Math.min(m[3].length, 4)), indent + 2);
    const item = [lines[i].slice(m[0].length)];
    let fence = FENCE.test(item[0]) ? FENCE.exec(item[0])[1] : "";
    for (i++; i < lines.length && (fence || lines[i].trim()); i++) {
      const line = lines[i], deep = line.length - line.trimStart().length >= inner;
      if (!fence && !deep && starts(lines, i)) break;     // a shallower item or another block
      item.push(deep || fence ? dedent(line, inner) : line.trim());
      if (fence ? closes(line, fence) : FENCE.test(line)) fence = fence ? "" : FENCE.exec(line)[1];
    }
    const li = node.appendChild(el("li"));
    if (depth >= DEPTH) {
      inline(li, item.join("\n"));
      continue;
    }
    const content = blocks(item, depth + 1);
    const lead = content.firstChild;              // a tight item: its text without a <p>
    if (lead && lead.tagName === "P") lead.replaceWith(...lead.childNodes);
    li.append(content);
  }
  return i;
}
function cells(line) {                          // a table row's cells; \| is a literal bar
  let t = line.trim(), out = [""];
  if (t[0] === "|") t = t.slice(1);
  if (t.endsWith("|") && !t.endsWith("\\|")) t = t.slice(0, -1);
  for (let i = 0; i < t.length; i++) {
    if (t[i] === "\\" && t[i + 1] === "|") out[out.length - 1] += t[++i];
    else if (t[i] === "|") out.push("");
    else out[out.length - 1] += t[i];
  }
  return out.map(c => c.trim());
}
const delimiters = line => line.includes("-") && cells(line).every(c => /^:?-+:?$/.test(c));
function mdTable(lines, i, out) {
  const head = cells(lines[i]), align = cells(lines[i + 1]).map(c =>
    c.endsWith(":") ? (c[0] === ":" ? "c" : "r") : "");
  if (head.length !== align.length) {           // not a table after all: a paragraph
    out.append(inline(el("p"), lines[i].trim()));
    return i + 1;
  }
  const t = out.appendChild(el("div", "tablewrap")).appendChild(el("table"));
  const row = (values, tag) => t.appendChild(el("tr")).append(...align.map((a, k) =>
    inline(el(tag, a), values[k] || "")));
  row(head, "th");
  for (i += 2; i < lines.length && lines[i].trim() && !starts(lines, i); i++) row(cells(lines[i]), "td");
  return i;
}
function codeBlock(code, lang) {
  const box = el("div", "code"), text = el("code", null, code);
  box.appendChild(el("div")).append(el("span", null, lang || "code"),
                                    button("Copy", e => copy(code, e.target, text), null, "Copy the code"));
  box.appendChild(el("pre")).append(text);
  return box;
}
function link(url) {                            // the URL if it is http(s) or mailto, else null
  try { return SCHEMES.includes(new URL(url).protocol) ? new URL(url).href : null; } catch (_) { return null; }
}
function anchor(href, text, depth) {             // depth: the label's marks, else plain text
  const a = Object.assign(el("a"), {href, target: "_blank", rel: "noopener noreferrer"});
  return depth == null ? Object.assign(a, {textContent: text}) : inline(a, text, depth + 1, true);
}
// Inline marks: `code`, **strong**, *em* and _em_, ~~del~~, [text](url), <url>, bare URLs;
// a backslash escapes a mark. A closer is searched for forward from where the last search of
// it ended (or failed), so each kind scans the text once; inner text is parsed once per level.
function inline(node, text, depth = 0, inLink = false) {
  let last = 0, linked = [-1, null];             // the last link target looked at, and its URL
  const seen = {}, word = c => c !== undefined && /[\p{L}\p{N}_]/u.test(c);
  const any = () => true, find = (s, from, ok) => {   // the first s at or after from where ok(at)
    const c = seen[s];
    if (c && c[0] <= from && (c[1] < 0 || c[1] >= from)) return c[1];
    let at = text.indexOf(s, from);
    while (at >= 0 && !ok(at)) at = text.indexOf(s, at + 1);
    seen[s] = [from, at];
    return at;
  };
  const marks = /[\\`*_~[<h]/g;
  const put = (i, made, next) => {              // made replaces text[i, next)
    node.append(text.slice(last, i), made);
    last = next;
    return next;
  };
  for (let i = 0, m; (marks.lastIndex = i, m = marks.exec(text));) {
    const c = m[0];
    i = m.index;
    let run = 1;
    while (text[i + run] === c && run < 16) run++;
    if (c === "\\") {
      i = /[!-/:-@[-`{-~]/.test(text[i + 1] || "") ? put(i, text[i + 1], i + 2) : i + 1;
    } else if (c === "`") {
      const s = c.repeat(run), end = find(s, i + run, at => text[at - 1] !== "`" && text[at + run] !== "`");
      if (end < 0 || depth > DEPTH) { i += run; continue; }
      let code = text.slice(i + run, end);
      if (code.length > 2 && code[0] === " " && code.endsWith(" ")) code = code.slice(1, -1);
      i = put(i, el("code", null, code), end + run);
    } else if ((c === "*" || c === "_" || (c === "~" && run === 2)) && depth < DEPTH && text[i + run] &&
               text[i + run].trim() && !(c === "_" && word(text[i - 1]))) {
      const n = Math.min(run, 2), s = c.repeat(n);      // the closer: after a non-space, alone
      let end = find(s, i + n, at => text[at - 1].trim() !== "" && text[at - 1] !== c &&
                     (n === 2 || text[at + 1] !== c) && !(c === "_" && word(text[at + n])));
      if (end < 0 || end === i + n) { i += run; continue; }
      while (n === 2 && text[end + 2] === c) end++;     // ***x*** is strong around *x*
      const tag = c === "~" ? "del" : n === 2 ? "strong" : "em";
      i = put(i, inline(el(tag), text.slice(i + n, end), depth + 1), end + n);
    } else if (inLink) {
      i += run;
    } else if (c === "[" && depth < DEPTH) {    // [label](url): the URL checked once per ]
      const close = find("]", i + 1, any), end = text[close + 1] === "(" ? find(")", close + 2, any) : -1;
      if (end > 0 && linked[0] !== close)
        linked = [close, end - close < 2048 && link(text.slice(close + 2, end).trim().split(" ")[0])];
      i = end > 0 && linked[1] ? put(i, anchor(linked[1], text.slice(i + 1, close), depth), end + 1) : i + 1;
    } else if (c === "<") {                      // <url>: no < or space inside
      const end = find(">", i + 1, any), lt = find("<", i + 1, any);
      const url = end > 0 && end - i < 2048 && (lt < 0 || lt > end) ? text.slice(i + 1, end) : "";
      const href = url && !/\s/.test(url) && link(url);
      i = href ? put(i, anchor(href, url), end + 1) : i + 1;
    } else if (c === "h" && !word(text[i - 1]) && /^ttps?:\/\//.test(text.slice(i + 1, i + 8))) {
      let end = i;                               // a bare URL, without the punctuation after it
      while (end < text.length && end - i < 2048 && text[end].trim() && text[end] !== "<") end++;
      const paren = text.slice(i, end).includes("(");
      while (".,:;!?'\")*_".includes(text[end - 1]) && !(paren && text[end - 1] === ")")) end--;
      const href = link(text.slice(i, end));
      i = href ? put(i, anchor(href, text.slice(i, end)), end) : end;
    } else {
      i += run;
    }
  }
  node.append(text.slice(last));
  return node;
}
// -- copying: the clipboard API, else (refused, as on plain http at a LAN address) a selected
// textarea and execCommand, else the text is left selected for Ctrl+C
async function copy(text, btn, node) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch (_) {
    const area = Object.assign(el("textarea", "offscreen"), {value: text, readOnly: true});
    document.body.append(area);
    area.focus({preventScroll: true});
    area.select();
    try { ok = document.execCommand("copy"); } catch (_) {}
    area.remove();
    btn.focus();
    if (!ok) getSelection().selectAllChildren(node);
  }
  btn.textContent = ok ? "Copied" : "Press Ctrl+C";
  clearTimeout(btn.reset);
  btn.reset = setTimeout(() => { btn.textContent = "Copy"; }, 1500);
}
// -- chats, kept (see MAX_CHATS): each {id, title, at, messages: [{role, content, ...}]}
function read(key) {                           // stored JSON, or null
  try { return JSON.parse(localStorage.getItem(key)); } catch (_) { return null; }
}
function store(key, json) {                     // false when refused (over the quota, or off)
  try { localStorage.setItem(key, json); return true; } catch (_) { return false; }
}
function stored() {                            // the chats kept, whatever was written there
  const list = [].concat(read(CHATS) || []).filter(c =>
    c && typeof c.title === "string" && Array.isArray(c.messages));
  list.forEach(c => { c.messages = c.messages.filter(m => m && typeof m.content === "string"); });
  return list;
}
function load() {
  const prefs = read(PREFS) || {};
  chats = stored();
  SETTINGS.forEach(id => { $(id).value = typeof prefs[id] === "string" ? prefs[id] : ""; });
  chat = chats.find(c => c.id === prefs.chat) || null;
  return prefs;
}
function save() {                               // the newest first; the oldest dropped to fit
  chats.sort((a, b) => b.at - a.at).splice(MAX_CHATS);
  for (;;) {
    const json = JSON.stringify(chats, (k, v) => k === "images" && Array.isArray(v) ? v.length : v);
    if ((json.length <= MAX_CHARS && store(CHATS, json)) || chats.length < 2) break;
    chats.pop();
  }
  prefs();
  drawChats();
}
function prefs() {
  const p = {model: $("model").value, chat: chat && chat.id};
  SETTINGS.forEach(id => { p[id] = $(id).value; });
  store(PREFS, JSON.stringify(p));
}
function drawChats(focus) {
  $("chats").replaceChildren(...chats.map(c => {
    const li = el("li"), del = button("×", () => {
      if (!del.classList.contains("sure"))           // asked twice
        return Object.assign(del, {className: "icon sure", textContent: "Delete?"});
      chats.splice(chats.indexOf(c), 1);
      if (c === chat) pick(null);
      save();
      $("new").focus();
    }, "icon", "Delete");
    del.onblur = () => Object.assign(del, {className: "icon", textContent: "×"});
    li.append(button(c.title, () => pick(c), "open"),
              button("✎", () => rename(li, c), "icon", "Rename"), del);
    if (c === chat) li.ariaCurrent = "true";
    if (c === focus) setTimeout(() => li.firstChild.focus());
    return li;
  }));
}
function rename(li, c) {
  const input = Object.assign(el("input"), {value: c.title, ariaLabel: "Chat name"});
  let ended = false;
  const end = keep => {
    if (ended) return;
    ended = true;
    if (keep && input.value.trim()) c.title = input.value.trim().slice(0, 200);
    save();
    drawChats(c);
  };
  input.onkeydown = e => {
    if (e.key === "Enter" || e.key === "Escape") [end(e.key === "Enter"), e.stopPropagation()];
  };
  input.onblur = () => end(true);
  li.replaceChildren(input);
  input.focus();
  input.select();
}
function pick(c) {                              // show a chat (null: a new one)
  stopAnswer();
  [chat, stick, editing] = [c, true, -1];
  $("editing").hidden = true;
  drawLog();
  drawChats();
  prefs();
  if (matchMedia("(max-width:760px)").matches) side(false);
  $("prompt").focus();
}
function side(open) {
  $("chat").classList.toggle("side", open);
  $("sidebtn").ariaExpanded = String(open);
}
// -- the conversation
function drawLog() {
  $("turns").replaceChildren(...(chat ? chat.messages : []).map((m, i) =>
    m.role === "user" ? userBox(m, i) : botBox(m, true)));
  marks();
}
function marks() {                              // Regenerate only on the last answer
  const shown = $("turns").querySelectorAll(":scope > .msg:not([hidden])"), last = shown[shown.length - 1];
  for (const b of $("turns").querySelectorAll(".regen")) b.hidden = b.closest(".msg") !== last;
}
function error(e) {                             // an API error as given, with Retry
  const box = Object.assign(el("div", "msg error", errorText(e)), {role: "alert"});
  box.appendChild(el("div", "acts")).append(button("Retry", regenerate, "regen", "Ask again"));
  return box;
}
function userBox(m, i) {
  const box = el("div", "msg user"), acts = el("div", "acts");
  if (Array.isArray(m.images)) box.appendChild(el("div", "imgs")).append(...m.images.map(src =>
    Object.assign(el("img"), {src, alt: "attached image"})));
  else if (m.images) box.append(el("div", "imgs mute", plural(m.images, "image") + " (not kept)"));
  const text = box.appendChild(el("div", "text", m.content));
  acts.append(button("Edit", () => edit(i), "edit", "Edit and send again"),
              button("Copy", e => copy(m.content, e.target, text)));
  box.append(acts);
  return box;
}
function botBox(m, done) {                      // an answer: the thought folded above it
  const box = el("div", "msg bot"), thought = box.appendChild(el("details", "thought"));
  const summary = thought.appendChild(el("summary"));
  const said = thought.appendChild(el("div")).appendChild(new Text());
  const answer = box.appendChild(el("div", "answer")), draw = renderer(answer);
  const acts = box.appendChild(el("div", "acts"));
  acts.append(button("Copy", e => copy(m.content, e.target, answer), null, "Copy the answer"),
              button("Regenerate", regenerate, "regen", "Answer again"));
  box.show = end => {
    said.appendData(m.reasoning.slice(said.length));
    thought.hidden = !m.reasoning;
    summary.textContent = m.seconds == null ? "Thinking…" : "Thought for " + (m.seconds < 10 ?
      m.seconds.toFixed(1) : Math.round(m.seconds)) + " s";
    draw(m.content, end);
    acts.hidden = !end;
  };
  m.reasoning = m.reasoning || "";
  if (done) box.show(true);
  return box;
}
function busy(on) {
  const had = document.activeElement;
  [$("send").hidden, $("send").disabled, $("stop").hidden, $("stop").disabled] = [on, on, !on, !on];
  $("conv").classList.toggle("busy", on);
  if (had === $("send") || had === $("stop")) $(on ? "stop" : "prompt").focus();
}
function stopAnswer() {                         // the answer so far stays in its chat
  if (controller) controller.abort();
  controller = null;
  busy(false);
}
function submit(event) {
  event.preventDefault();
  const content = $("prompt").value.trim();
  if ((!content && !attached.length) || controller) return;
  if (!chat) chats.push(chat = {id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6),
                                title: content.slice(0, 80) || "Image", messages: []});
  if (editing >= 0) chat.messages.splice(editing);
  const m = attached.length ? {role: "user", content, images: attached} : {role: "user", content};
  chat.messages.push(m);
  if (editing >= 0) drawLog();
  else $("turns").append(userBox(m, chat.messages.length - 1));
  [$("prompt").value, attached, editing, $("editing").hidden] = ["", [], -1, true];
  drawAttached();
  reply(chat);
}
async function reply(to) {                      // stream the answer to the chat's last question
  const m = {role: "assistant", content: "", reasoning: ""}, box = botBox(m), system = $("system").value.trim();
  const messages = (system ? [{role: "system", content: system}] : []).concat(sent(to.messages));
  const value = id => $(id).value === "" ? undefined : +$(id).value;    // empty: the app's default
  to.at = Date.now();
  save();
  $("turns").append(box);
  marks();
  [stick, $("jump").hidden] = [true, true];
  follow();
  const mine = controller = new AbortController();
  let frame = 0, thinking = 0, stopped = false;
  const show = () => { frame = 0; box.show(false); };   // at most once a frame
  box.show(false);
  busy(true);
  try {
    const r = await api("v1/chat/completions", {model: $("model").value, stream: true, messages,
      temperature: value("temperature"), max_tokens: value("max_tokens"), top_p: value("top_p")}, mine.signal);
    for await (const data of events(r)) {
      if (data.error) throw apiError(data.error);
      const delta = (data.choices[0] || {}).delta || {};
      for (const [name, v] of Object.entries(delta))     // the thought's field may be renamed
        if (typeof v === "string" && name !== "content" && name !== "role") {
          thinking = thinking || performance.now();
          m.reasoning += v;
        }
      if (delta.content && thinking && m.seconds == null) m.seconds = (performance.now() - thinking) / 1000;
      m.content += delta.content || "";
      frame = frame || requestAnimationFrame(show);
    }
  } catch (e) {
    stopped = e.name === "AbortError";
    if (stopped) box.lastChild.before(el("p", "mute stopped", "Stopped."));
    else box.after(error(e));
  } finally {
    cancelAnimationFrame(frame);
    if (thinking && m.seconds == null) m.seconds = (performance.now() - thinking) / 1000;
    if (m.seconds != null) m.seconds = Math.round(m.seconds * 10) / 10;
    box.show(true);
    if (m.content) to.messages.push(m);           // an unanswered question is not sent again
    else if (!m.reasoning && !stopped) box.hidden = true;
    if (controller === mine) {
      controller = null;
      busy(false);
    }
    marks();
    if (chats.includes(to)) save();
  }
}
function sent(msgs) {                           // answered questions and the last one; its images
  const last = msgs.length - 1;                 // (the app takes images with the new message only)
  return msgs.filter((m, i) => i === last || m.role === "assistant" || (msgs[i + 1] || {}).role === "assistant")
    .map((m, i, all) => {
      if (i < all.length - 1 || !Array.isArray(m.images)) return {role: m.role, content: m.content};
      const parts = m.images.map(url => ({type: "image_url", image_url: {url}}));
      return {role: m.role, content: m.content ? [{type: "text", text: m.content}, ...parts] : parts};
    });
}
function regenerate() {
  if (controller || !chat) return;
  const msgs = chat.messages;
  while (msgs.length && msgs[msgs.length - 1].role !== "user") msgs.pop();
  if (!msgs.length) return;
  drawLog();
  log.focus({preventScroll: true});               // the button is gone: focus the conversation
  reply(chat);
}
function cancelEdit() {
  [editing, $("prompt").value, $("editing").hidden] = [-1, "", true];
  $("prompt").focus();
}
function edit(i) {
  if (controller) return;
  [editing, $("prompt").value, $("editing").hidden] = [i, chat.messages[i].content, false];
  $("prompt").focus();
}
function drawAttached() {
  $("attached").replaceChildren(...attached.map((src, i) => {
    const s = el("span");
    s.append(Object.assign(el("img"), {src, alt: "image to send"}),
             button("×", () => { attached.splice(i, 1); drawAttached(); }, "icon", "Remove the image"));
    return s;
  }));
}
// The view follows the newest message while the reader is at the bottom: any scroll up (not
// a clamp at the end) stops that and shows "Latest"; back at the end, or a question sent, it
// follows again. Whatever grows or shrinks (an answer, the window, the box) calls follow().
const log = $("log");
function follow() {
  if (stick) log.scrollTop = log.scrollHeight;
}
log.onscroll = () => {
  const gap = log.scrollHeight - log.scrollTop - log.clientHeight;
  if (log.scrollTop < lastTop && gap > 1) stick = false;
  else if (gap < 30) stick = true;
  lastTop = log.scrollTop;
  $("jump").hidden = stick;
};
new ResizeObserver(follow).observe($("turns"));
new ResizeObserver(follow).observe(log);
$("jump").onclick = () => {
  stick = true;
  follow();
  $("prompt").focus();
};
// -- models and their settings
async function loadModels(chosen) {
  try {
    models = (await (await api("v1/models")).json()).data;
    $("model").replaceChildren(...models.map(m => el("option", null, m.id)));
    if (models.some(m => m.id === chosen)) $("model").value = chosen;
    applyModel();
  } catch (e) {
    if (e.status !== 401) $("turns").append(el("div", "msg error", errorText(e)));
  }
}
function applyModel() {                         // the app's ranges, demo, images
  const m = models.find(x => x.id === $("model").value) || {}, limits = m.limits || {};
  for (const id of ["temperature", "max_tokens", "top_p"]) {
    const [lo, hi] = limits[id] || ["", ""], label = $(id).parentNode.firstChild;
    [$(id).min, $(id).max] = [lo, hi];
    const name = label.textContent.split(" (")[0].trim();
    label.textContent = hi === "" ? name : name + " (" + lo + "–" + hi + ")";
  }
  $("demo").hidden = !m.demo;
  $("attach").hidden = !m.images;
  if (!m.images && attached.length) [attached] = [[], drawAttached()];
  $("empty").textContent = m.id ? "Ask " + m.id + (m.demo ? ", the built-in demo: canned answers, " +
    "not the Param model." : ".") : "";
}
// -- monitor
const ms = v => v == null ? "-" : v < 1 ? Math.round(v * 1000) + "\u00a0ms" : v.toFixed(2) + "\u00a0s";
function url(u) {                               // wraps after a / or before :port, not in a number
  const s = el("span", "url");
  for (const part of u.split(/(?=:\d)|(?<=\/)(?!\/)/)) s.append(part, el("wbr"));
  return s;
}
function table(title, heads, rows) {
  const section = el("section"), t = section.appendChild(el("table"));
  section.prepend(el("h3", null, title));
  t.appendChild(el("tr")).append(...heads.map(h => el("th", null, h)));
  for (const row of rows.length ? rows : [["none"]])
    t.appendChild(el("tr")).append(...row.map(v => { const td = el("td"); td.append(v); return td; }));
  return section;
}
function draw(d) {
  const r = d.recent, t = d.totals, span = ", last " + +(r.seconds / 60).toFixed(1) + " min";
  const cards = [["requests", "requests" + span, r.requests],
    ["errors", "errors" + span, r.series.reduce((n, p) => n + p.errors, 0)],
    ["streams", "streams open", d.streams_open], ["inflight", "requests in flight", d.requests_in_flight],
    ["ttft", "first token p50 / p95", ms(r.ttft.p50) + " / " + ms(r.ttft.p95)],
    ["latency", "latency p50 / p95", ms(r.latency.p50) + " / " + ms(r.latency.p95)],
    ["tokens", "tokens in / out" + span, r.tokens_in + " / " + r.tokens_out],
    ["total", "requests since start", t.requests],
    ["total-tokens", "tokens in / out since start", t.tokens_in + " / " + t.tokens_out]];
  if (d.cache) cards.push(["cache", "cache hits / misses", d.cache.hits + " / " + d.cache.misses]);
  $("cards").replaceChildren(...cards.map(([id, label, value]) => {
    const c = Object.assign(el("div", "card"), {id: "m-" + id});
    c.append(el("b", null, value), el("span", null, label));
    return c;
  }));
  const replicas = Object.entries(d.models).flatMap(([model, list]) =>
    list.map(x => [model, url(x.url), x.status, x.failures, x.last_error || "-"]));
  $("tables").replaceChildren(
    table("Status" + span, ["status", "requests"], Object.entries(r.by_status)),
    table("Errors by type" + span, ["type", "count"], Object.entries(r.errors)),
    table("Keys (short hash)" + span, ["key", "requests", "errors", "tokens in", "tokens out"],
      Object.entries(r.keys).map(([k, v]) => [k, v.requests, v.errors, v.tokens_in, v.tokens_out])),
    Object.assign(table("Replicas", ["model", "url", "state", "failures", "last error"], replicas),
                  {className: "all"}),
    table("Upstream errors since start", ["kind", "count"], Object.entries(t.upstream_errors)));
  chart(r.series);
  $("updated").textContent = "v" + d.version + " · up " + Math.round(d.uptime_seconds) + " s · updated "
    + new Date().toLocaleTimeString();
}
function chart(series) {                          // bars: requests and errors; line: latency p50
  const c = $("chart"), g = c.getContext("2d"), w = c.clientWidth, h = c.clientHeight;
  const dpr = devicePixelRatio || 1;
  const css = getComputedStyle(document.documentElement), color = n => css.getPropertyValue(n).trim();
  const most = Math.max(1, ...series.map(p => p.requests)), lat = series.map(p => p.latency_p50);
  const slowest = Math.max(0.001, ...lat.filter(v => v != null)), bw = w / series.length, top = 18, ph = h - 36;
  [c.width, c.height] = [w * dpr, h * dpr];
  g.scale(dpr, dpr);
  [g.font, g.fillStyle] = ["11px system-ui, sans-serif", color("--mute")];
  for (const [text, x, y] of [[plural(most, "request"), 6, 12], ["p50 " + ms(slowest), w - 6, 12],
                              ["-" + series.length * 10 / 60 + " min", 6, h - 5], ["now", w - 6, h - 5]]) {
    g.textAlign = x > 6 ? "right" : "left";
    g.fillText(text, x, y);
  }
  series.forEach((p, i) => {
    for (const [n, name] of [[p.requests, "--acc"], [p.errors, "--err"]]) {
      g.fillStyle = color(name);
      g.fillRect(i * bw + 1, top + ph - n / most * ph, Math.max(1, bw - 2), n / most * ph);
    }
  });
  [g.strokeStyle, g.fillStyle, g.lineWidth] = [color("--fg"), color("--fg"), 1.5];
  g.beginPath();
  lat.forEach((v, i) => {
    if (v == null) return;
    const x = i * bw + bw / 2, y = top + ph - v / slowest * ph;
    g.fillRect(x - 2, y - 2, 4, 4);
    i && lat[i - 1] != null ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
}
let polls = 0, pause = 1500;                      // the monitor's run, and its wait
async function poll(run) {                        // one at a time; slower while failing
  try {
    draw(await (await api("v1/dashboard")).json());
    pause = 1500;
  } catch (e) {
    $("updated").textContent = errorText(e);
    pause = Math.min(30000, pause * 2);
    if (e.status === 401) return;                 // until a key is given
  }
  if (run === polls && !$("monitor").hidden) timer = setTimeout(poll, pause, run);
}
function show(view) {
  for (const v of ["chat", "monitor"]) {
    $(v).hidden = v !== view;
    $("tab-" + v).classList.toggle("on", v === view);
  }
  clearTimeout(timer);
  if (view === "monitor") poll(++polls);
}
$("tab-chat").onclick = () => show("chat");
$("tab-monitor").onclick = () => show("monitor");
$("keybtn").onclick = () => askKey("Empty forgets the key.");
$("keyform").onsubmit = e => {
  e.preventDefault();
  const key = $("key").value.trim();
  key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY);
  [$("key").value, $("keyform").hidden] = ["", true];
  loadModels($("model").value);
  if (!$("monitor").hidden) show("monitor");
};
$("ask").onsubmit = submit;
$("prompt").onkeydown = e => {                    // not while an input method composes
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) submit(e);
  else if (e.key === "Escape" && editing >= 0) cancelEdit();
};
$("canceledit").onclick = cancelEdit;
$("stop").onclick = stopAnswer;
$("new").onclick = () => pick(null);
$("sidebtn").onclick = () => {
  side(!$("chat").classList.contains("side"));
  if ($("chat").classList.contains("side") && !wide.matches) $("new").focus();
};
$("setbtn").onclick = () => {
  $("setbtn").ariaExpanded = String($("settings").hidden);
  $("settings").hidden = !$("settings").hidden;
};
$("model").onchange = () => [applyModel(), prefs()];
SETTINGS.forEach(id => { $(id).onchange = prefs; });
$("attach").onclick = () => $("file").click();
$("file").onchange = () => {
  for (const f of $("file").files) {
    const reader = new FileReader();
    reader.onload = () => [attached.push(reader.result), drawAttached()];
    if (f.type.startsWith("image/")) reader.readAsDataURL(f);
  }
  $("file").value = "";
};
addEventListener("storage", e => {              // another tab saved: its list, with our open chat
  if (e.key !== CHATS) return;
  chats = stored().map(c => chat && c.id === chat.id ? chat : c);
  drawChats();
});
document.addEventListener("keydown", e => {      // Esc closes the chat list over a narrow page
  if (e.key === "Escape" && matchMedia("(max-width:760px)").matches && $("chat").classList.contains("side")) {
    side(false);
    $("sidebtn").focus();
  }
});
const saved = load();
const wide = matchMedia("(min-width:761px)");
side(wide.matches);
wide.onchange = () => side(wide.matches);
drawLog();
drawChats();
loadModels(saved.model);
$("prompt").focus();
</script></body></html>

"""


_DEMO_FORMATTING = (
    "Here is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n"
    "```html\n<div class=\"box\">a < b && c > d</div>\n```\n\n"
    "```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\n"
    "Math: 3 < 5 and 7 > 2; AT&T; 'quotes' \"double\"  two  spaces.\nTrailing line")
_DEMO_ANSWERS = (
    ("format", _DEMO_FORMATTING),
    ("hindi", "नमस्ते! भारत की राजधानी नई दिल्ली है। 🙏"),
    ("tamil", "வணக்கம்! இந்தியாவின் தலைநகரம் புது தில்லி. 🙏"),
    ("hello", "Hello! How are you doing today?"),
)
_DEMO_WORDS = ("Param is a bilingual model trained for India, and this demo answer "
               "repeats a fixed text so that its length can be chosen.").split()
_THOUGHT_HEAD = "<details class='thought'%s><summary>🧠 Thinking...</summary>\n\n"
_DEBUG_HEAD = ("\n\n<details style='opacity:0.6; font-size:0.85em'><summary>🔍 Debug: Raw "
               "Response</summary>\n\n<pre>")
_LATENCY = ("</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px "
            "solid #eee; margin-top:8px; padding-top:4px'>⏱️ Latency: %.2fs | Processing "
            "time: %.2fs</div>")
_DEMO_SLIDERS = {"temperature": (0, 2), "max_tokens": (1, 8192), "top_p": (0, 1),
                 "top_k": (1, 100)}      # the Param app's slider ranges


if __name__ == "__main__":
    sys.exit(main())
