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

Security: the server binds 127.0.0.1 by default.  Give it API keys (``--api-key`` or
``BHARATGEN_API_KEYS``) before exposing it; keys are compared in constant time.
"""

from __future__ import annotations    # annotations stay text: evaluating them slowed the import

__version__ = "0.1.0"

__all__ = [
    # errors
    "BharatGenError", "APIError", "BadRequestError", "AuthenticationError",
    "NotFoundError", "MethodNotAllowedError", "RequestTooLargeError", "RequestTimeoutError",
    "RateLimitError", "InternalServerError", "ServerOverloadedError", "UpstreamError",
    "UpstreamOverloadedError",
    "APIConnectionError", "APITimeoutError", "UpstreamTimeout",
    # protocol pieces
    "CleanReply", "clean_reply", "estimate_tokens",
    # objects
    "ChatCompletion", "Choice", "ChatCompletionMessage", "ChatCompletionChunk",
    "ChunkChoice", "ChoiceDelta", "CompletionUsage", "CompletionTokensDetails",
    "Model", "ModelList", "Completion", "CompletionChoice",
    # upstream, SDK, server
    "GradioClient", "BharatGenOpenAI", "AsyncBharatGenOpenAI", "Stream", "AsyncStream",
    "Config", "GatewayServer", "DemoUpstream", "main",
]

import collections
import dataclasses
import heapq
import html
import json
import logging
import os
import queue
import re
import selectors
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import ssl                          # imported where an https upstream needs it

DEFAULT_MODEL = "param-1"
DEFAULT_ENDPOINT = "chat_fn_1"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant. You think step-by-step."
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 1024
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 50
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 4 * 1024 * 1024
REASONING_MODES = ("separate", "inline", "none")

_log = logging.getLogger("bharatgen_openai")
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


class APIConnectionError(UpstreamError, ConnectionError):
    """The Gradio app could not be reached, or dropped the connection (502)."""
    code = "upstream_unreachable"


class APITimeoutError(APIConnectionError, TimeoutError):
    """The Gradio app did not answer in time (504)."""
    status = 504
    code = "upstream_timeout"


UpstreamTimeout = APITimeoutError


###############################################################################
# Protocol pieces: SSE, the HTML cleaner, stop sequences, token counts #########
###############################################################################

def _iter_sse(read: Callable[[], bytes]) -> Iterator[Tuple[str, str]]:
    """Yield ``(event, data)`` from a server-sent event stream, one event at a time."""
    for batch in _iter_sse_batches(read):
        yield from batch


def _iter_sse_batches(read: Callable[[], bytes]) -> Iterator[List[Tuple[str, str]]]:
    """Yield the ``(event, data)`` of a server-sent event stream in batches: all the
    events complete in what has arrived so far, so a reader that fell behind can
    catch up in one step.

    ``read`` returns the next bytes that arrived (any amount; ``b""`` at the end; ``None``
    when a non-blocking stream has nothing yet, passed on as an empty batch), so whole
    blocks are split here rather than line by line.  Follows the WHATWG rules that
    matter: ``event``/``data`` fields, multi-line data joined by ``\\n``, comments
    (``:``) ignored, ``\\r\\n`` line ends, an event dispatched on a blank line.
    """
    buf = b""
    while True:
        block = read()
        if block is None:                # nothing yet, on a non-blocking stream
            yield []
            continue
        if not block:
            event = _sse_event(buf)
            if event is not None:
                yield [event]
            return
        buf += block
        if b"\r" in buf:                 # a "\r" at the very end waits for its "\n"
            buf = buf.replace(b"\r\n", b"\n")
        start, batch = 0, []
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            event = _sse_event(buf[start:end])
            if event is not None:
                batch.append(event)
            start = end + 2
        if start:
            buf = buf[start:]
        if batch:
            yield batch


def _sse_event(raw: bytes) -> Optional[Tuple[str, str]]:
    """``(event, data)`` of one event's lines, or ``None`` if it has neither."""
    event, data = "", []
    for line in raw.decode("utf-8").split("\n"):
        if not line or line[0] == ":":
            continue
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if not data and not event:
        return None
    return event or "message", "\n".join(data)


_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # stateless


def _sse(obj: Any, event: Optional[str] = None) -> bytes:
    """One server-sent event carrying ``obj`` as compact JSON (or a literal string)."""
    payload = obj if isinstance(obj, str) else _COMPACT_JSON.encode(obj)
    head = "event: %s\n" % event if event else ""
    return ("%sdata: %s\n\n" % (head, payload)).encode("utf-8")


class _TagReader(HTMLParser):
    """Reads the name and attributes of the first start tag it is fed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tag: Optional[str] = None
        self.attrs: Dict[str, str] = {}

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
_MARKER_RE = re.compile(r"<(?:details|div)\b[^>]*>", re.I)
_PARTIAL_TAG_RE = re.compile(r"<(?:(?:d|de|det|deta|detai|detail|details|di|div)"
                             r"(?:[\s/][^>]*)?)?\Z", re.I)


def _is_tail_marker(tag_text: str) -> bool:
    """True for the app's debug ``<details style='opacity…'>`` or latency ``<div style='color:#666…'>``."""
    name, attrs = _parse_tag(tag_text)
    style = attrs.get("style", "").replace(" ", "").lower()
    if name == "details":
        return "opacity" in style
    return name == "div" and "color:#666" in style


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


def clean_reply(html_text: str) -> CleanReply:
    """Split the Param app's assistant HTML into the thought and the exact answer.

    The thought is the ``<details>`` block whose class contains ``thought``; the answer
    follows it and ends where the debug ``<details>`` (style with ``opacity``) or the
    latency ``<div>`` (style with ``color:#666``) begins.  The answer region is cut out,
    never re-serialized, so code that contains ``<div>``, ``&`` or ``a < b`` survives.
    Text without those blocks is returned whole as the answer.
    """
    pos, thought, thought_done = 0, "", True
    m = _DETAILS_RE.match(html_text)
    if m is None and _PARTIAL_TAG_RE.match(html_text.lstrip()):
        return CleanReply("", "", False, False)          # a tag still being written
    attrs = _parse_tag(m.group().strip())[1] if m is not None else {}
    if m is not None and "thought" in attrs.get("class", ""):
        body = m.end()
        s = _SUMMARY_RE.match(html_text, body)
        if s is not None:
            body = s.end()
        end = html_text.find(_DETAILS_END, body)
        if end < 0:                                       # still thinking
            return CleanReply("", html.unescape(html_text[body:]).strip(), False, False)
        thought = html.unescape(html_text[body:end]).strip()
        pos = end + len(_DETAILS_END)
        if "open" in attrs and not html_text[pos:].strip():   # still thinking
            return CleanReply("", thought, False, False)
        for _ in range(2):                                # the "\n\n" separator
            if html_text.startswith("\n", pos):
                pos += 1
    for marker in _MARKER_RE.finditer(html_text, pos):
        if _is_tail_marker(marker.group()):
            return CleanReply(html_text[pos:marker.start()].rstrip(), thought, True, True)
    return CleanReply(html_text[pos:], thought, thought_done, False)


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

    Only text that no later snapshot can change is released, so the deltas joined
    always equal :func:`clean_reply` of the final snapshot.  Once the answer streams,
    an update that only appends (a queue-protocol ``append`` diff, or a ``/call``
    snapshot extending the last one) is handled from the new text and a short held-back
    tail alone, so the work per update does not grow with the answer.
    """

    def __init__(self) -> None:
        self.thought = ""
        self._answer: List[str] = []      # the answer released so far, in pieces
        self._sent = 0                    # its length
        self._pending = ""                # answer text held back
        self._fast = False                # appends can be taken on their own
        self._prev: Optional[str] = None  # the last whole snapshot, if known
        self.diverged = False

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    def update(self, html_text: str, final: bool = False) -> Tuple[str, str]:
        """Feed the latest whole snapshot; return the new ``(thought, answer)`` text."""
        prev, self._prev = self._prev, html_text
        if (self._fast and not final and prev is not None and len(html_text) >= len(prev)
                and html_text.startswith(prev)):
            return "", self._take(html_text[len(prev):])
        return self._whole(html_text, final)

    def append(self, text: str) -> Tuple[str, str]:
        """Feed text appended to the last snapshot; return the new ``(thought, answer)``."""
        if self._fast:
            if self._prev is not None:
                self._prev = None          # not kept whole: that would copy it every time
            return "", self._take(text)
        if self._prev is None:
            raise ValueError("append before any whole snapshot")
        return self.update(self._prev + text)

    def _take(self, text: str) -> str:
        """The answer phase, appends only: look at the held-back tail and ``text``."""
        buf = self._pending + text
        for marker in _MARKER_RE.finditer(buf):
            if _is_tail_marker(marker.group()):
                self._fast, self._pending = False, ""
                return self._release(buf[:marker.start()].rstrip())
        safe = _stable_prefix(buf)
        self._pending = buf[len(safe):]
        return self._release(safe)

    def _release(self, text: str) -> str:
        if text:
            self._answer.append(text)
            self._sent += len(text)
        return text

    def _whole(self, html_text: str, final: bool) -> Tuple[str, str]:
        reply = clean_reply(html_text)
        thought = reply.thought if (final or reply.thought_done) else _stable_prefix(reply.thought)
        done = final or reply.answer_done
        answer = reply.answer if done else _stable_prefix(reply.answer)
        t_delta = ""
        if len(thought) > len(self.thought):
            if thought.startswith(self.thought):
                t_delta, self.thought = thought[len(self.thought):], thought
            else:
                self._diverge("thought")
        a_delta = ""
        if len(answer) > self._sent:
            if answer.startswith(self.answer):
                a_delta = self._release(answer[self._sent:])
            else:
                self._diverge("answer")
        # appends alone suffice once the answer has begun (the separator is behind it)
        self._fast = (reply.thought_done and not done and not self.diverged
                      and bool(reply.answer) and self._sent == len(answer))
        self._pending = reply.answer[self._sent:] if self._fast else ""
        return t_delta, a_delta

    def _diverge(self, name: str) -> None:
        if not self.diverged:
            _log.warning("upstream rewrote %s text already sent; keeping what was sent", name)
        self.diverged = True


class _StopCutter:
    """Cuts a streamed text before the first of the stop sequences.

    Holds back the longest tail that could still grow into a stop sequence, so a stop
    split across two deltas is still caught and nothing after it is released.
    """

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
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if stop.startswith(buf[len(buf) - k:]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The end of the text: release what was held."""
        held, self.held = self.held, ""
        return "" if self.stopped else held


# Token estimator: counts by script, calibrated against tiktoken's o200k_base. Compiled
# on first use (re caches it): its Unicode ranges cost a tenth of the module's import.
_TOKEN_PATTERN = (
    r"(?P<latin>[A-Za-z\u00C0-\u024F]+)"
    r"|(?P<digits>[0-9]+)"
    r"|(?P<indic>[\u0900-\u0DFF\uA8E0-\uA8FF\u1CD0-\u1CFF]+)"
    r"|(?P<cjk>[\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF\uF900-\uFAFF]+)"
    r"|(?P<space>\s+)"
    r"|(?P<punct>[!-/:-@\[-`{-~]+)"
    r"|(?P<other>.)")

# Characters per token for the Indic blocks, by script (o200k_base has many Devanagari
# merges, fewer for the southern scripts).
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
    punctuation (code) about one per two characters.
    """
    total = 0.0
    for m in re.finditer(_TOKEN_PATTERN, text, re.S):
        kind, s = m.lastgroup, m.group()
        n = len(s)
        if kind == "latin":
            total += 1 if n <= 8 else 1 + (n - 8) / 4.0
        elif kind == "digits":
            total += (n + 2) // 3
        elif kind == "indic":
            rate = 2.2
            for limit, r in _INDIC_CHARS_PER_TOKEN:
                if ord(s[0]) < limit:
                    rate = r
                    break
            total += max(1.0, n / rate)
        elif kind == "cjk":
            total += n * 0.8
        elif kind == "space":
            total += 0 if s == " " else 1 + s.count("\n") // 4
        elif kind == "punct":
            total += (n + 2) // 3
        else:
            total += 1 if ord(s) < 0x2000 else 2
    return int(round(total)) if text else 0


###############################################################################
# Objects shaped like the openai SDK's #########################################
###############################################################################

def _extension(default: Any = None) -> Any:
    """A dataclass field that is left out of the JSON while it is ``None``.

    Used for fields OpenAI does not define (``reasoning_content``), so that
    :meth:`_Object.to_dict` gives exactly the OpenAI JSON when they are unused.
    """
    return field(default=default, metadata={"omit_none": True})


class _Object:
    """Base of the response objects: attribute access plus OpenAI-exact JSON."""

    def to_dict(self) -> Dict[str, Any]:
        """The object as the OpenAI API's JSON (a fresh dict)."""
        out: Dict[str, Any] = {}
        for name, omit_none in self._json_fields():
            value = getattr(self, name)
            if value is None:
                if omit_none:
                    continue
            elif type(value) is list:
                value = [v.to_dict() if isinstance(v, _Object) else _to_json(v) for v in value]
            elif isinstance(value, (_Object, dict)):
                value = _to_json(value)
            out[name] = value
        return out

    @classmethod
    def _json_fields(cls) -> Tuple[Tuple[str, bool], ...]:
        """``(name, omit_none)`` of each field, worked out once per class (a hot path)."""
        found = cls.__dict__.get("_fields_for_json")
        if found is None:
            found = tuple((f.name, bool(f.metadata.get("omit_none")))
                          for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            setattr(cls, "_fields_for_json", found)
        return found

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
class ChatCompletionMessage(_Object):
    """The assistant's message in a non-streamed chat completion."""
    role: str = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None
    annotations: List[Any] = field(default_factory=list)
    reasoning_content: Optional[str] = _extension()


@dataclass
class Choice(_Object):
    """One choice of a chat completion."""
    index: int = 0
    message: ChatCompletionMessage = field(default_factory=ChatCompletionMessage)
    finish_reason: Optional[str] = "stop"
    logprobs: Optional[Any] = None


@dataclass
class ChatCompletion(_Object):
    """A non-streamed chat completion (``object: "chat.completion"``)."""
    id: str = ""
    choices: List[Choice] = field(default_factory=list)
    created: int = 0
    model: str = DEFAULT_MODEL
    object: str = "chat.completion"
    system_fingerprint: Optional[str] = None
    usage: Optional[CompletionUsage] = None


@dataclass
class ChoiceDelta(_Object):
    """What one streamed chunk adds to a choice."""
    role: Optional[str] = _extension()
    content: Optional[str] = _extension()
    reasoning_content: Optional[str] = _extension()


@dataclass
class ChunkChoice(_Object):
    """One choice of a streamed chunk."""
    index: int = 0
    delta: ChoiceDelta = field(default_factory=ChoiceDelta)
    finish_reason: Optional[str] = None
    logprobs: Optional[Any] = None


@dataclass
class ChatCompletionChunk(_Object):
    """One streamed piece of a chat completion (``object: "chat.completion.chunk"``)."""
    id: str = ""
    choices: List[ChunkChoice] = field(default_factory=list)
    created: int = 0
    model: str = DEFAULT_MODEL
    object: str = "chat.completion.chunk"
    system_fingerprint: Optional[str] = None
    usage: Optional[CompletionUsage] = None


@dataclass
class CompletionChoice(_Object):
    """One choice of a legacy text completion."""
    index: int = 0
    text: str = ""
    finish_reason: Optional[str] = "stop"
    logprobs: Optional[Any] = None


@dataclass
class Completion(_Object):
    """A legacy text completion (``object: "text_completion"``), streamed or not."""
    id: str = ""
    choices: List[CompletionChoice] = field(default_factory=list)
    created: int = 0
    model: str = DEFAULT_MODEL
    object: str = "text_completion"
    system_fingerprint: Optional[str] = None
    usage: Optional[CompletionUsage] = None


@dataclass
class Model(_Object):
    """One served model, as ``/v1/models`` lists it."""
    id: str = DEFAULT_MODEL
    created: int = 0
    object: str = "model"
    owned_by: str = "bharatgen"
    display_name: Optional[str] = _extension()


@dataclass
class ModelList(_Object):
    """The answer of ``/v1/models``; iterable like the SDK's page."""
    data: List[Model] = field(default_factory=list)
    object: str = "list"

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


_FINGERPRINT = "fp_bharatgen_" + __version__.replace(".", "_")


###############################################################################
# Upstream: a Gradio client over plain sockets ################################
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

    @property
    def has_history(self) -> bool:
        """False for a ``gr.ChatInterface``, which keeps its history in a State."""
        return any(role == "history" for role, _ in self.inputs)


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
    path = parts.path.rstrip("/")
    for tail in ("/gradio_api", "/config", "/info"):
        if path.endswith(tail):
            path = path[:-len(tail)]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _message_text(content: Any) -> str:
    """The text of a chatbot message's content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") or "" for p in content
                 if isinstance(p, dict) and p.get("type", "text") == "text"]
        return texts[0] if len(texts) == 1 else "".join(texts)
    if isinstance(content, dict):
        return content.get("text") or ""
    return ""


def _reply_from_output(output: Any) -> str:
    """The newest assistant text in a Gradio chat output (``[chatbot, textbox]``).

    The chatbot value is the whole conversation; the reply is its last message, and
    only while that message is the assistant's (before it appears, there is none).
    A ``gr.ChatInterface`` returns the reply itself as a string.
    """
    value = output[0] if isinstance(output, list) and output else output
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "value" in value:      # Gradio 4 "update" dicts
        value = value["value"]
    if isinstance(value, list):
        if not value:
            return ""
        last = value[-1]
        if isinstance(last, dict):
            return _message_text(last.get("content")) if last.get("role") == "assistant" else ""
        if isinstance(last, (list, tuple)) and len(last) == 2:
            return last[1] if isinstance(last[1], str) else ""
    raise UpstreamError("the Gradio app returned an output this client cannot read: %s"
                        % json.dumps(output, ensure_ascii=False)[:200])


def _reply_path(output: Any) -> Optional[List[Any]]:
    """The path of the reply's text inside output 0 (for spotting appends), if it has one."""
    value = output[0] if isinstance(output, list) and output else None
    if isinstance(value, str):
        return []
    if isinstance(value, list) and value:
        last = value[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
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


def _is_update(msg: Any) -> bool:
    """True for a queue message with output data (``process_generating``)."""
    return (isinstance(msg, dict) and msg.get("msg") == "process_generating"
            and isinstance(msg.get("output"), dict))


def _is_success(msg: Any) -> bool:
    """True for a queue message that ends the job with its output."""
    return (isinstance(msg, dict) and msg.get("msg") == "process_completed"
            and msg.get("success", True) is not False and isinstance(msg.get("output"), dict)
            and msg["output"].get("error") is None and msg["output"].get("data") is not None)


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
        if not path:
            if op == "replace":
                value = new
            elif op == "append":
                value = value + new
            else:
                raise UpstreamError("the Gradio app sent a diff this client cannot apply: %r" % op)
            continue
        target = value
        for key in path[:-1]:
            target = target[key]
        last = path[-1]
        if op == "replace":
            target[last] = new
        elif op == "append":
            target[last] += new
        elif op == "add":
            if isinstance(target, list):
                target.insert(int(last), new)
            else:
                target[last] = new
        elif op == "delete":
            del target[int(last) if isinstance(target, list) else last]
        else:
            raise UpstreamError("the Gradio app sent a diff this client cannot apply: %r" % op)
    return value


_MAX_HEAD = 65536                          # bytes of a response's status line and headers
_MAX_IDLE_CONNECTIONS = 256                # kept alive per upstream, for the next requests
_UNSAFE_IN_HEAD = re.compile(r"[\x00-\x1f\x7f]")   # would split or end a request line


class _ProtocolError(ConnectionError):
    """An upstream answer that is not HTTP/1.1 (status line, head or body framing): it is
    handled as a broken connection."""


class _UnsendableRequest(ValueError):
    """A request target or header with a control character, or a header that is not
    Latin-1: it would change the request's meaning, so it is never sent."""


def _not_yet(sock: socket.socket) -> Tuple[type, ...]:
    """What a non-blocking ``sock`` raises when it cannot read or write yet (a TLS
    socket has its own: its records need reads and writes of their own)."""
    ssl = sys.modules.get("ssl")           # imported only once TLS is in use
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        return BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError
    return (BlockingIOError,)


class _Response:
    """One upstream response: its status and headers, and its body read from the
    connection (``Content-Length``, chunked, or up to the close)."""

    __slots__ = ("conn", "status", "headers", "will_close", "chunked", "length", "done", "_left")

    def __init__(self, conn: "_Connection", status: int, headers: Dict[str, str],
                 will_close: bool, chunked: bool, length: Optional[int]) -> None:
        self.conn, self.status, self.headers = conn, status, headers
        self.will_close, self.chunked, self.length = will_close, chunked, length
        self.done = length == 0            # the body has been read to its end
        self._left = 0                     # chunked: data left in this chunk (-1: trailers,
                                           # -2: the CRLF after a chunk's data)

    @property
    def reusable(self) -> bool:
        """True if the connection can carry the next request."""
        return self.done and not self.will_close and self.conn.sock is not None

    def read(self) -> bytes:
        """The whole body (the socket must be blocking)."""
        parts = []
        while True:
            data = self.read1()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def read1(self) -> Optional[bytes]:
        """The body bytes that have arrived, in at most one socket read: ``b""`` at the
        end, ``None`` if the socket is non-blocking and nothing has arrived.

        A chunked body is decoded here, so one read takes every chunk that has arrived
        (Gradio sends one event per chunk).
        """
        if self.done:
            return b""
        conn = self.conn
        if not self.chunked:
            data, conn.buf = conn.buf, b""
            if not data:
                data = conn.recv()
                if data is None:
                    return None
            if self.length is None:        # up to the close
                self.done = not data
                return data
            if not data:
                raise _ProtocolError("the body ended %d bytes short" % self.length)
            if len(data) > self.length:
                data, conn.buf = data[:self.length], data[self.length:]
            self.length -= len(data)
            self.done = self.length == 0
            return data
        out: List[bytes] = []
        while True:
            buf, pos = conn.buf, 0
            while True:
                if self._left > 0:                      # inside a chunk's data
                    if pos == len(buf):
                        break
                    take = buf[pos:pos + self._left]
                    out.append(take)
                    pos += len(take)
                    self._left -= len(take)
                    if self._left:
                        break
                    self._left = -2
                if self._left == -2:
                    if len(buf) - pos < 2:
                        break
                    pos, self._left = pos + 2, 0
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                if self._left == -1:                    # trailers, up to an empty line
                    empty, pos = eol == pos, eol + 2
                    if empty:
                        self.done = True
                        break
                    continue
                try:
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise _ProtocolError("a malformed chunk size: %r" % buf[pos:eol][:40]) from None
                pos = eol + 2
                self._left = size if size else -1
            conn.buf = buf[pos:]
            if out or self.done:
                return b"".join(out)
            data = conn.recv()
            if data is None:
                return None
            if not data:
                raise _ProtocolError("the chunked body ended before its last chunk")
            conn.buf += data


class _Connection:
    """One keep-alive HTTP/1.1 connection to an upstream, over TLS for ``https``.

    A request goes out in one write and the response head is parsed here:
    http.client's header parsing (the email package) costs more than the rest of
    setting up a streamed answer.
    """

    def __init__(self, host: str, port: int, context: Optional["ssl.SSLContext"],
                 timeout: float) -> None:
        self.host, self.port, self.context, self.timeout = host, port, context, timeout
        self._not_yet: Tuple[type, ...] = (BlockingIOError,)
        self.sock: Optional[socket.socket] = None
        self.buf = b""                     # bytes read past what was handed out
        name = "[%s]" % host if ":" in host else host
        default = 443 if context is not None else 80
        self._host_header = name if port == default else "%s:%d" % (name, port)

    def close(self) -> None:
        sock, self.sock, self.buf = self.sock, None, b""
        if sock is not None:
            sock.close()

    def recv(self) -> Optional[bytes]:
        """One socket read (``None`` if the socket is non-blocking and has nothing)."""
        try:
            return self.sock.recv(65536)
        except self._not_yet:
            return None

    def request(self, method: str, target: str, body: Optional[bytes],
                headers: Dict[str, str]) -> None:
        """Send one request (connecting first if need be)."""
        if _UNSAFE_IN_HEAD.search(target) or " " in target or \
                any(_UNSAFE_IN_HEAD.search(value) for value in headers.values()):
            raise _UnsendableRequest("a control character in the request to %r" % target[:200])
        head = ["%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, self._host_header)]
        head += ["%s: %s\r\n" % item for item in headers.items()]
        if body is not None:
            head.append("Content-Length: %d\r\n" % len(body))
        head.append("\r\n")
        try:
            data = "".join(head).encode("latin-1")
        except UnicodeEncodeError:
            raise _UnsendableRequest("a header that is not Latin-1 in the request to %r"
                                     % target[:200]) from None
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
            self.sock, self.buf, self._not_yet = sock, b"", _not_yet(sock)
        self.sock.sendall(data + body if body else data)

    def exchange(self, method: str, target: str, body: Optional[bytes],
                 headers: Dict[str, str], timeout: float) -> _Response:
        """Send one request and read its response head, waiting up to ``timeout`` for
        it. A kept-alive connection the server closed while it rested fails at once:
        it is opened again and the request sent once more."""
        while True:
            rested = self.sock is not None
            try:
                self.request(method, target, body, headers)
                self.sock.settimeout(timeout)
                return self.getresponse(method)
            except socket.timeout:
                raise
            except OSError:
                if not rested:
                    raise
                self.close()

    def getresponse(self, method: str) -> _Response:
        """Read the status line and headers of the response (1xx ones skipped)."""
        while True:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > _MAX_HEAD:
                    raise _ProtocolError("a response head of over %d bytes" % _MAX_HEAD)
                data = self.sock.recv(65536)
                if not data:
                    if buf:
                        raise _ProtocolError("the response head ended early: %r" % buf[:200])
                    raise _ProtocolError("the connection closed without a response")
                buf += data
                end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(data) - 3))
            lines = buf[:end].decode("latin-1").split("\r\n")
            self.buf = buf[end + 4:]
            parts = lines[0].split(None, 2)
            try:
                if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                    raise ValueError
                status = int(parts[1])
            except ValueError:
                raise _ProtocolError("a malformed status line: %r" % lines[0][:200]) from None
            if 100 <= status < 200 and status != 101:
                continue                       # 100 Continue and the like: the real one follows
            headers: Dict[str, str] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not colon:
                    raise _ProtocolError("a malformed header line: %r" % line[:200])
                name, value = name.strip().lower(), value.strip()
                headers[name] = headers[name] + ", " + value if name in headers else value
            connection = headers.get("connection", "").lower()
            will_close = "close" in connection or (parts[0] == "HTTP/1.0"
                                                   and "keep-alive" not in connection)
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            length: Optional[int] = None
            if method == "HEAD" or status in (204, 304):
                length = 0
            elif not chunked:
                try:
                    length = int(headers["content-length"])
                    if length < 0:
                        raise ValueError
                except KeyError:
                    will_close = True          # the body runs to the close
                except ValueError:
                    raise _ProtocolError(
                        "a malformed Content-Length: %r" % headers["content-length"]) from None
            return _Response(self, status, headers, will_close, chunked, length)


class _IdleWatch:
    """Ends upstream reads that wait too long, so streaming sockets need no timeout.

    A socket with a timeout costs a ``poll()`` before every read; a blocking one does
    not.  Each watched stream notes when its current read began; one thread, alive
    while there is something to watch, shuts the socket of a read waiting past its
    limit, which ends that read at once.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._streams: set = set()
        self._lock = threading.Lock()
        self._running = False

    def watch(self, stream: "_EventStream") -> None:
        with self._lock:
            self._streams.add(stream)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, daemon=True,
                                 name="bharatgen-idle-watch").start()

    def unwatch(self, stream: "_EventStream") -> None:
        with self._lock:
            self._streams.discard(stream)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                if not self._streams:
                    self._running = False
                    return
                streams = list(self._streams)
            now = time.monotonic()
            for stream in streams:
                since = stream.reading_since
                if since and now - since > stream.client.timeout:
                    stream.expire()


class _EventStream:
    """The SSE events of one upstream response, under the first-output and idle timeouts.

    Until :meth:`output_started`, the whole wait is bounded by ``first_event_timeout``
    (heartbeats do not extend it), with socket timeouts; after, each silence by
    ``timeout``, kept by the client's :class:`_IdleWatch` while the socket blocks.
    """

    def __init__(self, client: "GradioClient", resp: _Response,
                 on_stream: Optional[Callable[["_EventStream"], None]] = None) -> None:
        self.client, self.resp, self.conn = client, resp, resp.conn
        self.deadline = time.monotonic() + client.first_event_timeout
        self.started = False
        self.bytes = 0         # counted here, added to the shared metrics once at the end
        self.reading_since = 0.0          # when the read under way began (0: none)
        self.expired = False
        self.pumped = False               # read without blocking, by the gateway's pump
        self.last_data = 0.0
        if on_stream is not None:         # shown to the gateway, which may pump it
            on_stream(self)

    @property
    def pumpable(self) -> bool:
        """True if the gateway's pump can take this stream over."""
        return self.started and self.conn.sock is not None

    def pump(self) -> socket.socket:
        """Make reads non-blocking (``None`` when nothing has arrived); the socket, for
        the pump's selector (which calls once first: some may be buffered already)."""
        sock = self.conn.sock
        sock.setblocking(False)
        self.client._idle_watch.unwatch(self)     # the pump keeps the idle timeout now
        self.pumped, self.last_data = True, time.monotonic()
        return sock

    def output_started(self) -> None:
        if not self.started:
            self.started = True
            if self.conn.sock is not None:
                self.conn.sock.settimeout(None)
                self.client._idle_watch.watch(self)

    def expire(self) -> None:
        """Called by the watch: end the read that waited too long."""
        self.expired = True
        try:
            if self.conn.sock is not None:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read(self) -> Optional[bytes]:
        if self.pumped:
            block = self.resp.read1()
            if block:
                self.bytes += len(block)
                self.last_data = time.monotonic()
            return block
        if not self.started:
            if self.conn.sock is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                self.conn.sock.settimeout(min(self.client.timeout, left))
            block = self.resp.read1()
        else:
            self.reading_since = time.monotonic()
            try:
                block = self.resp.read1()
            except OSError:
                if self.expired:
                    raise socket.timeout() from None
                raise
            finally:
                self.reading_since = 0.0
            if self.expired:
                raise socket.timeout()
        self.bytes += len(block)
        return block

    def finish(self) -> None:
        """Read a finished stream to its end (briefly), so its connection can be reused.

        A pumped stream takes only what has arrived (the pump must not wait); if the
        end is not there yet, the connection is closed instead of kept.
        """
        try:
            if self.conn.sock is not None and not self.pumped:
                self.conn.sock.settimeout(min(self.client.timeout, 1.0))
            while self.resp.read1():
                pass
            if not self.resp.done:
                self.conn.close()
        except OSError:
            self.conn.close()
        if self.pumped and self.conn.sock is not None:
            self.conn.sock.settimeout(self.client.timeout)

    def __iter__(self) -> Iterator[List[Tuple[str, str]]]:
        """Batches of the events that have arrived (see :func:`_iter_sse_batches`)."""
        try:
            yield from _iter_sse_batches(self._read)
        except socket.timeout:
            if self.started:
                raise APITimeoutError("the Gradio app sent nothing for %ss"
                                      % self.client.timeout) from None
            raise APITimeoutError("the Gradio app sent no output within %ss"
                                  % self.client.first_event_timeout) from None
        except UnicodeDecodeError:
            raise UpstreamError("the Gradio app sent an event that is not UTF-8") from None
        except OSError as exc:
            raise APIConnectionError("the Gradio app dropped the stream: %s" % exc) from None
        finally:
            if self.started:
                self.client._idle_watch.unwatch(self)
            if self.client.metrics is not None and self.bytes:
                self.client.metrics.inc("bharatgen_upstream_bytes_total", self.bytes)
                self.bytes = 0


class GradioClient:
    """Calls one chat endpoint of a Gradio app and streams the reply's HTML.

    ``base_url`` may be the app's root, its ``/gradio_api`` URL or a Hugging Face Space
    (``owner/space``).  :meth:`discover` reads ``/config`` and ``<prefix>/info`` once: the
    API prefix, the chat endpoint, its inputs (mapped to OpenAI fields by name, the rest
    filled with the app's defaults) and the history format.  Replies stream over the
    queue protocol (``/queue/join``, diffs) when the app offers it, else over ``/call``.
    ``HF_TOKEN`` (or ``hf_token``) is sent as a bearer token for private Spaces.
    """

    def __init__(self, base_url: str, *, endpoint: Optional[str] = None,
                 timeout: float = 120.0, connect_timeout: float = 10.0,
                 first_event_timeout: Optional[float] = None, protocol: str = "auto",
                 param_names: Optional[Dict[str, str]] = None,
                 hf_token: Optional[str] = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError("protocol must be one of %s, not %r" % (", ".join(PROTOCOLS), protocol))
        self.base_url = _normalize_base_url(base_url)
        self.endpoint = endpoint.strip("/") if endpoint else None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.first_event_timeout = first_event_timeout or timeout
        self.protocol = protocol
        self.param_names = dict(param_names or {})
        self.hf_token = hf_token if hf_token is not None else os.environ.get("HF_TOKEN")
        parts = urllib.parse.urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._root = parts.path
        self._prefix_hint = "/gradio_api" if base_url.rstrip("/").endswith("/gradio_api") else ""
        self._info: Optional[_AppInfo] = None
        self._lock = threading.Lock()
        self._discover_lock = threading.Lock()
        self._idle: List[_Connection] = []     # keep-alive connections at rest
        self._tls: Optional["ssl.SSLContext"] = None
        if self._https:
            import ssl                             # here, not on top: it is a tenth of the import
            self._tls = ssl.create_default_context()
            self._tls.set_alpn_protocols(["http/1.1"])
        self._idle_watch = _IdleWatch()
        self.metrics: Optional[Any] = None       # a server's _Metrics, counting bytes read

    def __repr__(self) -> str:
        return "GradioClient(%r, endpoint=%r)" % (self.base_url, self.endpoint)

    # -- HTTP -------------------------------------------------------------------------

    def _connect(self) -> _Connection:
        """A keep-alive connection at rest, or a new one (connected on first use)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Connection(self._host, self._port, self._tls, self.connect_timeout)

    def _release(self, conn: _Connection, resp: Optional[_Response]) -> None:
        """Keep ``conn`` for the next call if its last response was read to the end."""
        reusable = resp is not None and resp.reusable
        with self._lock:
            if reusable and len(self._idle) < _MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the keep-alive connections at rest."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _send(self, conn: _Connection, method: str, path: str,
              body: Optional[Any] = None) -> _Response:
        """Send one request; turn socket failures into the matching error."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"User-Agent": "bharatgen_openai/" + __version__,
                   "Accept-Encoding": "identity"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.hf_token:
            headers["Authorization"] = headers["X-HF-Authorization"] = "Bearer " + self.hf_token
        try:
            return conn.exchange(method, self._root + path, data, headers, self.timeout)
        except _UnsendableRequest as exc:
            raise UpstreamError("cannot send the request to the Gradio app: %s" % exc) from None
        except socket.timeout:
            raise APITimeoutError("the Gradio app at %s did not answer within %ss"
                                  % (self.base_url, self.timeout)) from None
        except OSError as exc:
            raise APIConnectionError("cannot reach the Gradio app at %s: %s"
                                     % (self.base_url, exc)) from None

    def _read_all(self, resp: _Response) -> bytes:
        try:
            return resp.read()
        except socket.timeout:
            raise APITimeoutError("the Gradio app did not answer within %ss" % self.timeout) from None
        except OSError as exc:
            raise APIConnectionError("the Gradio app dropped the connection: %s" % exc) from None

    def _request_json(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        """``(status, JSON or None)`` of one request."""
        conn, resp = self._connect(), None
        try:
            resp = self._send(conn, method, path, body)
            raw = self._read_all(resp)
        finally:
            self._release(conn, resp)
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, None

    # -- discovery ----------------------------------------------------------------------

    def discover(self, refresh: bool = False) -> _AppInfo:
        """What the app offers (read once, then cached; ``refresh`` reads it again)."""
        with self._discover_lock:
            if self._info is None or refresh:
                self._info = self._discover()
            return self._info

    def _discover(self) -> _AppInfo:
        status, config = self._request_json("GET", "/config")
        if status in (401, 403):
            raise UpstreamError("the Gradio app at %s refused access (HTTP %d); for a private "
                                "Space set HF_TOKEN" % (self.base_url, status))
        config = config if status == 200 and isinstance(config, dict) else {}
        prefix = (config.get("api_prefix") if config else self._prefix_hint) or ""
        prefix = prefix.rstrip("/")
        version = str(config.get("version") or "")
        major = int(version.split(".")[0]) if version[:1].isdigit() else 6
        status, api = self._request_json("GET", prefix + "/info")
        named = api.get("named_endpoints") if status == 200 and isinstance(api, dict) else None
        named = {k.strip("/"): v for k, v in (named or {}).items() if isinstance(v, dict)}
        endpoint = self.endpoint or self._pick_endpoint(named)
        parameters = list(named.get(endpoint, {}).get("parameters") or [])
        dep: Dict[str, Any] = {}
        fn_index = None
        for i, d in enumerate(config.get("dependencies") or []):
            if isinstance(d, dict) and d.get("api_name") == endpoint:
                dep, fn_index = d, d.get("id", i)
                break
        types = {c.get("id"): str(c.get("type", "")).lower()
                 for c in config.get("components") or [] if isinstance(c, dict)}
        inputs = self._layout(parameters, [types.get(i, "") for i in dep.get("inputs") or []])
        protocol = str(config.get("protocol") or "")
        m = re.fullmatch(r"sse_v(\d+)", protocol)
        queue_ok = bool(m and int(m.group(1)) >= 3 and fn_index is not None)
        if self.protocol == "queue" and not queue_ok:
            raise UpstreamError("the Gradio app at %s does not offer the queue protocol "
                                "(protocol %r)" % (self.base_url, protocol or None))
        use_queue = queue_ok and self.protocol != "call"
        numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2]) or (6, 31)
        props = {c.get("id"): c.get("props") for c in config.get("components") or []
                 if isinstance(c, dict) and isinstance(c.get("props"), dict)}
        dep_props = [props.get(i) or {} for i in dep.get("inputs") or []
                     if types.get(i, "") != "state"]
        return _AppInfo(prefix=prefix, version=version, protocol=protocol, endpoint=endpoint,
                        history_format=self._history_format(parameters, major),
                        inputs=inputs, parameters=parameters, fn_index=fn_index,
                        use_queue=use_queue, limits=self._limits(inputs, parameters, dep_props),
                        # /call wants placeholders for State inputs before Gradio 6.18
                        send_state=use_queue or numbers < (6, 18))

    @staticmethod
    def _pick_endpoint(named: Dict[str, Any]) -> str:
        """The configured name, else a known chat name, else the one Textbox+Chatbot endpoint."""
        for name in _ENDPOINT_PREFERENCE:
            if name in named:
                return name
        chats = [n for n, e in named.items()
                 if {"Textbox", "Chatbot"} <= {p.get("component") for p in e.get("parameters") or []}]
        if len(chats) == 1:
            return chats[0]
        return next(iter(named)) if len(named) == 1 else DEFAULT_ENDPOINT

    def _layout(self, parameters: List[Dict[str, Any]], dep_types: List[str]) -> List[Tuple[str, Any]]:
        """Each input's role, in order: an OpenAI field, the history, a State, or a default."""
        if not parameters:
            return list(_PARAM_LAYOUT)
        names = {alias: role for role, aliases in _ROLE_NAMES.items() for alias in aliases}
        names.update({v: k for k, v in self.param_names.items()})
        roles: List[Tuple[str, Any]] = []
        for p in parameters:
            name, component = str(p.get("parameter_name") or ""), p.get("component")
            default = p.get("parameter_default") if p.get("parameter_has_default") else None
            if component == "Chatbot":
                role = "history"
            elif component == "MultimodalTextbox":
                role = "multimodal"
            else:
                role = names.get(name, "default")
            if role in (r for r, _ in roles):
                role = "default"
            roles.append((role, default))
        if not any(r in ("message", "multimodal") for r, _ in roles):
            for i, (role, default) in enumerate(roles):
                if role == "default" and parameters[i].get("component") == "Textbox":
                    roles[i] = ("message", default)
                    break
        if dep_types and len(dep_types) > len(roles):   # State inputs, which /info leaves out
            it = iter(roles)
            roles = [("state", None) if t == "state" else next(it, ("state", None))
                     for t in dep_types]
        return roles

    @staticmethod
    def _limits(inputs: List[Tuple[str, Any]], parameters: List[Dict[str, Any]],
                props: List[Dict[str, Any]]) -> Dict[str, Tuple[float, float]]:
        """The range of each sampling slider: from ``/info`` ("numeric value between 1 and
        8192"), else from the component's ``minimum``/``maximum`` in ``/config``."""
        limits: Dict[str, Tuple[float, float]] = {}
        roles = [role for role, _ in inputs if role != "state"]
        for i, (role, p) in enumerate(zip(roles, parameters)):
            if role not in ("temperature", "max_tokens", "top_p", "top_k"):
                continue
            kind = p.get("type") if isinstance(p.get("type"), dict) else {}
            m = re.search(r"between\s+(-?[\d.]+(?:e[-+]?\d+)?)\s+and\s+(-?[\d.]+(?:e[-+]?\d+)?)",
                          str(kind.get("description") or ""))
            bounds = m.groups() if m else ((props[i].get("minimum"), props[i].get("maximum"))
                                           if i < len(props) else (None, None))
            try:
                lo, hi = float(bounds[0]), float(bounds[1])   # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if lo <= hi:
                limits[role] = (lo, hi)
        return limits

    @staticmethod
    def _history_format(parameters: List[Dict[str, Any]], major: int) -> str:
        for p in parameters:
            if p.get("component") == "Chatbot":
                example = p.get("example_input")
                if isinstance(example, list) and example:
                    first = example[0]
                    if isinstance(first, (list, tuple)):
                        return "pairs"
                    if isinstance(first, dict):
                        return "parts" if isinstance(first.get("content"), list) else "messages"
        return "parts" if major >= 6 else "messages" if major == 5 else "pairs"

    @staticmethod
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
        if fmt == "messages":
            return [{"role": r, "content": t} for r, t in history]
        return [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in history]

    def _data(self, info: _AppInfo, message: str, history: Sequence[Tuple[str, str]],
              values: Dict[str, Any]) -> List[Any]:
        """The endpoint's inputs: OpenAI values where given, the app's defaults elsewhere."""
        if history and not info.has_history:         # a ChatInterface: fold the history in
            lines = ["%s: %s" % ("User" if r == "user" else "Assistant", t) for r, t in history]
            message = "\n\n".join(lines + ["User: " + message])
        data: List[Any] = []
        for role, default in info.inputs:
            if role == "message":
                data.append(message)
            elif role == "multimodal":
                data.append({"text": message, "files": []})
            elif role == "history":
                data.append(self._history(history, info.history_format))
            elif role == "state":
                if info.send_state:
                    data.append(None)
            else:
                value = values.get(role)
                if value is not None and role in info.limits:
                    self._check_range(role, value, *info.limits[role])
                data.append(default if value is None else value)
        return data

    @staticmethod
    def _check_range(name: str, value: float, lo: float, hi: float) -> None:
        """A value outside the app's slider would fail there; say so before calling."""
        if lo <= value <= hi:
            return
        raise BadRequestError("%s=%g is %s than this model accepts (%s %g)"
                              % (name, value, "more" if value > hi else "less",
                                 "at most" if value > hi else "at least",
                                 hi if value > hi else lo),
                              param=name, code="invalid_value")

    # -- calling ------------------------------------------------------------------------

    def stream(self, message: str, history: Sequence[Tuple[str, str]] = (), *,
               system_prompt: Optional[str] = None, temperature: Optional[float] = None,
               max_tokens: Optional[int] = None, top_p: Optional[float] = None,
               top_k: Optional[int] = None,
               on_stream: Optional[Callable[["_EventStream"], None]] = None
               ) -> Iterator[Tuple[str, bool, bool]]:
        """Call the chat endpoint; yield ``(text, is_final, is_append)`` for every update:
        the reply's whole HTML, or (``is_append``) only what was appended to it.

        Values left ``None`` take the app's defaults.  Closing the generator closes the
        event stream and asks Gradio to cancel the job.  ``on_stream`` is shown the
        upstream event stream (the gateway's pump may take it over, and then ``None``
        is yielded whenever nothing has arrived).
        """
        info = self.discover()
        data = self._data(info, message, history, {
            "system": system_prompt, "temperature": temperature, "max_tokens": max_tokens,
            "top_p": top_p, "top_k": top_k})
        if info.use_queue:
            return self._stream_queue(info, data, on_stream)
        return self._stream_call(info, data, on_stream)

    def _join(self, conn: _Connection, path: str, body: Any) -> str:
        """POST a job; its ``event_id``.  503 is a full queue."""
        resp = self._send(conn, "POST", path, body)
        raw = self._read_all(resp)
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
        if info.fn_index is None:
            return

        def post() -> None:
            try:
                conn = self._connect()
                conn.timeout = min(self.connect_timeout, 5.0)
                try:
                    self._read_all(self._send(conn, "POST", info.prefix + "/cancel", {
                        "session_hash": session_hash, "fn_index": info.fn_index,
                        "event_id": event_id}))
                finally:
                    conn.close()
            except BharatGenError:
                pass
        threading.Thread(target=post, daemon=True, name="bharatgen-cancel").start()

    def _stream_call(self, info: _AppInfo, data: List[Any],
                     on_stream: Optional[Callable[["_EventStream"], None]] = None
                     ) -> Iterator[Tuple[str, bool, bool]]:
        """The two-step ``/call`` API: POST the inputs, then follow the event stream."""
        base = "%s/call/%s" % (info.prefix, info.endpoint)
        conn = self._connect()
        event_id, done, resp = None, False, None
        try:
            event_id = self._join(conn, base, {"data": data})
            resp = self._send(conn, "GET", "%s/%s" % (base, urllib.parse.quote(event_id, safe="")))
            if resp.status != 200:
                raise UpstreamError("the Gradio app refused the event stream (HTTP %d)" % resp.status)
            events = _EventStream(self, resp, on_stream)
            for event, payload in self._latest(events):
                if payload is None:
                    yield None                     # type: ignore[misc]
                    continue
                if event in ("generating", "complete"):
                    events.output_started()
                    try:
                        output = json.loads(payload)
                    except ValueError:
                        raise UpstreamError("the Gradio app sent a malformed %s event: %r"
                                            % (event, payload[:200])) from None
                    if output is None:
                        raise UpstreamError("the Gradio app cancelled the job")
                    done = event == "complete"
                    yield _reply_from_output(output), done, False
                    if done:
                        events.finish()
                        return
                elif event == "error":
                    done = True
                    try:
                        detail = json.loads(payload) if payload else None
                    except ValueError:
                        detail = payload
                    raise UpstreamError(_upstream_error_message(detail))
            raise APIConnectionError("the Gradio app ended the stream before the reply was complete")
        finally:
            self._release(conn, resp if done else None)
            if event_id is not None and not done:
                self._cancel(info, event_id, event_id)

    @staticmethod
    def _latest(events: "_EventStream") -> Iterator[Tuple[str, str]]:
        """The ``/call`` events, leaving out a snapshot that a later one, already
        arrived, replaces (each holds the whole reply): a reader that fell behind
        catches up without cleaning every snapshot it missed."""
        for batch in events:
            if not batch:                          # a pumped stream has nothing yet
                yield "", None                     # type: ignore[misc]
            for i, (event, payload) in enumerate(batch):
                if event == "generating" and i + 1 < len(batch) \
                        and batch[i + 1][0] in ("generating", "complete"):
                    continue
                yield event, payload

    @staticmethod
    def _messages(events: "_EventStream") -> Iterator[Tuple[Any, Any]]:
        """The queue messages, each with the (decoded) ones that arrived with it;
        ``(None, None)`` when a pumped stream has nothing yet."""
        for batch in events:
            if not batch:
                yield None, None
                continue
            msgs = collections.deque()
            for _, payload in batch:
                try:
                    msgs.append(json.loads(payload))
                except ValueError:
                    raise UpstreamError("the Gradio app sent a malformed queue message: %r"
                                        % payload[:200]) from None
            while msgs:
                yield msgs.popleft(), msgs

    def _stream_queue(self, info: _AppInfo, data: List[Any],
                      on_stream: Optional[Callable[["_EventStream"], None]] = None
                      ) -> Iterator[Tuple[str, bool, bool]]:
        """The queue protocol: join, then apply the ``process_generating`` diffs."""
        session = os.urandom(6).hex()
        conn = self._connect()
        event_id, done, resp = None, False, None
        try:
            event_id = self._join(conn, info.prefix + "/queue/join", {
                "data": data, "fn_index": info.fn_index, "session_hash": session,
                "event_data": None, "trigger_id": None})
            resp = self._send(conn, "GET", "%s/queue/data?session_hash=%s" % (info.prefix, session))
            if resp.status != 200:
                raise UpstreamError("the Gradio app refused the queue stream (HTTP %d)" % resp.status)
            outputs: Any = None
            path: Optional[List[Any]] = None      # where the reply text sits in output 0
            appended: List[str] = []              # appends to it not yet applied to outputs
            unsent = False                        # outputs changed, not yet yielded whole
            events = _EventStream(self, resp, on_stream)
            for msg, more in self._messages(events):
                if more is None:
                    yield None                     # type: ignore[misc]
                    continue
                kind = msg.get("msg") if isinstance(msg, dict) else None
                if kind in ("process_generating", "process_completed"):
                    events.output_started()
                if kind == "process_generating":
                    got = (msg.get("output") or {}).get("data")
                    if not unsent and path is not None and _is_append_to(got, path):
                        # appends already arrived behind this one join it: one update
                        texts = [got[0][0][2]]
                        while more and _is_update(more[0]) and \
                                _is_append_to(more[0]["output"].get("data"), path):
                            texts.append(more.popleft()["output"]["data"][0][0][2])
                        text = "".join(texts)
                        appended.append(text)             # kept aside: no copy of the reply
                        yield text, False, True
                        continue
                    if outputs is None:
                        outputs = got
                    else:
                        if appended:
                            outputs[0] = _apply_diff(outputs[0], [["append", path, "".join(appended)]])
                            appended.clear()
                        outputs = [_apply_diff(o, d) for o, d in zip(outputs, got)]
                    path = _reply_path(outputs)
                    # a later update that already arrived makes this snapshot stale
                    unsent = any(_is_update(m) or _is_success(m) for m in more)
                    if not unsent:
                        yield _reply_from_output(outputs), False, False
                elif kind == "process_completed":
                    done = True
                    output = msg.get("output") or {}
                    if not msg.get("success", True) or output.get("error") is not None:
                        raise UpstreamError(_upstream_error_message(output))
                    if output.get("data") is None:
                        raise UpstreamError("the Gradio app cancelled the job")
                    yield _reply_from_output(output["data"]), True, False
                    events.finish()
                    return
                elif kind == "unexpected_error":
                    done = True
                    raise UpstreamError(_upstream_error_message(msg.get("message")))
                elif kind == "close_stream":
                    break
            raise APIConnectionError("the Gradio app ended the stream before the reply was complete")
        finally:
            self._release(conn, resp if done else None)
            if event_id is not None and not done:
                self._cancel(info, session, event_id)


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
        return {"url": self.client.base_url,
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

    def __init__(self, clients: Sequence[GradioClient], backoff: float = 5.0,
                 max_backoff: float = 60.0) -> None:
        if not clients:
            raise ValueError("an upstream pool needs at least one upstream")
        self.replicas = [_Replica(c) for c in clients]
        self.backoff, self.max_backoff = backoff, max_backoff
        self._next = 0
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return ", ".join(r.client.base_url for r in self.replicas)

    def states(self) -> List[Dict[str, Any]]:
        return [r.state() for r in self.replicas]

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
                delay = min(self.max_backoff, self.backoff * 2 ** (replica.failures - 1))
            replica.down_until = time.monotonic() + delay
        _log.warning("upstream %s %s for %.0fs: %s", replica.client.base_url,
                     "set aside as busy" if replica.busy else "marked down", delay,
                     error.message)

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Tuple[str, bool, bool]]:
        """:meth:`GradioClient.stream` on the first replica that gives output."""
        error: Optional[BharatGenError] = None
        for replica in self._order():
            updates = None
            try:
                updates = replica.client.stream(*args, **kwargs)
                first = next(updates)
            except StopIteration:
                first = None
            except (APIConnectionError, UpstreamOverloadedError) as exc:
                if updates is not None:
                    updates.close()
                self._mark(replica, exc)
                error = exc
                continue
            self._mark(replica, None)
            return self._rest(first, updates)
        assert error is not None
        raise error

    @staticmethod
    def _rest(first: Any, updates: Any) -> Iterator[Tuple[str, bool, bool]]:
        try:
            if first is not None:
                yield first
            yield from updates
        finally:
            updates.close()


###############################################################################
# Requests: validation and the mapping of a conversation onto the app ##########
###############################################################################

_TEXT_PART_TYPES = ("text", "input_text", "output_text")
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
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad("%r must be %s, not %s" % (name, "an integer" if integer else "a number",
                                              json.dumps(value)[:50]), name, "invalid_type")
    if not lo <= value <= hi:
        raise _bad("%r must be between %s and %s; got %s" % (name, lo, hi, value), name)
    return value


def _content_text(content: Any, param: str, allow_none: bool = False) -> str:
    """The text of a message's ``content``: a string or a list of text parts."""
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
        if kind in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
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


def _conversation(messages: Any, param: str = "messages", max_messages: int = 1 << 30,
                  max_chars: int = 1 << 62) -> _Conversation:
    """Validate OpenAI ``messages`` and map them onto (system, history, message).

    System and developer messages, wherever they stand, are joined into the system
    prompt; consecutive messages of one role are joined; the last must be the user's.
    """
    if not isinstance(messages, list) or not messages:
        raise _bad("%r must be a non-empty list of messages" % param, param,
                   "invalid_type" if not isinstance(messages, list) else "invalid_value")
    if len(messages) > max_messages:
        raise _bad("%d messages is more than this server takes (%d)" % (len(messages), max_messages),
                   param, "too_many_messages")
    system: List[str] = []
    turns: List[Tuple[str, str]] = []
    tokens, chars = 3, 0
    for i, msg in enumerate(messages):
        where = "%s[%d]" % (param, i)
        if not isinstance(msg, dict):
            raise _bad("%s must be an object with 'role' and 'content'" % where, where, "invalid_type")
        role = msg.get("role")
        if role in ("tool", "function"):
            raise _bad("%s has role %r, but this server does not support tools yet; send "
                       "the conversation without tool messages" % (where, role),
                       where + ".role", "unsupported_role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad("%s.role must be one of 'system', 'developer', 'user', 'assistant'; "
                       "got %s" % (where, json.dumps(role)[:40]), where + ".role")
        if role == "assistant" and msg.get("tool_calls"):
            raise _bad("%s has tool_calls, but this server does not support tools yet" % where,
                       where + ".tool_calls", "unsupported_parameter")
        text = _content_text(msg.get("content"), where + ".content", allow_none=role == "assistant")
        tokens += 4 + estimate_tokens(text)
        chars += len(text)
        if chars > max_chars:
            raise _bad("the messages are longer than this server takes (%d characters)" % max_chars,
                       param, "context_length_exceeded")
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise _bad("the last message (other than system messages) must have role 'user'",
                   param, "invalid_value")
    return _Conversation(system="\n\n".join(system) if system else None,
                         history=turns[:-1], message=turns[-1][1], prompt_tokens=tokens)


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


_IGNORED_NUMBERS = (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2),
                    ("repetition_penalty", 0, 10), ("min_p", 0, 1))


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
    n = _number(body, "n", 1, 16, integer=True)
    s.n = int(n) if n is not None else 1
    stop = body.get("stop")
    if isinstance(stop, str):
        s.stop = [stop]
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) for x in stop):
        s.stop = list(stop)
    elif stop is not None:
        raise _bad("'stop' must be a string or a list of up to 4 strings", "stop")
    for name, lo, hi in _IGNORED_NUMBERS:
        _number(body, name, lo, hi)
    if body.get("seed") is not None:
        _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise _bad("logprobs are not available: the upstream app does not report them",
                   "logprobs", "unsupported_parameter")
    if body.get("tools"):
        raise _bad("tool calling is not supported by this model yet; send the request "
                   "without 'tools'", "tools", "unsupported_parameter")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise _bad("'tool_choice' needs 'tools', which this model does not support yet",
                   "tool_choice", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind in ("json_object", "json_schema"):
            raise _bad("response_format %r is not supported yet: this model can only be "
                       "asked for text" % kind, "response_format", "unsupported_parameter")
        if kind != "text":
            raise _bad("'response_format' must be {\"type\": \"text\"}", "response_format")
    if body.get("modalities") not in (None, ["text"]) or body.get("audio"):
        raise _bad("this model produces text only", "modalities", "unsupported_parameter")
    return s


def _flag(body: Dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad("%r must be a boolean" % name, name, "invalid_type")
    return value


def _include_usage(body: Dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    return _flag(opts, "include_usage")


###############################################################################
# The engine: upstream snapshots -> clean deltas, shared by SDK and server #####
###############################################################################

@dataclass
class _Piece:
    """One step of a generated choice: ``kind`` is reasoning, content or finish."""
    index: int
    kind: str
    text: str


class _Generation:
    """Runs ``n`` upstream calls for one request and yields their pieces interleaved.

    Each choice's HTML snapshots pass through a :class:`_StreamCleaner` and a
    :class:`_StopCutter`; a stop sequence or :meth:`close` ends the upstream call at
    once.  Streamed and non-streamed answers come from this one path, so they agree.
    """

    def __init__(self, client: Any, conv: _Conversation, sampling: _Sampling,
                 system_default: Optional[str],
                 on_stream: Optional[Callable[["_EventStream"], None]] = None) -> None:
        self.client, self.conv, self.sampling = client, conv, sampling
        self.on_stream = on_stream        # see GradioClient.stream: None means "nothing yet"
        self.system = conv.system if conv.system is not None else system_default
        self.thought: List[List[str]] = [[] for _ in range(sampling.n)]
        self.answer: List[List[str]] = [[] for _ in range(sampling.n)]
        self._closed = threading.Event()

    def _choice(self, index: int) -> Iterator[_Piece]:
        s = self.sampling
        try:
            upstream = self.client.stream(
                self.conv.message, self.conv.history, system_prompt=self.system,
                temperature=s.temperature, max_tokens=s.max_tokens, top_p=s.top_p,
                top_k=s.top_k, on_stream=self.on_stream)
        except BadRequestError as exc:      # name max_tokens as the client did
            if exc.param == "max_tokens" and s.max_tokens_param != "max_tokens":
                raise BadRequestError(s.max_tokens_param + exc.message[len("max_tokens"):],
                                      param=s.max_tokens_param, code=exc.code) from None
            raise
        cleaner, cutter = _StreamCleaner(), _StopCutter(s.stop)
        try:
            for update in upstream:
                if update is None:          # a pumped stream has nothing yet
                    yield None              # type: ignore[misc]
                    continue
                html_text, final, appended = update
                if appended:
                    thought, answer = cleaner.append(html_text)
                else:
                    thought, answer = cleaner.update(html_text, final)
                if thought:
                    self.thought[index].append(thought)
                    yield _Piece(index, "reasoning", thought)
                text = cutter.feed(answer) if answer else ""
                if text:
                    self.answer[index].append(text)
                    yield _Piece(index, "content", text)
                if cutter.stopped or self._closed.is_set():
                    break
            text = cutter.flush()
            if text:
                self.answer[index].append(text)
                yield _Piece(index, "content", text)
            yield _Piece(index, "finish", "stop")
        finally:
            upstream.close()

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
        running = self.sampling.n
        try:
            while running:
                item = pieces.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            self._closed.set()

    def close(self) -> None:
        """Stop every upstream call (the consumer went away)."""
        self._closed.set()

    def usage(self) -> CompletionUsage:
        """Estimated token counts of the prompt and everything generated so far."""
        reasoning = sum(estimate_tokens("".join(t)) for t in self.thought)
        completion = reasoning + sum(estimate_tokens("".join(a)) for a in self.answer)
        return CompletionUsage(
            prompt_tokens=self.conv.prompt_tokens, completion_tokens=completion,
            total_tokens=self.conv.prompt_tokens + completion,
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning))


class _Reasoning:
    """Places the thought text where ``--reasoning`` says: its own field, inline, or nowhere."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
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


###############################################################################
# Configuration #################################################################
###############################################################################

def _split_list(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


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
    allow_no_auth: bool = False
    cors_origins: List[str] = field(default_factory=list)
    max_body_bytes: int = MAX_BODY_BYTES
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_concurrent: int = 512
    max_messages: int = 2048
    max_chars: int = 1_000_000
    rate_limit_rpm: int = 0
    rate_limit_streams: int = 0
    grace: float = 30.0
    log_format: str = "text"
    pump: bool = True                  # stream answers from one thread (see _Pump)
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
            if flags.get(f.name) is not None:
                value = flags[f.name]
                values[f.name] = [value] if f.name == "upstream" and isinstance(value, str) else value
            elif raw is not None:
                values[f.name] = cls._parse(f, raw, names[0])
        config = cls(**values)
        config.check()
        return config

    @staticmethod
    def _parse(f: "dataclasses.Field[Any]", raw: str, name: str) -> Any:
        kind = str(f.type)                  # "<class 'int'>", "typing.Optional[float]", ...
        try:
            if "List" in kind:
                return _split_list(raw)
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
        if self.reasoning not in REASONING_MODES:
            raise ValueError("reasoning must be one of %s, not %r"
                             % (", ".join(REASONING_MODES), self.reasoning))
        if self.protocol not in PROTOCOLS:
            raise ValueError("protocol must be one of %s, not %r"
                             % (", ".join(PROTOCOLS), self.protocol))
        if min(self.timeout, self.connect_timeout, self.first_event_timeout or 1) <= 0:
            raise ValueError("timeouts must be positive")
        if not 0 <= self.port <= 65535:
            raise ValueError("port %r is out of range" % self.port)
        if self.log_format not in ("text", "json"):
            raise ValueError("log format must be text or json, not %r" % self.log_format)
        for name in ("max_body_bytes", "max_concurrent", "max_messages", "max_chars"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be at least 1" % name)


###############################################################################
# The backend: requests in, OpenAI objects out (used by the SDK and the server)
###############################################################################

@dataclass
class _ModelRoute:
    """One served model: its upstream pool and its own defaults."""
    id: str
    pool: _UpstreamPool
    system_prompt: Optional[str] = None
    display_name: Optional[str] = None


def _load_models(config: Config) -> List[_ModelRoute]:
    """The served models: from ``models_file`` (JSON) if given, else the one in ``config``.

    The file: ``{"models": [{"id", "upstreams": [url, ...], "endpoint", "protocol",
    "params": {openai_field: app_parameter}, "system_prompt", "display_name"}]}``.
    """
    def pool(urls: Any, spec: Dict[str, Any]) -> _UpstreamPool:
        urls = [urls] if isinstance(urls, str) else urls
        if not urls or not all(isinstance(u, str) for u in urls):
            raise ValueError("model %r needs 'upstreams': a list of URLs" % spec.get("id"))
        return _UpstreamPool([GradioClient(
            u, endpoint=spec.get("endpoint") or config.endpoint,
            protocol=spec.get("protocol") or config.protocol, timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            first_event_timeout=config.first_event_timeout,
            param_names=spec.get("params")) for u in urls], backoff=config.backoff)

    if not config.models_file:
        if not config.upstream:
            raise ValueError("no upstream: give base_url / --upstream, or set BHARATGEN_BASE_URL")
        return [_ModelRoute(config.model, pool(config.upstream, {}), config.system_prompt)]
    try:
        with open(config.models_file, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError("cannot read the models file %s: %s" % (config.models_file, exc)) from None
    models = spec.get("models") if isinstance(spec, dict) else None
    if not isinstance(models, list) or not models:
        raise ValueError("the models file %s needs {\"models\": [...]}" % config.models_file)
    routes = []
    for m in models:
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            raise ValueError("each model in %s needs an 'id'" % config.models_file)
        routes.append(_ModelRoute(m["id"], pool(m.get("upstreams") or m.get("upstream"), m),
                                  m.get("system_prompt", config.system_prompt),
                                  m.get("display_name")))
    return routes


class _Backend:
    """Serves the OpenAI operations for the configured models, each in front of its
    Gradio app (or replicas of it)."""

    def __init__(self, config: Config, routes: Optional[List[_ModelRoute]] = None) -> None:
        self.config = config
        self.routes = {r.id: r for r in (routes or _load_models(config))}
        self.created = int(time.time())

    @property
    def default_model(self) -> str:
        return next(iter(self.routes))

    def close(self) -> None:
        """Close every upstream client's idle connections."""
        for route in self.routes.values():
            for replica in route.pool.replicas:
                replica.client.close()

    # -- models -------------------------------------------------------------------------

    def models(self) -> ModelList:
        owner = "bharatgen (demo upstream: canned answers)" if self.config.demo else "bharatgen"
        return ModelList(data=[Model(id=r.id, created=self.created, owned_by=owner,
                                     display_name=r.display_name) for r in self.routes.values()])

    def model(self, model_id: str) -> Model:
        for m in self.models().data:
            if m.id == model_id:
                return m
        raise NotFoundError("The model %r does not exist; this server serves %s"
                            % (model_id, ", ".join(repr(r) for r in self.routes)),
                            param="model", code="model_not_found")

    def health(self) -> Tuple[bool, Dict[str, Any]]:
        """``(ok, report)``: ok while every model has a replica up (or only busy)."""
        report = {r.id: r.pool.states() for r in self.routes.values()}
        ok = all(any(s["status"] != "down" for s in states) for states in report.values())
        return ok, report

    def _route(self, body: Dict[str, Any]) -> _ModelRoute:
        model = body.get("model")
        if model is None:
            return self.routes[self.default_model]
        if not isinstance(model, str):
            raise _bad("'model' must be a string", "model", "invalid_type")
        return self.routes[self.model(model).id]

    @staticmethod
    def _generation(route: _ModelRoute, conv: _Conversation, sampling: _Sampling,
                    on_stream: Optional[Callable[["_EventStream"], None]] = None) -> _Generation:
        return _Generation(route.pool, conv, sampling, route.system_prompt, on_stream)

    @staticmethod
    def _body(body: Any) -> Dict[str, Any]:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", None, "invalid_type")
        return body

    # -- chat completions ---------------------------------------------------------------

    def chat(self, body: Any,
             on_stream: Optional[Callable[["_EventStream"], None]] = None) -> Any:
        """``POST /v1/chat/completions``: a :class:`ChatCompletion`, or an iterator of
        :class:`ChatCompletionChunk` when ``stream`` is true.

        ``on_stream`` (a streamed single choice only) is shown the upstream event
        stream; if it is pumped, the iterator yields ``None`` whenever nothing arrived.
        """
        body = self._body(body)
        route = self._route(body)
        model = route.id
        conv = _conversation(body.get("messages"), "messages", self.config.max_messages,
                             self.config.max_chars)
        sampling = _sampling(body, ("max_tokens", "max_completion_tokens"))
        stream = _flag(body, "stream")
        include_usage = _include_usage(body)
        pumpable = stream and sampling.n == 1
        gen = self._generation(route, conv, sampling, on_stream if pumpable else None)
        if stream:
            return self._chat_chunks(gen, model, include_usage)
        reasoning = _Reasoning(self.config.reasoning)
        thoughts: List[List[str]] = [[] for _ in range(sampling.n)]
        contents: List[List[str]] = [[] for _ in range(sampling.n)]
        for piece in gen:
            thought, content = reasoning.apply(piece)
            if thought:
                thoughts[piece.index].append(thought)
            if content:
                contents[piece.index].append(content)
        choices = [Choice(index=i, message=ChatCompletionMessage(
            content="".join(contents[i]), reasoning_content="".join(thoughts[i]) or None))
            for i in range(sampling.n)]
        return ChatCompletion(id=_new_id("chatcmpl-"), choices=choices, created=int(time.time()),
                              model=model, system_fingerprint=_FINGERPRINT, usage=gen.usage())

    def _chat_chunks(self, gen: _Generation, model: str,
                     include_usage: bool) -> Iterator[ChatCompletionChunk]:
        cid, created = _new_id("chatcmpl-"), int(time.time())
        reasoning = _Reasoning(self.config.reasoning)

        def chunk(index: int, delta: ChoiceDelta, finish: Optional[str] = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=cid, created=created, model=model,
                                       system_fingerprint=_FINGERPRINT,
                                       choices=[ChunkChoice(index=index, delta=delta,
                                                            finish_reason=finish)])

        pieces = iter(gen)
        try:
            first = next(pieces, None)           # errors before any output raise here
            for i in range(gen.sampling.n):
                yield chunk(i, ChoiceDelta(role="assistant", content=""))
            for piece in _chain_first(first, pieces):
                if piece is None:                # a pumped stream has nothing yet
                    yield None                   # type: ignore[misc]
                    continue
                yield from self._chat_piece(piece, reasoning, chunk)
            if include_usage:
                yield ChatCompletionChunk(id=cid, created=created, model=model,
                                          system_fingerprint=_FINGERPRINT, choices=[],
                                          usage=gen.usage())
        finally:
            gen.close()
            pieces.close()  # type: ignore[attr-defined]

    @staticmethod
    def _chat_piece(piece: _Piece, reasoning: _Reasoning,
                    chunk: Callable[..., ChatCompletionChunk]) -> Iterator[ChatCompletionChunk]:
        thought, content = reasoning.apply(piece)
        if thought or content:
            yield chunk(piece.index, ChoiceDelta(content=content, reasoning_content=thought))
        if piece.kind == "finish":
            yield chunk(piece.index, ChoiceDelta(), piece.text)

    # -- legacy completions -------------------------------------------------------------

    def completions(self, body: Any) -> Any:
        """``POST /v1/completions``: the legacy API, ``prompt`` a string or a list."""
        body = self._body(body)
        route = self._route(body)
        model = route.id
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _bad("'prompt' must be a string or a non-empty list of strings", "prompt",
                       "invalid_type" if not isinstance(prompts, list) else "invalid_value")
        if len(prompts) > self.config.max_messages or sum(map(len, prompts)) > self.config.max_chars:
            raise _bad("the prompt is longer than this server takes", "prompt",
                       "context_length_exceeded")
        if body.get("suffix"):
            raise _bad("'suffix' (fill-in-the-middle) is not supported", "suffix",
                       "unsupported_parameter")
        if body.get("best_of") not in (None, 1):
            raise _bad("'best_of' is not supported", "best_of", "unsupported_parameter")
        sampling = _sampling(body, ("max_tokens",))
        echo, stream = _flag(body, "echo"), _flag(body, "stream")
        include_usage = _include_usage(body)
        gens = [self._generation(route, _Conversation(None, [], p, estimate_tokens(p)), sampling)
                for p in prompts]
        cid, created = _new_id("cmpl-"), int(time.time())
        if stream:
            return self._completion_chunks(gens, prompts, echo, model, cid, created, include_usage)
        choices: List[CompletionChoice] = []
        reasoning = _Reasoning("inline" if self.config.reasoning == "inline" else "none")
        for p, gen in enumerate(gens):
            texts: List[List[str]] = [[prompts[p]] if echo else [] for _ in range(sampling.n)]
            for piece in gen:
                texts[piece.index].append(reasoning.apply(piece)[1] or "")
            choices += [CompletionChoice(index=p * sampling.n + i, text="".join(t))
                        for i, t in enumerate(texts)]
        return Completion(id=cid, choices=choices, created=created, model=model,
                          system_fingerprint=_FINGERPRINT, usage=self._sum_usage(gens))

    def _completion_chunks(self, gens: List[_Generation], prompts: List[str], echo: bool,
                           model: str, cid: str, created: int,
                           include_usage: bool) -> Iterator[Completion]:
        n = gens[0].sampling.n

        def chunk(index: int, text: str, finish: Optional[str] = None) -> Completion:
            return Completion(id=cid, created=created, model=model, system_fingerprint=_FINGERPRINT,
                              choices=[CompletionChoice(index=index, text=text,
                                                        finish_reason=finish)])

        for p, gen in enumerate(gens):
            reasoning = _Reasoning("inline" if self.config.reasoning == "inline" else "none")
            pieces = iter(gen)
            try:
                first = next(pieces, None)
                if echo:
                    for i in range(n):
                        yield chunk(p * n + i, prompts[p])
                for piece in _chain_first(first, pieces):
                    text = reasoning.apply(piece)[1]
                    if text:
                        yield chunk(p * n + piece.index, text)
                    if piece.kind == "finish":
                        yield chunk(p * n + piece.index, "", piece.text)
            finally:
                gen.close()
                pieces.close()  # type: ignore[attr-defined]
        if include_usage:
            usage = Completion(id=cid, created=created, model=model,
                               system_fingerprint=_FINGERPRINT, usage=self._sum_usage(gens))
            yield usage

    @staticmethod
    def _sum_usage(gens: List[_Generation]) -> CompletionUsage:
        total = CompletionUsage(completion_tokens_details=CompletionTokensDetails())
        for gen in gens:
            u = gen.usage()
            total.prompt_tokens += u.prompt_tokens
            total.completion_tokens += u.completion_tokens
            total.total_tokens += u.total_tokens
            total.completion_tokens_details.reasoning_tokens += (  # type: ignore[union-attr]
                u.completion_tokens_details.reasoning_tokens)  # type: ignore[union-attr]
        return total

    # -- responses ----------------------------------------------------------------------

    def responses(self, body: Any) -> Any:
        """``POST /v1/responses``: a response dict, or an iterator of ``(event, data)``."""
        body = self._body(body)
        route = self._route(body)
        model = route.id
        for name in ("previous_response_id", "conversation"):
            if body.get(name):
                raise _bad("%r is not supported: this server stores no responses" % name,
                           name, "unsupported_parameter")
        text = body.get("text")
        if isinstance(text, dict) and isinstance(text.get("format"), dict):
            body = dict(body, response_format=text["format"])
        messages = self._response_messages(body)
        conv = _conversation(messages, "input", self.config.max_messages, self.config.max_chars)
        sampling = _sampling(body, ("max_output_tokens",))
        if sampling.n != 1:
            raise _bad("'n' is not a parameter of the Responses API", "n", "unsupported_parameter")
        gen = self._generation(route, conv, sampling)
        rid, mid = _new_id("resp_"), _new_id("msg_")
        base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
                "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"),
                "max_output_tokens": sampling.max_tokens, "metadata": body.get("metadata") or {},
                "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": sampling.temperature, "text": {"format": {"type": "text"}},
                "tool_choice": "auto", "tools": [], "top_p": sampling.top_p,
                "truncation": "disabled", "user": body.get("user")}
        if _flag(body, "stream"):
            return self._response_events(gen, base, mid)
        answer = "".join(p.text for p in gen if p.kind == "content")
        return dict(base, status="completed", output=[self._response_message(mid, answer)],
                    usage=self._response_usage(gen))

    @staticmethod
    def _response_messages(body: Dict[str, Any]) -> List[Any]:
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
            if not isinstance(item, dict) or item.get("type", "message") != "message":
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise _bad("input[%d] is a %r item; this server takes message items only"
                           % (i, kind), "input[%d]" % i, "unsupported_input")
            messages.append({"role": item.get("role"), "content": item.get("content")})
        return messages

    @staticmethod
    def _response_message(mid: str, text: str, status: str = "completed") -> Dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": mid, "status": status, "role": "assistant",
                "content": content}

    @staticmethod
    def _response_usage(gen: _Generation) -> Dict[str, Any]:
        u = gen.usage()
        return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {
                    "reasoning_tokens": u.completion_tokens_details.reasoning_tokens},  # type: ignore[union-attr]
                "total_tokens": u.total_tokens}

    def _response_events(self, gen: _Generation, base: Dict[str, Any],
                         mid: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
        seq = iter(range(1 << 62))

        def event(kind: str, **data: Any) -> Tuple[str, Dict[str, Any]]:
            return kind, dict(type=kind, sequence_number=next(seq), **data)

        pieces = iter(gen)
        try:
            first = next(pieces, None)
            pending = dict(base, status="in_progress", output=[], usage=None)
            yield event("response.created", response=pending)
            yield event("response.in_progress", response=pending)
            yield event("response.output_item.added", output_index=0,
                        item=self._response_message(mid, "", "in_progress"))
            part = {"type": "output_text", "text": "", "annotations": []}
            yield event("response.content_part.added", item_id=mid, output_index=0,
                        content_index=0, part=part)
            text = []
            for piece in _chain_first(first, pieces):
                if piece.kind == "content":
                    text.append(piece.text)
                    yield event("response.output_text.delta", item_id=mid, output_index=0,
                                content_index=0, delta=piece.text, logprobs=[])
            answer = "".join(text)
            yield event("response.output_text.done", item_id=mid, output_index=0,
                        content_index=0, text=answer, logprobs=[])
            yield event("response.content_part.done", item_id=mid, output_index=0,
                        content_index=0, part=dict(part, text=answer))
            item = self._response_message(mid, answer)
            yield event("response.output_item.done", output_index=0, item=item)
            yield event("response.completed", response=dict(
                base, status="completed", output=[item], usage=self._response_usage(gen)))
        finally:
            gen.close()
            pieces.close()  # type: ignore[attr-defined]


def _chain_first(first: Optional[_Piece], rest: Iterator[_Piece]) -> Iterator[_Piece]:
    if first is not None:
        yield first
    yield from rest


###############################################################################
# SDK: BharatGenOpenAI and AsyncBharatGenOpenAI ################################
###############################################################################

class Stream:
    """The chunks of a streamed completion; iterate it, or use it in ``with``."""

    def __init__(self, chunks: Iterator[Any]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._chunks)

    def close(self) -> None:
        """Stop reading; the upstream call is cancelled."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Resource:
    def __init__(self, backend: _Backend) -> None:
        self._backend = backend


def _body_from(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Request body from SDK keyword arguments (``extra_body`` merged, openai-style)."""
    extra = kwargs.pop("extra_body", None) or {}
    for name in ("extra_headers", "extra_query", "timeout"):
        kwargs.pop(name, None)
    body = {k: v for k, v in kwargs.items() if v is not None}
    body.update(extra)
    return body


class _ChatCompletions(_Resource):
    def create(self, *, messages: List[Dict[str, Any]], model: Optional[str] = None,
               stream: bool = False, **kwargs: Any) -> Any:
        """Create a chat completion; with ``stream=True`` a :class:`Stream` of chunks."""
        result = self._backend.chat(_body_from(dict(kwargs, messages=messages, model=model,
                                                    stream=stream)))
        return Stream(result) if stream else result


class _Chat:
    def __init__(self, backend: _Backend) -> None:
        self.completions = _ChatCompletions(backend)


class _Completions(_Resource):
    def create(self, *, prompt: Any, model: Optional[str] = None, stream: bool = False,
               **kwargs: Any) -> Any:
        """Create a legacy text completion."""
        result = self._backend.completions(_body_from(dict(kwargs, prompt=prompt, model=model,
                                                           stream=stream)))
        return Stream(result) if stream else result


class _Models(_Resource):
    def list(self) -> ModelList:
        """The served models."""
        return self._backend.models()

    def retrieve(self, model: str) -> Model:
        """One served model; :class:`NotFoundError` for others."""
        return self._backend.model(model)


class BharatGenOpenAI:
    """A client shaped like ``openai.OpenAI`` that talks to the Param Gradio app directly.

    ``base_url`` is the Gradio app (default ``BHARATGEN_BASE_URL``); ``api_key`` is
    accepted for compatibility (a Hugging Face token for private Spaces goes in
    ``HF_TOKEN``).  Errors are this module's, named as the openai SDK names them.
    """

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 model: Optional[str] = None, timeout: Optional[float] = None,
                 endpoint: Optional[str] = None, reasoning: Optional[str] = None,
                 system_prompt: Optional[str] = None, protocol: Optional[str] = None) -> None:
        self.config = Config.load(upstream=base_url, model=model, timeout=timeout,
                                  endpoint=endpoint, reasoning=reasoning,
                                  system_prompt=system_prompt, protocol=protocol)
        self.api_key = api_key
        backend = self._backend = _Backend(self.config)
        self.base_url = backend.routes[backend.default_model].pool.replicas[0].client.base_url
        self.chat = _Chat(backend)
        self.completions = _Completions(backend)
        self.models = _Models(backend)

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
        self.chat = _AsyncWrap(self._sync.chat)
        self.completions = _AsyncWrap(self._sync.completions)
        self.models = _AsyncWrap(self._sync.models)

    async def close(self) -> None:
        """Close the upstream connections kept alive between calls."""
        self._sync.close()

    async def __aenter__(self) -> "AsyncBharatGenOpenAI":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


###############################################################################
# HTTP plumbing shared by the gateway and the demo upstream #####################
###############################################################################

def _http_chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 section 7.1)."""
    return b"%X\r\n%s\r\n" % (len(data), data)


_LAST_CHUNK = b"0\r\n\r\n"                   # the end of a chunked body
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date(when: Optional[float] = None) -> str:
    """``when`` (default now) as an HTTP date (RFC 9110 5.6.7), in English in any locale."""
    t = time.gmtime(when)
    return "%s, %02d %s %d %02d:%02d:%02d GMT" % (_WEEKDAYS[t.tm_wday], t.tm_mday,
                                                  _MONTHS[t.tm_mon - 1], t.tm_year,
                                                  t.tm_hour, t.tm_min, t.tm_sec)


def _reason(status: int) -> str:
    """The reason phrase of a status (none for one that HTTP does not name, e.g. 499)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class _Headers:
    """A request's header fields, looked up by name in any case, like the email
    ``Message`` that http.server makes of them (which costs more to parse than the
    rest of a request)."""

    __slots__ = ("_fields", "_first")

    def __init__(self, fields: List[Tuple[str, str]]) -> None:
        self._fields = fields
        self._first: Dict[str, str] = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    def __getitem__(self, name: str) -> Optional[str]:
        return self._first.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def get_all(self, name: str, failobj: Any = None) -> Any:
        name = name.lower()
        return [v for n, v in self._fields if n.lower() == name] or failobj

    def items(self) -> List[Tuple[str, str]]:
        return list(self._fields)

    def keys(self) -> List[str]:
        return [n for n, _ in self._fields]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._fields)

    def __str__(self) -> str:
        return "".join("%s: %s\n" % field for field in self._fields)


class _BaseHandler(socketserver.StreamRequestHandler):
    """HTTP/1.1 keep-alive handler with JSON and chunked-stream writers.

    It does what http.server's handler does, with the request head parsed into
    :class:`_Headers`: http.server imports http.client and the email package, which
    took a third of this module's import time.
    """

    protocol_version = "HTTP/1.1"
    server_version = "bharatgen_openai/" + __version__
    default_request_version = "HTTP/0.9"
    # TCP_NODELAY: the head and the body (or one SSE event and the next) go out at once,
    # not after the client's delayed ACK (40 ms on a kept-alive connection)
    disable_nagle_algorithm = True
    command: Optional[str] = None
    request_version = default_request_version
    close_connection = True

    def handle(self) -> None:
        """Serve the connection's requests, one after the other, until one closes it."""
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self) -> None:
        """Read one request and call its ``do_<METHOD>``."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414, "Request line too long")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, "Unsupported method (%r)" % self.command)
                return
            method()
            self.wfile.flush()
        except socket.timeout as exc:
            self.log_message("request timed out: %r", exc)
            self.close_connection = True

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """A malformed request's answer (JSON, as Gradio's are); the connection then closes."""
        self.log_message("code %d, message %s", code, message)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = self.protocol_version
        self._send_json(code, {"detail": message or _reason(code)}, {"Connection": "close"})

    def log_message(self, format: str, *args: Any) -> None:
        """Send the handler's messages to the module's logger; override to log elsewhere."""
        _log.info("%s %s", self.client_address[0], format % args)

    def parse_request(self) -> bool:
        """Parse the request line and header fields, as http.server does, into
        :class:`_Headers`; a field line that is not ``name: value`` is a 400."""
        self.command = None                    # send_error needs these set
        self.request_version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            digits = version[5:].split(".") if version.startswith("HTTP/") else []
            if len(digits) != 2 or not all(n.isdigit() and len(n) <= 10 for n in digits):
                self.send_error(400, "Bad request version (%r)" % version)
                return False
            number = (int(digits[0]), int(digits[1]))
            if number >= (2, 0):
                self.send_error(505, "Invalid HTTP version (%s)" % version[5:])
                return False
            self.close_connection = number < (1, 1)
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(400, "Bad request syntax (%r)" % requestline)
            return False
        self.command, self.path = words[0], words[1]
        if len(words) == 2:                    # HTTP/0.9
            self.close_connection = True
            if self.command != "GET":
                self.send_error(400, "Bad HTTP/0.9 request type (%r)" % self.command)
                return False
        if self.path.startswith("//"):         # not taken for a scheme-less absolute URL
            self.path = "/" + self.path.lstrip("/")
        fields: List[Tuple[str, str]] = []
        while True:
            line = self.rfile.readline(65537)
            if len(line) > 65536:
                self.send_error(431, "Line too long", "a header field of over 65536 bytes")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            if len(fields) >= 100:
                self.send_error(431, "Too many headers", "more than 100 header fields")
                return False
            text = line.decode("iso-8859-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and fields:      # obs-fold: the field goes on
                fields[-1] = (fields[-1][0], (fields[-1][1] + " " + text.strip()).strip())
                continue
            name, colon, value = text.partition(":")
            if not colon or not name or name != name.strip():
                self.send_error(400, "Bad header field (%r)" % text[:100])
                return False
            fields.append((name, value.strip()))
        self.headers = _Headers(fields)  # type: ignore[assignment]
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if self.headers.get("Expect", "").lower() == "100-continue" and \
                self.request_version >= "HTTP/1.1":
            self.wfile.write(b"%s 100 Continue\r\n\r\n" % self.protocol_version.encode())
        return True

    def _write_head(self, status: int, headers: Dict[str, str]) -> None:
        """The status line and header fields, in one write (none for HTTP/0.9)."""
        if self.request_version == "HTTP/0.9":
            return
        head = ["%s %d %s\r\nServer: %s\r\nDate: %s\r\n" % (
            self.protocol_version, status, _reason(status), self.server_version, _http_date())]
        said_connection = False
        for name, value in headers.items():
            head.append("%s: %s\r\n" % (name, value))
            if name.lower() == "connection":
                said_connection = True
                self.close_connection = self.close_connection or value.lower() == "close"
        if self.close_connection and not said_connection:
            head.append("Connection: close\r\n")     # asked for, or HTTP/1.0 (RFC 9112 9.6)
        head.append("\r\n")
        self.wfile.write("".join(head).encode("latin-1"))

    def _send_bytes(self, status: int, body: bytes, content_type: str,
                    headers: Optional[Dict[str, str]] = None) -> None:
        head = {"Content-Type": content_type, "Content-Length": str(len(body))}
        head.update(headers or {})
        self._write_head(status, head)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
        body = _COMPACT_JSON.encode(obj).encode("utf-8")
        self._send_bytes(status, body, "application/json", headers)

    def _start_chunked(self, status: int, headers: Dict[str, str]) -> None:
        head = {"Transfer-Encoding": "chunked"}
        head.update(headers)
        self._write_head(status, head)

    def _chunk(self, data: bytes) -> None:
        """Write one HTTP/1.1 chunk (RFC 9112 section 7.1) and flush it to the socket."""
        if data:
            self.wfile.write(_http_chunk(data))
            self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(_LAST_CHUNK)
        self.wfile.flush()

    def _read_body(self, limit: int) -> bytes:
        """The request body (Content-Length or chunked), at most ``limit`` bytes."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, size = [], 0
            while True:
                line = self.rfile.readline(65537)
                try:
                    n = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    self.close_connection = True
                    raise _bad("malformed chunked request body", None, "invalid_body") from None
                if n == 0:
                    self.rfile.readline(65537)
                    return b"".join(parts)
                size += n
                if size > limit:
                    self.close_connection = True
                    raise RequestTooLargeError("the request body is larger than %d bytes" % limit)
                parts.append(self.rfile.read(n))
                self.rfile.readline(3)
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _bad("invalid Content-Length header %r" % raw, None, "invalid_header") from None
        if length > limit:
            self.close_connection = True
            raise RequestTooLargeError("the request body has %d bytes; the limit is %d"
                                       % (length, limit))
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise _bad("the request body ended after %d of %d bytes" % (len(body), length),
                       None, "invalid_body")
        return body


###############################################################################
# Server pieces: keys, rate limits, metrics, deadlines ##########################
###############################################################################

def _sha256(text: str) -> bytes:
    import hashlib      # only where keys are used: loading OpenSSL's hashes slows the import
    return hashlib.sha256(text.encode("utf-8")).digest()


def _key_hash(token: str) -> str:
    """A short, stable name for a key in logs (never the key itself)."""
    return _sha256(token).hex()[:10]


class _KeyStore:
    """The accepted API keys: given ones plus a key file, re-read by :meth:`reload`.

    Keys are kept only as SHA-256 digests and compared in constant time.
    """

    def __init__(self, keys: Sequence[str] = (), path: Optional[str] = None) -> None:
        self._given = [k for k in keys if k]
        self.path = path
        self._digests: List[bytes] = []
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
                    keys += [line.strip() for line in f
                             if line.strip() and not line.lstrip().startswith("#")]
            except OSError as exc:
                if self._digests:
                    _log.error("cannot re-read the key file (keeping %d keys): %s",
                               len(self._digests), exc)
                    return len(self._digests)
                raise ValueError("cannot read the key file: %s" % exc) from None
        self._digests = [_sha256(k) for k in keys]
        return len(self._digests)

    def identify(self, authorization: Optional[str]) -> str:
        """The key's short hash for ``Authorization: Bearer <key>``, or :class:`AuthenticationError`."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Missing API key: send the header "
                                      "'Authorization: Bearer <key>'")
        import hmac
        given, ok = _sha256(token), False
        for digest in self._digests:    # no early exit: time does not depend on which key
            ok |= hmac.compare_digest(given, digest)
        if not ok:
            raise AuthenticationError("Incorrect API key provided")
        return _key_hash(token)


def _duration(seconds: float) -> str:
    """OpenAI's style for reset times: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return "%dms" % max(1, round(seconds * 1000))
    minutes, secs = divmod(int(round(seconds)), 60)
    return "%dm%ds" % (minutes, secs) if minutes else "%ds" % secs


class _RateLimiter:
    """Per-identity limits: requests a minute (a token bucket) and concurrent streams.

    ``0`` disables a limit.  Identities are key hashes (or client addresses when the
    server has no keys).
    """

    def __init__(self, per_minute: int = 0, streams: int = 0) -> None:
        self.per_minute, self.streams = per_minute, streams
        self._buckets: Dict[str, List[float]] = {}
        self._open: Dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, who: str) -> Dict[str, str]:
        """Spend one request; the ``x-ratelimit-*`` headers, or :class:`RateLimitError`."""
        if not self.per_minute:
            return {}
        rate, now = self.per_minute / 60.0, time.monotonic()
        with self._lock:
            if len(self._buckets) > 10000:             # forget identities at rest
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * rate < self.per_minute}
            tokens, last = self._buckets.get(who, [float(self.per_minute), now])
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            allowed = tokens >= 1
            if allowed:
                tokens -= 1
            self._buckets[who] = [tokens, now]
        headers = {"x-ratelimit-limit-requests": str(self.per_minute),
                   "x-ratelimit-remaining-requests": str(int(tokens)),
                   "x-ratelimit-reset-requests": _duration((self.per_minute - tokens) / rate)}
        if not allowed:
            wait = (1 - tokens) / rate
            raise RateLimitError("Rate limit reached: %d requests per minute; retry in %s"
                                 % (self.per_minute, _duration(wait)),
                                 headers=dict(headers, **{"Retry-After": str(max(1, int(wait + 0.999)))}))
        return headers

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
                left = self._open.get(who, 1) - 1
                if left:
                    self._open[who] = left
                else:
                    self._open.pop(who, None)


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Metrics:
    """Counters, gauges and histograms, rendered in Prometheus' text format."""

    HELP = {
        "bharatgen_requests_total": ("counter", "Requests by route and status."),
        "bharatgen_requests_in_flight": ("gauge", "Requests being served."),
        "bharatgen_streams_in_flight": ("gauge", "Streamed responses being sent."),
        "bharatgen_upstream_errors_total": ("counter", "Upstream failures by kind."),
        "bharatgen_upstream_bytes_total": ("counter", "Bytes read from upstream apps."),
        "bharatgen_rate_limited_total": ("counter", "Requests refused by rate limits."),
        "bharatgen_request_duration_seconds": ("histogram",
                                               "Generation requests, start to last byte."),
        "bharatgen_time_to_first_token_seconds": ("histogram",
                                                  "Streams, request start to first event."),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]] = {}
        self._hists: Dict[str, List[float]] = {}

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

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

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
                    tag = ",".join('%s="%s"' % (k, str(val).replace("\\", "\\\\").replace('"', '\\"'))
                                   for k, val in labels)
                    lines.append("%s%s %s" % (name, "{%s}" % tag if tag else "", "%g" % v))
        return "\n".join(lines) + "\n"


class _Deadlines:
    """Cuts off clients that send a request too slowly, with one watcher thread.

    A socket armed with a deadline that passes is shut for reading, so the handler's
    blocked read ends at once; :meth:`disarm` then says it expired.
    """

    def __init__(self) -> None:
        self._due: Dict[Any, float] = {}
        self._expired: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="bharatgen-deadlines")
        self._thread.start()

    def arm(self, sock: Any, seconds: float) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + seconds
            self._expired.discard(sock)

    def disarm(self, sock: Any) -> bool:
        """Forget ``sock``; True if its deadline had passed."""
        with self._lock:
            self._due.pop(sock, None)
            expired = sock in self._expired
            self._expired.discard(sock)
            return expired

    def expired(self, sock: Any) -> bool:
        with self._lock:
            return sock in self._expired

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._lock:
                late = [s for s, due in self._due.items() if due <= now]
                for sock in late:
                    del self._due[sock]
                    self._expired.add(sock)
            for sock in late:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()


###############################################################################
# The gateway: an OpenAI-compatible HTTP server ################################
###############################################################################

def _json_body(raw: bytes) -> Any:
    if not raw.strip():
        raise _bad("the request has no body; send a JSON object", None, "invalid_body")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad("the request body is not valid UTF-8", None, "invalid_body") from None
    except RecursionError:
        raise _bad("the JSON body is nested too deeply", None, "invalid_json") from None
    except ValueError as exc:
        raise _bad("could not parse the JSON body: %s" % exc, None, "invalid_json") from None


def _shutting_down() -> "ServerOverloadedError":
    return ServerOverloadedError("the server is shutting down; the stream was cut off "
                                 "after the grace period")


class _PumpJob:
    """One stream the pump moves: its events, its sockets, what is left to send."""

    def __init__(self, handler: Any, stream: "_EventStream",
                 events: Iterator[Optional[bytes]]) -> None:
        self.handler, self.stream, self.events = handler, stream, events
        self.client: socket.socket = handler.connection
        self.not_yet = _not_yet(self.client)
        self.upstream: Optional[socket.socket] = None
        self.out: List[bytes] = []         # HTTP chunks the client has not taken yet
        self.writing = False               # waiting for the client to take them
        self.error: Optional[BaseException] = None
        self.done = threading.Event()


class _Pump:
    """Moves streamed answers for the whole server on one thread.

    A thread per stream costs two GIL hand-offs and two wake-ups per event; with
    hundreds of streams that is most of the server's CPU.  Once a stream has begun
    (headers and first event sent by its handler thread), its upstream socket joins
    one selector: when it is readable, every event that has arrived runs through the
    same generator chain as before (which yields ``None`` when it has read all there
    is) and the chunks go to the client without blocking (a slow client stops the
    reading of its own upstream until it has caught up).  The handler thread waits,
    then ends the response as before: error event, ``[DONE]``, closing the upstream.
    """

    def __init__(self, closing: threading.Event, interval: float = 0.1) -> None:
        self.closing, self.interval = closing, interval
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._new: List[_PumpJob] = []
        self._jobs: List[_PumpJob] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self.served = 0                    # streams taken over so far
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bharatgen-pump")
        self._thread.start()

    def run(self, handler: Any, stream: "_EventStream", events: Iterator[Optional[bytes]]) -> None:
        """Stream ``events`` to ``handler``'s client; return when they end, raising what
        the stream raised (an upstream error, a client gone, the server closing)."""
        job = _PumpJob(handler, stream, events)
        timeout = job.client.gettimeout()
        with self._lock:
            if self._stopping:
                raise _shutting_down()
            self._new.append(job)
        self._wake()
        job.done.wait()
        job.client.settimeout(timeout)
        if job.out:                        # what the client had not taken yet
            handler.wfile.write(b"".join(job.out))
        if job.error is not None:
            raise job.error

    def close(self) -> None:
        """End the streams still running (as the server closing) and the thread."""
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(5)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:                    # its buffer is full: a wake-up is pending anyway
            pass

    def _loop(self) -> None:
        last_check = time.monotonic()
        while not self._stopping:
            try:
                for key, _ in self._selector.select(self.interval):
                    job = key.data
                    if job is None:
                        self._take_new()
                    elif key.fileobj is job.client:
                        self._flush(job)
                    else:
                        self._step(job)
                now = time.monotonic()
                if now - last_check >= self.interval:
                    last_check = now
                    self._check(now)
            except Exception as exc:       # a bug here must not hang every stream
                _log.exception("the stream pump failed; ending its streams")
                for job in list(self._jobs):
                    self._end(job, exc)
        with self._lock:
            new, self._new = self._new, []
        for job in list(self._jobs) + new:
            self._end(job, _shutting_down())

    def _take_new(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            new, self._new = self._new, []
        for job in new:
            try:
                job.upstream = job.stream.pump()
                job.client.setblocking(False)
            except Exception as exc:       # handed to the handler thread, raised there
                job.error = exc
                job.done.set()
                continue
            self._jobs.append(job)
            self.served += 1
            self._selector.register(job.upstream, selectors.EVENT_READ, job)
            self._step(job)                # it may have events buffered already

    def _step(self, job: _PumpJob) -> None:
        """Run the stream's events that have arrived, then send what they made."""
        handler = job.handler
        try:
            while True:
                data = next(job.events)
                if data is None:
                    break
                if self.closing.is_set():
                    raise _shutting_down()
                handler._bytes_out += len(data)
                job.out.append(_http_chunk(data))
        except StopIteration:
            self._flush(job)
            self._end(job, None)
            return
        except BaseException as exc:       # handed to the handler thread, raised there
            self._end(job, exc)
            return
        self._flush(job)

    def _flush(self, job: _PumpJob) -> None:
        if job.done.is_set() or not job.out:
            return
        data = b"".join(job.out)
        try:
            sent = job.client.send(data)
        except job.not_yet:
            sent = 0
        except OSError as exc:             # the client went away
            self._end(job, exc)
            return
        job.out = [data[sent:]] if sent < len(data) else []
        if job.out and not job.writing:    # wait for the client before reading on
            job.writing = True
            self._selector.unregister(job.upstream)
            self._selector.register(job.client, selectors.EVENT_WRITE, job)
        elif not job.out and job.writing:
            job.writing = False
            self._selector.unregister(job.client)
            self._selector.register(job.upstream, selectors.EVENT_READ, job)

    def _check(self, now: float) -> None:
        """Idle upstreams time out; a closing server cuts its streams off."""
        for job in list(self._jobs):
            if self.closing.is_set():
                self._end(job, _shutting_down())
            elif not job.writing and now - job.stream.last_data > job.stream.client.timeout:
                self._end(job, APITimeoutError("the Gradio app sent nothing for %ss"
                                               % job.stream.client.timeout))

    def _end(self, job: _PumpJob, error: Optional[BaseException]) -> None:
        if job.done.is_set():
            return
        try:
            self._selector.unregister(job.client if job.writing else job.upstream)
        except (KeyError, ValueError):
            pass
        if job in self._jobs:
            self._jobs.remove(job)
        job.error = error
        job.done.set()


class _ChunkEncoder:
    """The SSE bytes of one stream's chat chunks, with a fast path for the common one.

    Most chunks carry only a piece of content (or of reasoning) for one choice; their
    bytes around the text are rendered once, by the general path, and reused, so each
    such chunk costs one JSON string encoding instead of building and encoding a dict.
    """

    _MARK = "\x00bharatgen-text\x00"

    def __init__(self, finish: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
        self.finish = finish              # last touches to the dict (renaming a field)
        self._around: Dict[Tuple[Any, ...], Tuple[bytes, bytes]] = {}

    def _general(self, chunk: "ChatCompletionChunk") -> bytes:
        return _sse(self.finish(chunk.to_dict()))

    def __call__(self, chunk: Optional["ChatCompletionChunk"]) -> Optional[bytes]:
        if chunk is None:                 # a pumped stream has nothing yet
            return None
        if chunk.usage is not None or len(chunk.choices) != 1:
            return self._general(chunk)
        choice = chunk.choices[0]
        delta = choice.delta
        if choice.finish_reason is not None or choice.logprobs is not None or delta.role:
            return self._general(chunk)
        if delta.reasoning_content is None and delta.content:
            name, text = "content", delta.content
        elif delta.content is None and delta.reasoning_content:
            name, text = "reasoning_content", delta.reasoning_content
        else:
            return self._general(chunk)
        key = (chunk.id, chunk.created, chunk.model, chunk.system_fingerprint, choice.index, name)
        around = self._around.get(key)
        if around is None:
            probe = dataclasses.replace(chunk, choices=[dataclasses.replace(
                choice, delta=ChoiceDelta(**{name: self._MARK}))])
            mark = _COMPACT_JSON.encode(self._MARK).encode("utf-8")
            before, _, after = self._general(probe).partition(mark)
            around = self._around[key] = (before, after)
        return b"%s%s%s" % (around[0], _COMPACT_JSON.encode(text).encode("utf-8"), around[1])


class _GatewayHandler(_BaseHandler):
    """Serves the OpenAI routes; one instance per connection."""

    server: "GatewayServer"
    _routes = {
        "/health": {"GET": "health"},
        "/metrics": {"GET": "metrics"},
        "/v1/models": {"GET": "list_models"},
        "/v1/chat/completions": {"POST": "chat"},
        "/v1/completions": {"POST": "completions"},
        "/v1/responses": {"POST": "responses"},
        "/v1/embeddings": {"POST": "embeddings"},
    }
    _public = ("/health",)
    _unlimited = ("/health", "/metrics")
    request_id = ""

    # -- the connection -----------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self._who = "ip:" + str(self.client_address[0])
        self._extra: Dict[str, str] = {}

    def handle_one_request(self) -> None:
        """One request; the request line and headers must arrive within ``header_timeout``."""
        deadlines = self.server.deadlines
        deadlines.arm(self.connection, self.server.config.header_timeout)
        try:
            super().handle_one_request()
        finally:
            if deadlines.disarm(self.connection):
                self.close_connection = True

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """Errors found before routing (bad request line, headers...) as OpenAI errors."""
        if self.server.deadlines.expired(self.connection):
            code, message = 408, "the request did not arrive within the time allowed"
        code = {501: 405, 505: 400}.get(code, code)          # clients' faults stay 4xx
        if self.request_version == "HTTP/0.9":
            self.request_version = self.protocol_version
        self.close_connection = True
        self.request_id = self.request_id or _new_id("req_")
        err = BharatGenError(message or "bad request", status=code,
                             code={405: "method_not_allowed", 408: "request_timeout"}.get(
                                 code, "bad_request"))
        err.type = "invalid_request_error"
        try:
            self._send_json(code, err.to_dict(), {"x-request-id": self.request_id,
                                                  "Connection": "close"})
        except OSError:
            pass

    def parse_request(self) -> bool:
        """As the base's, but blank lines before the request line are skipped (RFC 9112 2.2)."""
        for _ in range(8):
            if self.raw_requestline not in (b"\r\n", b"\n"):
                break
            self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return False
        return super().parse_request()

    def _read_body(self, limit: int) -> bytes:
        deadlines = self.server.deadlines
        deadlines.arm(self.connection, self.server.config.body_timeout)
        try:
            body = super()._read_body(limit)
        except BadRequestError:
            if deadlines.disarm(self.connection):
                self.close_connection = True
                raise RequestTimeoutError("the request body did not arrive within %ss"
                                          % self.server.config.body_timeout) from None
            raise
        if deadlines.disarm(self.connection):
            self.close_connection = True
            raise RequestTimeoutError("the request body did not arrive within %ss"
                                      % self.server.config.body_timeout)
        self._body_read = True
        return body

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def do_OPTIONS(self) -> None:
        """CORS preflight: answered without a key, as browsers send none."""
        self.request_id = _new_id("req_")
        self.server.deadlines.disarm(self.connection)
        headers = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                   "Access-Control-Allow-Headers":
                       self.headers.get("Access-Control-Request-Headers") or
                       "authorization, content-type",
                   "Access-Control-Max-Age": "600"}
        self._send_bytes(204, b"", "text/plain", self._headers(
            headers if self._cors_origin() else None))

    def _cors_origin(self) -> Optional[str]:
        origin, allowed = self.headers.get("Origin"), self.server.config.cors_origins
        if not origin or not allowed:
            return None
        return "*" if "*" in allowed else origin if origin in allowed else None

    def _headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Headers every response carries: request id, rate limits, CORS."""
        headers = {"x-request-id": self.request_id}
        headers.update(self._extra)
        origin = self._cors_origin()
        if origin:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = "x-request-id, x-ratelimit-limit-requests, " \
                                                       "x-ratelimit-remaining-requests, retry-after"
            if origin != "*":
                headers["Vary"] = "Origin"
        headers.update(extra or {})
        return headers

    def _route(self) -> Tuple[str, Dict[str, str], Optional[str]]:
        """``(path, methods, model_id)`` for the request; :class:`NotFoundError` if none."""
        path = re.sub(r"/{2,}", "/", urllib.parse.urlsplit(self.path).path).rstrip("/") or "/"
        if not path.startswith("/v1/") and "/v1" + path in self._routes:
            path = "/v1" + path
        if path in self._routes:
            return path, self._routes[path], None
        m = re.fullmatch(r"/v1/models/(.+)", path)
        if m:
            return path, {"GET": "get_model"}, urllib.parse.unquote(m.group(1))
        raise NotFoundError("Unknown request URL: %s %s. Please check the URL for typos; "
                            "this server serves /v1/chat/completions, /v1/completions, "
                            "/v1/responses and /v1/models" % (self.command, path[:200]),
                            code="unknown_url")

    # -- one request --------------------------------------------------------------------

    def _dispatch(self) -> None:
        srv = self.server
        srv.deadlines.disarm(self.connection)          # the headers are in
        self.request_id = _new_id("req_")
        self._extra, self._model, self._ttft = {}, None, None
        self._bytes_out, self._key, self._body_read = 0, "-", False
        started = time.monotonic()
        status, route, slot = 500, "unknown", False
        srv.track(+1)
        try:
            path, methods, model_id = self._route()
            route = path if not model_id else "/v1/models/{id}"
            method = "GET" if self.command == "HEAD" else self.command
            if method not in methods:
                self.close_connection = self.command not in ("GET", "HEAD", "OPTIONS")
                raise MethodNotAllowedError("%s is not allowed on %s; use %s"
                                            % (self.command, path, ", ".join(methods)),
                                            headers={"Allow": ", ".join(methods)})
            if path not in self._public and srv.keys.enabled:
                self._key = srv.keys.identify(self.headers.get("Authorization"))
                self._who = "key:" + self._key
            if path not in self._unlimited:
                self._extra = srv.limiter.take(self._who)
                slot = srv.slots.acquire(blocking=False)
                if not slot:
                    raise ServerOverloadedError("the server is serving its limit of %d requests; "
                                                "retry shortly" % srv.config.max_concurrent)
            name = methods[method]
            if name == "get_model":
                status = self._respond(srv.backend.model(model_id or ""))
            else:
                status = getattr(self, "_op_" + name)()
        except BharatGenError as exc:
            status = self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection, status = True, 499
        except Exception:                               # the catch-all, at the boundary
            if not srv.catch_all:
                raise
            _log.exception("internal error while serving %s %s", self.command, self.path)
            status = self._send_error(InternalServerError(
                "internal error in the gateway; request id %s" % self.request_id))
        finally:
            if slot:
                srv.slots.release()
            srv.track(-1)
            self._finish(route, status, time.monotonic() - started)

    def _finish(self, route: str, status: int, took: float) -> None:
        """Metrics and the access-log line of one request."""
        m = self.server.metrics
        m.inc("bharatgen_requests_total", route=route, status=str(status))
        if route in ("/v1/chat/completions", "/v1/completions", "/v1/responses") and status == 200:
            m.observe("bharatgen_request_duration_seconds", took)
        fields = {"method": self.command, "path": self.path[:200], "status": status,
                  "model": self._model or "-", "duration": round(took, 4),
                  "ttft": None if self._ttft is None else round(self._ttft, 4),
                  "bytes": self._bytes_out, "request_id": self.request_id, "key": self._key,
                  "client": self.client_address[0]}
        if self.server.config.log_format == "json":
            _access_log.info(json.dumps(fields, ensure_ascii=False))
        else:
            _access_log.info('%s "%s %s" %d model=%s %.3fs ttft=%s bytes=%d %s key=%s',
                             fields["client"], self.command, fields["path"], status,
                             fields["model"], took,
                             "-" if self._ttft is None else "%.3fs" % self._ttft,
                             self._bytes_out, self.request_id, self._key)

    def _send_error(self, exc: BharatGenError) -> int:
        headers = dict(exc.headers)
        if isinstance(exc, RateLimitError):
            self.server.metrics.inc("bharatgen_rate_limited_total")
        if isinstance(exc, UpstreamError):
            self.server.metrics.inc("bharatgen_upstream_errors_total", kind=str(exc.code))
            if type(exc) is UpstreamError:
                headers.setdefault("x-should-retry", "false")
        unread = not self._body_read and (self.headers.get("Content-Length", "0") != "0" or
                                          "Transfer-Encoding" in self.headers)
        if exc.status in (408, 413) or unread:     # the body's bytes must not become a request
            self.close_connection = True
            headers["Connection"] = "close"
        self._send_json(exc.status, exc.to_dict(), self._headers(headers))
        return exc.status

    def _send_bytes(self, status: int, body: bytes, content_type: str,
                    headers: Optional[Dict[str, str]] = None) -> None:
        self._bytes_out = getattr(self, "_bytes_out", 0) + len(body)
        super()._send_bytes(status, body, content_type, headers)

    def _respond(self, obj: Any) -> int:
        self._send_json(200, obj.to_dict() if isinstance(obj, _Object) else obj, self._headers())
        return 200

    def _request_json(self) -> Any:
        body = _json_body(self._read_body(self.server.config.max_body_bytes))
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            self._model = body["model"][:100]
        return body

    # -- operations ---------------------------------------------------------------------

    def _op_health(self) -> int:
        ok, report = self.server.backend.health()
        self._send_json(200 if ok else 503, {
            "status": "ok" if ok else "unavailable", "models": report,
            "demo": self.server.config.demo, "version": __version__}, self._headers())
        return 200 if ok else 503

    def _op_metrics(self) -> int:
        body = self.server.metrics.render().encode("utf-8")
        self._send_bytes(200, body, "text/plain; version=0.0.4; charset=utf-8", self._headers())
        return 200

    def _op_list_models(self) -> int:
        return self._respond(self.server.backend.models())

    def _op_embeddings(self) -> int:
        body = self._request_json()
        model = body.get("model") if isinstance(body, dict) else None
        raise NotFoundError("%s is a chat model and serves no embeddings"
                            % (model if isinstance(model, str) else self.server.backend.default_model),
                            param="model", code="model_not_found")

    def _op_chat(self) -> int:
        upstreams: List[_EventStream] = []
        result = self.server.backend.chat(self._request_json(), upstreams.append)
        if isinstance(result, ChatCompletion):
            return self._respond(self._rename_reasoning(result.to_dict()))
        encode = _ChunkEncoder(self._rename_reasoning)
        return self._stream((encode(c) for c in result), result, done=True,
                            upstreams=upstreams)

    def _op_completions(self) -> int:
        result = self.server.backend.completions(self._request_json())
        if isinstance(result, Completion):
            return self._respond(result)
        return self._stream((_sse(c.to_dict()) for c in result), result, done=True)

    def _op_responses(self) -> int:
        result = self.server.backend.responses(self._request_json())
        if isinstance(result, dict):
            return self._respond(result)
        return self._stream((_sse(data, event) for event, data in result), result,
                            done=False, error_event="error")

    def _rename_reasoning(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        """Rename ``reasoning_content`` to the configured field name (e.g. ``reasoning``)."""
        name = self.server.config.reasoning_field
        if name != "reasoning_content":
            for choice in obj.get("choices", ()):
                for part in (choice.get("message"), choice.get("delta")):
                    if part and "reasoning_content" in part:
                        part[name] = part.pop("reasoning_content")
        return obj

    def _stream(self, events: Iterator[bytes], source: Any, done: bool,
                error_event: Optional[str] = None,
                upstreams: Optional[List["_EventStream"]] = None) -> int:
        """Send ``events`` as SSE over a chunked response.

        The first event is produced before the headers, so a failure before any output
        still gets its own status code; a failure after it (or the server shutting down
        past its grace period) is sent as an error event the openai SDK raises on, and
        the stream ends.
        """
        srv, close = self.server, getattr(source, "close", lambda: None)
        try:
            srv.limiter.open_stream(self._who)
        except BharatGenError:
            close()
            raise
        srv.metrics.inc("bharatgen_streams_in_flight")
        started = time.monotonic()
        try:
            try:
                first = next(events, None)
            except BaseException:
                close()
                raise
            self._ttft = time.monotonic() - started
            srv.metrics.observe("bharatgen_time_to_first_token_seconds", self._ttft)
            self._start_chunked(200, self._headers({
                "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}))
            return self._send_events(first, events, close, done, error_event, upstreams)
        finally:
            srv.metrics.inc("bharatgen_streams_in_flight", -1)
            srv.limiter.close_stream(self._who)

    def _send_events(self, first: Optional[bytes], events: Iterator[bytes],
                     close: Callable[[], None], done: bool, error_event: Optional[str],
                     upstreams: Optional[List["_EventStream"]] = None) -> int:
        try:
            if first is not None:
                self._chunk(first)
            pump = self.server.pump
            # the last upstream stream opened is the one giving output (a replica that
            # failed before output left an earlier one behind)
            if pump is not None and upstreams and upstreams[-1].pumpable:
                pump.run(self, upstreams[-1], events)     # the same outcomes as the loop
            else:
                for event in events:
                    if self.server.closing.is_set():
                        raise _shutting_down()
                    self._chunk(event)
        except BharatGenError as exc:
            _log.warning("stream %s failed after output began: %s", self.request_id, exc.message)
            if isinstance(exc, UpstreamError):
                self.server.metrics.inc("bharatgen_upstream_errors_total", kind=str(exc.code))
            body = exc.to_dict()
            if error_event:           # the Responses API's shape: its fields, and "error"
                body = dict(body["error"], error=body["error"], type="error")
            try:
                self._chunk(_sse(body, error_event))
            except OSError:
                self.close_connection = True
                return exc.status
        except OSError:             # the client went away (the upstream's failures are
            self.close_connection = True            # BharatGenErrors by now)
            return 499
        finally:
            close()
        try:
            if done:
                self._chunk(b"data: [DONE]\n\n")
            self._end_chunked()
        except OSError:
            self.close_connection = True
        return 200

    def _chunk(self, data: bytes) -> None:
        self._bytes_out += len(data)
        super()._chunk(data)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """http.server's ``ThreadingHTTPServer`` (a thread per connection, daemon threads,
    address reuse), defined here so that http.server is not imported; it can also serve
    in the background and stop cleanly."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024          # the listen backlog; socketserver's 5 drops bursts
    _thread: Optional[threading.Thread] = None

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

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up is routine; anything else is logged."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            _log.debug("connection from %s ended: %s", client_address, exc)
        else:
            _log.exception("error while serving %s", client_address)


class GatewayServer(_Server):
    """The OpenAI-compatible server: one thread per connection, state on the instance.

    ``GatewayServer(config).start()`` serves in a background thread (tests, embedding);
    ``serve_forever()`` serves in the caller's; :meth:`drain` stops it gracefully.
    """

    catch_all = True          # tests may set False to see the real exception

    def __init__(self, config: Config, backend: Optional[_Backend] = None) -> None:
        self.config = config
        self.keys = _KeyStore(config.api_keys, config.api_key_file)
        self.metrics = _Metrics()
        self.backend = backend or _Backend(config)
        for route in self.backend.routes.values():
            for replica in route.pool.replicas:
                replica.client.metrics = self.metrics
        self.limiter = _RateLimiter(config.rate_limit_rpm, config.rate_limit_streams)
        self.slots = threading.BoundedSemaphore(config.max_concurrent)
        self.deadlines = _Deadlines()
        self.closing = threading.Event()
        self.pump = _Pump(self.closing) if config.pump else None
        self.in_flight = 0
        self._count_lock = threading.Lock()
        super().__init__((config.host, config.port), _GatewayHandler)

    def track(self, delta: int) -> None:
        """Count requests being served (for :meth:`drain` and the metrics)."""
        with self._count_lock:
            self.in_flight += delta
        self.metrics.inc("bharatgen_requests_in_flight", delta)

    def drain(self, grace: float) -> bool:
        """Stop accepting, let requests in flight finish for up to ``grace`` seconds, then
        cut off the streams still running (each gets an error event).  True if none was cut."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.socket.close()
        deadline = time.monotonic() + grace
        while self.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        clean = self.in_flight == 0
        self.closing.set()
        deadline = time.monotonic() + 5
        while self.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return clean

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.close()
        if self.pump is not None:
            self.pump.close()
        self.backend.close()


###############################################################################
# The demo upstream: a stand-in Param app speaking Gradio's protocol ###########
###############################################################################

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
_DEMO_VERSIONS = {4: "4.44.1", 5: "5.50.0", 6: "6.31.0"}
_DEMO_SLIDERS = {"temperature": (0, 2), "max_tokens": (1, 8192), "top_p": (0, 1),
                 "top_k": (1, 100)}      # the Param app's slider ranges


def _demo_reply(message: str, history: Any, system: Any, params: Sequence[Any]) -> Tuple[str, str]:
    """The demo's (thought, answer) for a message: chosen by keywords in the prompt."""
    thought = "The user said: %s. Let me think step by step." % message[:200]
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


def _demo_html(thought: str, answer: str) -> Iterator[str]:
    """The Param app's assistant HTML, snapshot by snapshot, as it streams."""
    started = time.monotonic()
    for part in _demo_tokens(thought):
        yield _THOUGHT_HEAD % " open" + html.escape(part) + "\n\n</details>"
    closed = _THOUGHT_HEAD % "" + html.escape(thought) + "\n\n</details>\n\n"
    for part in _demo_tokens(answer):
        yield closed + part
    took = time.monotonic() - started
    yield (closed + answer + _DEBUG_HEAD + html.escape("<think>%s</think>%s" % (thought, answer))
           + _LATENCY % (took, took))


_DEMO_BATCH = 0.002     # chunks due this close together go out in one wake-up of the pacer
_DEMO_RETRY = 0.005     # a client whose socket is full is tried again after this
_DEMO_WRITE = 65536     # at most this much is gathered for one write


@dataclass
class _DemoJob:
    """One submitted job of the demo upstream."""
    data: List[Any]
    event_id: str
    queue: bool
    cancelled: threading.Event = field(default_factory=threading.Event)
    next_at: float = 0.0       # when its next token is due (a steady rate, like a model's)


class _PacedStream:
    """A job's event stream as the pacer writes it: what is due, and what waits."""

    __slots__ = ("sock", "not_yet", "chunks", "job", "out", "held", "held_due", "end", "due",
                 "ended", "ok")

    def __init__(self, sock: socket.socket, chunks: Iterator[Optional[bytes]],
                 job: _DemoJob) -> None:
        self.sock, self.chunks, self.job = sock, _framed(chunks), job
        self.not_yet = _not_yet(sock)
        self.out = b""                     # due, not yet sent (the client's socket was full)
        self.held: Optional[bytes] = None  # the next HTTP chunk, until its token is due
        self.held_due = 0.0
        self.end: Optional[bool] = None    # once gathered: True the body's end, False a drop
        self.due = 0.0                     # of its newest entry in the pacer's heap
        self.ended = threading.Event()
        self.ok = False


def _framed(chunks: Iterator[Optional[bytes]]) -> Iterator[bytes]:
    """A demo stream's events as HTTP chunks, then the end of the body; ``b""`` for
    the drop fault (a ``None`` event)."""
    for chunk in chunks:
        if chunk is None:
            yield b""
            return
        yield _http_chunk(chunk)
    yield _LAST_CHUNK


class _DemoPacer:
    """One thread that writes every stream of a demo upstream, each chunk when due; it
    runs while there are streams.

    A thread per stream, each waking for every token, cost the demo more CPU (much of it
    in the kernel) than the gateway in front of it; on the bench's shared cores that
    slowed both paths. One thread takes every chunk that is due in each wake-up. Its
    sockets do not block: a client that stops reading holds up only its own stream.
    """

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, _PacedStream]] = []    # (due, order, stream)
        self._order = 0
        self._streams: Dict[int, _PacedStream] = {}               # by id(job)
        self._thread: Optional[threading.Thread] = None

    def stream(self, sock: socket.socket, chunks: Iterator[Optional[bytes]],
               job: _DemoJob) -> bool:
        """Write ``chunks`` to the client on ``sock`` as a chunked body, each when it falls
        due (a ``None`` chunk drops the connection); True if the whole body went out."""
        paced, timeout = _PacedStream(sock, chunks, job), sock.gettimeout()
        sock.settimeout(0)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="DemoPacer")
                self._thread.start()
            self._streams[id(job)] = paced
            self._schedule(paced, 0.0)
        paced.ended.wait()
        sock.settimeout(timeout)
        return paced.ok

    def wake(self, job: _DemoJob) -> None:
        """Make the job's next chunk due now (it was cancelled)."""
        with self._cond:
            paced = self._streams.get(id(job))
            if paced is not None:
                self._schedule(paced, 0.0)

    def stop(self) -> None:
        """Wake the thread to end every stream (called once the stopping flag is set)."""
        with self._cond:
            self._cond.notify()

    def _schedule(self, paced: _PacedStream, due: float) -> None:
        """Called with the lock held; an earlier entry for the stream goes stale."""
        paced.due, self._order = due, self._order + 1
        heapq.heappush(self._heap, (due, self._order, paced))
        self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping.is_set() or not self._streams:   # ends when idle
                        for paced in list(self._streams.values()):
                            self._finish(paced, False)
                        self._heap.clear()
                        self._thread = None
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now + _DEMO_BATCH:
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                ready = []
                while self._heap and self._heap[0][0] <= now + _DEMO_BATCH:
                    due, _, paced = heapq.heappop(self._heap)
                    if due == paced.due and not paced.ended.is_set():
                        ready.append(paced)
            for paced in ready:
                self._step(paced)

    def _step(self, paced: _PacedStream) -> None:
        """Send what fell due in one write, then wait for the next chunk's time."""
        try:
            if not paced.out:
                self._gather(paced)
            if paced.out:
                paced.out = paced.out[paced.sock.send(paced.out):]
        except paced.not_yet:
            pass
        except OSError:                                 # the client went away
            return self._finish(paced, False)
        except Exception:
            _log.exception("demo upstream: a stream failed")
            return self._finish(paced, False)
        if paced.out:                                   # the client's socket is full
            due = time.monotonic() + _DEMO_RETRY
        elif paced.end is not None:
            return self._finish(paced, paced.end)
        elif paced.held is None:                        # a full write: more is due now
            due = time.monotonic()
        else:
            due = 0.0 if paced.job.cancelled.is_set() else paced.held_due
        with self._cond:
            self._schedule(paced, due)

    @staticmethod
    def _gather(paced: _PacedStream) -> None:
        """Move the held chunk, and every next one already due, into ``out`` (up to a
        full write): the last events leave with the end of the body, so a reader finds
        the body complete."""
        job, parts, size = paced.job, [], 0
        while paced.end is None and size < _DEMO_WRITE:
            chunk, paced.held = paced.held, None
            if chunk is None:
                chunk = next(paced.chunks, None)
                if chunk is None:
                    paced.end = True
                    break
                due = 0.0 if job.cancelled.is_set() else job.next_at
                if due > time.monotonic() + _DEMO_BATCH:
                    paced.held, paced.held_due = chunk, due
                    break
            if not chunk:
                paced.end = False                       # the drop fault
                break
            parts.append(chunk)
            size += len(chunk)
        paced.out = b"".join(parts)

    def _finish(self, paced: _PacedStream, ok: bool) -> None:
        with self._cond:
            self._streams.pop(id(paced.job), None)
        paced.ok = ok
        paced.ended.set()


class _DemoHandler(_BaseHandler):
    """The routes of a Gradio app: ``/config``, ``info``, ``/call``, the queue, ``cancel``."""

    server: "DemoUpstream"

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("demo upstream: " + format, *args)

    def do_GET(self) -> None:
        srv, parts = self.server, urllib.parse.urlsplit(self.path)
        path = parts.path
        if path.rstrip("/") == "/config":
            return self._send_json(200, srv.config_json())
        if path == srv.prefix + "/info":
            return self._send_json(200, srv.info_json())
        m = re.fullmatch(re.escape(srv.prefix) + r"/call/(\w+)/(\w+)", path)
        if m and m.group(1) == srv.endpoint:
            with srv.lock:
                job = srv.jobs.pop(m.group(2), None)
            return self._stream(job, queue=False)
        if path == srv.prefix + "/queue/data" and srv.queue:
            session = urllib.parse.parse_qs(parts.query).get("session_hash", [""])[0]
            with srv.lock:
                job = srv.jobs.pop("session:" + session, None)
            return self._stream(job, queue=True)
        self._send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        srv, path = self.server, urllib.parse.urlsplit(self.path).path
        try:
            body = json.loads(self._read_body(1 << 24) or b"null")
        except (ValueError, BharatGenError):
            return self._send_json(422, {"detail": [{"type": "json_invalid"}]})
        if path == srv.prefix + "/cancel":
            with srv.lock:
                for job in srv.running.values():
                    if job.event_id == (body or {}).get("event_id"):
                        job.cancelled.set()
                        srv.pacer.wake(job)
                srv.cancels.append(body)
            return self._send_json(200, {"success": True})
        call = re.fullmatch(re.escape(srv.prefix) + r"/call/(\w+)/?", path)
        join = path == srv.prefix + "/queue/join" and srv.queue
        if not (join or (call and call.group(1) == srv.endpoint)):
            return self._send_bytes(500, b"Internal Server Error", "text/plain; charset=utf-8")
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            return self._send_json(422, {"detail": [{"type": "missing", "loc": ["body", "data"]}]})
        data = body["data"]
        message = data[0] if data and isinstance(data[0], str) else ""
        if "[[busy]]" in message:
            return self._send_json(503, {"detail": "Queue is full. Max size is 0 and size is 0."})
        job = _DemoJob(data, os.urandom(16).hex(), queue=bool(join))
        with srv.lock:
            srv.auth_seen.append(self.headers.get("Authorization"))
            srv.jobs["session:" + str(body.get("session_hash")) if join else job.event_id] = job
            srv.calls.append(data)
        self._send_json(200, {"event_id": job.event_id})

    def _stream(self, job: Optional[_DemoJob], queue: bool) -> None:
        srv = self.server
        with srv.lock:
            srv.active_streams += 1
            if job is not None:
                srv.running[id(job)] = job
        try:
            self._start_chunked(200, {"Content-Type": "text/event-stream; charset=utf-8",
                                      "Cache-Control": "no-cache"})
            if job is None:
                self._chunk(b'event: error\ndata: "404: Not Found"\n\n')
                self._end_chunked()
            else:
                render = srv.queue_events if queue else srv.call_events
                if not srv.pacer.stream(self.connection, render(job), job):  # dropped, gone
                    self.close_connection = True
        except OSError:
            self.close_connection = True
        finally:
            with srv.lock:
                srv.active_streams -= 1
                if job is not None:
                    srv.running.pop(id(job), None)


class DemoUpstream(_Server):
    """A stand-in for the Param Gradio app: Gradio's routes, events and the app's HTML.

    It answers from the prompt: "hello", "format", "hindi", "tamil", "history" (echoes the
    system prompt and history), "params" (echoes the sampling values), "N words"; and it
    fails on demand: ``[[error]]``, ``[[error-null]]``, ``[[fail-midstream]]``,
    ``[[drop]]``, ``[[hang]]`` (no output), ``[[stall]]`` (silent after some output),
    ``[[malformed]]``, ``[[busy]]``.  ``version`` (4, 5 or 6)
    sets the API prefix, history format and error shapes of that Gradio; ``chat_interface``
    makes it a ``gr.ChatInterface`` (a string reply, history kept in a State); ``queue``
    offers the queue protocol.  ``replay`` maps a prompt to a captured event stream, sent
    verbatim (a ``/call`` capture on ``/call``, a queue capture on the queue).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token_delay: float = 0.0,
                 version: int = 6, chat_interface: bool = False, queue: bool = True,
                 replay: Optional[Dict[str, bytes]] = None) -> None:
        if version not in _DEMO_VERSIONS:
            raise ValueError("version must be 4, 5 or 6, not %r" % version)
        self.token_delay = token_delay
        self.version, self.chat_interface, self.queue = version, chat_interface, queue
        self.prefix = "" if version == 4 else "/gradio_api"
        self.endpoint = ("respond" if version == 6 else "chat") if chat_interface else "chat_fn_1"
        self.replay = dict(replay or {})
        self.jobs: Dict[str, _DemoJob] = {}
        self.running: Dict[int, _DemoJob] = {}
        self.calls: List[Any] = []
        self.cancels: List[Any] = []
        self.auth_seen: List[Optional[str]] = []
        self.active_streams = 0
        self.connections = 0
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self.pacer = _DemoPacer(self._stopping)
        super().__init__((host, port), _DemoHandler)

    def stop(self) -> None:
        """Stop serving, end hanging streams, release the socket."""
        self._stopping.set()
        self.pacer.stop()
        super().stop()

    # -- what the app says of itself ---------------------------------------------------

    def _inputs(self) -> List[Tuple[int, str, str, Any]]:
        """(component id, type, parameter name, default) of the endpoint's inputs."""
        if self.chat_interface:
            return [(2, "textbox", "message", None), (3, "state", "", None),
                    (4, "textbox", "system_prompt", "You are a friendly bot."),
                    (5, "slider", "temperature", 0.7)]
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
        other = dict(dep, id=0, api_name="chat_fn")
        return {"version": _DEMO_VERSIONS[self.version],
                "api_prefix": self.prefix or None,
                "protocol": "sse_v3" if self.queue else "sse_v1", "enable_queue": True,
                "title": "bharatgen_openai demo upstream",
                "components": [self._component(i, t, name, default)
                               for i, t, name, default in inputs],
                "dependencies": [other, dep]}

    @staticmethod
    def _component(cid: int, kind: str, name: str, default: Any) -> Dict[str, Any]:
        props: Dict[str, Any] = {"label": name, "value": default}
        if kind == "slider":
            props["minimum"], props["maximum"] = _DEMO_SLIDERS[name]
        return {"id": cid, "type": kind, "props": props}

    @staticmethod
    def _type(kind: str, name: str) -> Dict[str, Any]:
        if kind == "slider":
            return {"type": "number",
                    "description": "numeric value between %g and %g" % _DEMO_SLIDERS[name]}
        return {"type": "string"} if kind == "textbox" else {}

    def info_json(self) -> Dict[str, Any]:
        """What ``<prefix>/info`` answers: the endpoint's parameters (no State)."""
        params = [{"label": name, "parameter_name": name,
                   "component": {"textbox": "Textbox", "chatbot": "Chatbot",
                                 "slider": "Slider"}[kind],
                   "parameter_has_default": default is not None, "parameter_default": default,
                   "type": self._type(kind, name),
                   "python_type": {"type": "Any", "description": ""}}
                  for _, kind, name, default in self._inputs() if kind != "state"]
        endpoint = {"parameters": params, "returns": [{"component": "Chatbot"},
                                                     {"component": "Textbox"}]}
        named = {"/" + self.endpoint: endpoint}
        if not self.chat_interface:
            named["/chat_fn"] = endpoint
        return {"named_endpoints": named, "unnamed_endpoints": {}}

    # -- answering ----------------------------------------------------------------------

    def _check_sliders(self, values: Dict[str, Any]) -> Optional[str]:
        """Gradio 5 and later refuse a slider value outside its range."""
        for name, (lo, hi) in _DEMO_SLIDERS.items():
            value = values.get(name)
            if self.version < 5 or not isinstance(value, (int, float)):
                continue
            if value > hi:
                return "Value %s is greater than maximum value %s." % (value, hi)
            if value < lo:
                return "Value %s is less than minimum value %s." % (value, lo)
        return None

    def _steps(self, job: _DemoJob) -> Iterator[Tuple[str, Any]]:
        """What the app does for a job: ``("output", value)`` updates, then ``("done", value)``,
        or ``("error", message)``, ``("drop", None)``, ``("malformed", None)``."""
        data, wants_state = job.data, job.queue or self.version < 6
        layout = self._inputs()
        if not wants_state:
            layout = [x for x in layout if x[1] != "state"]
        if len(data) < len(layout):
            yield "error", ("An event handler (%s) didn't receive enough input values "
                            "(needed: %d, got: %d)." % (self.endpoint, len(layout), len(data)))
            return
        values = {name: data[i] for i, (_, _, name, _) in enumerate(layout) if name}
        message = values["message"] if isinstance(values["message"], str) else ""
        history = values.get("chat_history") or []
        problem = self._check_history(history) or self._check_sliders(values)
        if problem:
            yield "error", problem
            return
        for fault in ("error", "error-null", "malformed", "hang"):
            if "[[%s]]" % fault in message:
                if fault == "hang":
                    self._wait(job, 30)
                yield {"error": ("error", "Model is overloaded, try again"),
                       "error-null": ("error", None), "malformed": ("malformed", None),
                       "hang": ("drop", None)}[fault]
                return
        params = [values.get(n) for n in ("temperature", "max_tokens", "top_p", "top_k")]
        thought, answer = _demo_reply(message, history, values.get("system_prompt"), params)
        chat = self._chat(history, message)
        n_thought, text = sum(1 for _ in _demo_tokens(thought)), ""
        for i, text in enumerate(_demo_html(thought, answer)):
            self._tick(job)
            if job.cancelled.is_set():
                yield "done", None
                return
            yield "output", self._output(chat, text)
            if i == n_thought + 3 and "[[fail-midstream]]" in message:
                yield "error", "error after output began"
                return
            if i == n_thought + 3 and "[[drop]]" in message:
                yield "drop", None
                return
            if i == n_thought + 3 and "[[stall]]" in message:
                self._wait(job, 30)
                yield "drop", None
                return
        yield "done", self._output(chat, text)

    def _tick(self, job: _DemoJob) -> None:
        """Set when the job's next token is due (the pacer writes it then): one every
        ``token_delay`` from the first, so a late wake-up (a busy machine) is made up, not
        added to every token after it."""
        if self.token_delay:
            job.next_at = (job.next_at or time.monotonic()) + self.token_delay

    @staticmethod
    def _wait(job: _DemoJob, seconds: float) -> None:
        """Hold the job's next chunk for ``seconds`` (less if it is cancelled)."""
        job.next_at = time.monotonic() + seconds

    def _check_history(self, history: Any) -> Optional[str]:
        """The validation error this Gradio version gives for a history it rejects."""
        if self.chat_interface or history is None:
            return None
        if not isinstance(history, list):
            return "chat_history must be a list"
        for item in history:
            if self.version == 4:
                ok = isinstance(item, list) and len(item) == 2
            else:
                content = item.get("content") if isinstance(item, dict) else None
                ok = isinstance(content, list if self.version == 6 else str)
            if not ok:
                return ("1 validation error for ChatbotDataMessages: %r is not a valid %s "
                        "message" % (item, {4: "pair", 5: "string-content", 6: "content-list"}
                                     [self.version]))
        return None

    def _chat(self, history: List[Any], message: str) -> List[Any]:
        """The conversation so far, as this version's Chatbot returns it."""
        if self.version == 4:
            return [list(p) for p in history] + [[message, None]]
        wrap = (lambda t: [{"text": t, "type": "text"}]) if self.version == 6 else (lambda t: t)
        chat = [{"role": h["role"], "metadata": None, "content": h["content"], "options": None}
                for h in history]
        return chat + [{"role": "user", "metadata": None, "content": wrap(message),
                        "options": None}]

    def _output(self, chat: List[Any], text: str) -> List[Any]:
        """The endpoint's outputs with the reply ``text``."""
        if self.chat_interface:
            return [text, None]
        if self.version == 4:
            return [chat[:-1] + [[chat[-1][0], text]], ""]
        content = [{"text": text, "type": "text"}] if self.version == 6 else text
        return [chat + [{"role": "assistant", "metadata": None, "content": content,
                         "options": None}], ""]

    def _reply_path(self, output: List[Any]) -> List[Any]:
        """Where the reply text sits inside output 0, for diffs."""
        if self.chat_interface:
            return []
        last = len(output[0]) - 1
        if self.version == 4:
            return [last, 1]
        return [last, "content", 0, "text"] if self.version == 6 else [last, "content"]

    def _replayed(self, job: _DemoJob) -> Optional[bytes]:
        message = job.data[0] if job.data and isinstance(job.data[0], str) else None
        return self.replay.get(message) if message is not None else None

    def _replay(self, job: _DemoJob, capture: bytes) -> Iterator[bytes]:
        for raw in capture.split(b"\n\n"):
            if raw.strip():
                self._tick(job)
                yield raw + b"\n\n"

    def call_events(self, job: _DemoJob) -> Iterator[Optional[bytes]]:
        """The ``/call`` event stream of a job (``None``: drop the connection)."""
        capture = self._replayed(job)
        if capture is not None:
            yield from self._replay(job, capture)
            return
        for kind, value in self._steps(job):
            if kind == "output":
                yield b"event: generating\ndata: " + json.dumps(value).encode() + b"\n\n"
            elif kind == "done":
                yield b"event: complete\ndata: " + json.dumps(value).encode() + b"\n\n"
            elif kind == "error":
                payload = {"error": value, "visible": True} if self.version == 6 else None
                yield b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
            elif kind == "malformed":
                yield b"event: generating\ndata: {not json\n\n"
            else:
                yield None

    def queue_events(self, job: _DemoJob) -> Iterator[Optional[bytes]]:
        """The queue protocol's messages for a job: whole output first, then diffs."""
        def msg(kind: str, **fields: Any) -> bytes:
            return _sse(dict(msg=kind, event_id=job.event_id, **fields))

        capture = self._replayed(job)
        if capture is not None:
            yield from self._replay(job, capture)
            return
        yield msg("estimation", rank=0, queue_size=1, rank_eta=0.5)
        yield msg("process_starts", eta=0.5)
        last: Any = None
        for kind, value in self._steps(job):
            if kind == "output":
                if last is None:
                    data = value
                else:
                    path, old, new = self._reply_path(value), last[0], value[0]
                    for key in path:
                        old, new = old[key], new[key]
                    op = ["append", path, new[len(old):]] if new.startswith(old) else \
                        ["replace", path, new]
                    data = [[op], []]
                last = value
                yield msg("process_generating", output={"data": data, "is_generating": True},
                          success=True)
            elif kind == "done":
                yield msg("process_completed", output={"data": value, "is_generating": False},
                          success=True)
            elif kind == "error":
                yield msg("process_completed", output={"error": value, "visible": True},
                          success=False)
            elif kind == "malformed":
                yield b"data: {not json\n\n"
                return
            else:
                yield None
                return
        yield _sse({"msg": "close_stream", "event_id": None})


###############################################################################
# Benchmark #####################################################################
###############################################################################

def _proc_stats(pid: Optional[int]) -> Tuple[float, float]:
    """CPU seconds used and peak RSS (MB) of a process, from /proc (Linux)."""
    if pid is None:
        return float("nan"), float("nan")
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
    """Run this file with ``args`` in a new process; ``(process, first group of pattern)``.

    Waits for ``pattern`` on its stderr, then keeps draining stderr so it never blocks.
    """
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


def _percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


_FIRST_CONTENT = re.compile(rb'"content":"[^"]')     # a chunk with answer text in it


def _gateway_request(url: str, model: str, prompt: str, stream: bool, timeout: float,
                     idle: Optional[List[_Connection]] = None,
                     started: Optional[float] = None) -> Tuple[float, float]:
    """One chat completion through a gateway: (seconds to the first answer text, total),
    counted from ``started`` (default: now).

    It goes over the module's own HTTP connection, as the direct path's requests do, so
    both paths pay the same client cost. ``idle`` keeps connections alive between
    requests, as the openai SDK's pool does (the direct client keeps its own too).
    """
    conn = None
    if idle:
        try:
            conn = idle.pop()
        except IndexError:
            pass
    if conn is None:
        parts = urllib.parse.urlsplit(url)
        conn = _Connection(parts.hostname or "127.0.0.1", parts.port or 80, None, timeout)
    started, reusable = started or time.monotonic(), False
    try:
        body = json.dumps({"model": model, "stream": stream,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        resp = conn.exchange("POST", "/v1/chat/completions", body,
                             {"Content-Type": "application/json"}, timeout)
        if resp.status != 200:
            raise RuntimeError("HTTP %d: %s" % (resp.status, resp.read()[:200]))
        if not stream:
            resp.read()
            total = time.monotonic() - started
            reusable = resp.reusable
            return total, total
        ttft, seen = None, b""
        while True:                   # whole blocks, not lines: the load stays light
            block = resp.read1()
            if not block:
                break
            if ttft is None:
                seen = seen[-64:] + block
                if _FIRST_CONTENT.search(seen):
                    ttft = time.monotonic() - started
            if b'data: {"error"' in block:
                raise RuntimeError(block[block.index(b'data: {"error"'):][:200].decode(
                    "utf-8", "replace"))
        total = time.monotonic() - started
        reusable = resp.reusable
        return (total if ttft is None else ttft), total
    finally:
        if reusable and idle is not None:
            idle.append(conn)
        else:
            conn.close()


def _direct_request(client: "BharatGenOpenAI", prompt: str, stream: bool,
                    started: Optional[float] = None) -> Tuple[float, float]:
    """The same request through the SDK straight to the upstream, no gateway."""
    started = started or time.monotonic()
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        client.chat.completions.create(messages=messages)
        total = time.monotonic() - started
        return total, total
    ttft = None
    for chunk in client.chat.completions.create(messages=messages, stream=True):
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.monotonic() - started
    total = time.monotonic() - started
    return (total if ttft is None else ttft), total


def _load(fn: Callable[[float], Tuple[float, float]], concurrency: int,
          requests: int) -> Dict[str, Any]:
    """Run ``requests`` calls of ``fn`` on ``concurrency`` threads; timings and errors.

    The threads start together, and each call's times count from when it was due (the
    start, then the end of the thread's last call), not from when its thread got round
    to it: a load generator slowed by its own work must not flatter the figures.
    """
    ttfts: List[float] = []
    totals: List[float] = []
    errors: List[str] = []
    left = [requests]
    lock = threading.Lock()
    go = threading.Event()
    begun: List[float] = []

    def worker() -> None:
        go.wait()
        due = begun[0]
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                ttft, total = fn(due)
                with lock:
                    ttfts.append(ttft)
                    totals.append(total)
            except Exception as exc:          # counted and shown, the run goes on
                with lock:
                    errors.append(repr(exc)[:200])
            due = time.monotonic()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    started = time.monotonic()
    begun.append(started)
    go.set()
    for t in threads:
        t.join()
    return {"wall": time.monotonic() - started, "ttft": ttfts, "total": totals, "errors": errors}


def _summary(r: Dict[str, Any]) -> Dict[str, Any]:
    """One run's figures: wall, TTFT and total p50/p95, errors, the gateway's extras."""
    return {"wall": r["wall"], "ttft50": _percentile(r["ttft"], .5),
            "ttft95": _percentile(r["ttft"], .95), "tot50": _percentile(r["total"], .5),
            "tot95": _percentile(r["total"], .95), "errors": len(r["errors"]),
            "error_list": r["errors"], "extra": r["extra"]}


def _median_summary(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The median of each figure over repeated runs (errors: all of them)."""
    def median(values: List[Any]) -> Any:
        values = [v for v in values if v is not None]
        return sorted(values)[len(values) // 2] if values else None
    out = {k: median([r[k] for r in runs]) for k in ("wall", "ttft50", "ttft95", "tot50", "tot95")}
    out["errors"] = sum(r["errors"] for r in runs)
    out["error_list"] = [e for r in runs for e in r["error_list"]]
    out["extra"] = tuple(median([r["extra"][i] for r in runs])
                         for i in range(len(runs[0]["extra"])))
    return out


def _seconds(cpu: Optional[float]) -> str:
    """A CPU time for the bench table ("-" when not known)."""
    return "-" if cpu is None or cpu != cpu else "%.2fs" % cpu


def _scrape(url: str, name: str) -> float:
    """One counter's value from a gateway's /metrics (0 if it cannot be read)."""
    try:
        status, text = _fetch_text(url + "/metrics")
        m = re.search(r"^%s (\S+)$" % re.escape(name), text, re.M)
        return float(m.group(1)) if m else 0.0
    except OSError:
        return 0.0


def _fetch_text(url: str, timeout: float = 10) -> Tuple[int, str]:
    parts = urllib.parse.urlsplit(url)
    conn = _Connection(parts.hostname or "127.0.0.1", parts.port or 80, None, timeout)
    try:
        resp = conn.exchange("GET", parts.path, None, {}, timeout)
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


_BENCH_ROW = ("%5d %-6s %-8s %5d %7.2f %6.0fms %6.0fms %7.2fs %7.2fs %6d %7s %7s %9.3f %7s "
              "%8s")


def _startup(upstream: str) -> str:
    """Import and serve-ready times (medians), each beside the part of it that is
    Python's own: importing the standard modules this file imports, starting python."""
    import subprocess
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    with open(__file__, encoding="utf-8") as f:
        stdlib = sorted(set(re.findall(r"^(?:from|import) ([\w.]+)", f.read(), re.M)))

    def median_of(runs: int, measure: Callable[[], float]) -> float:
        return _percentile([measure() for _ in range(runs)], .5) * 1000

    def import_time(statement: str) -> float:
        code = "import time; t = time.perf_counter(); %s; print(time.perf_counter() - t)"
        return float(subprocess.run([sys.executable, "-c", code % statement], cwd=here, env=env,
                                    capture_output=True, text=True).stdout)

    def python_start() -> float:
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        return time.monotonic() - started

    def serve_ready() -> float:
        started = time.monotonic()
        proc, url = _spawn(["serve", "--upstream", upstream, "--port", "0"],
                           r"OpenAI API at (http://[\d.:\[\]a-z]+)/v1")
        try:
            while _fetch_text(url + "/health")[0] != 200 and time.monotonic() - started < 10:
                time.sleep(0.005)
            return time.monotonic() - started
        finally:
            proc.terminate()
            proc.wait(10)

    with tempfile.TemporaryDirectory() as cache:   # bytecode cached there, not here
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        import_time("import bharatgen_openai")      # writes the cache
        own = median_of(7, lambda: import_time("import bharatgen_openai"))
        floor = median_of(7, lambda: import_time("import " + ", ".join(stdlib)))
    return ("\nimport: %.0f ms, of which %.0f ms imports the standard modules it uses (medians "
            "of 7)\nserve ready (process start to /health answering): %.0f ms; python alone "
            "starts in %.0f ms (medians of 3)"
            % (own, floor, median_of(3, serve_ready), median_of(3, python_start)))


def _cmd_bench(args: Any) -> int:
    """Load a gateway and the same upstream directly; print what the gateway adds."""
    procs: List[Any] = []
    try:
        demo_pid: Optional[int] = None             # its CPU is shown when it is ours
        if args.upstream:
            upstream = args.upstream[0]
        else:
            proc, upstream = _spawn(["demo", "--port", "0", "--token-delay",
                                        str(args.token_delay)], r" at (http://\S+)")
            procs.append(proc)
            demo_pid = proc.pid
        gateways: Dict[str, Tuple[str, Optional[int]]] = {}

        def gateway(protocol: str) -> Tuple[str, Optional[int]]:
            if args.target:
                return args.target.rstrip("/").rsplit("/v1", 1)[0], None
            if protocol not in gateways:
                proc, url = _spawn(["--log-level", "WARNING", "serve", "--upstream", upstream,
                                       "--port", "0", "--protocol", protocol,
                                       "--max-concurrent", "100000"],
                                      r"OpenAI API at (http://[\d.:\[\]a-z]+)/v1")
                procs.append(proc)
                gateways[protocol] = (url, proc.pid)
            return gateways[protocol]

        model = args.model or DEFAULT_MODEL
        prompt = "%d words" % args.words
        print("bharatgen_openai %s bench on %d cores: %s, %d-word answers, protocol %s%s"
              % (__version__, os.cpu_count() or 0,
                 "upstream %s" % upstream if args.upstream else
                 "demo upstream with %g ms a token" % (args.token_delay * 1000),
                 args.words, args.protocol,
                 "; medians of %d runs each, alternating" % args.repeat if args.repeat > 1 else ""))
        url, pid = gateway(args.protocol)
        direct = BharatGenOpenAI(upstream, protocol=args.protocol, timeout=args.timeout)
        direct_metrics = _Metrics()
        for route in direct._backend.routes.values():
            for replica in route.pool.replicas:
                replica.client.metrics = direct_metrics
        header = ("%5s %-6s %-8s %5s %7s %8s %8s %8s %8s %6s %7s %7s %9s %7s %8s"
                  % ("conc", "mode", "path", "reqs", "wall s", "ttft p50", "ttft p95",
                     "tot p50", "tot p95", "errors", "gw cpu", "gw rss", "up MB/req",
                     "up cpu", "load cpu"))
        print(header)
        print("-" * len(header))
        modes = [m for m in ("stream", "json") if args.mode in (m, "both")]
        kept_alive: List[_Connection] = []   # list.pop/append: thread-safe
        for conc in args.concurrency:
            for mode in modes:
                stream, n = mode == "stream", max(args.requests or conc, conc)

                def via_gateway() -> Dict[str, Any]:
                    cpu0, _ = _proc_stats(pid)
                    bytes0 = _scrape(url, "bharatgen_upstream_bytes_total")
                    up0, load0 = _proc_stats(demo_pid)[0], time.process_time()
                    r = _load(lambda due: _gateway_request(url, model, prompt, stream, args.timeout,
                                                           kept_alive, due), conc, n)
                    cpu1, rss = _proc_stats(pid)
                    r["extra"] = (cpu1 - cpu0, rss,
                                  (_scrape(url, "bharatgen_upstream_bytes_total") - bytes0) / n / 1e6,
                                  _proc_stats(demo_pid)[0] - up0, time.process_time() - load0)
                    return _summary(r)

                def via_direct() -> Dict[str, Any]:
                    d0 = direct_metrics.value("bharatgen_upstream_bytes_total")
                    up0, load0 = _proc_stats(demo_pid)[0], time.process_time()
                    r = _load(lambda due: _direct_request(direct, prompt, stream, due), conc, n)
                    r["extra"] = (None, None,
                                  (direct_metrics.value("bharatgen_upstream_bytes_total") - d0) / n / 1e6,
                                  _proc_stats(demo_pid)[0] - up0, time.process_time() - load0)
                    return _summary(r)

                runs: Dict[str, List[Dict[str, Any]]] = {"gateway": [], "direct": []}
                for i in range(args.repeat):      # alternate which path goes first
                    order = (("gateway", via_gateway), ("direct", via_direct))
                    for name, run in (order if i % 2 == 0 else order[::-1]):
                        runs[name].append(run())
                g, d = _median_summary(runs["gateway"]), _median_summary(runs["direct"])
                for name, r in (("gateway", g), ("direct", d)):
                    cpu, rss, up, up_cpu, load_cpu = r["extra"]
                    print(_BENCH_ROW % (conc, mode, name, n, r["wall"], r["ttft50"] * 1000,
                                        r["ttft95"] * 1000, r["tot50"], r["tot95"], r["errors"],
                                        _seconds(cpu), "-" if rss is None else "%.0fMB" % rss,
                                        up, _seconds(up_cpu), _seconds(load_cpu)))
                print("%5d %-6s %-8s %5s %6.3fx %7.3fx %7.3fx %7.3fx %7.3fx"
                      % (conc, mode, "ratio", "", g["wall"] / d["wall"], g["ttft50"] / d["ttft50"],
                         g["ttft95"] / d["ttft95"], g["tot50"] / d["tot50"],
                         g["tot95"] / d["tot95"]))
                for e in (g["error_list"] + d["error_list"])[:3]:
                    print("      error: %s" % e)
        if args.cpu_words and not args.target:
            print("\nCPU and upstream bytes for one streamed answer, by length "
                  "(gateway process; queue protocol vs /call):")
            print("%7s %12s %12s %12s %12s" % ("words", "queue cpu", "queue MB", "call cpu", "call MB"))
            for words in args.cpu_words:
                cells = []
                for protocol in ("queue", "call"):
                    gurl, gpid = gateway(protocol)
                    cpu0, _ = _proc_stats(gpid)
                    b0 = _scrape(gurl, "bharatgen_upstream_bytes_total")
                    _gateway_request(gurl, model, "%d words" % words, True, args.timeout)
                    cpu1, _ = _proc_stats(gpid)
                    cells += [cpu1 - cpu0, (_scrape(gurl, "bharatgen_upstream_bytes_total") - b0) / 1e6]
                print("%7d %11.3fs %11.3f %11.3fs %11.3f" % tuple([words] + cells))
        if args.startup:
            print(_startup(upstream))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except Exception:
                proc.kill()
    return 0


###############################################################################
# Command line ##################################################################
###############################################################################

def _config_from_args(args: Any) -> Config:
    """A :class:`Config` from parsed flags, the environment and the defaults."""
    flags = {name: getattr(args, name, None) for name in
             ("endpoint", "model", "models_file", "system_prompt", "protocol", "timeout",
              "connect_timeout", "first_event_timeout", "reasoning", "reasoning_field",
              "host", "port", "max_body_bytes", "api_key_file", "header_timeout",
              "body_timeout", "max_concurrent", "max_messages", "max_chars", "rate_limit_rpm",
              "rate_limit_streams", "grace", "log_format")}
    if getattr(args, "allow_no_auth", False):
        flags["allow_no_auth"] = True
    if getattr(args, "no_pump", False):
        flags["pump"] = False
    if getattr(args, "cors_origin", None):
        flags["cors_origins"] = list(args.cors_origin)
    if getattr(args, "upstream", None):
        flags["upstream"] = [u for arg in args.upstream for u in _split_list(arg)]
    if getattr(args, "api_key", None):
        flags["api_keys"] = list(args.api_key)
    return Config.load(**flags)


def _start_demo(config: Config, token_delay: float, out: Any) -> DemoUpstream:
    demo = DemoUpstream(token_delay=token_delay).start()
    config.upstream, config.models_file, config.demo = [demo.url], None, True
    print("DEMO: serving canned answers from the built-in demo upstream at %s; this is "
          "NOT the Param model. Give --upstream URL (or BHARATGEN_BASE_URL) for the real one."
          % demo.url, file=out, flush=True)
    return demo


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
            handler.setFormatter(logging.Formatter("%(message)s"))
    has_keys = bool(config.api_keys or config.api_key_file)
    if not has_keys and not _is_loopback(config.host) and not config.allow_no_auth:
        raise SystemExit("error: refusing to serve on %s with no API key: anyone on the network "
                         "could use it. Give --api-key, --api-key-file or BHARATGEN_API_KEYS, "
                         "or --allow-no-auth if that is really what you want." % config.host)
    demo = None
    if args.demo or not (config.upstream or config.models_file):
        demo = _start_demo(config, args.token_delay, sys.stderr)
    server = GatewayServer(config)
    for route in server.backend.routes.values():
        print("bharatgen_openai %s: OpenAI API at %s/v1, model %r in front of %s"
              % (__version__, server.url, route.id, route.pool.base_url),
              file=sys.stderr, flush=True)
    if not server.keys.enabled:
        print("WARNING: no API key configured; anyone who can reach %s can use it. "
              "Set --api-key or BHARATGEN_API_KEYS." % server.url, file=sys.stderr, flush=True)
    stop = threading.Event()
    import signal
    for name in ("SIGTERM", "SIGINT"):
        signal.signal(getattr(signal, name), lambda *_: stop.set())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: _log.info("reloaded %d API keys",
                                                          server.keys.reload()))
    server.start()
    try:
        while not stop.wait(0.5):
            pass
        print("stopping: no new connections; letting requests in flight finish (up to %gs)"
              % config.grace, file=sys.stderr, flush=True)
        clean = server.drain(config.grace)
        print("stopped%s" % ("" if clean else "; streams still running were cut off"),
              file=sys.stderr, flush=True)
    finally:
        server.server_close()
        if demo is not None:
            demo.stop()
    return 0


def _cmd_demo(args: Any) -> int:
    demo = DemoUpstream(args.host, args.port, token_delay=args.token_delay)
    print("demo upstream (a stand-in Gradio app, not the Param model) at %s" % demo.url,
          file=sys.stderr, flush=True)
    try:
        demo.serve_forever(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        demo.stop()
    return 0


def _cmd_info(args: Any) -> int:
    config = _config_from_args(args)
    if not config.upstream:
        raise SystemExit("info: give --upstream URL (or set BHARATGEN_BASE_URL)")
    for url in config.upstream:
        client = GradioClient(url, endpoint=config.endpoint, protocol=config.protocol,
                              timeout=config.timeout, connect_timeout=config.connect_timeout)
        info = client.discover()
        client.close()
        print("app:            %s" % client.base_url)
        print("gradio:         %s, API at %s" % (info.version or "version unknown (no /config)",
                                                 info.prefix or "the root"))
        print("protocol:       %s (%s)" % (info.protocol or "unknown", "queue, with diffs"
                                           if info.use_queue else "/call, whole output"))
        print("chat endpoint:  /%s%s" % (info.endpoint, "" if info.fn_index is not None
                                         else "  (not listed in /config)"))
        print("history:        %s" % ("sent as " + info.history_format if info.has_history
                                      else "not an input (a ChatInterface): folded into the message"))
        print("inputs:")
        params = iter(info.parameters)
        for role, default in info.inputs:
            p = {} if role == "state" else next(params, {})
            what = {"state": "(State: null placeholder)", "default": "the app's default %r"
                    % (default,)}.get(role, "<- OpenAI %s" % role)
            print("  %-16s %-10s %s" % (p.get("parameter_name", "-"), p.get("component", ""), what))
        print()
    return 0


def _cmd_chat(args: Any) -> int:
    config = _config_from_args(args)
    demo = _start_demo(config, args.token_delay, sys.stderr) if args.demo or not config.upstream else None
    cleanup: List[Callable[[], None]] = []
    try:
        client = BharatGenOpenAI(config.upstream[0], model=config.model, timeout=config.timeout,
                                 endpoint=config.endpoint, system_prompt=config.system_prompt,
                                 protocol=config.protocol)
        cleanup.append(client.close)
        history: List[Dict[str, str]] = []
        if args.prompt:
            _chat_turn(client, history, " ".join(args.prompt), args)
            return 0
        print("Chatting with %s at %s. /reset forgets the conversation, /exit leaves."
              % (config.model, client.base_url), file=sys.stderr)
        while True:
            try:
                line = input(">>> ").strip()
            except EOFError:
                print()
                return 0
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history.clear()
                print("(conversation forgotten)", file=sys.stderr)
            elif line:
                _chat_turn(client, history, line, args)
    except KeyboardInterrupt:
        return 130
    finally:
        for close in cleanup:
            close()
        if demo is not None:
            demo.stop()


def _chat_turn(client: BharatGenOpenAI, history: List[Dict[str, str]], prompt: str,
               args: Any) -> None:
    """Stream one answer to the terminal; remember the turn on success."""
    dim = sys.stdout.isatty()
    messages = history + [{"role": "user", "content": prompt}]
    answer: List[str] = []
    thinking = False
    stream = client.chat.completions.create(messages=messages, stream=True,
                                            temperature=args.temperature,
                                            max_tokens=args.max_tokens)
    with stream:
        for chunk in stream:
            for choice in chunk.choices:
                delta = choice.delta
                if delta.reasoning_content and args.show_reasoning:
                    if not thinking:
                        thinking = True
                        sys.stdout.write("\x1b[2m" if dim else "[thinking] ")
                    sys.stdout.write(delta.reasoning_content)
                if delta.content:
                    if thinking:
                        thinking = False
                        sys.stdout.write("\x1b[0m\n\n" if dim else "\n\n")
                    answer.append(delta.content)
                    sys.stdout.write(delta.content)
                sys.stdout.flush()
    if thinking and dim:
        sys.stdout.write("\x1b[0m")
    sys.stdout.write("\n")
    sys.stdout.flush()
    history += [{"role": "user", "content": prompt},
                {"role": "assistant", "content": "".join(answer)}]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: ``serve``, ``chat``, ``info``, ``demo``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="bharatgen_openai",
        description="An OpenAI-compatible API in front of BharatGen's Param Gradio app.")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default: INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def upstream_flags(p: Any) -> None:
        p.add_argument("--upstream", "--base-url", dest="upstream", metavar="URL", action="append",
                       help="the Gradio app: its root, /gradio_api URL, or owner/space; "
                            "repeat it (or give a comma list) for replicas "
                            "(env BHARATGEN_UPSTREAM or BHARATGEN_BASE_URL)")
        p.add_argument("--endpoint", help="the app's chat endpoint (default: discovered; "
                                          "%s for the Param app)" % DEFAULT_ENDPOINT)
        p.add_argument("--protocol", choices=PROTOCOLS,
                       help="queue (diffs), call (whole output each update), or auto (default)")
        p.add_argument("--first-event-timeout", type=float,
                       help="seconds to wait for the first output (default: --timeout)")
        p.add_argument("--model", help="the model name to serve (default %s)" % DEFAULT_MODEL)
        p.add_argument("--system-prompt", help="used when a request has no system message")
        p.add_argument("--timeout", type=float,
                       help="seconds of upstream silence allowed between events (default 120)")
        p.add_argument("--connect-timeout", type=float, help="seconds to connect upstream")
        p.add_argument("--demo", action="store_true",
                       help="use the built-in demo upstream (canned answers)")
        p.add_argument("--token-delay", type=float, default=0.02,
                       help="the demo upstream's pause per token, seconds (default 0.02)")

    p = sub.add_parser("serve", help="run the OpenAI-compatible server")
    upstream_flags(p)
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default %d; 0 picks a free one)" % DEFAULT_PORT)
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="accepted bearer key; repeatable (env BHARATGEN_API_KEYS, comma list)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="more keys, one a line; re-read on SIGHUP")
    p.add_argument("--allow-no-auth", action="store_true",
                   help="serve a non-loopback address with no key (refused otherwise)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let browser pages from ORIGIN call the API; repeatable; * for any")
    p.add_argument("--max-concurrent", type=int,
                   help="requests served at once; beyond it 503 (default 512)")
    p.add_argument("--max-messages", type=int, help="messages a request may hold (default 2048)")
    p.add_argument("--max-chars", type=int,
                   help="characters a request's messages may hold (default 1000000)")
    p.add_argument("--header-timeout", type=float,
                   help="seconds a client has to send its request line and headers (default 10)")
    p.add_argument("--body-timeout", type=float,
                   help="seconds a client has to send its body (default 30)")
    p.add_argument("--rate-limit-rpm", type=int, help="requests a minute per key (default: none)")
    p.add_argument("--rate-limit-streams", type=int,
                   help="concurrent streams per key (default: none)")
    p.add_argument("--grace", type=float,
                   help="on SIGTERM, seconds to let streams finish (default 30)")
    p.add_argument("--log-format", choices=("text", "json"), help="access log format")
    p.add_argument("--no-pump", action="store_true",
                   help="stream each answer from its own thread instead of one pump thread")
    p.add_argument("--reasoning", choices=REASONING_MODES,
                   help="where the thought goes: its own field (separate, default), "
                        "inline in <think> tags, or none")
    p.add_argument("--reasoning-field", help="name of that field (default reasoning_content)")
    p.add_argument("--max-body-bytes", type=int, help="request body limit (default 4 MiB)")
    p.add_argument("--config", dest="models_file", metavar="FILE",
                   help="a JSON file declaring several models and their upstreams")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("chat", help="chat in the terminal (one prompt, or interactive)")
    upstream_flags(p)
    p.add_argument("prompt", nargs="*", help="the prompt; none opens an interactive session")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--show-reasoning", action="store_true", help="print the thought, dimmed")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("info", help="show what the upstream app offers")
    upstream_flags(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="measure what the gateway adds to calling the app directly")

    def int_list(text: str) -> List[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError("expected numbers separated by commas: %r" % text)
    p.add_argument("--upstream", action="append", metavar="URL",
                   help="a real Gradio app (default: a demo upstream in its own process)")
    p.add_argument("--target", metavar="URL", help="an already running gateway to load")
    p.add_argument("--model", help="the model name to ask for (default %s)" % DEFAULT_MODEL)
    p.add_argument("--protocol", choices=PROTOCOLS, default="auto")
    p.add_argument("--concurrency", type=int_list, default=[1, 16, 64, 256],
                   help="comma list (default 1,16,64,256)")
    p.add_argument("--requests", type=int, help="requests per run (default: the concurrency)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each path, alternating which goes first; medians shown")
    p.add_argument("--mode", choices=("stream", "json", "both"), default="stream")
    p.add_argument("--token-delay", type=float, default=0.02,
                   help="the demo upstream's pause per token (default 0.02)")
    p.add_argument("--words", type=int, default=100, help="answer length in words (default 100)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--cpu-words", type=int_list, metavar="LIST",
                   help="also measure CPU and upstream bytes per answer of these lengths")
    p.add_argument("--startup", action="store_true", help="also measure import and serve-ready time")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="run only the demo upstream (a stand-in Gradio app)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token-delay", type=float, default=0.02)
    p.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except BharatGenError as exc:
        raise SystemExit("error: %s" % exc.message) from None
    except ValueError as exc:           # bad settings, from flags or the environment
        parser.error(str(exc))
    return 1


if __name__ == "__main__":
    sys.exit(main())
