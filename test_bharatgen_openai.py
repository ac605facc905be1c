"""Tests for bharatgen_openai: run with ``python -m unittest -v test_bharatgen_openai``.

Two tiers: fast tests that feed text straight into the parsers, and tests over real
sockets on 127.0.0.1 (port 0) with the demo Gradio upstream and the gateway.  Tests
that need a third-party package (openai, langchain-openai, gradio) skip without it,
unless BHARATGEN_REQUIRE_EXTRAS=1 (CI's venv run), where a missing package fails.
"""

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import html
import http
import http.client
import http.server
import io
import itertools
import json
import logging
import os
import pathlib
import random
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import unittest
import urllib.parse
from unittest import mock

import bharatgen_openai as bg

###############################################################################
# Shared helpers: fixtures, fake upstreams, servers and requests ##############
###############################################################################

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT = 20

HELLO = "Hello! How are you doing today?"
HINDI = "नमस्ते! भारत की राजधानी नई दिल्ली है। 🙏"


def short_key(key):
    """How logs and the dashboard show a key: the start of its SHA-256 digest."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def thought_of(prompt):
    return "The user said: %s. Let me think step by step." % prompt


def fixture(name):
    return CAPTURES[name]


def events_of(read):
    """The events of an SSE stream, unbatched."""
    return list(bg._iter_sse(read))


def needs(module, *files):
    """Skip without ``module`` (or one of ``files``), unless BHARATGEN_REQUIRE_EXTRAS=1 makes
    it a failure."""
    try:
        __import__(module)
        missing = ", ".join(f for f in files if not os.path.exists(f))
    except ImportError:
        missing = module
    if not missing:
        return lambda cls: cls
    if os.environ.get("BHARATGEN_REQUIRE_EXTRAS") == "1":
        def fail(cls):
            @classmethod
            def setUpClass(klass):
                raise AssertionError("%s is required (BHARATGEN_REQUIRE_EXTRAS=1) but "
                                     "not installed" % missing)
            cls.setUpClass = setUpClass
            return cls
        return fail
    return unittest.skip("%s is not installed" % missing)


# -- captures --------------------------------------------------------------------------------
# Byte-exact captures from real Gradio 6.31 servers running an app shaped like Param's
# (chat_fn_1 streaming a thought block, the answer, a debug block and a latency line; see
# shared/docs/gradio-protocol.md), written one SSE line per source line ('' is the blank line
# that ends an event).  call_*: the stream of GET <prefix>/call/chat_fn_1/<event_id>.  Each of
# its events repeats the whole chat, so only some are kept, unchanged and in their order: the
# first two; every one whose reply ends in U+FFFD (half a character) and the one after it; the
# three around the thought block closing; the last two "generating", the "complete" and any
# other event; and of the rest one in k, evenly, k the smallest that keeps a capture within
# 8 KB (call_hindi_please.sse is over that with its U+FFFD events alone, and keeps none of the
# rest).  queue_*: the stream of GET <prefix>/queue/data, whole, since its diffs only add up
# in full.  The comment before an event gives its number in the original capture.


def _capture(*lines):
    """The bytes of a capture given as its lines, each without its "\\n"."""
    return "".join(line + "\n" for line in lines).encode("utf-8")


CAPTURES = {
    "chatinterface_thoughts6_queue.sse": _capture(  # a ChatInterface yielding gr.ChatMessage thoughts (Gradio 6.31), whole
        'data: {"msg":"estimation","event_id":"5b0976227bc7494e8cefb140527303e3","rank":0,"queue_size":1,"rank_eta":null}',
        '',
        'data: {"msg":"process_starts","event_id":"5b0976227bc7494e8cefb140527303e3","eta":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[{"content":"Consider the","role":"assistant","metadata":{"title":"Reasoning","status":"pending"},"options":[]},null],"is_generating":true,"duration":0.011266231536865234,"average_duration":0.011266231536865234,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[],[]],"is_generating":true,"duration":0.010346174240112305,"average_duration":0.01080620288848877,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[],[]],"is_generating":true,"duration":0.010313272476196289,"average_duration":0.010641892751057943,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[],[]],"is_generating":true,"duration":0.010367155075073242,"average_duration":0.010573208332061768,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[],[]],"is_generating":true,"duration":0.0002961158752441406,"average_duration":0.008517789840698241,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[["replace",[],[{"content":"Consider the question carefully.","role":"assistant","metadata":{"title":"Reasoning","status":"done"},"options":[]},{"content":"The","role":"assistant","metadata":{},"options":[]}]]],[]],"is_generating":true,"duration":0.010806798934936523,"average_duration":0.008899291356404623,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[["replace",[1],{"content":"The capital","role":"assistant","metadata":{},"options":[]}]],[]],"is_generating":true,"duration":0.01038980484008789,"average_duration":0.009112221854073661,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[["replace",[1],{"content":"The capital of","role":"assistant","metadata":{},"options":[]}]],[]],"is_generating":true,"duration":0.010426521301269531,"average_duration":0.009276509284973145,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[["replace",[1],{"content":"The capital of India","role":"assistant","metadata":{},"options":[]}]],[]],"is_generating":true,"duration":0.010309934616088867,"average_duration":0.00939133432176378,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[["replace",[1],{"content":"The capital of India is","role":"assistant","metadata":{},"options":[]}]],[]],"is_generating":true,"duration":0.01029658317565918,"average_duration":0.009481859207153321,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[["replace",[1],{"content":"The capital of India is New","role":"assistant","metadata":{},"options":[]}]],[]],"is_generating":true,"duration":0.010480880737304688,"average_duration":0.00957267934625799,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[["replace",[1],{"content":"The capital of India is New Delhi.","role":"assistant","metadata":{},"options":[]}]],[]],"is_generating":true,"duration":0.010343074798583984,"average_duration":0.009636878967285156,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_completed","event_id":"5b0976227bc7494e8cefb140527303e3","output":{"data":[[{"content":"Consider the question carefully.","role":"assistant","metadata":{"title":"Reasoning","status":"done"},"options":[]},{"content":"The capital of India is New Delhi.","role":"assistant","metadata":{},"options":[]}],null],"is_generating":false,"duration":0.00042366981506347656,"average_duration":0.008928170570960412,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"title":null,"used_cache":null,"cache_duration":0.00042366981506347656,"avg_time":0.008928170570960412}',
    ),
    "call_Say_hello.sse": _capture(  # events 1-2, 4, 6, 8, 10, 12, 14, 16-19, 21, 23, 25-28 of 28
        # 1/28: first
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 2/28: first
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 4/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 6/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 8/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 10/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 12/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 14/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 16/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 17/28: thought still open
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 18/28: thought closed
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>\n\nHell", "type": "text"}], "options": null}], ""]''',
        '',
        # 19/28: after the close
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>\n\nHello! ", "type": "text"}], "options": null}], ""]''',
        '',
        # 21/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>\n\nHello! How are ", "type": "text"}], "options": null}], ""]''',
        '',
        # 23/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>\n\nHello! How are you doin", "type": "text"}], "options": null}], ""]''',
        '',
        # 25/28: 1 in 2 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>\n\nHello! How are you doing toda", "type": "text"}], "options": null}], ""]''',
        '',
        # 26/28: last generating
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>\n\nHello! How are you doing today?", "type": "text"}], "options": null}], ""]''',
        '',
        # 27/28: last generating
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>\n\nHello! How are you doing today?\n\n<details style='opacity:0.6; font-size:0.85em'><summary>\ud83d\udd0d Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: Say hello. Let me think step by step.&lt;/think&gt;Hello! How are you doing today?</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>\u23f1\ufe0f Latency: 0.04s | Processing time: 0.04s</div>", "type": "text"}], "options": null}], ""]''',
        '',
        # 28/28: complete
        'event: complete',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Say hello", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: Say hello. Let me think step by step.\n\n</details>\n\nHello! How are you doing today?\n\n<details style='opacity:0.6; font-size:0.85em'><summary>\ud83d\udd0d Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: Say hello. Let me think step by step.&lt;/think&gt;Hello! How are you doing today?</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>\u23f1\ufe0f Latency: 0.04s | Processing time: 0.04s</div>", "type": "text"}], "options": null}], ""]''',
        '',
    ),
    "call_show_formatting.sse": _capture(  # events 1-2, 13, 19-21, 37, 58, 79, 100, 119-121 of 121
        # 1/121: first
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 2/121: first
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 13/121: 1 in 21 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me thin\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 19/121: thought still open
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 20/121: thought closed
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere", "type": "text"}], "options": null}], ""]''',
        '',
        # 21/121: after the close
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere ", "type": "text"}], "options": null}], ""]''',
        '',
        # 37/121: 1 in 21 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some", "type": "text"}], "options": null}], ""]''',
        '',
        # 58/121: 1 in 21 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n<div class=\"box\">a < b && c > d</div>\n```", "type": "text"}], "options": null}], ""]''',
        '',
        # 79/121: 1 in 21 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n<div class=\"box\">a < b && c > d</div>\n```\n\n```python\ndef f(x):\n    if x:\n        retu", "type": "text"}], "options": null}], ""]''',
        '',
        # 100/121: 1 in 21 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n<div class=\"box\">a < b && c > d</div>\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 < 5 and 7 ", "type": "text"}], "options": null}], ""]''',
        '',
        # 119/121: last generating
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n<div class=\"box\">a < b && c > d</div>\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 < 5 and 7 > 2; AT&T; 'quotes' \"double\"  two  spaces.\nTrailing line", "type": "text"}], "options": null}], ""]''',
        '',
        # 120/121: last generating
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n<div class=\"box\">a < b && c > d</div>\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 < 5 and 7 > 2; AT&T; 'quotes' \"double\"  two  spaces.\nTrailing line\n\n<details style='opacity:0.6; font-size:0.85em'><summary>\ud83d\udd0d Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: show formatting. Let me think step by step.&lt;/think&gt;Here is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n&lt;div class=&quot;box&quot;&gt;a &lt; b &amp;&amp; c &gt; d&lt;/div&gt;\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 &lt; 5 and 7 &gt; 2; AT&amp;T; &#x27;quotes&#x27; &quot;double&quot;  two  spaces.\nTrailing line</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>\u23f1\ufe0f Latency: 0.27s | Processing time: 0.27s</div>", "type": "text"}], "options": null}], ""]''',
        '',
        # 121/121: complete
        'event: complete',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "show formatting", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n<div class=\"box\">a < b && c > d</div>\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 < 5 and 7 > 2; AT&T; 'quotes' \"double\"  two  spaces.\nTrailing line\n\n<details style='opacity:0.6; font-size:0.85em'><summary>\ud83d\udd0d Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: show formatting. Let me think step by step.&lt;/think&gt;Here is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n&lt;div class=&quot;box&quot;&gt;a &lt; b &amp;&amp; c &gt; d&lt;/div&gt;\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 &lt; 5 and 7 &gt; 2; AT&amp;T; &#x27;quotes&#x27; &quot;double&quot;  two  spaces.\nTrailing line</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>\u23f1\ufe0f Latency: 0.27s | Processing time: 0.27s</div>", "type": "text"}], "options": null}], ""]''',
        '',
    ),
    "call_hindi_please.sse": _capture(  # events 1-2, 18-24, 26-43 of 43
        # 1/43: first
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 2/43: first
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 18/43: thought still open
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 19/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 20/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d", "type": "text"}], "options": null}], ""]''',
        '',
        # 21/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947!\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 22/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! ", "type": "text"}], "options": null}], ""]''',
        '',
        # 23/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 24/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924", "type": "text"}], "options": null}], ""]''',
        '',
        # 26/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 27/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 ", "type": "text"}], "options": null}], ""]''',
        '',
        # 28/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 29/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927", "type": "text"}], "options": null}], ""]''',
        '',
        # 30/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 31/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 ", "type": "text"}], "options": null}], ""]''',
        '',
        # 32/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 33/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 ", "type": "text"}], "options": null}], ""]''',
        '',
        # 34/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 35/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d", "type": "text"}], "options": null}], ""]''',
        '',
        # 36/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 37/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 ", "type": "text"}], "options": null}], ""]''',
        '',
        # 38/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 \u0939\u0948\u0964\ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 39/43: after U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 \u0939\u0948\u0964 ", "type": "text"}], "options": null}], ""]''',
        '',
        # 40/43: ends in U+FFFD
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 \u0939\u0948\u0964 \ufffd", "type": "text"}], "options": null}], ""]''',
        '',
        # 41/43: last generating
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 \u0939\u0948\u0964 \ud83d\ude4f", "type": "text"}], "options": null}], ""]''',
        '',
        # 42/43: last generating
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 \u0939\u0948\u0964 \ud83d\ude4f\n\n<details style='opacity:0.6; font-size:0.85em'><summary>\ud83d\udd0d Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: hindi please. Let me think step by step.&lt;/think&gt;\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 \u0939\u0948\u0964 \ud83d\ude4f</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>\u23f1\ufe0f Latency: 0.09s | Processing time: 0.09s</div>", "type": "text"}], "options": null}], ""]''',
        '',
        # 43/43: complete
        'event: complete',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "hindi please", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\n\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 \u0939\u0948\u0964 \ud83d\ude4f\n\n<details style='opacity:0.6; font-size:0.85em'><summary>\ud83d\udd0d Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: hindi please. Let me think step by step.&lt;/think&gt;\u0928\u092e\u0938\u094d\u0924\u0947! \u092d\u093e\u0930\u0924 \u0915\u0940 \u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932\u0940 \u0939\u0948\u0964 \ud83d\ude4f</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>\u23f1\ufe0f Latency: 0.09s | Processing time: 0.09s</div>", "type": "text"}], "options": null}], ""]''',
        '',
    ),
    "call_crash.sse": _capture(  # whole: 1 event(s)
        'event: error',
        'data: {"error": "internal failure in model worker", "visible": true}',
        '',
    ),
    "call_history_messages_gradio6.sse": _capture(  # events 1-2, 21-23, 33, 88-90 of 90
        # 1/90: first
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe \n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 2/90: first
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 21/90: thought still open
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought' open><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: tell me the history. Let me think step by step.\n\n</details>", "type": "text"}], "options": null}], ""]''',
        '',
        # 22/90: thought closed
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: tell me the history. Let me think step by step.\n\n</details>\n\nSYST", "type": "text"}], "options": null}], ""]''',
        '',
        # 23/90: after the close
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: tell me the history. Let me think step by step.\n\n</details>\n\nSYSTEM=B", "type": "text"}], "options": null}], ""]''',
        '',
        # 33/90: 1 in 55 of the rest
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: tell me the history. Let me think step by step.\n\n</details>\n\nSYSTEM=Be terse. | HISTORY=[{\"content\": ", "type": "text"}], "options": null}], ""]''',
        '',
        # 88/90: last generating
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: tell me the history. Let me think step by step.\n\n</details>\n\nSYSTEM=Be terse. | HISTORY=[{\"content\": [{\"text\": \"Hi\", \"type\": \"text\"}], \"metadata\": null, \"options\": null, \"role\": \"user\"}, {\"content\": [{\"text\": \"Hello!\", \"type\": \"text\"}], \"metadata\": null, \"options\": null, \"role\": \"assistant\"}]", "type": "text"}], "options": null}], ""]''',
        '',
        # 89/90: last generating
        'event: generating',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: tell me the history. Let me think step by step.\n\n</details>\n\nSYSTEM=Be terse. | HISTORY=[{\"content\": [{\"text\": \"Hi\", \"type\": \"text\"}], \"metadata\": null, \"options\": null, \"role\": \"user\"}, {\"content\": [{\"text\": \"Hello!\", \"type\": \"text\"}], \"metadata\": null, \"options\": null, \"role\": \"assistant\"}]\n\n<details style='opacity:0.6; font-size:0.85em'><summary>\ud83d\udd0d Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: tell me the history. Let me think step by step.&lt;/think&gt;SYSTEM=Be terse. | HISTORY=[{&quot;content&quot;: [{&quot;text&quot;: &quot;Hi&quot;, &quot;type&quot;: &quot;text&quot;}], &quot;metadata&quot;: null, &quot;options&quot;: null, &quot;role&quot;: &quot;user&quot;}, {&quot;content&quot;: [{&quot;text&quot;: &quot;Hello!&quot;, &quot;type&quot;: &quot;text&quot;}], &quot;metadata&quot;: null, &quot;options&quot;: null, &quot;role&quot;: &quot;assistant&quot;}]</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>\u23f1\ufe0f Latency: 0.10s | Processing time: 0.10s</div>", "type": "text"}], "options": null}], ""]''',
        '',
        # 90/90: complete
        'event: complete',
        r'''data: [[{"role": "user", "metadata": null, "content": [{"text": "Hi", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "Hello!", "type": "text"}], "options": null}, {"role": "user", "metadata": null, "content": [{"text": "tell me the history", "type": "text"}], "options": null}, {"role": "assistant", "metadata": null, "content": [{"text": "<details class='thought'><summary>\ud83e\udde0 Thinking...</summary>\n\nThe user said: tell me the history. Let me think step by step.\n\n</details>\n\nSYSTEM=Be terse. | HISTORY=[{\"content\": [{\"text\": \"Hi\", \"type\": \"text\"}], \"metadata\": null, \"options\": null, \"role\": \"user\"}, {\"content\": [{\"text\": \"Hello!\", \"type\": \"text\"}], \"metadata\": null, \"options\": null, \"role\": \"assistant\"}]\n\n<details style='opacity:0.6; font-size:0.85em'><summary>\ud83d\udd0d Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: tell me the history. Let me think step by step.&lt;/think&gt;SYSTEM=Be terse. | HISTORY=[{&quot;content&quot;: [{&quot;text&quot;: &quot;Hi&quot;, &quot;type&quot;: &quot;text&quot;}], &quot;metadata&quot;: null, &quot;options&quot;: null, &quot;role&quot;: &quot;user&quot;}, {&quot;content&quot;: [{&quot;text&quot;: &quot;Hello!&quot;, &quot;type&quot;: &quot;text&quot;}], &quot;metadata&quot;: null, &quot;options&quot;: null, &quot;role&quot;: &quot;assistant&quot;}]</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>\u23f1\ufe0f Latency: 0.10s | Processing time: 0.10s</div>", "type": "text"}], "options": null}], ""]''',
        '',
    ),
    "queue_hindi_please.sse": _capture(  # whole: 45 events
        'data: {"msg":"estimation","event_id":"99d29560fdd3409a81ead51e353fdd9d","rank":0,"queue_size":1,"rank_eta":0.5411751800113254}',
        '',
        'data: {"msg":"process_starts","event_id":"99d29560fdd3409a81ead51e353fdd9d","eta":0.5411751800113254}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[{"role":"user","metadata":null,"content":[{"text":"hindi please","type":"text"}],"options":null},{"role":"assistant","metadata":null,"content":[{"text":"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe \n\n</details>","type":"text"}],"options":null}],""],"is_generating":true,"duration":0.0004925727844238281,"average_duration":0.0005596232664532634,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user\n\n</details>"]],[]],"is_generating":true,"duration":0.0005304813385009766,"average_duration":0.0005596216217821222,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user \n\n</details>"]],[]],"is_generating":true,"duration":0.0002880096435546875,"average_duration":0.0005596062937923802,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said\n\n</details>"]],[]],"is_generating":true,"duration":0.00038909912109375,"average_duration":0.0005595966720344264,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: \n\n</details>"]],[]],"is_generating":true,"duration":0.0002999305725097656,"average_duration":0.0005595820198450841,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hind\n\n</details>"]],[]],"is_generating":true,"duration":0.0002827644348144531,"average_duration":0.0005595664007295263,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi \n\n</details>"]],[]],"is_generating":true,"duration":0.00029087066650390625,"average_duration":0.0005595512407354942,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi plea\n\n</details>"]],[]],"is_generating":true,"duration":0.0002532005310058594,"average_duration":0.0005595339571975687,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. \n\n</details>"]],[]],"is_generating":true,"duration":0.0002593994140625,"average_duration":0.0005595170253154105,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let \n\n</details>"]],[]],"is_generating":true,"duration":0.0002665519714355469,"average_duration":0.0005595004988273482,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me \n\n</details>"]],[]],"is_generating":true,"duration":0.00025582313537597656,"average_duration":0.0005594833690121716,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me thin\n\n</details>"]],[]],"is_generating":true,"duration":0.00027489662170410156,"average_duration":0.0005594673169648306,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think \n\n</details>"]],[]],"is_generating":true,"duration":0.0002613067626953125,"average_duration":0.0005594505002387016,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step\n\n</details>"]],[]],"is_generating":true,"duration":0.0002658367156982422,"average_duration":0.0005594339408915389,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step \n\n</details>"]],[]],"is_generating":true,"duration":0.00026416778564453125,"average_duration":0.0005594172892924385,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by \n\n</details>"]],[]],"is_generating":true,"duration":0.0002834796905517578,"average_duration":0.0005594017286090381,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step\n\n</details>"]],[]],"is_generating":true,"duration":0.0002536773681640625,"average_duration":0.0005593844891616238,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>"]],[]],"is_generating":true,"duration":0.0003712177276611328,"average_duration":0.0005593738792511924,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस''' '\ufffd' '"]],[]],"is_generating":true,"duration":0.0002887248992919922,"average_duration":0.000559358619385385,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्"]],[]],"is_generating":true,"duration":0.0002548694610595703,"average_duration":0.0005593414524936713,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"ते!' '\ufffd' '"]],[]],"is_generating":true,"duration":0.0002903938293457031,"average_duration":0.0005593262902643813,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! "]],[]],"is_generating":true,"duration":0.0002944469451904297,"average_duration":0.0005593113582307224,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"भार' '\ufffd' '"]],[]],"is_generating":true,"duration":0.0002655982971191406,"average_duration":0.0005592948016883825,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत"]],[]],"is_generating":true,"duration":0.0002601146697998047,"average_duration":0.0005592779379190409,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0003018379211425781,"average_duration":0.0005592634277163142,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"की' '\ufffd' '"]],[]],"is_generating":true,"duration":0.00025844573974609375,"average_duration":0.0005592464735547874,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की "]],[]],"is_generating":true,"duration":0.000263214111328125,"average_duration":0.0005592297900357259,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"राज' '\ufffd' '"]],[]],"is_generating":true,"duration":0.0003135204315185547,"average_duration":0.0005592159433544908,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की राजध"]],[]],"is_generating":true,"duration":0.000324249267578125,"average_duration":0.0005592027028115078,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"ानी' '\ufffd' '"]],[]],"is_generating":true,"duration":0.0002727508544921875,"average_duration":0.0005591865619511754,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की राजधानी "]],[]],"is_generating":true,"duration":0.00026535987854003906,"average_duration":0.0005591700064698022,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"नई' '\ufffd' '"]],[]],"is_generating":true,"duration":0.0002701282501220703,"average_duration":0.0005591537215097285,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की राजधानी नई "]],[]],"is_generating":true,"duration":0.00028967857360839844,"average_duration":0.0005591385398112552,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"दिल' '\ufffd' '"]],[]],"is_generating":true,"duration":0.0002720355987548828,"average_duration":0.0005591223659088803,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की राजधानी नई दिल्"]],[]],"is_generating":true,"duration":0.0002884864807128906,"average_duration":0.0005591071205345453,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"ली' '\ufffd' '"]],[]],"is_generating":true,"duration":0.00026702880859375,"average_duration":0.000559090668199056,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की राजधानी नई दिल्ली "]],[]],"is_generating":true,"duration":0.0002510547637939453,"average_duration":0.0005590733179735066,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"है।' '\ufffd' '"]],[]],"is_generating":true,"duration":0.00026798248291015625,"average_duration":0.000559056923108113,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की राजधानी नई दिल्ली है। "]],[]],"is_generating":true,"duration":0.0002532005310058594,"average_duration":0.0005590396975847911,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"' '\ufffd' '"]],[]],"is_generating":true,"duration":0.0002701282501220703,"average_duration":0.000559023427299976,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की राजधानी नई दिल्ली है। 🙏"]],[]],"is_generating":true,"duration":0.0002827644348144531,"average_duration":0.0005590078704246249,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[["append",[1,"content",0,"text"],"\n\n<details style='opacity:0.6; font-size:0.85em'><summary>🔍 Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: hindi please. Let me think step by step.&lt;/think&gt;नमस्ते! भारत की राजधानी नई दिल्ली है। 🙏</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>⏱''' '\ufe0f' ' Latency: 0.03s | Processing time: 0.03s</div>"]],[]],"is_generating":true,"duration":0.0002086162567138672,"average_duration":0.000558988140056152,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_completed","event_id":"99d29560fdd3409a81ead51e353fdd9d","output":{"data":[[{"role":"user","metadata":null,"content":[{"text":"hindi please","type":"text"}],"options":null},{"role":"assistant","metadata":null,"content":[{"text":"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: hindi please. Let me think step by step.\n\n</details>\n\nनमस्ते! भारत की राजधानी नई दिल्ली है। 🙏\n\n<details style='opacity:0.6; font-size:0.85em'><summary>🔍 Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: hindi please. Let me think step by step.&lt;/think&gt;नमस्ते! भारत की राजधानी नई दिल्ली है। 🙏</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>⏱''' '\ufe0f' ' Latency: 0.03s | Processing time: 0.03s</div>","type":"text"}],"options":null}],""],"is_generating":false,"duration":0.00018739700317382812,"average_duration":0.0005589672171317779,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"title":null,"used_cache":null,"cache_duration":0.00018739700317382812,"avg_time":0.0005589672171317779}',
    ),
    "queue_show_formatting.sse": _capture(  # whole: 123 events
        'data: {"msg":"estimation","event_id":"33b61572aee84126a8f1cf03a8b572a7","rank":0,"queue_size":1,"rank_eta":0.530124166737432}',
        '',
        'data: {"msg":"process_starts","event_id":"33b61572aee84126a8f1cf03a8b572a7","eta":0.530124166737432}',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[{"role":"user","metadata":null,"content":[{"text":"show formatting","type":"text"}],"options":null},{"role":"assistant","metadata":null,"content":[{"text":"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe \n\n</details>","type":"text"}],"options":null}],""],"is_generating":true,"duration":0.00034689903259277344,"average_duration":0.0005589552770279246,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user\n\n</details>"]],[]],"is_generating":true,"duration":0.0002982616424560547,"average_duration":0.0005589405999851044,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user \n\n</details>"]],[]],"is_generating":true,"duration":0.00028252601623535156,"average_duration":0.0005589250387294748,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said\n\n</details>"]],[]],"is_generating":true,"duration":0.00027298927307128906,"average_duration":0.0005589089423679763,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: \n\n</details>"]],[]],"is_generating":true,"duration":0.0002491474151611328,"average_duration":0.0005588915057495014,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show\n\n</details>"]],[]],"is_generating":true,"duration":0.00026345252990722656,"average_duration":0.0005588748762900934,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show \n\n</details>"]],[]],"is_generating":true,"duration":0.00026035308837890625,"average_duration":0.0005588580742532886,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show form\n\n</details>"]],[]],"is_generating":true,"duration":0.0002684593200683594,"average_duration":0.0005588417303342102,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatti\n\n</details>"]],[]],"is_generating":true,"duration":0.00025963783264160156,"average_duration":0.0005588248918009392,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. \n\n</details>"]],[]],"is_generating":true,"duration":0.00030159950256347656,"average_duration":0.0005588104165398679,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let \n\n</details>"]],[]],"is_generating":true,"duration":0.0002624988555908203,"average_duration":0.0005587937426576469,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me \n\n</details>"]],[]],"is_generating":true,"duration":0.0002579689025878906,"average_duration":0.000558776815759151,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me thin\n\n</details>"]],[]],"is_generating":true,"duration":0.00025653839111328125,"average_duration":0.0005587598102775415,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me think \n\n</details>"]],[]],"is_generating":true,"duration":0.00026679039001464844,"average_duration":0.000558743383506963,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me think step\n\n</details>"]],[]],"is_generating":true,"duration":0.00027823448181152344,"average_duration":0.000558727602415447,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me think step \n\n</details>"]],[]],"is_generating":true,"duration":0.0002562999725341797,"average_duration":0.0005587105891599406,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by \n\n</details>"]],[]],"is_generating":true,"duration":0.0002696514129638672,"average_duration":0.0005586943288698919,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step\n\n</details>"]],[]],"is_generating":true,"duration":0.0002961158752441406,"average_duration":0.0005586795590164986,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought' open><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>"]],[]],"is_generating":true,"duration":0.00025463104248046875,"average_duration":0.0005586624574631752,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["replace",[1,"content",0,"text"],"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere"]],[]],"is_generating":true,"duration":0.00030517578125,"average_duration":0.0005586482006197437,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.000270843505859375,"average_duration":0.0005586320145393905,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"is "]],[]],"is_generating":true,"duration":0.0003800392150878906,"average_duration":0.000558621971079743,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"a "]],[]],"is_generating":true,"duration":0.0006129741668701172,"average_duration":0.0005586250274929349,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"list"]],[]],"is_generating":true,"duration":0.0004723072052001953,"average_duration":0.0005586201738142185,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],":"]],[]],"is_generating":true,"duration":0.00044918060302734375,"average_duration":0.0005586140203382113,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[],[]],"is_generating":true,"duration":0.0004317760467529297,"average_duration":0.0005586068890004409,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n\n1. "]],[]],"is_generating":true,"duration":0.00045871734619140625,"average_duration":0.0005586012731268922,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"Red"]],[]],"is_generating":true,"duration":0.0004718303680419922,"average_duration":0.0005585963950683648,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n2. "]],[]],"is_generating":true,"duration":0.00041294097900390625,"average_duration":0.0005585882071198538,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"Blue"]],[]],"is_generating":true,"duration":0.0004012584686279297,"average_duration":0.0005585793634021195,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[],[]],"is_generating":true,"duration":0.00040078163146972656,"average_duration":0.0005585704938764081,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n3. "]],[]],"is_generating":true,"duration":0.00044155120849609375,"average_duration":0.0005585639168032639,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"Gree"]],[]],"is_generating":true,"duration":0.00039839744567871094,"average_duration":0.0005585549151469314,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"n"]],[]],"is_generating":true,"duration":0.00039315223693847656,"average_duration":0.0005585456197283517,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[],[]],"is_generating":true,"duration":0.0005633831024169922,"average_duration":0.000558545891573403,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n\nAnd "]],[]],"is_generating":true,"duration":0.0003943443298339844,"average_duration":0.0005585366646931074,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"some"]],[]],"is_generating":true,"duration":0.0003750324249267578,"average_duration":0.0005585263537283512,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0004258155822753906,"average_duration":0.0005585188972292248,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"code"]],[]],"is_generating":true,"duration":0.0005867481231689453,"average_duration":0.0005585204832298955,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],":"]],[]],"is_generating":true,"duration":0.0004961490631103516,"average_duration":0.0005585169792175293,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[],[]],"is_generating":true,"duration":0.00041937828063964844,"average_duration":0.0005585091628758307,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n\n```h"]],[]],"is_generating":true,"duration":0.0004563331604003906,"average_duration":0.0005585034232958691,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"tml"]],[]],"is_generating":true,"duration":0.0003879070281982422,"average_duration":0.0005584938408437488,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n<div"]],[]],"is_generating":true,"duration":0.0003745555877685547,"average_duration":0.0005584835095556632,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0003960132598876953,"average_duration":0.0005584743845767434,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"clas"]],[]],"is_generating":true,"duration":0.0004367828369140625,"average_duration":0.0005584675502766388,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"s=\"b"]],[]],"is_generating":true,"duration":0.0004582405090332031,"average_duration":0.0005584619217574473,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"ox\">"]],[]],"is_generating":true,"duration":0.0004239082336425781,"average_duration":0.0005584543659573509,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"a "]],[]],"is_generating":true,"duration":0.0005276203155517578,"average_duration":0.0005584526345827423,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"< "]],[]],"is_generating":true,"duration":0.00043463706970214844,"average_duration":0.000558445682557763,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"b "]],[]],"is_generating":true,"duration":0.000606536865234375,"average_duration":0.0005584483826410081,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"&& "]],[]],"is_generating":true,"duration":0.0005307197570800781,"average_duration":0.0005584468259025418,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"c "]],[]],"is_generating":true,"duration":0.0004343986511230469,"average_duration":0.0005584398619899622,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"> "]],[]],"is_generating":true,"duration":0.0003979206085205078,"average_duration":0.0005584308511415582,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"d</d"]],[]],"is_generating":true,"duration":0.0003705024719238281,"average_duration":0.0005584203022569544,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"iv>"]],[]],"is_generating":true,"duration":0.00040435791015625,"average_duration":0.0005584116548393466,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n```"]],[]],"is_generating":true,"duration":0.00042557716369628906,"average_duration":0.0005584041993478978,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[],[]],"is_generating":true,"duration":0.00041747093200683594,"average_duration":0.0005583962897470816,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n\n```p"]],[]],"is_generating":true,"duration":0.0004024505615234375,"average_duration":0.0005583875380927675,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"ytho"]],[]],"is_generating":true,"duration":0.00038433074951171875,"average_duration":0.0005583777705962141,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"n"]],[]],"is_generating":true,"duration":0.00039649009704589844,"average_duration":0.0005583686865002852,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\ndef "]],[]],"is_generating":true,"duration":0.0004563331604003906,"average_duration":0.0005583629612435182,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"f(x)"]],[]],"is_generating":true,"duration":0.0004477500915527344,"average_duration":0.0005583567550565861,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],":"]],[]],"is_generating":true,"duration":0.00045108795166015625,"average_duration":0.0005583507368337744,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n "]],[]],"is_generating":true,"duration":0.0003910064697265625,"average_duration":0.0005583413486560966,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0004055500030517578,"average_duration":0.0005583327773924589,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0007882118225097656,"average_duration":0.0005583456723857342,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0004334449768066406,"average_duration":0.0005583386665131977,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"if "]],[]],"is_generating":true,"duration":0.0004069805145263672,"average_duration":0.0005583301770773357,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"x:"]],[]],"is_generating":true,"duration":0.00038242340087890625,"average_duration":0.0005583203113018898,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n "]],[]],"is_generating":true,"duration":0.00040721893310546875,"average_duration":0.0005583118372186529,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.00033545494079589844,"average_duration":0.0005582993396358567,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.00032830238342285156,"average_duration":0.0005582864423692043,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0003464221954345703,"average_duration":0.0005582745625751629,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0003380775451660156,"average_duration":0.0005582622162327233,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.00032901763916015625,"average_duration":0.0005582493633185569,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0004780292510986328,"average_duration":0.0005582448659192061,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.00032329559326171875,"average_duration":0.0005582316946403263,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"retu"]],[]],"is_generating":true,"duration":0.00034308433532714844,"average_duration":0.000558219634134731,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"rn "]],[]],"is_generating":true,"duration":0.00034928321838378906,"average_duration":0.0005582079224522339,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"x "]],[]],"is_generating":true,"duration":0.0003185272216796875,"average_duration":0.000558194488188416,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"* "]],[]],"is_generating":true,"duration":0.0003314018249511719,"average_duration":0.0005581817770202042,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"2"]],[]],"is_generating":true,"duration":0.00034618377685546875,"average_duration":0.0005581698957222069,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n "]],[]],"is_generating":true,"duration":0.0004436969757080078,"average_duration":0.0005581634805170952,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.00042557716369628906,"average_duration":0.0005581560506310307,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0004055500030517578,"average_duration":0.0005581474993563709,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.00038623809814453125,"average_duration":0.0005581378669587011,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"retu"]],[]],"is_generating":true,"duration":0.00040221214294433594,"average_duration":0.0005581291306451637,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"rn "]],[]],"is_generating":true,"duration":0.00040531158447265625,"average_duration":0.000558120568958449,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"None"]],[]],"is_generating":true,"duration":0.0004754066467285156,"average_duration":0.0005581159351252708,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[],[]],"is_generating":true,"duration":0.0004482269287109375,"average_duration":0.0005581097792232814,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n```"]],[]],"is_generating":true,"duration":0.0004355907440185547,"average_duration":0.0005581029161807536,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[],[]],"is_generating":true,"duration":0.0004360675811767578,"average_duration":0.0005580960806161423,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n\nMath"]],[]],"is_generating":true,"duration":0.0005156993865966797,"average_duration":0.000558093705983342,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],": "]],[]],"is_generating":true,"duration":0.000423431396484375,"average_duration":0.0005580861639889707,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"3 "]],[]],"is_generating":true,"duration":0.0004096031188964844,"average_duration":0.0005580778484062482,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"< "]],[]],"is_generating":true,"duration":0.00040912628173828125,"average_duration":0.0005580695070517839,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"5 "]],[]],"is_generating":true,"duration":0.00046634674072265625,"average_duration":0.0005580643708234085,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"and "]],[]],"is_generating":true,"duration":0.0004134178161621094,"average_duration":0.0005580562714586814,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"7 "]],[]],"is_generating":true,"duration":0.0004153251647949219,"average_duration":0.0005580482797953744,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"> "]],[]],"is_generating":true,"duration":0.0004296302795410156,"average_duration":0.0005580410899403687,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"2; "]],[]],"is_generating":true,"duration":0.0004189014434814453,"average_duration":0.0005580333002389658,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"AT&T"]],[]],"is_generating":true,"duration":0.00041961669921875,"average_duration":0.0005580255514509112,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"; "]],[]],"is_generating":true,"duration":0.0004215240478515625,"average_duration":0.0005580179103009112,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"'quo"]],[]],"is_generating":true,"duration":0.0003490447998046875,"average_duration":0.0005580062129535563,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"tes'"]],[]],"is_generating":true,"duration":0.0004367828369140625,"average_duration":0.0005579994278099293,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}''',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0004203319549560547,"average_duration":0.0005579917226846787,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\"dou"]],[]],"is_generating":true,"duration":0.0004277229309082031,"average_duration":0.0005579844320650359,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"ble\""]],[]],"is_generating":true,"duration":0.00042438507080078125,"average_duration":0.0005579769554652673,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.00034356117248535156,"average_duration":0.0005579649568204448,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0003514289855957031,"average_duration":0.0005579533997743239,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"two "]],[]],"is_generating":true,"duration":0.0003380775451660156,"average_duration":0.0005579410969624054,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.0003135204315185547,"average_duration":0.0005579274215489077,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"spac"]],[]],"is_generating":true,"duration":0.00035834312438964844,"average_duration":0.0005579162553691405,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"es."]],[]],"is_generating":true,"duration":0.0003447532653808594,"average_duration":0.0005579043301669034,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\nTrai"]],[]],"is_generating":true,"duration":0.00042748451232910156,"average_duration":0.000557897034361475,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"ling"]],[]],"is_generating":true,"duration":0.0004131793975830078,"average_duration":0.000557888939175662,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"]," "]],[]],"is_generating":true,"duration":0.00036835670471191406,"average_duration":0.0005578783377529938,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        'data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"line"]],[]],"is_generating":true,"duration":0.0003559589385986328,"average_duration":0.0005578670440900845,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_generating","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[["append",[1,"content",0,"text"],"\n\n<details style='opacity:0.6; font-size:0.85em'><summary>🔍 Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: show formatting. Let me think step by step.&lt;/think&gt;Here is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n&lt;div class=&quot;box&quot;&gt;a &lt; b &amp;&amp; c &gt; d&lt;/div&gt;\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 &lt; 5 and 7 &gt; 2; AT&amp;T; &#x27;quotes&#x27; &quot;double&quot;  two  spaces.\nTrailing line</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>⏱''' '\ufe0f' ' Latency: 0.12s | Processing time: 0.12s</div>"]],[]],"is_generating":true,"duration":0.00040793418884277344,"average_duration":0.000557858658583639,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"time_limit":null}',
        '',
        r'''data: {"msg":"process_completed","event_id":"33b61572aee84126a8f1cf03a8b572a7","output":{"data":[[{"role":"user","metadata":null,"content":[{"text":"show formatting","type":"text"}],"options":null},{"role":"assistant","metadata":null,"content":[{"text":"<details class='thought'><summary>🧠 Thinking...</summary>\n\nThe user said: show formatting. Let me think step by step.\n\n</details>\n\nHere is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n<div class=\"box\">a < b && c > d</div>\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 < 5 and 7 > 2; AT&T; 'quotes' \"double\"  two  spaces.\nTrailing line\n\n<details style='opacity:0.6; font-size:0.85em'><summary>🔍 Debug: Raw Response</summary>\n\n<pre>&lt;think&gt;The user said: show formatting. Let me think step by step.&lt;/think&gt;Here is a list:\n\n1. Red\n2. Blue\n3. Green\n\nAnd some code:\n\n```html\n&lt;div class=&quot;box&quot;&gt;a &lt; b &amp;&amp; c &gt; d&lt;/div&gt;\n```\n\n```python\ndef f(x):\n    if x:\n        return x * 2\n    return None\n```\n\nMath: 3 &lt; 5 and 7 &gt; 2; AT&amp;T; &#x27;quotes&#x27; &quot;double&quot;  two  spaces.\nTrailing line</pre>\n\n</details>\n<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; margin-top:8px; padding-top:4px'>⏱''' '\ufe0f' ' Latency: 0.12s | Processing time: 0.12s</div>","type":"text"}],"options":null}],""],"is_generating":false,"duration":0.0003790855407714844,"average_duration":0.0005578486606462857,"render_config":null,"changed_state_ids":[],"used_cache":null},"success":true,"title":null,"used_cache":null,"cache_duration":0.0003790855407714844,"avg_time":0.0005578486606462857}',
    ),
}

try:
    import tokenizers
    from tokenizers import (AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers,
                            trainers)
except ImportError:  # pragma: no cover
    tokenizers = None


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "tags": {
    "type": "array", "items": {"type": "string"}}}, "required": ["x", "tags"]}


class QuickStop:
    """A server whose ``stop()`` waits at most 5 ms for its loop to notice, not the 50 ms
    it polls at in the product: the suite starts and stops some 280 servers."""

    def serve_forever(self, poll_interval=0.5):
        super().serve_forever(0.005)


class Gateway(QuickStop, bg.GatewayServer):
    """The gateway, as the tests run it."""


class _DemoGateway(unittest.TestCase):
    """A fast demo upstream and a gateway in front of it, shared by a class's tests."""

    @classmethod
    def setUpClass(cls):
        cls.demo = FakeGradio().start()
        cls.gw = Gateway(bg.Config(upstream=cls.demo.url, port=0, timeout=10)).start()

    @classmethod
    def tearDownClass(cls):
        cls.gw.stop()
        cls.demo.stop()


# -- real sockets ---------------------------------------------------------------------------

def scripted_server(test, serve):
    """A raw TCP server on a free loopback port; ``serve(listener)`` runs on a thread.
    Returns ``(port, thread)``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)
    test.addCleanup(listener.close)
    thread = threading.Thread(target=serve, args=(listener,), daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


# Answers that talk about HTML, the app's own markup included: they must come through whole.
HTML_ANSWERS = {
    "style please": "Style:\n```html\n<div style='color:#666; font-size:0.85em'>not latency"
                    "</div>\n```",
    "debug tag please": "A <details style='opacity:0.6'> tag is how the debug block starts.",
    "unclosed please": "The tag <div is not closed and <span neither",
}


# -- a Gradio emulator: the demo upstream, as Gradio 4, 5 or 6, with faults ---------------------

VERSIONS = {4: "4.44.1", 5: "5.50.0", 6: "6.31.0"}
SLIDERS = {"temperature": (0, 2), "max_tokens": (1, 8192), "top_p": (0, 1), "top_k": (1, 100)}


class FakeGradio(QuickStop, bg.DemoUpstream):
    """The product's demo upstream made into the Gradio versions and app shapes the tests
    need: ``version`` 4, 5 or 6 (API prefix, history format, error shapes),
    ``chat_interface`` (a string reply, history kept in a State), ``queue`` (the queue
    protocol or only ``/call``), ``replay`` (a prompt -> a captured event stream, sent
    verbatim), and faults named in the prompt: ``[[error]]``, ``[[error-null]]``,
    ``[[fail-midstream]]``, ``[[drop]]``, ``[[hang]]`` (no output), ``[[stall]]`` (silent
    after some output), ``[[malformed]]``, ``[[busy]]`` (a full queue).  It counts what
    it saw: ``calls``, ``cancels``, ``auth_seen``, ``accepted`` (connections) and
    ``active_streams``.  While ``gate`` (an Event the test sets) is clear, every stream
    waits before its next token: a test acts while streams run, then lets them finish."""

    def __init__(self, host="127.0.0.1", port=0, *, token_delay=0.0, version=6,
                 chat_interface=False, queue=True, replay=None, gate=None):
        self.gate = gate
        self.major, self.version = version, VERSIONS[version]
        self.chat_interface = chat_interface
        self.prefix = "" if version == 4 else "/gradio_api"
        self.endpoint = ("respond" if version == 6 else "chat") if chat_interface else "chat_fn_1"
        self.replay = dict(replay or {})
        self.auth_seen, self.accepted, self.active_streams = [], 0, 0
        self.calls, self.cancels = [], []
        super().__init__(host, port, token_delay=token_delay, queue=queue)

    def verify_request(self, request, client_address):
        self.accepted += 1
        return super().verify_request(request, client_address)

    def _pace(self, job):
        gate, deadline = self.gate, time.monotonic() + TIMEOUT   # the gate, then the delay
        while gate is not None and not gate.wait(0.01):
            if job.cancelled.is_set() or time.monotonic() > deadline:
                break
        return super()._pace(job)

    def reply(self, message, history, system, params):
        if message in HTML_ANSWERS:
            return thought_of(message), HTML_ANSWERS[message]
        return super().reply(message, history, system, params)

    def _inputs(self):
        if self.chat_interface:
            return [(2, "textbox", "message", None), (3, "state", "", None),
                    (4, "textbox", "system_prompt", "You are a friendly bot."),
                    (5, "slider", "temperature", 0.7)]
        return super()._inputs()

    def info_json(self):
        info = super().info_json()
        if self.chat_interface:
            del info["named_endpoints"]["/chat_fn"]
        return info

    def submit(self, body, queue, headers):
        data = body["data"]
        with self.lock:
            self.auth_seen.append(headers.get("Authorization"))
        if data and isinstance(data[0], str) and "[[busy]]" in data[0]:
            return 503, {"detail": "Queue is full. Max size is 0 and size is 0."}
        with self.lock:
            self.calls.append(data)
        return super().submit(body, queue, headers)

    def cancel(self, body):
        with self.lock:
            self.cancels.append(body)
        super().cancel(body)

    def _check_sliders(self, values):
        for name, (lo, hi) in SLIDERS.items():       # Gradio 5 and later refuse these
            value = values.get(name)
            if self.major < 5 or not isinstance(value, (int, float)):
                continue
            if value > hi:
                return "Value %s is greater than maximum value %s." % (value, hi)
            if value < lo:
                return "Value %s is less than minimum value %s." % (value, lo)
        return None

    def _check_history(self, history):
        if self.chat_interface or history is None:
            return None
        if not isinstance(history, list):
            return "chat_history must be a list"
        for item in history:
            if self.major == 4:
                ok = isinstance(item, list) and len(item) == 2
            else:
                content = item.get("content") if isinstance(item, dict) else None
                ok = isinstance(content, list if self.major == 6 else str)
            if not ok:
                return ("1 validation error for ChatbotDataMessages: %r is not a valid %s "
                        "message" % (item, {4: "pair", 5: "string-content", 6: "content-list"}
                                     [self.major]))
        return None

    def _values(self, job):
        layout = self._inputs()
        if not (job.queue or self.major < 6):          # /call wants no State from 6.18 on
            layout = [x for x in layout if x[1] != "state"]
        return {name: value for (_, _, name, _), value in zip(layout, job.data) if name}

    def _steps(self, job):
        if job.endpoint == "embed":
            yield from super()._steps(job)
            return
        needed = len(self._inputs()) - (0 if job.queue or self.major < 6 else
                                         sum(1 for x in self._inputs() if x[1] == "state"))
        if len(job.data) < needed:
            yield "error", ("An event handler (%s) didn't receive enough input values "
                            "(needed: %d, got: %d)." % (self.endpoint, needed, len(job.data)))
            return
        values = self._values(job)
        message = values["message"] if isinstance(values["message"], str) else ""
        problem = self._check_history(values.get("chat_history") or []) or \
            self._check_sliders(values)
        if problem:
            yield "error", problem
            return
        for fault, step in (("error", ("error", "Model is overloaded, try again")),
                            ("error-null", ("error", None)), ("malformed", ("malformed", b"data: {not json\n\n")),
                            ("hang", ("drop", None))):
            if "[[%s]]" % fault in message:
                if fault == "hang":
                    job.cancelled.wait(30)
                yield step
                return
        n_thought = len(list(bg._demo_tokens(thought_of(message[:200]))))
        for i, step in enumerate(super()._steps(job)):
            yield step
            if i == n_thought + 3:
                if "[[fail-midstream]]" in message:
                    yield "error", "error after output began"
                    return
                if "[[drop]]" in message:
                    yield "drop", None
                    return
                if "[[stall]]" in message:
                    job.cancelled.wait(30)
                    yield "drop", None
                    return

    def _chat(self, history, message):
        if self.major == 4:
            return [list(p) for p in history] + [[message, None]]
        if self.major == 5:
            return [{"role": h["role"], "metadata": None, "content": h["content"], "options": None}
                    for h in history] + [{"role": "user", "metadata": None, "content": message,
                                          "options": None}]
        return super()._chat(history, message)

    def _output(self, chat, text):
        if self.chat_interface:
            return [text, None]
        if self.major == 4:
            return [chat[:-1] + [[chat[-1][0], text]], ""]
        if self.major == 5:
            return [chat + [{"role": "assistant", "metadata": None, "content": text,
                             "options": None}], ""]
        return super()._output(chat, text)

    def _reply_path(self, output):
        if self.chat_interface:
            return []
        if self.major == 4:
            return [len(output[0]) - 1, 1]
        if self.major == 5:
            return [len(output[0]) - 1, "content"]
        return super()._reply_path(output)

    def _replay(self, job):
        """The captured stream for the job's prompt, if one was given, paced."""
        message = job.data[0] if job.data and isinstance(job.data[0], str) else None
        capture = self.replay.get(message)
        return None if capture is None else self._paced(job, capture)

    def _paced(self, job, capture):
        for raw in capture.split(b"\n\n"):
            if raw.strip():
                self._pace(job)
                yield raw + b"\n\n"

    def _counted(self, events):
        with self.lock:
            self.active_streams += 1
        try:
            yield from events
        finally:
            with self.lock:
                self.active_streams -= 1

    def call_events(self, job):
        return self._counted(self._replay(job) or self._call_events(job))

    def _call_events(self, job):
        for kind, value in self._steps(job):
            if kind == "output":
                yield b"event: generating\ndata: " + json.dumps(value).encode() + b"\n\n"
            elif kind == "done":
                yield b"event: complete\ndata: " + json.dumps(value).encode() + b"\n\n"
            elif kind == "error":
                payload = {"error": value, "visible": True} if self.major == 6 else None
                yield b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
            elif kind == "malformed":
                yield b"event: generating\ndata: {not json\n\n"
            else:
                yield None

    def queue_events(self, job):
        return self._counted(self._replay(job) or super().queue_events(job))


class HeldGradio(FakeGradio):
    """The demo upstream, whose long answers ("600 words") each send their first ``OPEN``
    tokens (the thought, a few words) and then wait, before each next token, until
    ``release`` (an Event the test sets) is set: a test sees a stream's first text, acts
    while the stream runs, then lets it finish.  Other answers are never held."""

    OPEN = 16

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.release = threading.Event()

    def _pace(self, job):
        job.paced = getattr(job, "paced", 0) + 1
        if job.paced > self.OPEN and any(re.search(r"\d+ words", str(v)) for v in job.data):
            release, deadline = self.release, time.monotonic() + TIMEOUT
            while not release.wait(0.01) and not job.cancelled.is_set():
                if time.monotonic() > deadline:
                    break
        return super()._pace(job)


def gradio_client(test, *args, **kwargs):
    client = bg.GradioClient(*args, **kwargs)
    test.addCleanup(client.close)
    return client


def wait_until(predicate, timeout=TIMEOUT):
    """Whether ``predicate()`` came true within ``timeout`` seconds (asked every 5 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def at_once(*calls):
    """Each call run in a thread of its own, side by side (their timeouts overlap): what
    each returned, or raised, in order."""
    out = [None] * len(calls)

    def run(i, call):
        try:
            out[i] = call()
        except BaseException as exc:           # returned, for the test to assert on
            out[i] = exc
    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    return out


def wait_until_stalled(sock):
    """Whether the bytes waiting on ``sock`` (which is not read) stopped growing, within
    TIMEOUT: its buffers and the sender's are full, and the sender waits."""
    import fcntl
    import struct
    import termios
    sizes = []

    def stalled():
        sizes.append(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])
        return len(sizes) > 10 and sizes[-1] == sizes[-11] > 0     # the same for 50 ms
    return wait_until(stalled)


def start_demo(test, **kwargs):
    demo = FakeGradio(**kwargs).start()
    test.addCleanup(demo.stop)
    return demo


def start_gateway(test, upstream, **kwargs):
    kwargs.setdefault("timeout", 10)
    upstream = [upstream] if isinstance(upstream, str) else upstream
    gw = Gateway(bg.Config(upstream=upstream, port=0, **kwargs)).start()
    test.addCleanup(gw.stop)
    return gw


def request(url, method, path, body=None, headers=None, raw=None):
    """(status, headers, body bytes) of one request on a fresh connection."""
    parts = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(parts[0], int(parts[1]), timeout=TIMEOUT)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=dict({"Content-Type": "application/json"},
                                                           **(headers or {})))
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def sse_events(body):
    """The data payloads of an SSE body, JSON-decoded except [DONE]."""
    out = []
    for block in body.decode("utf-8").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat(gw, content, stream=False, headers=None, **extra):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    body = dict({"model": bg.DEFAULT_MODEL, "messages": messages, "stream": stream}, **extra)
    return request(gw.url, "POST", "/v1/chat/completions", body, headers)


def streamed_text(events, field="content", index=0):
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in events
                   if c != "[DONE]" and c["choices"] and c["choices"][0]["index"] == index)


class PlainChatInterface(FakeGradio):
    """A ``gr.ChatInterface(fn)`` with no extra inputs: message and its State."""

    def __init__(self, **kwargs):
        super().__init__(chat_interface=True, **kwargs)

    def _inputs(self):
        return super()._inputs()[:2]


class _UploadHandler(bg._DemoHandler):
    def do_POST(self):
        if self.path.endswith("/upload"):                 # Gradio's upload route
            self.server.uploads.append(self.read_body(1 << 24))
            self.send_json(200, ["/tmp/gradio/upload/image.png"])
        else:
            super().do_POST()


class ImageGradio(FakeGradio):
    """A Param-shaped app whose message input is a MultimodalTextbox (text and images),
    with a max_tokens slider up to 512; ``uploads`` holds the bodies it was sent."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.RequestHandlerClass, self.uploads = _UploadHandler, []

    def info_json(self):
        info = super().info_json()
        for name, endpoint in info["named_endpoints"].items():
            if name == "/embed":
                continue
            endpoint["parameters"][0]["component"] = "MultimodalTextbox"
            endpoint["parameters"][4]["type"]["description"] = "numeric value between 1 and 512"
        return info

    def _values(self, job):
        values = super()._values(job)
        if isinstance(values.get("message"), dict):
            values["message"] = values["message"]["text"]
        return values


def raw_exchange(port, data, shut_write=False, timeout=TIMEOUT):
    """Send raw bytes; return everything the server answers until it closes or goes quiet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)
    finally:
        sock.close()


def _complete(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length: (\d+)", head)
    return m is not None and len(body) >= int(m.group(1))


def parse_response(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    return status, head.decode("latin-1"), body


def wait_for_logs(logs, count):
    """The server logs a request after answering it: wait for its line."""
    deadline = time.monotonic() + TIMEOUT
    while len(logs.records) < count and time.monotonic() < deadline:
        time.sleep(0.01)
CHAT_72 = b'{"messages":[{"role":"user","content":"Say hello, please. Thank you."}]}'   # 72 bytes


def drain(test, sock, timeout=5.0):
    """Everything the server sends on ``sock`` until it closes; fails the test if it has
    not closed within ``timeout`` seconds.  A reset counts as a close (Linux resets a
    connection closed with unread bytes, after the bytes already sent)."""
    deadline = time.monotonic() + timeout
    chunks = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                test.fail("the server did not close the connection within %ss; it sent %r"
                          % (timeout, b"".join(chunks)[:300]))
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks)


def read_until_close(test, port, data, timeout=5.0):
    """Send ``data`` in one write on a fresh connection; everything answered until close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
    except OSError:                       # answered and closed before all was taken
        pass
    return drain(test, sock, timeout)


def split_responses(raw):
    """``[(status, head text, body bytes)]``: the responses in ``raw``, framed by their
    Content-Length (a body without one runs to the end)."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
        status = int(match.group(1)) if match else None
        if not sep or status is None:
            out.append((status, head.decode("latin-1"), rest))
            break
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        if 100 <= status < 200 or status in (204, 304):
            length = 0
        if length is None:
            length = len(rest)
        out.append((status, head.decode("latin-1"), rest[:length]))
        raw = rest[length:]
    return out


# -- security: a misbehaving upstream --------------------------------------------------

FAKE_CONFIG = {"version": "6.31.0", "api_prefix": "/gradio_api", "protocol": "sse_v3",
               "dependencies": [{"id": 0, "api_name": "chat_fn_1", "inputs": [1], "outputs": [2]}],
               "components": [{"id": 1, "type": "textbox"}, {"id": 2, "type": "textbox"}]}
FAKE_INFO = {"named_endpoints": {"/chat_fn_1": {"parameters": [
    {"parameter_name": "message", "component": "Textbox"}]}}}
FAKE_STREAM_BYTES = 100 << 20      # no stream the fake sends goes beyond this ...
FAKE_STREAM_SECONDS = 15           # ... or lasts longer than this
FAKE_LIFETIME = 30                 # and the fake serves nothing after this
BIG = 40 << 20                     # the size of the "big" events
PIECE = b"a" * 65536


class _Gone(Exception):
    """The peer closed, the fake is stopping, or its time is up."""


class FaultyGradio:
    """A Gradio 6 app (queue protocol, one Textbox in and out) on a raw socket, that
    misbehaves as ``behaviour`` says:

    - ``"hello"``: behaves, answers ``text`` (process_generating whole, then an append diff,
      then process_completed); connections are kept alive as uvicorn does
    - ``"flood"``: the event stream sends append diffs as fast as the reader takes them
      (past FAKE_STREAM_BYTES, one diff every 0.1 s, so that a reader that reads ahead
      still sees a live stream)
    - ``"big_line"``: one event whose data line is 40 MB, then a normal end
    - ``"big_run"``: 40 MB without any newline, then the end of the stream
    - ``"continue_forever"``: the join is answered with "100 Continue" heads, fast, forever
    - ``"drip_head"``: the join's response head comes one byte every 0.1 s
    - ``"endless_config"`` / ``"huge_config"``: /config is an endless chunked body, or says
      Content-Length 300 MB and streams it
    - ``"drop_join"``: every join is read whole, then the connection closed without a word
    - ``"drop_second_join"``: the second join only
    - ``"trickle"``: some output, then one byte of an event every 0.2 s, never ending it
    - ``"heartbeats"``: some output, then heartbeat events as fast as the reader takes them

    Every stream stops after FAKE_STREAM_BYTES (then holds the connection open, silent) or
    FAKE_STREAM_SECONDS, or when its reader is gone; ``ended`` says which ("peer", "limit",
    "stop", "done"), ``peer_gone`` is set when a reader went away, ``sent`` counts bytes.
    ``joins`` holds the join bodies received, ``log`` the requests as (connection number,
    method, path).  Stopped (threads joined) at the test's cleanup."""

    def __init__(self, test, behaviour, text=HELLO):
        self.behaviour, self.text = behaviour, text
        self.joins, self.log, self.ended, self.threads = [], [], [], []
        self.sent = 0                         # bytes sent, all connections together
        self.peer_gone, self.stopping = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.born = time.monotonic()
        port, accepter = scripted_server(test, self._accept)
        with self.lock:
            self.threads.append(accepter)
        self.url = "http://127.0.0.1:%d" % port
        test.addCleanup(self.stop)          # runs before scripted_server closes the listener

    def stop(self):
        self.stopping.set()
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(2)

    # -- sockets, every wait bounded -------------------------------------------------------

    def _accept(self, listener):
        listener.settimeout(0.02)
        for number in range(200):                                     # connections
            while True:
                if self.stopping.is_set() or time.monotonic() > self.born + FAKE_LIFETIME:
                    return
                try:
                    conn, _ = listener.accept()
                    break
                except socket.timeout:
                    continue
                except OSError:
                    return
            thread = threading.Thread(target=self._connection, args=(conn, number), daemon=True)
            with self.lock:
                self.threads.append(thread)
            thread.start()

    def _recv(self, conn):
        while True:
            if self.stopping.is_set() or time.monotonic() > self.born + FAKE_LIFETIME:
                raise _Gone()
            try:
                if not select.select([conn], [], [], 0.02)[0]:
                    continue
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                raise _Gone() from None
            if not data:
                raise _Gone()
            return data

    def _send(self, conn, data, deadline):
        """Send all of ``data``: None, or why not ("peer", "limit", "stop")."""
        view = memoryview(data)
        while view:
            if self.stopping.is_set():
                return "stop"
            if time.monotonic() > deadline:
                return "limit"
            try:
                if select.select([], [conn], [], 0.02)[1]:
                    count = conn.send(view)
                    view = view[count:]
                    with self.lock:
                        self.sent += count
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return "peer"
        return None

    def _stall(self, conn, end):
        """Say nothing more, keep the connection open: "peer" if the reader goes away
        first, else "limit" or "stop" (an early close would only end a gateway's read)."""
        while not self.stopping.is_set() and time.monotonic() < end:
            try:
                if select.select([conn], [], [], 0.02)[0] and not conn.recv(65536):
                    return "peer"
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return "peer"
        return "stop" if self.stopping.is_set() else "limit"

    def _end(self, reason):
        with self.lock:
            self.ended.append(reason)
        if reason == "peer":
            self.peer_gone.set()
        return False                     # the connection is done

    # -- HTTP ------------------------------------------------------------------------------

    def _connection(self, conn, number):
        conn.setblocking(False)
        buf = b""
        with conn:
            try:
                for _ in range(50):                                  # requests per connection
                    while b"\r\n\r\n" not in buf:
                        if len(buf) > 65536:
                            return
                        buf += self._recv(conn)
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, target = (lines[0].split(" ") + [""])[:2]
                    fields = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        fields[name.strip().lower()] = value.strip()
                    if "chunked" in fields.get("transfer-encoding", "").lower():
                        body = b""
                        while True:
                            while b"\r\n" not in buf:
                                buf += self._recv(conn)
                            size_line, _, buf = buf.partition(b"\r\n")
                            size = int(size_line.split(b";")[0], 16)
                            while len(buf) < size + 2:
                                buf += self._recv(conn)
                            body, buf = body + buf[:size], buf[size + 2:]
                            if size == 0:
                                break
                    else:
                        length = int(fields.get("content-length") or 0)
                        while len(buf) < length:
                            buf += self._recv(conn)
                        body, buf = buf[:length], buf[length:]
                    with self.lock:
                        self.log.append((number, method, target))
                    if not self._answer(conn, method, target, body):
                        return
            except _Gone:
                return

    def _json(self, conn, value, status="200 OK"):
        data = json.dumps(value).encode()
        return self._send(conn, b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (status.encode(), len(data), data),
                          time.monotonic() + 5) is None

    def _answer(self, conn, method, target, body):
        path, _, query = target.partition("?")
        how, end = self.behaviour, time.monotonic() + FAKE_STREAM_SECONDS
        if method == "GET" and path == "/config":
            if how in ("endless_config", "huge_config"):
                return self._end(self._big_config(conn, end, chunked=how == "endless_config"))
            return self._json(conn, FAKE_CONFIG)
        if method == "GET" and path == "/gradio_api/info":
            return self._json(conn, FAKE_INFO)
        if method == "POST" and path == "/gradio_api/queue/join":
            try:
                join = json.loads(body)
            except ValueError:
                join = body
            with self.lock:
                self.joins.append(join)
                count = len(self.joins)
            if how == "drop_join" or (how == "drop_second_join" and count == 2):
                return False                                         # closed without a word
            answer = json.dumps({"event_id": "e%d" % count}).encode()
            answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
            if how == "continue_forever":
                return self._end(self._repeat(conn, b"HTTP/1.1 100 Continue\r\n\r\n" * 2000, end))
            if how == "drip_head":
                return self._end(self._drip(conn, answer, end))
            return self._send(conn, answer, end) is None
        if method == "GET" and path == "/gradio_api/queue/data":
            return self._events(conn, query, end)
        if method == "POST" and path == "/gradio_api/cancel":
            return self._json(conn, {"success": True})
        return self._json(conn, {"detail": "Not Found"}, "404 Not Found")

    # -- the misbehaviours, each bounded -----------------------------------------------------

    def _repeat(self, conn, data, end, sent=0, trickle=None):
        """Send ``data`` again and again up to FAKE_STREAM_BYTES; then stall, or send
        ``trickle`` ten times a second (a stream that goes on, but costs nothing)."""
        while sent < FAKE_STREAM_BYTES:
            why = self._send(conn, data, end)
            if why:
                return why
            sent += len(data)
        if trickle is None:
            return self._stall(conn, end)
        while not self.stopping.wait(0.1):
            why = self._send(conn, trickle, end)
            if why:
                return why
        return "stop"

    def _chunks(self, conn, data, end, sent=0, trickle=None):
        """Send ``data`` as one chunk after another, endlessly (bounded)."""
        return self._repeat(conn, b"%x\r\n%s\r\n" % (len(data), data), end, sent,
                            trickle and b"%x\r\n%s\r\n" % (len(trickle), trickle))

    def _drip(self, conn, data, end):
        for i in range(len(data)):
            why = self._send(conn, data[i:i + 1], end)
            if why:
                return why
            if self.stopping.wait(0.1):
                return "stop"
        return "done"

    def _big_config(self, conn, end, chunked):
        if chunked:
            start = b'{"version": "6.31.0", "api_prefix": "/gradio_api", "pad": "'
            why = self._send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n"
                             % (len(start), start), end)
            return why or self._chunks(conn, PIECE, end)
        why = self._send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 300000000\r\n\r\n{\"pad\": \"", end)
        return why or self._repeat(conn, PIECE, end)

    def _events(self, conn, query, end):
        session = urllib.parse.parse_qs(query).get("session_hash", [""])[0]
        event_id, wait_until = None, time.monotonic() + 2
        while event_id is None and time.monotonic() < wait_until and not self.stopping.is_set():
            with self.lock:                  # the join that named this session
                event_id = next(("e%d" % (i + 1) for i, j in enumerate(self.joins)
                                 if isinstance(j, dict) and j.get("session_hash") == session),
                                None)
            if event_id is None:
                time.sleep(0.02)
        event_id = event_id or "e1"

        def event(msg, **fields):
            data = json.dumps(dict({"msg": msg, "event_id": event_id}, **fields)).encode()
            return b"data: %s\n\n" % data

        def chunk(data):
            return b"%x\r\n%s\r\n" % (len(data), data)

        def generating(output):
            return event("process_generating", output={"data": output, "is_generating": True},
                         success=True)

        how = self.behaviour
        why = self._send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; "
                         b"charset=utf-8\r\nCache-Control: no-cache\r\nTransfer-Encoding: "
                         b"chunked\r\n\r\n" + chunk(event("estimation", rank=0, queue_size=1)
                                                      + event("process_starts")), end)
        if why:
            return self._end(why)
        if how == "flood":
            why = self._send(conn, chunk(generating(["flood "])), end)
            one = generating([[["append", [], "flood "]]])
            return self._end(why or self._chunks(conn, one * (65536 // len(one)), end,
                                                 trickle=one))
        if how in ("big_line", "big_run"):
            start = (b'data: {"msg": "process_generating", "event_id": "%s", "output": '
                     b'{"data": ["' % event_id.encode())
            why = self._send(conn, chunk(start), end)
            sent = 0
            while not why and sent < BIG:
                why, sent = self._send(conn, chunk(PIECE), end), sent + len(PIECE)
            if why:
                return self._end(why)
            if how == "big_run":                 # no newline at all, then the end
                return self._end(self._send(conn, b"0\r\n\r\n", end) or "done")
            tail = b'"], "is_generating": true}, "success": true}\n\n'
            why = self._send(conn, chunk(tail + event(
                "process_completed", output={"data": ["done"]}, success=True)) + b"0\r\n\r\n",
                end)
            return self._end(why or "done")
        if how == "trickle":                     # output, then an event a byte at a time
            why = self._send(conn, chunk(generating([self.text])), end)
            while not why and not self.stopping.wait(0.2) and time.monotonic() < end:
                why = self._send(conn, chunk(b"d"), end)
            return self._end(why or "done")
        if how == "heartbeats":                  # output, then heartbeats as fast as they go
            beat = event("heartbeat")
            why = self._send(conn, chunk(generating([self.text])), end)
            return self._end(why or self._chunks(conn, beat * (65536 // len(beat)), end))
        if how == "ping_after_complete":         # the job is done, the stream goes on
            why = self._send(conn, chunk(generating([self.text])) + chunk(event(
                "process_completed", output={"data": [self.text]}, success=True)), end)
            while not why and not self.stopping.wait(0.3) and time.monotonic() < end:
                why = self._send(conn, chunk(b": ping\n\n"), end)
            return self._end(why or "done")
        half = len(self.text) // 2
        why = self._send(conn, chunk(generating([self.text[:half]])) + chunk(
            generating([[["append", [], self.text[half:]]]])) + chunk(
            event("process_completed", output={"data": [self.text]}, success=True)
            + b'data: {"msg": "close_stream", "event_id": null}\n\n') + b"0\r\n\r\n", end)
        if why:
            return self._end(why)
        with self.lock:
            self.ended.append("done")
        return True                              # kept alive, as uvicorn does


def faulty_gradio(test, behaviour, text=HELLO):
    """A :class:`FaultyGradio` serving until the test ends."""
    return FaultyGradio(test, behaviour, text)


slow = unittest.skipUnless(os.environ.get("BHARATGEN_SLOW_TESTS") == "1",
                           "a slow attack test: BHARATGEN_SLOW_TESTS=1 runs it (.ci/run does)")


def streams_in_flight(url):
    """The streams a gateway is sending, from its /metrics (no line before the first)."""
    text = request(url, "GET", "/metrics")[2].decode()
    found = re.search(r"^bharatgen_streams_in_flight (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


class _RealClientBase(unittest.TestCase):
    """A demo upstream and a keyed gateway, shared by a class of real-client tests."""

    @classmethod
    def setUpClass(cls):
        cls.demo = FakeGradio().start()
        cls.gw = Gateway(bg.Config(upstream=[cls.demo.url], port=0, timeout=10,
                                   api_keys=["sk-test"])).start()
        cls.base_url = cls.gw.url + "/v1"

    @classmethod
    def tearDownClass(cls):
        cls.gw.stop()
        cls.demo.stop()


def _free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _launch(test, gr, app, **queue):
    """Launch a Gradio app on a free loopback port; its URL."""
    port = _free_port()
    app.queue(**queue).launch(server_name="127.0.0.1", server_port=port,
                              prevent_thread_lock=True, quiet=True, show_error=True)
    test.addCleanup(app.close)
    return "http://127.0.0.1:%d" % port


###############################################################################
# The contract ################################################################
###############################################################################

# -- the contract --------------------------------------------------------------------------

class ContractTests(unittest.TestCase):
    def test_all_lists_exactly_the_public_names(self):
        public = {name for name, value in vars(bg).items()
                  if not name.startswith("_") and getattr(value, "__module__", None) == bg.__name__}
        public |= {"APIError", "UpstreamTimeout"}          # aliases of public classes
        self.assertEqual(set(bg.__all__), public)

    def test_product_imports_only_the_standard_library(self):
        import ast
        tree = ast.parse((HERE / "bharatgen_openai.py").read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        stdlib = getattr(sys, "stdlib_module_names", None)
        if stdlib is None:
            self.skipTest("sys.stdlib_module_names needs Python 3.10")
        self.assertEqual(names - set(stdlib) - {"__future__"}, set())

    def test_error_hierarchy_maps_each_error_to_one_status_and_type(self):
        cases = [(bg.BadRequestError, 400, "invalid_request_error"),
                 (bg.AuthenticationError, 401, "invalid_request_error"),
                 (bg.NotFoundError, 404, "invalid_request_error"),
                 (bg.MethodNotAllowedError, 405, "invalid_request_error"),
                 (bg.RequestTooLargeError, 413, "invalid_request_error"),
                 (bg.RateLimitError, 429, "requests"),
                 (bg.InternalServerError, 500, "server_error"),
                 (bg.UpstreamError, 502, "upstream_error"),
                 (bg.UpstreamOverloadedError, 503, "upstream_error"),
                 (bg.APIConnectionError, 502, "upstream_error"),
                 (bg.APITimeoutError, 504, "upstream_error")]
        for cls, status, kind in cases:
            exc = cls("boom", param="p")
            self.assertIsInstance(exc, bg.BharatGenError)
            self.assertEqual((exc.status, exc.type), (status, kind), cls)
            self.assertEqual(exc.to_dict(), {"error": {"message": "boom", "type": kind,
                                                       "param": "p", "code": cls.code}})
        self.assertTrue(issubclass(bg.UpstreamTimeout, TimeoutError))
        self.assertTrue(issubclass(bg.APIConnectionError, ConnectionError))
        self.assertTrue(issubclass(bg.APITimeoutError, bg.APIConnectionError))
        self.assertFalse(issubclass(bg.APIConnectionError, bg.InternalServerError))   # as openai
        self.assertEqual((bg.NotFoundError("x").status_code, bg.APITimeoutError("x").status_code),
                         (404, 504))


###############################################################################
# Errors: tested where each is raised #########################################
###############################################################################
# (no test class of its own)


###############################################################################
# Protocol pieces: SSE, the HTML cleaner, stop sequences, token estimate ######
###############################################################################

# -- protocol pieces -----------------------------------------------------------------------

class SSETests(unittest.TestCase):
    def events(self, raw):
        return events_of(io.BytesIO(raw).readline)

    def test_events_multiline_data_comments_and_crlf(self):
        raw = (b"event: generating\r\ndata: [1,\r\ndata: 2]\r\n\r\n: a comment\n\n"
               b"data: plain\n\nevent: heartbeat\ndata: null\n\nevent: complete\ndata:[3]")
        self.assertEqual(self.events(raw), [("generating", "[1,\n2]"), ("message", "plain"),
                                            ("heartbeat", "null"), ("complete", "[3]")])

    def test_blocks_split_anywhere_give_the_same_events(self):
        import random
        raw = fixture("call_hindi_please.sse").replace(b"\n", b"\r\n")
        expected = self.events(fixture("call_hindi_please.sse"))
        rng = random.Random(7)
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(raw)), 40))
            blocks = iter([raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])])
            self.assertEqual(events_of(lambda: next(blocks, b"")), expected)

    def test_events_cut_anywhere_come_whole(self):
        blocks = iter([b"data: 1\n\ndata: 2\n\nda", b"ta: 3\n", b"\n", b"data: 4\n\ndata: 5\n\n",
                       b": just a comment\n\n", b"data: 6"])
        self.assertEqual([d for _, d in bg._iter_sse(lambda: next(blocks, b""))],
                         ["1", "2", "3", "4", "5", "6"])

    def test_a_line_or_an_event_over_the_limit_ends_the_stream(self):
        def feed(*blocks):
            it = iter(blocks)
            return lambda: next(it, b"")
        self.assertEqual([d for _, d in bg._iter_sse(feed(b"data: " + b"x" * 94 + b"\n\n"), 100)],
                         ["x" * 94])
        for blocks in ([b"data: " + b"x" * 60, b"x" * 60],                  # one line, no end
                       [b"data: " + b"x" * 60 + b"\n", b"data: " + b"y" * 60 + b"\n"],   # one event
                       [b"x" * 101]):
            with self.assertRaisesRegex(bg.UpstreamError, "an event of over 100 bytes"):
                list(bg._iter_sse(feed(*blocks), 100))
        with self.assertRaisesRegex(bg.UpstreamError, "not UTF-8"):
            list(bg._iter_sse(feed(b"data: \xff\n\n")))

    def test_reading_is_linear_in_the_bytes(self):
        # a 4 MB event in 4 KB blocks: each block is searched once (it took minutes when
        # the buffer was searched from its start on every read)
        calls = [0]
        block = b"y" * 4096

        def read():
            calls[0] += 1
            if calls[0] == 1:
                return b"data: "
            return block if calls[0] < 1026 else b"\n\n" if calls[0] == 1026 else b""
        started = time.monotonic()
        [(_, data)] = list(bg._iter_sse(read))
        self.assertEqual(len(data), 4096 * 1024)
        self.assertLess(time.monotonic() - started, 5)

    def test_fixture_streams_parse_into_events(self):
        events = self.events(fixture("call_Say_hello.sse"))
        self.assertEqual([e for e, _ in events[-2:]], ["generating", "complete"])
        self.assertEqual(self.events(fixture("call_crash.sse")),
                         [("error", '{"error": "internal failure in model worker", "visible": true}')])


def snapshots(capture):
    """The reply HTML of every generating/complete event of a /call capture."""
    out = []
    for event, data in events_of(io.BytesIO(capture).readline):
        if event in ("generating", "complete"):
            out.append((bg._reply_from_output(json.loads(data)), event == "complete"))
    return out


def stream_clean(snaps):
    """Run snapshots through the streaming cleaner; return (deltas, final CleanReply)."""
    cleaner = bg._StreamCleaner()
    thoughts, answers = [], []
    for html_text, final in snaps:
        t, a = cleaner.update(html_text, final)
        thoughts.append(t)
        answers.append(a)
    return thoughts, answers


class CleanerTests(unittest.TestCase):
    FORMATTING = bg._DEMO_FORMATTING

    def check_capture(self, name, answer, thought):
        snaps = snapshots(fixture(name))
        final = bg.clean_reply(snaps[-1][0])
        self.assertEqual(final.answer, answer)
        self.assertEqual(final.thought, thought)
        thoughts, answers = stream_clean(snaps)
        self.assertEqual("".join(answers), answer)
        self.assertEqual("".join(thoughts), thought)
        for piece in answers + thoughts:
            self.assertNotIn("\ufffd", piece)
        return answers

    def test_say_hello_capture(self):
        self.check_capture("call_Say_hello.sse", HELLO, thought_of("Say hello"))

    def test_formatting_capture_keeps_code_tags_indentation_and_ampersands(self):
        answers = self.check_capture("call_show_formatting.sse", self.FORMATTING,
                                     thought_of("show formatting"))
        self.assertGreater(sum(1 for a in answers if a), 5)      # it really streamed

    def test_hindi_capture_never_sends_a_half_written_character(self):
        self.check_capture("call_hindi_please.sse", HINDI, thought_of("hindi please"))

    def test_history_capture(self):
        answers = self.check_capture("call_history_messages_gradio6.sse", None or
                                     bg.clean_reply(snapshots(fixture(
                                         "call_history_messages_gradio6.sse"))[-1][0]).answer,
                                     thought_of("tell me the history"))
        self.assertTrue("".join(answers).startswith("SYSTEM=Be terse. | HISTORY=[{\"content\""))

    def test_thought_is_unescaped_and_answer_is_verbatim(self):
        html_text = ("<details class='thought'><summary>🧠 Thinking...</summary>\n\n"
                     "a &lt; b &amp;&amp; &quot;c&quot;\n\n</details>\n\n"
                     "x &amp; <b>y</b>\n  indented\n\n\nend\n\n"
                     "<details style='opacity:0.6'><summary>d</summary><pre>x</pre></details>\n"
                     "<div style='color:#666'>⏱️ Latency: 1s</div>")
        reply = bg.clean_reply(html_text)
        self.assertEqual(reply.thought, 'a < b && "c"')
        self.assertEqual(reply.answer, "x &amp; <b>y</b>\n  indented\n\n\nend")

    def test_markup_drift_double_quotes_other_labels_and_attribute_order(self):
        html_text = ('<details open="" class="thought x"><summary>Thinking</summary>T</details>'
                     'Answer <div class="box">kept</div>'
                     '<details class="dbg" style="font-size: 1em; opacity: 0.5">x</details>'
                     '<div style="font-size:1em; color: #666">L</div>')
        reply = bg.clean_reply(html_text)
        self.assertEqual((reply.thought, reply.answer), ("T", 'Answer <div class="box">kept</div>'))

    def test_plain_text_without_blocks_is_the_answer(self):
        self.assertEqual(bg.clean_reply("Echo: Hello there"),
                         bg.CleanReply("Echo: Hello there", "", True, False))

    def test_open_thought_has_no_answer_yet(self):
        reply = bg.clean_reply("<details class='thought' open><summary>s</summary>\n\nThe user\n\n</details>")
        self.assertEqual((reply.thought, reply.answer, reply.thought_done), ("The user", "", False))

    def test_stream_holds_back_partial_tags_whitespace_and_replacement_chars(self):
        head = "<details class='thought'><summary>s</summary>\n\nT\n\n</details>\n\n"
        steps = ["<det", "<details class='tho", head + "a <", head + "a < b", head + "a < b\n\n<d",
                 head + "a < b\n\n<details style='opa",
                 head + "a < b\n\nनमस\ufffd", head + "a < b\n\nनमस्ते",
                 head + "a < b\n\nनमस्ते\n\n<details style='opacity:1'>x</details>"]
        cleaner = bg._StreamCleaner()
        out = [cleaner.update(s) for s in steps]
        self.assertEqual([a for _, a in out],
                         ["", "", "a", " < b", "", "", "\n\nनमस", "्ते", ""])
        self.assertEqual("".join(t for t, _ in out), "T")

    def test_appends_give_the_same_text_as_whole_snapshots(self):
        for prompt in ("Say hello", "show formatting", "hindi please", "tamil", "90 words"):
            snaps = list(bg._demo_html(*bg._demo_reply(prompt, [], "", [0] * 4)))
            whole, appended = bg._StreamCleaner(), bg._StreamCleaner()
            out_whole, out_appended, prev = [], [], None
            for i, snap in enumerate(snaps):
                final = i == len(snaps) - 1
                out_whole.append(whole.update(snap, final))
                if prev is not None and snap.startswith(prev) and not final:
                    out_appended.append(appended.append(snap[len(prev):]))
                else:
                    out_appended.append(appended.update(snap, final))
                prev = snap
            self.assertEqual(out_appended, out_whole, prompt)
            self.assertEqual("".join(a for _, a in out_whole), bg.clean_reply(snaps[-1]).answer)

    def test_final_update_releases_what_was_held(self):
        cleaner = bg._StreamCleaner()
        self.assertEqual(cleaner.update("Echo: Hello \ufffd"), ("", "Echo: Hello"))
        self.assertEqual(cleaner.update("Echo: Hello ✓\n", final=True), ("", " ✓\n"))


class CleanerPropertyTests(unittest.TestCase):
    """Answers built from the pieces that break cleaners (the app's own block markup, tags
    left open, comments, entities written out, code, Indic text, CRLF, long lines),
    rendered as the Param app renders them, a few characters at a time with a
    half-written character first shown as U+FFFD, then cleaned whole and streamed (as
    queue appends and as whole snapshots): every way gives exactly what went in, and
    nothing sent is ever taken back."""

    SEED, COUNT = 20261202, 2000
    PIECES = ["<details class='thought'>", "<details class='thought' open>",
              "<summary>\U0001f9e0 Thinking...</summary>", "</details>", "</summary>",
              "<details style='opacity:0.6; font-size:0.85em'>",
              "<summary>\U0001f50d Debug: Raw Response</summary>", "<pre>", "</pre>",
              "<div style='color:#666; font-size:0.85em; border-top:1px solid #eee; "
              "margin-top:8px; padding-top:4px'>", "\u23f1\ufe0f Latency: 1.23s", "</div>",
              "<details>", "<div", "<div>", "<span", "<!--", "-->", "<script>x()</script>",
              "&amp;lt;", "&lt;", "&", "a < b", "c > d", "x<y", "```html\n", "```", "\n",
              "\n\n", "\r\n", " ", "\t", "\u0928\u092e\u0938\u094d\u0924\u0947",
              "\u0bb5\u0ba3\u0b95\u0bcd\u0b95\u0bae\u0bcd", "\U0001f64f", "x" * 300, "word",
              "Hello, world.", "<", ">", "\ufffd"]

    def render(self, rng, thought, answer):
        """The app's snapshots of a reply: the thought growing in an open block, then the
        answer growing after the closed one, then the debug block and latency line."""
        def growing(text):
            i = 0
            while i < len(text):
                i = min(len(text), i + rng.randint(1, 5))
                if ord(text[i - 1]) > 0x7f and rng.random() < 0.5:
                    yield text[:i - 1] + "\ufffd"          # half a character, first
                yield text[:i]
        snaps = [bg._THOUGHT_HEAD % " open" + html.escape(part) + "\n\n</details>"
                 for part in growing(thought)]
        closed = bg._THOUGHT_HEAD % "" + html.escape(thought) + "\n\n</details>\n\n"
        snaps += [closed + part for part in growing(answer)]
        return snaps, (closed + answer + bg._DEBUG_HEAD + html.escape(
            "<think>%s</think>%s" % (thought, answer)) + bg._LATENCY % (1.5, 1.25))

    def stream(self, snaps, final, appends):
        cleaner, thoughts, answers, last = bg._StreamCleaner(), [], [], ""
        for snap in snaps:
            if appends and last and snap.startswith(last):
                t, a = cleaner.append(snap[len(last):])
            else:
                t, a = cleaner.update(snap)
            thoughts.append(t)
            answers.append(a)
            last = snap
        t, a = cleaner.update(final, True)
        self.assertFalse(cleaner.diverged)
        return "".join(thoughts) + t, "".join(answers) + a

    def test_every_way_of_cleaning_gives_what_went_in(self):
        import random
        rng = random.Random(self.SEED)
        for n in range(self.COUNT):
            answer = "".join(rng.choice(self.PIECES) for _ in range(rng.randint(0, 12)))
            thought = " ".join(rng.choice(self.PIECES) for _ in range(rng.randint(1, 6))).strip()
            thought = thought or "hmm"
            snaps, final = self.render(rng, thought, answer)
            with self.subTest(n=n, answer=answer, thought=thought):
                reply = bg.clean_reply(final)
                self.assertEqual((reply.thought, reply.answer), (thought, answer))
                for appends in (True, False):
                    self.assertEqual(self.stream(snaps, final, appends), (thought, answer))


class StopCutterTests(unittest.TestCase):
    def run_cutter(self, stops, deltas):
        cutter = bg._StopCutter(stops)
        out = [cutter.feed(d) for d in deltas]
        return out, cutter.flush(), cutter.stopped

    def test_stop_split_across_deltas_is_caught(self):
        self.assertEqual(self.run_cutter(["END"], ["abc E", "N", "Dxyz", "more"]),
                         (["abc ", "", "", ""], "", True))

    def test_false_start_is_released(self):
        self.assertEqual(self.run_cutter(["END"], ["a EN", "X b"]), (["a ", "ENX b"], "", False))

    def test_earliest_of_several_stops_wins_and_tail_is_flushed(self):
        self.assertEqual(self.run_cutter(["yy", "x"], ["a yy b x"]), (["a "], "", True))
        self.assertEqual(self.run_cutter(["zz"], ["tail z"]), (["tail "], "z", False))


class TokenEstimateTests(unittest.TestCase):
    def test_counts_by_script(self):
        self.assertEqual(bg.estimate_tokens(""), 0)
        self.assertEqual(bg.estimate_tokens("Hello, world!"), 4)
        self.assertEqual(bg.estimate_tokens("1234567"), 3)
        self.assertEqual(bg.estimate_tokens(HINDI), 14)
        self.assertEqual(bg.estimate_tokens("def f(x):\n    return x"), 8)

    def test_far_better_than_four_characters_a_token_for_hindi(self):
        text = HINDI * 10
        self.assertGreater(bg.estimate_tokens(text), len(text.encode("utf-8")) / 8)


TOKEN_SAMPLES = {
"english": """The Indian monsoon is a seasonal reversal of winds that brings most of the country's annual rainfall between June and September. Farmers across the Gangetic plain plan their sowing around its arrival, and a delay of even two weeks can change what a whole district earns that year. Meteorologists watch sea-surface temperatures in the Indian Ocean, the strength of the Somali jet, and the position of the monsoon trough to forecast it. In recent decades, heavy downpours have become more frequent while the number of light rain days has fallen, which makes both floods and dry spells more likely. Understanding these patterns helps cities prepare their drains, reservoirs and emergency services well before the first clouds appear.""",
"hindi": """भारतीय मानसून हवाओं का एक मौसमी बदलाव है जो जून से सितंबर के बीच देश की अधिकांश वार्षिक वर्षा लाता है। गंगा के मैदान के किसान इसके आगमन के अनुसार अपनी बुवाई की योजना बनाते हैं, और केवल दो सप्ताह की देरी भी पूरे ज़िले की उस साल की कमाई बदल सकती है। मौसम वैज्ञानिक इसका पूर्वानुमान लगाने के लिए हिंद महासागर के समुद्री सतह के तापमान और मानसून द्रोणी की स्थिति पर नज़र रखते हैं। हाल के दशकों में भारी बारिश की घटनाएँ बढ़ी हैं जबकि हल्की बारिश वाले दिनों की संख्या घटी है। इन पैटर्न को समझने से शहर अपनी नालियों, जलाशयों और आपातकालीन सेवाओं को पहले से तैयार कर पाते हैं।""",
"tamil": """இந்தியப் பருவமழை என்பது ஜூன் முதல் செப்டம்பர் வரை நாட்டின் பெரும்பாலான ஆண்டு மழையைக் கொண்டுவரும் காற்றின் பருவகால மாற்றமாகும். கங்கைச் சமவெளியின் விவசாயிகள் அதன் வருகையைப் பொறுத்து விதைப்பைத் திட்டமிடுகின்றனர், இரண்டு வாரத் தாமதம்கூட ஒரு மாவட்டத்தின் அந்த ஆண்டு வருமானத்தை மாற்றக்கூடும். வானிலை ஆய்வாளர்கள் இந்தியப் பெருங்கடலின் கடல் மேற்பரப்பு வெப்பநிலையைக் கவனித்து அதை முன்னறிவிக்கின்றனர். சமீபத்திய பத்தாண்டுகளில் கனமழை நிகழ்வுகள் அதிகரித்துள்ளன, லேசான மழை நாட்களின் எண்ணிக்கை குறைந்துள்ளது. இந்த முறைகளைப் புரிந்துகொள்வது நகரங்கள் தங்கள் வடிகால்களையும் நீர்த்தேக்கங்களையும் முன்கூட்டியே தயார் செய்ய உதவுகிறது.""",
"code": '''def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping closed intervals, e.g. [(1, 3), (2, 6)] -> [(1, 6)]."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda iv: iv[0])
    merged = [intervals[0]]
    for start, end in intervals[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged


class Cache:
    def __init__(self, size=128):
        self._data = {}
        self._size = size

    def get(self, key, default=None):
        return self._data.get(key, default)

    def put(self, key, value):
        if len(self._data) >= self._size:
            self._data.pop(next(iter(self._data)))
        self._data[key] = value
''',
}


@needs("bpe_openai")
class TokenEstimateAccuracyTests(unittest.TestCase):
    """The estimate within 15% of o200k_base (bpe_openai ships that vocabulary offline)."""

    def test_within_fifteen_percent_on_english_hindi_tamil_and_code(self):
        import bpe_openai
        enc = bpe_openai.get_encoding("o200k_base")
        for name, text in TOKEN_SAMPLES.items():
            real, est = len(enc.encode(text)), bg.estimate_tokens(text)
            with self.subTest(name=name, real=real, estimate=est):
                self.assertLessEqual(abs(est - real) / real, 0.15)


###############################################################################
# Token counts: tokenizer.json, and the limits counted with it ################
###############################################################################

# -- exact token counts: the pure-Python tokenizer against Hugging Face's ---------------------

_GPT2_SPLIT, _onig, _split, _Tokenizer = bg._GPT2_SPLIT, bg._onig, bg._split, bg._Tokenizer

try:
    import sentencepiece
except ImportError:  # pragma: no cover
    sentencepiece = None

_SEEDS = [
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've done it before, haven't we?",
    "Prices rose 12.5% to $1,234.56 in Q3 2024 (see table 7).",
    "OpenAI-compatible gateways translate requests: POST /v1/chat/completions.",
    "résumé, naïve café, Zürich, São Paulo, Ελληνικά, Ωμέγα ΣΟΦΙΑΣ, İstanbul",
    "ﬁne ﬂour costs ½ of ¼ kg ① ② — “quoted” ‘text’ … ™ ℃",
    "भारत एक विशाल देश है जिसकी संस्कृति बहुत पुरानी है।",
    "मैं आज बाज़ार जा रहा हूँ, क्या तुम भी चलोगे?",
    "हिन्दी में क़लम, ज़मीन और फ़ारसी शब्द आते हैं।",
    "प्रधानमंत्री ने २०२४ में नई योजनाओं की घोषणा की।",
    "தமிழ் ஒரு பழமையான மொழி ஆகும்.",
    "நான் இன்று பள்ளிக்குச் செல்கிறேன், நீங்கள் வருகிறீர்களா?",
    "கொம்பு, கோவில், கௌரவம் — ௧௨௩ எண்கள்.",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { total += v[i] * 2; }",
    "if __name__ == '__main__':\n\tmain(sys.argv[1:])\n",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "const f = async (x) => { await fetch(`/api/${x}`); };",
    "<div class=\"row\"><span>Hello</span></div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"ok\": true, \"n\": null}}",
    "Emoji: 😀 😂 👍🏽 ❤️ 🇮🇳 👨‍👩‍👧‍👦 🧑🏾‍💻 🏳️‍🌈 #️⃣",
    "Mixed: Hello नमस्ते வணக்கம் 你好 こんにちは 안녕하세요 مرحبا",
    "Hinglish: kal main office jaunga, phir मीटिंग है at 10am.",
    "Numbers 0123456789 and ١٢٣ and ٤٥٦ and 一二三",
    "Tabs\tand\ttabs\t\tand trailing spaces   ",
    "Line one\nLine two\r\nLine three\n\n\nLine six",
    "A very long word: pneumonoultramicroscopicsilicovolcanoconiosis.",
    "URLs like https://example.com/path?q=1&r=two#frag are common.",
    "e\u0301 a\u0300 o\u0302 n\u0303 (combining marks, decomposed)",
    "\u0b95\u0bc6\u0bbe\u0bb2\u0bcd \u0b95\u0bc6\u0bb3 (Tamil vowel signs, decomposed)",
    "\u0915\u093c\u0932\u092e \u091c\u093c\u092e\u0940\u0928 (nukta, decomposed)",
    "Zero\u200bwidth\u200cjoiners\u200d and\u00a0no-break\u202fspaces\u3000here",
    "CAPITAL LETTERS AND Title Case And lower case",
    "Ünïcödé ÀÉÎÕÜ straße ΣΊΣΥΦΟΣ ǅungla",
    "    indented code\n        more indented\n",
    "!!! ??? ... --- *** ### $$$ %%% ^^^ &&& ((( )))",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "সংখ্যা বাংলা ভাষায় ১২৩ — ગુજરાતી ਪੰਜਾਬੀ తెలుగు ಕನ್ನಡ മലയാളം",
    "Control\x01chars\x1fand\x7fdel and \U0001F600 astral",
    "The end. ॐ ॥ ৳ ₹ 100 only.",
    "Marks out of order: a\u0301\u0323 q\u0307\u0323 \u1e69\u0301 \u0915\u094d\u093c",
    "Odd spaces:\x1c\x1d\x1e\x1f|\x85|\u2028|\u2029|\u180e|\u200b|\ufeff|end",
    "Blocked marks: a\u0305\u0301 e\u0305\u0300 o\u0316\u0300 \u1100\u1161\u11a8 \u0b47\u0b3e",
    "Astral: x𓀀y 𝐀𝐁𝐂bold 𝟏𝟐𝟑digits 𐐀𐐨deseret a😀b 9𝟗9 'S𝐒",
]
_UNSEEN = [  # scripts left out of the training texts: unknown chars, byte fallback
    "ግዕዝ ፊደል ሰላም ነው። ქართული ენა ლამაზია",
    "Cherokee ᏣᎳᎩ and Javanese ꦧꦱꦗꦮ and 𓀀𓀁 hieroglyphs",
]
_SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<mask>", "[TOOL]", "wordy"]
_SEPARATORS = ["", " ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "      ", "\n    \n", " " * 17]
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# A precompiled_charsmap that SentencePiece built from this rule table (hex code points):
#   3000->20, FB01->66 69, 1->(none), 65 301->E9, 41->61 ("A" + a mark is replaced whole by
#   "a": the shortest key wins), FF21->41, D->20 ("\r\n" becomes " "), 2460->31, 958->915 93C,
#   BCA->BC6 BBE, FE0F->(none), 200B->(none), 2026->2E 2E 2E, A0->20.
_SMALL_CHARSMAP = (
    "AAQAAAAMAAAAAACAAQ0AAMwQAgABAACACwAAgIEFAAAQAACAoDEAAJgNAAATAACAih0AABoAAICAJAIADSkAAIs5AACl"
    "BAIAAwAAgKAFAAAHAACAgAQCAIBFAACBBQAADQAAgKENAACPYQAAr2wCAAkAAICRuAIAHwAAABwAAAAdAAAArNwCACMA"
    "AACmzQAAIQAAACYAAAAnAAAAJAAAACUAAAAqAAAAKwAAACgAAAApAAAALgAAAC8AAAAsAAAALQAAALwkAgAzAAAAMAAA"
    "ADEAAAC4iAIANwAAADQAAAA1AAAAOgAAADsAAAA4AAAAOQAAAD4AAAA/AAAAPAAAAD0AAABCAAAAQwAAAEEdAQBBAAAA"
    "RgAAAEcAAABEAAAARQAAAEoAAABLAAAASAAAAEkAAABOAAAATwAAAEwAAABNAAAAUgAAAFMAAABQAAAAUQAAAFYAAABX"
    "AAAAVAAAAFUAAABaAAAAWwAAAFgAAABZAAAAXgAAAF8AAABcAAAAXQAAAGIAAABjAAAAYAAAAGEAAABmAAAAZwAAAGWk"
    "AgBlAAAAagAAAGsAAABoAAAAaQAAAG4AAABvAAAAbAAAAG0AAAByAAAAcwAAAHAAAABxAAAAdgAAAHcAAAB0AAAAdQAA"
    "AHoAAAB7AAAAeAAAAHkAAAB+AAAAfwAAAHwAAAB9AAAAggAAAIMAAACAAAAAgQAAAIYAAACHAAAAhAAAAIUAAACKAAAA"
    "iwAAAIgAAACJAAAAjgAAAI8AAACMAAAAjQAAAJIAAACTAAAAkAAAAJEAAACWAAAAlwAAAJQAAACVAAAAmgAAAJsAAACY"
    "AAAAmQAAAJ4AAACfAAAAnAAAAJ0AAACiAAAAowAAAKAAAAChAAAApgAAAKcAAACkAAAApQAAAKoAAACrAAAAqAAAAKkA"
    "AACuAAAArwAAAKwAAACtAAAAsgAAALMAAACwAAAAsQAAALYAAAC3AAAAtAAAALUAAAC6AAAAuwAAALgAAAC5AAAAvgAA"
    "AL8AAAC8AAAAvQAAAMIAAADCpAEAwAAAAMEAAADGAAAAxwAAAMQAAADFAAAAygAAAMsAAADIAAAAyQAAAM4AAADPAAAA"
    "zAAAAM0AAADSAAAA0wAAANAAAADRAAAA1gAAANcAAADUAAAA1QAAANoAAADbAAAA2AAAANkAAADeAAAA3wAAANwAAADd"
    "AAAA49ABAOKwAQDgAAAA4FgBAOYAAADnAAAA5AAAAOUAAADqAAAA6wAAAOgAAADpAAAA74ABAO8AAADsAAAA7QAAAPIA"
    "AADzAAAA8AAAAPEAAAD2AAAA9wAAAPQAAAD1AAAA+gAAAPsAAAD4AAAA+QAAAP4AAAD/AAAA/AAAAP0AAAAAIAAuLi4A"
    "MQBBAGEAZmkAw6kA4KSV4KS8AOCvhuCuvgA="
)
_TRAIN_SPECIALS = ["<unk>", "<s>", "</s>"]


def _llama_legacy():
    """The normalizers of a legacy Llama conversion (no pre-tokenizer)."""
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def _corpus(n: int = 560, seed: int = 20240917, train: bool = False) -> list:
    """Deterministic texts: the seeds, mixes of them, odd slices, specials, whitespace runs."""
    rnd = random.Random(seed)
    texts = ["", " ", "\n", "  ", " " * 300, "\n" * 50, "\t \n" * 20, "▁", "▁▁ ▁", "<s>",
             " <mask> ", "".join(_SEEDS) * 3] + list(_SEEDS) + _UNSEEN
    while len(texts) < n:
        parts = [rnd.choice(_SEEDS if train or rnd.random() < 0.9 else _UNSEEN)
                 for _ in range(rnd.randint(1, 4))]
        text = "".join(p + rnd.choice(_SEPARATORS) for p in parts)
        kind = rnd.random()
        if kind < 0.25:  # a slice starting and ending anywhere
            a = rnd.randrange(len(text))
            text = text[a:rnd.randint(a, len(text))]
        elif kind < 0.5:  # added tokens inside the text, with or without spaces around
            for _ in range(rnd.randint(1, 3)):
                i = rnd.randint(0, len(text))
                text = text[:i] + rnd.choice(["", " ", "  "]) + rnd.choice(_SPECIALS) + rnd.choice(
                    ["", " ", "\n"]) + text[i:]
        elif kind < 0.6:
            text = unicodedata.normalize(rnd.choice(["NFD", "NFKD", "NFC"]), text)
        elif kind < 0.7:
            text = rnd.choice([str.upper, str.lower, str.title])(text)
        elif kind < 0.8:
            text = rnd.choice(_SEPARATORS) + text + " " * rnd.randint(0, 40)
        texts.append(text)
    return texts


def _charsmap_from_spm(model: bytes) -> bytes:
    """The precompiled_charsmap in a SentencePiece model proto (field 3, then its field 2)."""
    def field(buf: bytes, wanted: int) -> bytes:
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            if key & 7 == 0:
                i = varint(buf, i)[1]
            elif key & 7 in (1, 5):
                i += 8 if key & 7 == 1 else 4
            else:
                size, i = varint(buf, i)
                if key >> 3 == wanted:
                    return buf[i:i + size]
                i += size
        raise ValueError("field %d not found" % wanted)

    def varint(buf: bytes, i: int) -> tuple:
        value = shift = 0
        while True:
            value |= (buf[i] & 127) << shift
            shift += 7
            i += 1
            if buf[i - 1] < 128:
                return value, i
    return field(field(model, 3), 2)


@unittest.skipIf(tokenizers is None, "the tokenizers package is not installed")
@needs("tokenizers")
class TokenizerTests(unittest.TestCase):
    """_Tokenizer gives the ids and end offsets that Hugging Face tokenizers gives."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.texts = _corpus()
        cls.train = [t for t in _corpus(300, seed=7, train=True) if t not in _UNSEEN]

    def _train_bpe(self, pre, vocab_size=700, alphabet=None, **model):
        tok = Tokenizer(models.BPE(**model))
        tok.pre_tokenizer = pre
        kwargs = {"initial_alphabet": alphabet} if alphabet else {"limit_alphabet": 150}
        tok.train_from_iterator(self.train, trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False, special_tokens=_TRAIN_SPECIALS, **kwargs))
        return tok

    def _with_bytes(self, tok, score=None):
        """The tokenizer with <0x00>..<0xFF> in its vocab and byte_fallback on."""
        spec = json.loads(tok.to_str())
        model = spec["model"]
        for b in range(256):
            if score is None:
                model["vocab"].setdefault("<0x%02X>" % b, len(model["vocab"]))
            else:
                model["vocab"].append(["<0x%02X>" % b, score])
        model["byte_fallback"] = True
        return Tokenizer.from_str(json.dumps(spec))

    def _add_tokens(self, tok):
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False),
                                AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
        tok.add_tokens([AddedToken("[TOOL]", rstrip=True, normalized=False),
                        AddedToken("wordy", single_word=True, normalized=True)])
        return tok

    def assertSame(self, name, tok, texts=None):
        """Every text: same ids, count, and end offsets as the library, both reading the same
        tokenizer.json (an edited Tokenizer object may keep stale state in older versions)."""
        tok.post_processor = None
        spec = tok.to_str()
        tok, ours = Tokenizer.from_str(spec), _Tokenizer.load(json.loads(spec))
        bad = []
        for text in texts or self.texts:
            want = tok.encode(text, add_special_tokens=False)
            got = ours.encode(text)
            ok = ([i for i, _ in got] == want.ids and ours.count(text) == len(want.ids)
                  and [e for _, e in got] == [e for _, e in want.offsets])
            if not ok:
                bad.append(text)
        if bad:  # trained models vary from run to run: keep this one
            fd, path = tempfile.mkstemp(prefix="tokenizer-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(spec)
            want = tok.encode(bad[0], add_special_tokens=False)
            self.fail("%s (%s): %d of %d texts differ; first %r:\n ours %r\n lib  %r" % (
                name, path, len(bad), len(texts or self.texts), bad[0], ours.encode(bad[0]),
                list(zip(want.ids, [e for _, e in want.offsets]))))

    def test_regex_translation(self):
        # Oniguruma patterns (\p{..}, \s) run with Python's re split every text as the library does.
        for pattern in (_GPT2_SPLIT, _LLAMA3, _GPT4O, r"\p{N}+|[^\p{N}\s]+", r"\P{L}+"):
            lib, ours = pre_tokenizers.Split(Regex(pattern), behavior="isolated"), _onig(pattern)
            for text in self.texts:
                want = [o for _, o in lib.pre_tokenize_str(text)]
                got = [(w[0], w[-1] + 1) for _, w in _split(text, range(len(text)), ours)]
                self.assertEqual(got, want, "%r on %r" % (pattern, text))

    def test_byte_level_bpe(self):
        for prefix in (False, True):
            tok = self._train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=prefix),
                                  alphabet=pre_tokenizers.ByteLevel.alphabet())
            self.assertSame("gpt2 prefix=%s" % prefix, self._add_tokens(tok))

    def test_llama3_split_regex(self):
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok = self._train_bpe(pre, alphabet=pre_tokenizers.ByteLevel.alphabet(), ignore_merges=True)
        self.assertSame("llama3", self._add_tokens(tok))

    def test_sentencepiece_bpe_byte_fallback(self):
        # Trained as SentencePiece does (words start with "▁"), then run as converted Llama files:
        # legacy (Prepend + Replace normalizers, no pre-tokenizer), and Metaspace "first".
        tok = self._with_bytes(self._train_bpe(pre_tokenizers.Metaspace(), unk_token="<unk>",
                                               fuse_unk=True))
        tok.normalizer = _llama_legacy()
        tok.pre_tokenizer = None
        self.assertSame("llama legacy", self._add_tokens(tok))
        tok.normalizer = None
        for scheme, split in (("first", False), ("always", True), ("never", True)):
            tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=split)
            self.assertSame("metaspace %s split=%s" % (scheme, split), tok)

    def test_bpe_merges_across_words_and_unk(self):
        # Merges that cross "x▁" (no cutting of long words), unknown chars fused or not.
        for fuse in (True, False):
            tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=fuse))
            tok.normalizer = _llama_legacy()
            tok.train_from_iterator(self.train[:40], trainers.BpeTrainer(
                vocab_size=300, limit_alphabet=60, show_progress=False, special_tokens=["<unk>"]))
            self.assertSame("bpe fuse_unk=%s" % fuse, tok)

    def test_unigram_metaspace(self):
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                               normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(self.train, trainers.UnigramTrainer(
            vocab_size=600, show_progress=False, special_tokens=_TRAIN_SPECIALS, unk_token="<unk>"))
        self.assertSame("unigram", self._add_tokens(tok))
        tok = self._with_bytes(tok, score=-20.0)
        tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.NFD(),
                                               normalizers.Lowercase(), normalizers.NFC()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        self.assertSame("unigram byte_fallback", tok)

    def test_unigram_near_tie(self):
        # The library reads "-2.1152937751343606" 1 ulp off (serde_json), which decides this tie:
        # the same model built in memory splits it the other way.
        vocab = [("<unk>", 0.0), ("▁", -2.1152937751343606), ("^", -7.290994014629568),
                 ("^^", -7.292064820859244)]
        tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        self.assertSame("unigram near-tie", tok, ["^^^", " ^^^^^ ^^^"])
        self.assertEqual(Tokenizer.from_str(tok.to_str()).encode("^^^").tokens, ["▁", "^", "^^"])
        self.assertEqual(tok.encode("^^^").tokens, ["▁", "^^", "^"])

    def test_normalizers_alignment(self):
        # Each normalizer alone, on a byte-level BPE, so offsets go through every alignment rule.
        tok = self._train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                              alphabet=pre_tokenizers.ByteLevel.alphabet())
        for norm in (normalizers.NFC(), normalizers.NFD(), normalizers.NFKC(), normalizers.NFKD(),
                     normalizers.Lowercase(), normalizers.Strip(left=True, right=False),
                     normalizers.Strip(left=False, right=True),
                     normalizers.Replace(Regex(r"\s+"), " "), normalizers.Replace("e", ""),
                     normalizers.Precompiled(base64.b64decode(_SMALL_CHARSMAP))):
            tok.normalizer = norm
            self.assertSame("normalizer %s" % norm.__class__.__name__, tok, self.texts[:200])

    def test_precompiled_charsmap(self):
        # The small charsmap above, and SentencePiece's default (nmt_nfkc) when it is installed.
        charsmaps = [base64.b64decode(_SMALL_CHARSMAP)]
        if sentencepiece is not None:
            model = io.BytesIO()
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(self.train), model_writer=model, vocab_size=400,
                hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", minloglevel=2)
            charsmaps.append(_charsmap_from_spm(model.getvalue()))
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(self.train, trainers.UnigramTrainer(
            vocab_size=500, show_progress=False, special_tokens=["<unk>"], unk_token="<unk>"))
        for charsmap in charsmaps:
            tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap),
                                                   normalizers.Replace(Regex(" {2,}"), " ")])
            self.assertSame("precompiled (%d bytes)" % len(charsmap), tok)

    def test_malformed(self):
        # A bad tokenizer.json is a ValueError whose one line names the part and the fault.
        tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        good = json.loads(tok.to_str())
        split = {"type": "Split", "pattern": {"Regex": " "}, "behavior": "Isolated",
                 "invert": False}
        model, pre = good["model"], "pre_tokenizer"
        cases = [
            ({"model": {**model, "merges": [["a", "c"]]}}, "bad model: merge ['a', 'c']"),
            ({"model": {**model, "type": "WordPiece"}}, "unsupported model 'WordPiece'"),
            ({"model": {**model, "unk_token": "<unk>"}}, "unk_token '<unk>' is not in the vocab"),
            ({"model": {**model, "vocab": None}}, "bad model: "),
            ({"normalizer": {"type": "BertNormalizer"}}, "bad normalizer: unsupported 'Bert"),
            ({"normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA"}},
             "not a SentencePiece"),
            ({pre: {**split, "pattern": {"Regex": "(?<"}}}, "bad pre_tokenizer: regex '(?<'"),
            ({pre: {**split, "pattern": {"Regex": r"\p{Han}"}}}, r"unsupported regex class \p"),
            ({pre: {**split, "behavior": "MergedWithNext"}}, "unsupported Split behavior"),
            ({pre: {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "often"}},
             "unsupported scheme 'often'"),
            ({pre: {"type": "Sequence", "pretokenizers": [good[pre], split]}},
             "ByteLevel must be the last"),
        ]
        for change, says in cases:
            with self.assertRaises(ValueError) as caught:
                _Tokenizer.load({**good, **change})
            self.assertIn(says, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith("tokenizer.json: "), caught.exception)
            self.assertNotIn("\n", str(caught.exception))
        del good["model"]["merges"]
        with self.assertRaisesRegex(ValueError, "^tokenizer.json: bad model: missing 'merges'$"):
            _Tokenizer.load(good)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "tokenizer.json")
            for content, says in (("[]", "not a JSON object"), ("{", "not JSON: Expecting"),
                                  (json.dumps(good) + " " * 99, "larger than")):
                with open(path, "w", encoding="utf-8") as f:
                    f.write(content)
                module = sys.modules[_Tokenizer.__module__]
                with mock.patch.object(module, "_TOKENIZER_FILE_LIMIT", len(json.dumps(good)) + 50):
                    with self.assertRaisesRegex(ValueError, "^tokenizer.json: " + says):
                        _Tokenizer.load(path)


class TokenLimitTests(unittest.TestCase):
    def test_tokens_a_minute_are_reserved_then_settled_with_what_was_used(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, api_keys=["k"], rate_limit_tpm=600)
        key = {"Authorization": "Bearer k"}
        status, headers, body = chat(gw, "Say hello", headers=key, max_tokens=550)
        usage = json.loads(body)["usage"]
        self.assertEqual((status, headers["x-ratelimit-limit-tokens"], headers["x-token-counter"]),
                         (200, "600", "estimate"))
        reserved = usage["prompt_tokens"] + 550
        self.assertIn(int(headers["x-ratelimit-remaining-tokens"]), (600 - reserved, 601 - reserved))
        status, headers, body = chat(gw, "Say hello", headers=key, max_tokens=550)
        left = 600 - usage["total_tokens"] - reserved       # the first settled with what it used
        self.assertEqual(status, 200)
        self.assertIn(int(headers["x-ratelimit-remaining-tokens"]) - left, range(0, 5))
        status, headers, body = chat(gw, "Say hello", headers=key, max_tokens=550)
        self.assertEqual((status, json.loads(body)["error"]["code"], "Retry-After" in headers),
                         (429, "rate_limit_exceeded", True))
        self.assertTrue(json.loads(body)["error"]["message"].startswith(
            "Rate limit reached: 600 tokens per minute; retry in "), body)
        status, _, body = chat(gw, "Say hello", headers=key, max_tokens=1000)
        self.assertEqual((status, json.loads(body)["error"]["message"]), (
            429, "Request too large: %d tokens, and the limit is 600 a minute"
            % (usage["prompt_tokens"] + 1000)))

    def test_a_tokenizer_counts_exactly(self):
        """A byte-level BPE with no merges: a token a byte, easy to count by hand."""
        chars = [chr(b) if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174 else None
                 for b in range(256)]
        extra = iter(range(256, 512))
        chars = [c or chr(next(extra)) for c in chars]     # GPT-2's stand-ins for the rest
        spec = {"model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(chars)},
                          "merges": []},
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                  "trim_offsets": True, "use_regex": True}}
        path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
        self.addCleanup(__import__("shutil").rmtree, os.path.dirname(path))
        with open(path, "w") as f:
            json.dump(spec, f)
        nbytes = lambda text: len(text.encode("utf-8"))
        demo = PlainChatInterface().start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url, tokenizer=path, context_length=50)
        status, headers, body = chat(gw, "नमस्ते", max_tokens=20)
        usage, choice = json.loads(body)["usage"], json.loads(body)["choices"][0]
        self.assertEqual((status, headers["x-token-counter"], usage["prompt_tokens"]),
                         (200, "tokenizer", 3 + 4 + nbytes("नमस्ते")))
        thought = choice["message"]["reasoning_content"]        # cut at the 20th byte token,
        self.assertEqual((choice["finish_reason"], nbytes(thought), choice["message"]["content"]),
                         ("length", 18, ""))                   # a Devanagari letter whole
        self.assertEqual(usage["completion_tokens"], 18)
        status, _, body = chat(gw, "नमस्ते", max_tokens=30)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "context_length_exceeded"))
        with self.assertRaisesRegex(ValueError, "tokenizer.json: bad model"):
            bg._Tokenizer.load({"model": {"type": "BPE"}})

    def test_a_prompt_past_the_context_length_is_a_400_before_the_app_is_called(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, context_length=64)
        calls = len(demo.calls)
        status, _, body = chat(gw, "Say hello", max_completion_tokens=100)
        self.assertEqual((status, json.loads(body)["error"]), (400, {
            "message": "This model's maximum context length is 64 tokens. However, you "
                       "requested 109 tokens (9 in the messages, 100 in the completion); the "
                       "app's chat template is not counted.", "type": "invalid_request_error",
            "param": "max_completion_tokens", "code": "context_length_exceeded"}))
        self.assertEqual((len(demo.calls), chat(gw, "Say hello", max_tokens=50)[0]), (calls, 200))


###############################################################################
# Objects shaped like the openai SDK's ########################################
###############################################################################

class ObjectTests(unittest.TestCase):
    def test_chat_completion_json_is_exactly_openai_shaped(self):
        c = bg.ChatCompletion(id="chatcmpl-1", created=7, model="m", choices=[
            bg.Choice(message=bg.ChatCompletionMessage(content="hi"))],
            usage=bg.CompletionUsage(1, 2, 3))
        self.assertEqual(c.to_dict(), {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
            "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "hi", "refusal": None,
                                     "annotations": []}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
        self.assertEqual(c.model_dump(), c.to_dict())
        self.assertEqual(c.choices[0].message.content, "hi")
        self.assertEqual(json.loads(c.model_dump_json()), c.to_dict())

    def test_chunk_delta_leaves_out_unset_fields(self):
        chunk = bg.ChatCompletionChunk(id="x", choices=[bg.ChunkChoice(delta=bg.ChoiceDelta(
            reasoning_content="r"))])
        self.assertEqual(chunk.to_dict()["choices"][0]["delta"], {"reasoning_content": "r"})


###############################################################################
# Upstream: the Gradio client, its protocol versions, captures and faults #####
###############################################################################

class GradioClientTests(unittest.TestCase):
    def setUp(self):
        self.demo = start_demo(self)

    def test_discovers_prefix_and_history_format(self):
        for url in (self.demo.url, self.demo.url + "/gradio_api/"):
            info = gradio_client(self, url).discover()
            self.assertEqual((info.prefix, info.version, info.history_format, info.fn_index,
                              info.endpoint, info.use_queue),
                             ("/gradio_api", "6.31.0", "parts", 1, "chat_fn_1", True))

    def test_slider_ranges_from_info_or_config(self):
        self.assertEqual(gradio_client(self, self.demo.url).discover().limits, {
            "temperature": (0, 2), "max_tokens": (1, 8192), "top_p": (0, 1), "top_k": (1, 100)})
        layout = [("message", None), ("state", None), ("max_tokens", 9), ("top_k", 5)]
        params = [{"type": {"type": "string"}}, {"type": {"type": "number"}},
                  {"type": {"description": "numeric value between 1 and 40"}}]
        props = [{}, {"minimum": 16, "maximum": 4096}, {"minimum": "x"}]
        self.assertEqual(bg._limits(layout, params, props),
                         {"max_tokens": (16, 4096), "top_k": (1, 40)})
        with self.assertRaises(bg.BadRequestError) as caught:
            list(gradio_client(self, self.demo.url).stream("hi", top_p=1.5))
        self.assertEqual((caught.exception.message, caught.exception.param),
                         ("top_p=1.5 is more than this model accepts (at most 1)", "top_p"))
        self.assertEqual(self.demo.calls, [])

    def test_demo_refuses_slider_values_out_of_range_like_gradio(self):
        client = gradio_client(self, self.demo.url)
        info = client.discover()
        info.limits.clear()          # as if the app had not said: Gradio itself refuses
        with self.assertRaises(bg.UpstreamError) as caught:
            list(client.stream("hi", max_tokens=9000))
        self.assertEqual(caught.exception.message, "the Gradio app reported an error: "
                         "Value 9000 is greater than maximum value 8192.")

    def test_connections_are_reused(self):
        for protocol in ("queue", "call"):
            demo = start_demo(self)
            client = gradio_client(self, demo.url, protocol=protocol)
            for _ in range(5):
                self.assertEqual(bg.clean_reply(list(client.stream("Say hello"))[-1][0]).answer, HELLO)
            self.assertEqual(demo.connections, 1, protocol)

    def test_hf_token_is_sent_as_a_bearer_token(self):
        list(gradio_client(self, self.demo.url, hf_token="hf_secret").stream("Say hello"))
        self.assertEqual(self.demo.auth_seen[-1], "Bearer hf_secret")
        old = os.environ.pop("HF_TOKEN", None)
        self.addCleanup(lambda: old is not None and os.environ.__setitem__("HF_TOKEN", old))
        for key, sent in (("hf_from_the_sdk", "Bearer hf_from_the_sdk"), ("sk-anything", None)):
            with bg.BharatGenOpenAI(self.demo.url, api_key=key) as client:
                client.chat.completions.create(messages=[{"role": "user", "content": "Say hello"}])
            self.assertEqual(self.demo.auth_seen[-1], sent)
        os.environ["HF_TOKEN"] = "hf_ambient"          # for Hugging Face's hosts only
        self.addCleanup(os.environ.pop, "HF_TOKEN", None)
        list(gradio_client(self, self.demo.url).stream("Say hello"))
        self.assertEqual(self.demo.auth_seen[-1], None)
        self.assertEqual(bg.GradioClient("owner/space").http.token, "hf_ambient")

    def test_stream_yields_snapshots_ending_with_the_final_one(self):
        demo = start_demo(self, token_delay=0.005)    # events one by one, not in a burst
        snaps = list(gradio_client(self, demo.url).stream("Say hello"))
        self.assertTrue(all(not final for _, final, _ in snaps[:-1]) and snaps[-1][1])
        self.assertGreater(sum(1 for _, _, appended in snaps if appended), 3)   # queue diffs
        self.assertEqual(bg.clean_reply(snaps[-1][0]).answer, HELLO)
        self.assertEqual(demo.calls[-1], ["Say hello", [], bg.DEFAULT_SYSTEM_PROMPT,
                                               0.7, 1024, 0.95, 50])

    def test_history_formats(self):
        hist = [("user", "Hi"), ("assistant", "Hello!")]
        fmt = bg._history
        self.assertEqual(fmt(hist, "parts"), [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}])
        self.assertEqual(fmt(hist, "messages"), [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello!"}])
        self.assertEqual(fmt(hist + [("user", "a"), ("user", "b")], "pairs"),
                         [["Hi", "Hello!"], ["a", None], ["b", None]])

    def test_reply_is_the_last_assistant_message_only(self):
        chat_ = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "old"}]},
                 {"role": "user", "content": [{"type": "text", "text": "again"}]}]
        self.assertEqual(bg._reply_from_output([chat_, ""]), "")
        self.assertEqual(bg._reply_from_output([chat_[:2], ""]), "old")
        self.assertEqual(bg._reply_from_output([[["u", "pair"]], ""]), "pair")
        self.assertEqual(bg._reply_from_output("chat interface"), "chat interface")

    def test_errors(self):
        client = gradio_client(self, self.demo.url)
        with self.assertRaisesRegex(bg.UpstreamError, "Model is overloaded, try again"):
            list(client.stream("[[error]]"))
        with self.assertRaisesRegex(bg.UpstreamError, "failed without a message"):
            list(client.stream("[[error-null]]"))
        with self.assertRaises(bg.UpstreamOverloadedError):
            list(client.stream("[[busy]]"))
        with self.assertRaisesRegex(bg.UpstreamError, "malformed queue message: '{not json'"):
            list(client.stream("[[malformed]]"))
        with self.assertRaisesRegex(bg.UpstreamError, "malformed generating event"):
            list(gradio_client(self, self.demo.url, protocol="call").stream("[[malformed]]"))
        with self.assertRaisesRegex(bg.APIConnectionError, "ended the stream|dropped"):
            list(client.stream("[[drop]]"))
        with self.assertRaisesRegex(bg.UpstreamError, r"refused the call to /nope \(HTTP 500\)"):
            list(gradio_client(self, self.demo.url, endpoint="nope").stream("x"))
        timeouts = at_once(
            lambda: list(gradio_client(self, self.demo.url, timeout=0.3).stream("[[hang]]")),
            lambda: list(gradio_client(self, self.demo.url, timeout=5, first_event_timeout=0.2).stream("[[hang]]")),
            lambda: list(gradio_client(self, self.demo.url, timeout=0.3).stream("[[stall]]")))
        for exc, message in zip(timeouts, ("sent no output within 0.3s",
                                           "sent no output within 0.2s", "sent no output for 0.3s")):
            self.assertIsInstance(exc, bg.APITimeoutError)
            self.assertRegex(str(exc), message)

    def test_a_stall_after_output_ends_within_the_timeout(self):
        def stall(protocol):
            client = gradio_client(self, self.demo.url, timeout=0.3, protocol=protocol)
            updates = client.stream("[[stall]] Say hello")
            next(updates)                             # output has started
            started = time.monotonic()
            with self.assertRaisesRegex(bg.APITimeoutError, "sent no output for 0.3s"):
                list(updates)
            self.assertLess(time.monotonic() - started, 2)
            self.assertEqual(bg.clean_reply(list(client.stream("Say hello"))[-1][0]).answer, HELLO)
        for failure in at_once(lambda: stall("queue"), lambda: stall("call")):   # side by side
            if failure is not None:
                raise failure

    def test_a_connection_closed_at_rest_is_not_used_and_a_post_is_never_sent_twice(self):
        seen, closed, failed = [], threading.Semaphore(0), threading.Event()
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"

        def serve(server):
            server.settimeout(2)
            try:
                for n in range(4):
                    if n == 3:                        # the POST failed: was it sent again?
                        failed.wait(5)
                        server.settimeout(0)          # (its connection would be waiting)
                    conn, _ = server.accept()
                    with conn:
                        seen.append(conn.recv(65536).split(b" ", 2)[:2])
                        if n < 2:
                            conn.sendall(ok)          # then closed while it rests
                    closed.release()
            except (socket.timeout, BlockingIOError):
                pass
        port, thread = scripted_server(self, serve)
        client = gradio_client(self, "http://127.0.0.1:%d" % port, timeout=5)
        conn = client.http.connection()
        for path in ("/a", "/b"):
            self.assertEqual(client.http.read_body(*client.http.exchange(conn, "GET", path)), b"{}")
            self.assertTrue(closed.acquire(timeout=5))
        with self.assertRaisesRegex(bg.APIConnectionError, "cannot reach the Gradio app"):
            client.http.exchange(conn, "POST", "/c", {})  # it reached the app: not sent again
        failed.set()
        thread.join(5)
        self.assertEqual(seen, [[b"GET", b"/a"], [b"GET", b"/b"], [b"POST", b"/c"]])

    def test_unreachable_app_is_a_connection_error(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()                                   # nothing listens there now
        with self.assertRaisesRegex(bg.APIConnectionError, "cannot reach the Gradio app"):
            list(gradio_client(self, "http://127.0.0.1:%d" % port).stream("x"))


class DiffTests(unittest.TestCase):
    def test_queue_diff_operations(self):
        value = [{"content": [{"text": "Echo:"}]}, ["a"], {"k": 1}]
        value = bg._apply_diff(value, [["append", [0, "content", 0, "text"], " Hi"],
                                       ["add", [1, 0], "z"], ["add", [2, "j"], 2],
                                       ["delete", [2, "k"], None], ["replace", [1, 1], "b"]])
        self.assertEqual(value, [{"content": [{"text": "Echo: Hi"}]}, ["z", "b"], {"j": 2}])
        self.assertEqual(bg._apply_diff("ab", [["append", [], "c"]]), "abc")
        self.assertEqual(bg._apply_diff("ab", [["replace", [], "x"]]), "x")
        with self.assertRaisesRegex(bg.UpstreamError, "cannot apply: 'move'"):
            bg._apply_diff([1], [["move", [0], 1]])

    def test_call_and_queue_captures_give_the_same_text(self):
        for name, answer in (("hindi_please", HINDI), ("show_formatting", bg._DEMO_FORMATTING)):
            prompt = name.replace("_", " ")
            texts = []
            for queue, capture in ((False, "call_%s.sse" % name), (True, "queue_%s.sse" % name)):
                demo = start_demo(self, queue=queue, replay={prompt: fixture(capture)})
                gw = start_gateway(self, demo.url)
                for stream in (False, True):
                    status, _, body = chat(gw, prompt, stream=stream)
                    texts.append(streamed_text(sse_events(body)) if stream else
                                 json.loads(body)["choices"][0]["message"]["content"])
            self.assertEqual(texts, [answer] * 4, name)


class UrlTests(unittest.TestCase):
    def test_accepts_root_gradio_api_and_spaces(self):
        norm = bg._normalize_base_url
        self.assertEqual(norm("https://abc.gradio.live/gradio_api/"), "https://abc.gradio.live")
        self.assertEqual(norm("http://127.0.0.1:7860"), "http://127.0.0.1:7860")
        self.assertEqual(norm("localhost:7860/app/gradio_api"), "http://localhost:7860/app")
        self.assertEqual(norm("BharatGen/Param_Chat"), "https://bharatgen-param-chat.hf.space")
        self.assertEqual(norm("https://huggingface.co/spaces/a/b"), "https://a-b.hf.space")


# The demo upstream's variants: Gradio 4, 5 and 6, over /call and over the queue, and a
# gr.ChatInterface.  Every text case runs across all of them.
VARIANTS = [dict(version=v, queue=q) for v in (6, 5, 4) for q in (True, False)] + \
    [dict(version=6, chat_interface=True, queue=True), dict(version=5, chat_interface=True, queue=False),
     dict(version=4, chat_interface=True, queue=True)]


class VariantTests(unittest.TestCase):
    def each_variant(self):
        for variant in VARIANTS:
            with self.subTest(**variant):
                demo = FakeGradio(**variant).start()
                gw = Gateway(bg.Config(upstream=[demo.url], port=0, timeout=10)).start()
                try:
                    yield variant, demo, gw
                finally:
                    gw.stop()
                    demo.stop()

    def test_discovery_of_each_variant(self):
        for variant, demo, gw in self.each_variant():
            info = gradio_client(self, demo.url).discover()
            v, ci = variant["version"], variant.get("chat_interface", False)
            self.assertEqual(info.prefix, "" if v == 4 else "/gradio_api")
            self.assertEqual(info.use_queue, variant["queue"])
            self.assertEqual(info.endpoint, ("respond" if v == 6 else "chat") if ci else "chat_fn_1")
            self.assertEqual(info.has_history, not ci)
            if not ci:
                self.assertEqual(info.history_format, {4: "pairs", 5: "messages", 6: "parts"}[v])
                self.assertEqual([r for r, _ in info.inputs], ["message", "history", "system",
                                                               "temperature", "max_tokens",
                                                               "top_p", "top_k"])
            else:
                self.assertEqual(info.inputs, [("message", None), ("state", None),
                                               ("system", "You are a friendly bot."),
                                               ("temperature", 0.7)])

    def test_text_cases_streamed_and_not_on_every_variant(self):
        cases = (("Say hello", HELLO), ("show formatting", bg._DEMO_FORMATTING),
                 ("hindi please", HINDI), ("250 words", bg._demo_reply("250 words", [], "", [0] * 4)[1]))
        for variant, demo, gw in self.each_variant():
            for prompt, answer in cases:
                status, _, body = chat(gw, prompt)
                message = json.loads(body)["choices"][0]["message"]
                self.assertEqual((status, message["content"], message["reasoning_content"]),
                                 (200, answer, thought_of(prompt)), prompt)
                events = sse_events(chat(gw, prompt, stream=True)[2])
                self.assertEqual(streamed_text(events), answer, prompt)
                self.assertEqual(streamed_text(events, "reasoning_content"), thought_of(prompt))

    def test_history_and_system_prompt_on_every_variant(self):
        messages = [{"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "tell me the history"}]
        for variant, demo, gw in self.each_variant():
            reply = json.loads(chat(gw, messages, temperature=0.3)[2])
            text = reply["choices"][0]["message"]["content"]
            sent = demo.calls[-1]
            if variant.get("chat_interface"):
                folded = "User: Hi\n\nAssistant: Hello!\n\nUser: tell me the history"
                self.assertEqual(sent[0], folded)
                self.assertEqual(sent[1:], ([None] if variant["queue"] or variant["version"] < 6
                                            else []) + ["Be terse.", 0.3])
                self.assertEqual(text, "SYSTEM=Be terse. | HISTORY=[]")
                continue
            history = {6: [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}],
                       5: [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                       4: [["Hi", "Hello!"]]}[variant["version"]]
            self.assertEqual(sent, ["tell me the history", history, "Be terse.", 0.3,
                                    bg.DEFAULT_MAX_TOKENS, bg.DEFAULT_TOP_P, bg.DEFAULT_TOP_K])
            self.assertEqual(text, "SYSTEM=Be terse. | HISTORY=" + json.dumps(history, sort_keys=True))

    def test_errors_on_every_variant(self):
        for variant, demo, gw in self.each_variant():
            status, _, body = chat(gw, "[[error]]")
            message = json.loads(body)["error"]["message"]
            self.assertEqual(status, 502)
            if variant["queue"] or variant["version"] == 6:
                self.assertEqual(message, "the Gradio app reported an error: Model is overloaded, try again")
            else:     # Gradio 4 and 5 hide the message on /call
                self.assertEqual(message, "the Gradio app failed without a message (it may hide "
                                          "errors; see its logs)")
            events = sse_events(chat(gw, "[[fail-midstream]]", stream=True)[2])
            self.assertEqual((events[-1], events[-2]["error"]["type"]), ("[DONE]", "upstream_error"))


class ReplayTests(unittest.TestCase):
    """The byte-exact captures of a real Gradio 6 app, replayed through the gateway."""

    CASES = [("Say hello", "call_Say_hello.sse", HELLO),
             ("show formatting", "call_show_formatting.sse", bg._DEMO_FORMATTING),
             ("hindi please", "call_hindi_please.sse", HINDI)]

    def setUp(self):
        replay = {prompt: fixture(name) for prompt, name, _ in self.CASES}
        self.demo = start_demo(self, replay=replay, queue=False)
        self.gw = start_gateway(self, self.demo.url)

    def test_captures_give_exact_answers_streamed_and_not(self):
        for prompt, _, answer in self.CASES:
            with self.subTest(prompt=prompt):
                status, _, body = chat(self.gw, prompt)
                self.assertEqual(status, 200)
                message = json.loads(body)["choices"][0]["message"]
                self.assertEqual((message["content"], message["reasoning_content"]),
                                 (answer, thought_of(prompt)))
                status, _, body = chat(self.gw, prompt, stream=True)
                events = sse_events(body)
                self.assertEqual(streamed_text(events), answer)
                self.assertEqual(streamed_text(events, "reasoning_content"), thought_of(prompt))
                self.assertNotIn("\ufffd", body.decode("utf-8"))

    def test_gradio_chat_message_thoughts_are_the_reasoning(self):
        # a ChatInterface yielding gr.ChatMessage(metadata={"title": ...}), then
        # [thought, answer]: mid-stream diffs are empty while the thought grows in place
        demo = start_demo(self, chat_interface=True, replay={
            "capital?": fixture("chatinterface_thoughts6_queue.sse")})
        for reasoning, field in (("separate", "reasoning_content"), ("inline", None)):
            gw = start_gateway(self, demo.url, reasoning=reasoning)
            status, _, body = chat(gw, "capital?")
            message = json.loads(body)["choices"][0]["message"]
            status2, _, streamed = chat(gw, "capital?", stream=True)
            events = sse_events(streamed)
            if field:
                self.assertEqual((status, message["content"], message[field]), (
                    200, "The capital of India is New Delhi.", "Consider the question carefully."))
                self.assertEqual((status2, streamed_text(events), streamed_text(events, field)),
                                 (200, message["content"], message[field]))
            else:
                self.assertEqual(message["content"], "<think>\nConsider the question carefully."
                                 "\n</think>\n\nThe capital of India is New Delhi.")
                self.assertEqual(streamed_text(events), message["content"])

    def test_replies_as_gradio_messages(self):
        thought = {"role": "assistant", "content": "Hmm.", "metadata": {"title": "Thinking",
                                                                       "status": "pending"}}
        answer = {"role": "assistant", "content": [{"type": "text", "text": "Yes."}],
                  "metadata": None}
        user = {"role": "user", "content": "Q?"}
        clean = lambda output: bg.clean_reply(bg._reply_from_output(output))     # noqa: E731
        self.assertEqual(clean([thought, None]), bg.CleanReply("", "Hmm.", False, False))
        self.assertEqual(clean([[thought, answer], None]), bg.CleanReply("Yes.", "Hmm.", True, False))
        self.assertEqual(clean([[user, thought, answer, dict(answer, content="More.")], ""]),
                         bg.CleanReply("Yes.\n\nMore.", "Hmm.", True, False))
        self.assertEqual(clean([[answer, user], ""]), bg.CleanReply("", "", True, False))
        with self.assertRaisesRegex(bg.UpstreamError, "cannot read"):
            bg._reply_from_output([[1, 2], None])

    def test_a_thought_message_growing_by_appends_stays_the_thought(self):
        thought = {"role": "assistant", "content": "Let me", "metadata": {"title": "T",
                                                                          "status": "pending"}}
        def msg(data, kind="process_generating"):
            return "", json.dumps({"msg": kind, "output": {"data": data}, "success": True})

        def events():
            yield msg([[thought], None])
            yield msg([[["append", [0, "content"], " think"]], []])
            yield msg([[["append", [0, "content"], " more"]], []])
            yield msg([[dict(thought, content="Let me think more", metadata={"title": "T"}),
                        {"role": "assistant", "content": "Answer.", "metadata": {}}], None],
                      "process_completed")
        cleaner, thoughts, answers = bg._StreamCleaner(), [], []
        for text, final, appended in bg.GradioClient._queue_updates(events(), bg._Progress()):
            t, a = cleaner.append(text) if appended else cleaner.update(text, final)
            thoughts.append(t)
            answers.append(a)
        self.assertEqual(("".join(thoughts), "".join(answers), cleaner.diverged),
                         ("Let me think more", "Answer.", False))
        self.assertEqual(bg.clean_reply(bg._reply_from_output([[thought, {
            "role": "assistant", "content": 'See:\n<div style="color:#666">x</div>'}], None])
        ).answer, 'See:\n<div style="color:#666">x</div>')        # no Param tail to cut here
        self.assertEqual(bg.clean_reply("<d and e are variables").answer,
                         "<d and e are variables")

    def test_upstream_crash_capture_is_a_502_with_its_message(self):
        self.demo.replay["crash"] = fixture("call_crash.sse")
        status, _, body = chat(self.gw, "crash")
        self.assertEqual((status, json.loads(body)), (502, {"error": {
            "message": "the Gradio app reported an error: internal failure in model worker",
            "type": "upstream_error", "param": None, "code": "upstream_error"}}))


class UpstreamFaultTests(unittest.TestCase):
    """A Gradio app that floods, sends huge events, stalls its head or drops a join: the
    gateway answers in time, within its caps, and never sends a POST twice."""

    def timed_chat(self, gw, prompt, limit, **extra):
        started = time.monotonic()
        status, headers, body = chat(gw, prompt, **extra)
        self.assertLess(time.monotonic() - started, limit)
        return status, headers, body

    def assert_error(self, answer, status, codes):
        got, _, body = answer
        self.assertEqual(got, status, body[:300])
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertIn(error["code"], codes)
        return error

    def test_a_flooding_upstream_does_not_hold_back_another_stream(self):
        flood = faulty_gradio(self, "flood")
        gw1 = start_gateway(self, flood.url)
        demo = start_demo(self)
        gw2 = start_gateway(self, demo.url)
        sock = socket.create_connection(("127.0.0.1", gw1.server_address[1]), timeout=5)
        self.addCleanup(sock.close)
        body = json.dumps({"model": bg.DEFAULT_MODEL, "stream": True,
                           "messages": [{"role": "user", "content": "Say hello"}]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got, deadline = b"", time.monotonic() + 5
        while b"flood" not in got and time.monotonic() < deadline:   # read a little
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        self.assertTrue(got.startswith(b"HTTP/1.1 200 "), got[:300])
        self.assertIn(b"flood", got)
        answer = bg._demo_reply("40 words", [], "", [0] * 4)[1]
        self.assertEqual(len(answer.split()), 40)
        started = time.monotonic()
        status, _, reply = chat(gw2, "40 words", stream=True)
        took = time.monotonic() - started
        self.assertEqual((status, streamed_text(sse_events(reply))), (200, answer))
        self.assertLess(took, 10)
        self.assertGreater(len(sock.recv(65536)), 0)        # the flood's stream still moves
        sock.close()
        self.assertTrue(flood.peer_gone.wait(5), flood.ended)   # and its upstream read ended

    def test_a_40_mb_event_is_cut_at_max_event_bytes(self):
        import tracemalloc
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            self.addCleanup(tracemalloc.stop)
        for behaviour in ("big_line", "big_run"):
            with self.subTest(behaviour=behaviour):
                fake = faulty_gradio(self, behaviour)
                gw = start_gateway(self, fake.url, max_event_bytes=1 << 20)
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                self.assert_error(self.timed_chat(gw, "Say hello", 10), 502, {"upstream_error"})
                self.assertLess(tracemalloc.get_traced_memory()[1] - before, BIG // 2)
                self.assertEqual(len(fake.joins), 1)
                self.assertTrue(fake.peer_gone.wait(5), fake.ended)   # let go, not read out
                self.assertLess(fake.sent, BIG)

    def test_endless_100_continue_is_a_504(self):
        fake = faulty_gradio(self, "continue_forever")
        gw = start_gateway(self, fake.url, connect_timeout=0.25)
        self.assert_error(self.timed_chat(gw, "Say hello", 5), 504, {"upstream_timeout"})
        self.assertEqual(len(fake.joins), 1)

    def test_a_dripped_response_head_is_a_504(self):
        fake = faulty_gradio(self, "drip_head")
        gw = start_gateway(self, fake.url, connect_timeout=0.25)     # a byte each 0.1 s
        self.assert_error(self.timed_chat(gw, "Say hello", 5), 504, {"upstream_timeout"})
        self.assertEqual(len(fake.joins), 1)

    def test_an_endless_config_is_cut_at_max_upstream_body(self):
        for behaviour in ("endless_config", "huge_config"):
            with self.subTest(behaviour=behaviour):
                fake = faulty_gradio(self, behaviour)
                gw = start_gateway(self, fake.url, max_upstream_body=1 << 20)
                self.assert_error(self.timed_chat(gw, "Say hello", 10), 502,
                                  {"upstream_error", "upstream_unreachable"})
                self.assertEqual(fake.joins, [])
                self.assertTrue(fake.peer_gone.wait(5), fake.ended)   # let go, not read out
                self.assertLess(fake.sent, FAKE_STREAM_BYTES)

    def test_a_dropped_join_is_never_sent_twice(self):
        fake = faulty_gradio(self, "drop_join")
        gw = start_gateway(self, fake.url)
        for count in (1, 2):             # the second may ride a kept-alive connection
            self.assert_error(self.timed_chat(gw, "Say hello", 10), 502,
                              {"upstream_error", "upstream_unreachable"})
            self.assertEqual(len(fake.joins), count, fake.log)

    def test_a_join_dropped_on_a_kept_alive_connection_is_never_sent_twice(self):
        fake = faulty_gradio(self, "drop_second_join")
        gw = start_gateway(self, fake.url)
        status, _, body = self.timed_chat(gw, "Say hello", 10)
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                         (200, HELLO))
        self.assert_error(self.timed_chat(gw, "Say hello", 10), 502,
                          {"upstream_error", "upstream_unreachable"})
        self.assertEqual(len(fake.joins), 2, fake.log)


###############################################################################
# Requests: validation and the mapping onto the app ###########################
###############################################################################

class RequestMappingTests(unittest.TestCase):
    def test_system_developer_history_and_merged_turns(self):
        conv = bg._conversation([
            {"role": "system", "content": "S1"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": None}, {"role": "developer", "content": "S2"},
            {"role": "user", "content": [{"type": "text", "text": "u2"}]},
            {"role": "user", "content": "u3"}])
        self.assertEqual((conv.system, conv.history, conv.message),
                         ("S1\n\nS2", [("user", "u1"), ("assistant", "")], "u2\n\nu3"))

    def assert_bad(self, fn, param, message_part, code=None):
        with self.assertRaises(bg.BadRequestError) as cm:
            fn()
        self.assertEqual(cm.exception.param, param)
        self.assertIn(message_part, cm.exception.message)
        if code:
            self.assertEqual(cm.exception.code, code)

    def test_invalid_messages_name_the_param(self):
        self.assert_bad(lambda: bg._conversation([]), "messages", "non-empty list")
        self.assert_bad(lambda: bg._conversation([{"role": "tool", "content": "x"}]),
                        "messages[0].tool_call_id", "is required", "missing_required_parameter")
        self.assert_bad(lambda: bg._conversation([{"role": "robot", "content": "x"}]),
                        "messages[0].role", "must be one of", None)
        self.assert_bad(lambda: bg._conversation([{"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]}]),
            "messages[0].tool_calls[0]", "\"arguments\": \"<JSON>\"", "invalid_value")
        self.assert_bad(lambda: bg._conversation([{"role": "user", "content": "a"}, {
            "role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "user", "content": "b"}]),
            "messages[1].content[0]", "text only", "unsupported_content_type")
        self.assert_bad(lambda: bg._conversation([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]),
            "messages[0].content[0]", "earlier message", "unsupported_content_type")
        conv = bg._conversation([{"role": "user", "content": [
            {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {
                "url": "data:image/png;base64,AA=="}}]}, {"role": "user", "content": [
                    {"type": "input_image", "image_url": "https://example.org/b.png"}]}])
        self.assertEqual((conv.message, conv.images), ("What is it?\n\n", [
            ("data:image/png;base64,AA==", "messages[0].content[1]"),
            ("https://example.org/b.png", "messages[1].content[0]")]))
        conv = bg._conversation([{"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "b"}])   # LangGraph's last call
        self.assertEqual((conv.history, conv.message), ([("user", "a"), ("assistant", "b")],
                                                        "Go on from your last reply."))
        conv = bg._conversation([{"role": "user", "content": "a"}, {"role": "assistant",
                                 "content": "b"}], shaped=True)
        self.assertEqual(conv.message, "Give your last reply again, in the output format.")
        self.assert_bad(lambda: bg._conversation([{"role": "user", "content": "a"}, {
            "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "f", "arguments": "{}"}}]}]), "messages", "send each call's result")
        self.assert_bad(lambda: bg._conversation([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "b"}]),
            "messages[0].content[0]", "earlier message", "unsupported_content_type")
        self.assert_bad(lambda: bg._conversation([{"role": "system", "content": "a"}]),
                        "messages", "need a user message")
        self.assert_bad(lambda: bg._conversation([{"role": "robot", "content": "a"}]),
                        "messages[0].role", "must be one of")

    def test_sampling_ranges_and_types(self):
        s = bg._sampling({"temperature": 0, "top_p": 1, "top_k": 40, "max_tokens": 9,
                          "max_completion_tokens": 12, "stop": "x", "n": 2,
                          "seed": 1, "presence_penalty": 0.5, "response_format": {"type": "text"}},
                         ("max_tokens", "max_completion_tokens"))
        self.assertEqual((s.temperature, s.top_p, s.top_k, s.max_tokens, s.stop, s.n),
                         (0, 1, 40, 12, ["x"], 2))
        self.assert_bad(lambda: bg._sampling({"temperature": 2.5}, ()), "temperature", "between 0 and 2")
        self.assert_bad(lambda: bg._sampling({"temperature": "hot"}, ()), "temperature", "a number")
        self.assert_bad(lambda: bg._sampling({"max_tokens": True}, ("max_tokens",)), "max_tokens", "an integer")
        self.assert_bad(lambda: bg._sampling({"stop": ["a"] * 5}, ()), "stop", "up to 4")
        self.assert_bad(lambda: bg._sampling({"logprobs": True}, ()), "logprobs", "not available")
        self.assertEqual(bg._sampling({"tools": []}, ()).n, 1)

    def test_tools_and_formats_are_checked(self):
        fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        for body, param, text in [
                ({"tools": {}}, "tools", "must be a list"),
                ({"tools": [{"type": "web_search"}]}, "tools[0]", "calls functions only"),
                ({"tools": [{"type": "function", "function": {"name": "a b"}}]},
                 "tools[0].function.name", "1 to 64"),
                ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
                 "tools[0].function.parameters", "JSON Schema object"),
                ({"tools": [fn, fn]}, "tools[1]", "repeats the function name 'f'"),
                ({"tools": [fn], "tool_choice": "always"}, "tool_choice", "must be 'none'"),
                ({"tools": [fn], "tool_choice": {"type": "function", "function": {"name": "g"}}},
                 "tool_choice", "names \"g\", which is not in 'tools'"),
                ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
                ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "must be a boolean"),
                ({"response_format": {"type": "xml"}}, "response_format", "must have type"),
                ({"response_format": {"type": "json_schema", "json_schema": {"schema": 1}}},
                 "response_format", "must be a JSON Schema object")]:
            with self.subTest(body=body):
                self.assert_bad(lambda: bg._shape(body, 1), param, text)
        shape = bg._shape({"tools": [fn], "tool_choice": {"type": "function", "function": {
            "name": "f"}}, "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "array"}, "strict": True}}}, 2)
        self.assertEqual((shape.choice, shape.fmt["schema"], shape.fmt["strict"], shape.repairs,
                          shape.hold_all), ("f", {"type": "array"}, True, 2, True))


class FoldingTests(unittest.TestCase):
    def test_a_system_prompt_the_app_has_no_input_for_is_folded_into_the_message(self):
        demo = PlainChatInterface().start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url)
        messages = [{"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Say hello"}]
        status, _, body = chat(gw, messages, temperature=0.2, max_tokens=100)
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                         (200, HELLO))
        self.assertEqual(demo.calls[-1], ["System: Be terse.\n\nUser: Hi\n\nAssistant: Hello!"
                                          "\n\nUser: Say hello", None])
        chat(gw, [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
        self.assertEqual(demo.calls[-1], ["System: Be terse.\n\nUser: Hi", None])
        chat(gw, "Hi")
        self.assertEqual(demo.calls[-1], ["Hi", None])


class MaxTokensTests(unittest.TestCase):
    def test_an_app_with_no_max_tokens_input_is_cut_by_the_gateway(self):
        demo = PlainChatInterface(token_delay=0.005).start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url)
        for stream in (False, True):
            status, _, body = chat(gw, "300 words", stream=stream, max_tokens=5)
            if stream:
                events = sse_events(body)[:-1]
                thought, text = streamed_text(events, "reasoning_content"), streamed_text(events)
                finish = events[-1]["choices"][0]["finish_reason"]
            else:
                choice = json.loads(body)["choices"][0]
                thought, text = choice["message"]["reasoning_content"], choice["message"]["content"]
                finish = choice["finish_reason"]
            self.assertEqual((status, finish), (200, "length"))
            self.assertEqual(thought, "The user said: 300")         # 5 tokens, no more
            self.assertEqual(text, "")
            self.assertEqual(bg.estimate_tokens(thought) + bg.estimate_tokens(text), 5)
        deadline = time.monotonic() + TIMEOUT            # the app's job was stopped at the cut
        while len(demo.cancels) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(len(demo.cancels), 2)
        status, _, body = chat(gw, "300 words", max_tokens=30)
        choice = json.loads(body)["choices"][0]
        self.assertEqual((choice["finish_reason"], choice["message"]["content"]), (
            "length", bg._demo_reply("300 words", [], "", [0] * 4)[1][:len(choice["message"]["content"])]))
        self.assertEqual(json.loads(body)["usage"]["completion_tokens"], 30)
        choice = json.loads(chat(gw, "Say hello", max_tokens=30)[2])["choices"][0]
        self.assertEqual((choice["finish_reason"], choice["message"]["content"]), ("stop", HELLO))


###############################################################################
# Tools and JSON Schema #######################################################
###############################################################################

def schema_problem(schema, strict=True, patterns=None):
    """Why a schema is refused when a request brings it (None if it is taken)."""
    try:
        bg._Schema(schema, "s", strict, patterns)
    except bg.BadRequestError as exc:
        return exc.message
    return None


class SchemaTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.patterns = bg._Patterns()

    @classmethod
    def tearDownClass(cls):
        cls.patterns.close()

    def error(self, value, schema, strict=False):
        return bg._Schema(schema, "s", strict, self.patterns).error(value)

    def test_the_validator_says_what_is_wrong(self):
        defs = {"$defs": {"P": POINT}, "type": "object", "properties": {
            "p": {"$ref": "#/$defs/P"}, "kind": {"enum": ["a", "b"]},
            "n": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
            "s": {"type": "string", "maxLength": 3}}, "additionalProperties": False}
        for value, error in [
                ({"p": {"x": 1, "tags": ["t"]}, "kind": "a", "n": None, "s": "abc"}, None),
                ({"p": {"x": 1.5, "tags": []}}, "$.p.x should be of type integer, not 1.5"),
                ({"p": {"x": True, "tags": []}}, "$.p.x should be of type integer, not true"),
                ({"p": {"x": 2.0, "tags": [3]}}, "$.p.tags[0] should be of type string, not 3"),
                ({"p": {"tags": []}}, "$.p is missing the required property 'x'"),
                ({"kind": "c"}, "$.kind should be one of [\"a\", \"b\"]"),
                ({"n": 0}, "$.n fits none of the schemas it may take"),
                ({"s": "abcd"}, "$.s should have a maxLength of 3"),
                ({"t": 1}, "$.t is not a property the schema allows"),
                ([], "$ should be of type object, not []")]:
            with self.subTest(value=value):
                self.assertEqual(self.error(value, defs), error)
        loop = {"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}
        self.assertEqual(self.error(1, loop), "$: the schema's $ref '#/$defs/A' cannot be followed")
        self.assertEqual(self.error(1, {"$ref": "http://x/s.json"}),
                         "$: the schema's $ref 'http://x/s.json' cannot be followed")

    def test_a_value_nested_past_the_stack_is_an_error_to_repair(self):
        shape = bg._shape({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/T"}}, "$defs": {
                "T": {"type": "array", "items": {"$ref": "#/$defs/T"}}}}}}]}, 1)
        call = '<tool_call>{"name": "f", "arguments": {"a": %s}}</tool_call>' % ("[" * 900 + "]" * 900)
        self.assertEqual(shape.check(call), (None, [], "the call of f is invalid: it is nested "
                                                       "too deeply to check"))
        self.assertEqual(schema_problem({"allOf": [{"allOf": [{}]}]}), None)
        deep = {}
        for _ in range(65):
            deep = {"allOf": [deep]}
        self.assertEqual(schema_problem(deep, strict=False), "s" + ".allOf[0]" * 65 + " must be a "
                         "JSON Schema object (at most 64 levels deep)")

    def test_checked_keywords_and_json_equality(self):
        tree = {"$defs": {"N": {"type": "object", "properties": {"kids": {"type": "array",
                                                                        "items": {"$ref": "#/$defs/N"}}}}},
                "$ref": "#/$defs/N"}
        deep = {}
        for _ in range(40):
            deep = {"kids": [deep]}
        for schema, value, error in [
                ({"enum": [1, 2]}, True, "$ should be one of [1, 2]"),
                ({"enum": [1, 2]}, 1.0, None),
                ({"const": False}, 0, "$ should be false"),
                ({"const": {"a": 1}}, {"a": True}, '$ should be {"a": 1}'),
                ({"oneOf": [{"type": "integer"}, {"minimum": 0}]}, 5,
                 "$ should fit exactly one of the schemas it may take"),
                ({"$defs": {"A": {"type": "integer"}}, "$ref": "#/$defs/A", "minimum": 5}, 1,
                 "$ should be minimum 5"),
                ({"$defs": {"a/b": {"type": "string"}}, "$ref": "#/$defs/a~1b"}, 1,
                 "$ should be of type string, not 1"),
                ({"pattern": "^[0-9]+$"}, "abc", "$ should match the pattern '^[0-9]+$'"),
                ({"uniqueItems": True}, [1, 1.0], "$ should hold no item twice"),
                ({"uniqueItems": True}, [1, True], None),
                ({"multipleOf": 0.5}, 1.25, "$ should be multipleOf 0.5"),
                ({"not": {"type": "string"}}, "x", "$ should not fit the schema it is told not to"),
                ({"prefixItems": [{"type": "string"}], "items": False}, ["a", 1],
                 "$[1] is not allowed"),
                ({"minProperties": 1}, {}, "$ should have a minProperties of 1"),
                ({"maxItems": 1}, "abc", None), ({"maxLength": 1}, [1, 2], None),
                ({"minimum": 5}, True, None), ({"exclusiveMinimum": True, "minimum": 1}, 1, None),
                (tree, deep, None)]:
            with self.subTest(schema=schema, value=value):
                self.assertEqual(schema_problem(schema, patterns=self.patterns), None)
                self.assertEqual(self.error(value, schema), error)
        self.assertEqual(bg._json_in('{"v": NaN} or {"v": 1}'), ({"v": 1}, '{"v": 1}'))

    def test_schemas_that_cannot_be_checked_are_refused(self):
        for schema, problem, strict_problem in [
                ({"type": {}}, "s.type is not a valid 'type'", None),
                ({"type": ["x"]}, "s.type is not a valid 'type'", None),
                ({"required": 5}, "s.required is not a valid 'required'", None),
                ({"enum": "abc"}, "s.enum is not a valid 'enum'", None),
                ({"allOf": 5}, "s.allOf is not a valid 'allOf'", None),
                ({"maxLength": -1}, "s.maxLength is not a valid 'maxLength'", None),
                ({"multipleOf": 0}, "s.multipleOf is not a valid 'multipleOf'", None),
                ({"items": [{}]}, "s.items must be a JSON Schema object (at most 64 levels "
                                  "deep)", None),
                ({"pattern": "("}, None, "s.pattern: the pattern '(' cannot be checked here"),
                ({"pattern": "a" * 1001}, None, "s.pattern: the pattern %r cannot be checked "
                                               "here" % ("a" * 100)),
                ({"patternProperties": {"\\p{L}": {}}}, None,
                 "s.patternProperties: the pattern '\\\\p{L}' cannot be checked here"),
                ({"properties": {"a": {"unevaluatedProperties": False}}}, None,
                 "s.properties.a: this server cannot check the keyword 'unevaluatedProperties'")]:
            with self.subTest(schema=schema):
                self.assertEqual(schema_problem(schema, strict=False), problem)
                self.assertEqual(schema_problem(schema, True, self.patterns),
                                 problem or strict_problem)

    def test_a_bare_json_call_is_the_call_not_the_content(self):
        shape = bg._shape({"tools": [WEATHER], "tool_choice": "required"}, 1)
        rest, calls, error = shape.check('{"name": "get_weather", "arguments": {"city": "Pune"}}')
        self.assertEqual((rest.strip(), [(c["name"], c["arguments"]) for c in calls], error),
                         ("", [("get_weather", '{"city": "Pune"}')], None))
        shape = bg._shape({"tools": [WEATHER]}, 1)
        self.assertEqual(shape.check("I would write <tool_call> tags here."),
                         ("I would write <tool_call> tags here.", [], None))   # prose: no call

    def test_json_is_found_in_fences_and_prose(self):
        for text, found in [('{"a": 1}', ({"a": 1}, '{"a": 1}')),
                            ('Sure:\n```json\n{"a": [1]}\n```\nDone.', ({"a": [1]}, '{"a": [1]}')),
                            ('The set {x} is {"b": 2} here', ({"b": 2}, '{"b": 2}')),
                            ('no json at all', None), ('{' * 100 + '"a"', None)]:
            with self.subTest(text=text):
                self.assertEqual(bg._json_in(text), found)


class ToolTests(_DemoGateway):
    """Tool calls and structured output against the demo upstream, which calls the
    weather tool when asked about the weather and answers in JSON when asked to."""

    def both(self, prompt, **extra):
        """``(message, finish_reason)`` of the answer, checked the same when streamed."""
        status, _, body = chat(self.gw, prompt, **extra)
        self.assertEqual(status, 200, body)
        choice = json.loads(body)["choices"][0]
        status, _, body = chat(self.gw, prompt, stream=True, **extra)
        events = sse_events(body)[:-1]
        calls = {}
        for e in events:
            for d in e["choices"][0]["delta"].get("tool_calls") or ():
                call = calls.setdefault(d["index"], {"id": None, "type": None, "function": {
                    "name": None, "arguments": ""}})
                call["id"] = d.get("id") or call["id"]
                call["type"] = d.get("type") or call["type"]
                call["function"]["name"] = d.get("function", {}).get("name") or call["function"]["name"]
                call["function"]["arguments"] += d.get("function", {}).get("arguments", "")
        message = choice["message"]
        self.assertEqual((streamed_text(events) or None, [
            dict(c, id=None) for _, c in sorted(calls.items())] or None,
            events[-1]["choices"][0]["finish_reason"]),
            (message["content"] or None, [dict(c, id=None) for c in message.get("tool_calls", [])]
             or None, choice["finish_reason"]))
        return message, choice["finish_reason"]

    def calls(self, message):
        return [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in message.get("tool_calls", ())]

    def test_a_call_and_its_result(self):
        message, finish = self.both("What is the weather in Pune and Delhi?", tools=[WEATHER])
        self.assertEqual((message["content"], self.calls(message), finish), (
            "Let me check.", [("function", "get_weather", {"city": "Pune"}),
                              ("function", "get_weather", {"city": "Delhi"})], "tool_calls"))
        self.assertTrue(all(c["id"].startswith("call_") for c in message["tool_calls"]))
        system = self.demo.calls[-1][2]
        self.assertTrue(system.startswith("# Tools\n\nYou may call one or more functions"), system)
        self.assertIn('\n<tools>\n%s\n</tools>\n' % json.dumps(WEATHER, ensure_ascii=False), system)
        history = [{"role": "user", "content": "What is the weather in Pune?"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_a", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\": \"Pune\"}"}}]},
                   {"role": "tool", "tool_call_id": "call_a", "content": "31 C, sunny"}]
        message, finish = self.both(history, tools=[WEATHER])
        self.assertEqual((message["content"], finish),
                         ("Here is what the tools said: get_weather: 31 C, sunny", "stop"))
        self.assertEqual(self.demo.calls[-1][:2], [
            '<tool_response>\n{"name": "get_weather", "content": "31 C, sunny"}\n</tool_response>',
            [{"role": "user", "content": [{"type": "text", "text": "What is the weather in Pune?"}]},
             {"role": "assistant", "content": [{"type": "text", "text":
                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pune"}}\n</tool_call>'}]}]])

    def test_tool_choice_forms(self):
        message, finish = self.both("Say hello", tools=[WEATHER])
        self.assertEqual((message["content"], finish), (HELLO, "stop"))
        message, finish = self.both("weather in Pune", tools=[WEATHER], tool_choice="none")
        self.assertEqual((message["content"][:40], finish, "<tools>" in self.demo.calls[-1][2]),
                         ("This is the bharatgen_openai demo upstre", "stop", False))
        message, _ = self.both("weather in Pune", tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "get_weather"}})
        self.assertEqual(self.calls(message), [("function", "get_weather", {"city": "Pune"})])
        self.assertIn(" You must call the function 'get_weather'.", self.demo.calls[-1][2])
        status, _, body = chat(self.gw, "[[no-call]] Say hello", tools=[WEATHER],
                               tool_choice="required")
        self.assertEqual((status, json.loads(body)["error"]["message"], len(self.demo.calls[-1][1])),
                         (502, "the model's reply was not valid after 1 repair turn(s): it calls "
                               "no function, and a function call is required", 2))
        status, _, body = chat(self.gw, "weather in Pune and Delhi", tools=[WEATHER],
                               parallel_tool_calls=False)
        self.assertEqual((status, json.loads(body)["choices"][0]["finish_reason"]), (200, "stop"))
        self.assertIn(" Call at most one function.", self.demo.calls[-1][2])

    def test_a_bad_call_gets_one_repair_and_is_never_returned(self):
        message, finish = self.both("weather in Pune, a bad call once", tools=[WEATHER])
        self.assertEqual((self.calls(message), finish),
                         ([("function", "get_weather", {"city": "Pune"})], "tool_calls"))
        self.assertEqual(self.demo.calls[-1][0], "Your last reply was not valid: the call of "
                         "get_weather is invalid: arguments is missing the required property "
                         "'city'. Reply again, correctly.")
        bad = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
        message, finish = self.both("[[bad-call]] weather in Pune", tools=[WEATHER])
        self.assertEqual((message["content"], "tool_calls" in message, finish), (bad, False, "stop"))
        gw = start_gateway(self, self.demo.url, tool_repairs=0)
        status, _, body = chat(gw, "weather in Pune, a bad call once", tools=[WEATHER])
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], bad)
        status, _, body = chat(gw, "[[bad-call]] weather in Pune", tools=[WEATHER],
                               tool_choice="required")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (502, "invalid_model_output"))
        status, _, body = chat(gw, "[[bad-call]] weather in Pune", tools=[WEATHER],
                               tool_choice="required", stream=True)   # the thought went out
        events = sse_events(body)
        self.assertEqual((status, streamed_text(events[:-2]), events[-2]["error"]["code"],
                          events[-1]), (200, "", "invalid_model_output", "[DONE]"))

    def test_structured_output(self):
        schema = {"type": "json_schema", "json_schema": {"name": "point", "strict": True,
                                                          "schema": POINT}}
        for fmt, prompt, content in [
                ({"type": "json_object"}, "give me json", '{"answer": "Param"}'),
                (schema, "a point please", '{"x": 1, "tags": ["Param"]}'),
                (schema, "a point, bad json once", '{"x": 1, "tags": ["Param"]}'),
                ({"type": "json_object"}, "[[bad-json]]", "Sure! {not json")]:
            with self.subTest(fmt=fmt["type"], prompt=prompt):
                message, finish = self.both(prompt, response_format=fmt)
                self.assertEqual((message["content"], finish), (content, "stop"))
        self.both("a point please", response_format=schema)
        self.assertEqual(self.demo.calls[-1][2], "# Output format\n\nReply with JSON only, no "
                         "other text: one JSON value valid against this JSON Schema:\n"
                         + json.dumps(POINT))
        error = "the model's reply was not valid after 1 repair turn(s): it holds no JSON"
        status, _, body = chat(self.gw, "[[bad-json]]", response_format=schema)
        self.assertEqual((status, json.loads(body)["error"]["message"]), (502, error))
        status, _, body = chat(self.gw, "[[bad-json]]", True, response_format=schema)
        events = sse_events(body)
        self.assertEqual((status, streamed_text(events[:-2]), events[-2]["error"]["message"]),
                         (200, "", error))

    def test_odd_requests_get_a_clear_400(self):
        fn = WEATHER["function"]
        for path, body, param, text in [
                ("/v1/chat/completions", {"functions": [fn]}, "functions", "deprecated form"),
                ("/v1/chat/completions", {"tools": [WEATHER], "function_call": "auto"},
                 "function_call", "deprecated form"),
                ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {
                    "type": "allowed_tools"}}, "tool_choice", 'type "allowed_tools" is not'),
                ("/v1/chat/completions", {"response_format": {"type": "json_schema"}},
                 "response_format", "needs 'json_schema'"),
                ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
                    "name": "x", "schema": {"type": {}}}}}, "response_format", "not a valid 'type'"),
                ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
                    "name": "f", "parameters": {"required": 5}}}]}, "tools[0].function.parameters",
                 "not a valid 'required'"),
                ("/v1/chat/completions", {"messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [{"id": ["x"], "type": "function",
                                                          "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "x", "content": "1"}]},
                 "messages[1].tool_calls[0]", "must be {\"id\""),
                ("/v1/chat/completions", {"messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "nope", "content": "1"}]},
                 "messages[1].tool_call_id", 'the tool call "nope", which no earlier'),
                ("/v1/completions", {"prompt": "hi", "tool_choice": "auto"}, "tool_choice",
                 "not of /v1/completions"),
                ("/v1/responses", {"input": "hi", "response_format": {"type": "json_object"}},
                 "response_format", "takes text.format"),
                ("/v1/responses", {"input": "hi", "text": "json"}, "text", "must be an object")]:
            with self.subTest(path=path, param=param):
                body = dict({"model": bg.DEFAULT_MODEL}, **body)
                if path == "/v1/chat/completions":
                    body.setdefault("messages", [{"role": "user", "content": "hi"}])
                status, _, raw = request(self.gw.url, "POST", path, body)
                error = json.loads(raw)["error"]
                self.assertEqual((status, error["param"], error["type"]),
                                 (400, param, "invalid_request_error"))
                self.assertIn(text, error["message"])

    def test_a_repair_sends_nothing_twice_and_a_failed_one_returns_the_first_reply(self):
        both = dict(WEATHER["function"], parameters={
            "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city", "unit"]})
        message, finish = self.both("weather in Delhi", tools=[{"type": "function", "function": both}])
        self.assertEqual((message["content"], finish), (
            'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Delhi"}}'
            '\n</tool_call>', "stop"))
        status, _, body = chat(self.gw, "weather in Delhi", tools=[{"type": "function", "function": both}])
        self.assertEqual(json.loads(body)["choices"][0]["message"]["reasoning_content"],
                         thought_of("weather in Delhi") + "\n\n" + thought_of(
                             "Your last reply was not valid: the call of get_weather is invalid: "
                             "arguments is missing the required property 'unit'. Reply again, "
                             "correctly."))

    def test_a_failure_after_output_began_is_an_error_event_not_a_second_response(self):
        class Broken(bg._Backend):
            def _chat_chunks(self, *args):
                yield from itertools.islice(super()._chat_chunks(*args), 2)
                raise KeyError("a bug")

        config = bg.Config(upstream=[self.demo.url], port=0, timeout=10)
        gw = Gateway(config, Broken(config)).start()
        self.addCleanup(gw.stop)
        with self.assertLogs("bharatgen_openai", "ERROR"):
            status, _, body = chat(gw, "Say hello", stream=True)
        events = sse_events(body)
        self.assertEqual((status, events[-2]["error"]["type"], events[-1]),
                         (200, "server_error", "[DONE]"))
        self.assertNotIn(b"HTTP/1.1", body)

    def test_responses_api_tools(self):
        tool = dict(WEATHER["function"], type="function")
        status, _, body = request(self.gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": "weather in Pune", "tools": [tool]})
        resp = json.loads(body)
        call = resp["output"][-1]
        self.assertEqual((status, [o["type"] for o in resp["output"]], call["name"],
                          call["arguments"], call["status"], resp["tools"]),
                         (200, ["reasoning", "message", "function_call"], "get_weather",
                          '{"city": "Pune"}', "completed", [tool]))
        status, _, body = request(self.gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "tools": [tool], "stream": True, "input": [
                {"role": "user", "content": "weather in Pune"},
                {"type": "function_call", "call_id": call["call_id"], "name": "get_weather",
                 "arguments": call["arguments"]},
                {"type": "function_call_output", "call_id": call["call_id"], "output": "rain"}]})
        self.assertEqual(sse_events(body)[-1]["response"]["output"][-1]["content"][0]["text"],
                         "Here is what the tools said: get_weather: rain")
        status, _, body = request(self.gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": "point", "text": {"format": {
                "type": "json_schema", "name": "p", "schema": POINT, "strict": True}}})
        self.assertEqual(json.loads(body)["output"][-1]["content"][0]["text"],
                         '{"x": 1, "tags": ["Param"]}')
        status, _, body = request(self.gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": "hi", "tools": [{"type": "web_search"}]})
        self.assertEqual((status, json.loads(body)["error"]["param"]), (400, "tools[0]"))


###############################################################################
# The engine: snapshots -> clean deltas, reasoning modes ######################
###############################################################################

class ReasoningModeTests(unittest.TestCase):
    def test_inline_none_and_renamed_field(self):
        demo = start_demo(self)
        thought = thought_of("Say hello")
        inline = start_gateway(self, demo.url, reasoning="inline")
        expected = "<think>\n%s\n</think>\n\n%s" % (thought, HELLO)
        self.assertEqual(json.loads(chat(inline, "Say hello")[2])["choices"][0]["message"],
                         {"role": "assistant", "content": expected, "refusal": None, "annotations": []})
        self.assertEqual(streamed_text(sse_events(chat(inline, "Say hello", stream=True)[2])), expected)
        none = start_gateway(self, demo.url, reasoning="none")
        self.assertEqual(json.loads(chat(none, "Say hello")[2])["choices"][0]["message"]["content"], HELLO)
        renamed = start_gateway(self, demo.url, reasoning_field="reasoning")
        events = sse_events(chat(renamed, "Say hello", stream=True)[2])
        self.assertEqual(streamed_text(events, "reasoning"), thought)
        self.assertEqual(json.loads(chat(renamed, "Say hello")[2])["choices"][0]["message"]["reasoning"], thought)

###############################################################################
# Configuration ###############################################################
###############################################################################

class ConfigTests(unittest.TestCase):
    def test_flags_win_over_environment_over_defaults(self):
        env = {"BHARATGEN_MODEL": "env-model", "BHARATGEN_TIMEOUT": "5",
               "BHARATGEN_API_KEYS": "a, b", "BHARATGEN_BASE_URL": "http://x"}
        c = bg.Config.load(env, model="flag-model")
        self.assertEqual((c.model, c.timeout, c.api_keys, c.upstream, c.port),
                         ("flag-model", 5.0, ["a", "b"], ["http://x"], 8000))
        self.assertEqual(bg.Config.load({"BHARATGEN_UPSTREAM": "http://a, http://b"}).upstream,
                         ["http://a", "http://b"])
        self.assertEqual(bg.Config.load({}).model, bg.DEFAULT_MODEL)
        c = bg.Config.load({"BHARATGEN_FIRST_EVENT_TIMEOUT": "2.5", "BHARATGEN_ALLOW_NO_AUTH": "yes",
                            "BHARATGEN_MAX_CONCURRENT": "9", "BHARATGEN_CORS_ORIGINS": "*"})
        self.assertEqual((c.first_event_timeout, c.allow_no_auth, c.max_concurrent, c.cors_origins),
                         (2.5, True, 9, ["*"]))
        import argparse
        self.assertEqual(bg._config_from_args(argparse.Namespace(
            max_connections=7, send_timeout=2.5, max_event_bytes=99)).max_connections, 7)
        c = bg.Config.load({"BHARATGEN_MAX_CONNECTIONS": "3", "BHARATGEN_SEND_TIMEOUT": "1.5",
                            "BHARATGEN_MAX_EVENT_BYTES": "1024"})
        self.assertEqual((c.max_connections, c.send_timeout, c.max_event_bytes), (3, 1.5, 1024))

    def test_bad_environment_values_are_reported(self):
        with self.assertRaisesRegex(ValueError, "BHARATGEN_TIMEOUT='soon' is not a valid"):
            bg.Config.load({"BHARATGEN_TIMEOUT": "soon"})
        with self.assertRaisesRegex(ValueError, "reasoning must be one of"):
            bg.Config.load({}, reasoning="loud")


###############################################################################
# The backend: the cache and replicas #########################################
###############################################################################

class CacheTests(unittest.TestCase):
    def test_a_cached_answer_is_served_again_for_the_same_request_and_key_only(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, api_keys=["sk-a", "sk-b"], cache_ttl=60, cache_size=2)
        a, b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}

        def ask(prompt, headers, stream=False, **extra):
            status, head, body = chat(gw, prompt, stream, headers, **extra)
            self.assertEqual(status, 200, body)
            events = sse_events(body)[:-1] if stream else None
            text = streamed_text(events) if stream else json.loads(body)["choices"][0]["message"]["content"]
            return head["x-cache"], text

        calls = len(demo.calls)
        self.assertEqual(ask("Say hello", a), ("miss", HELLO))
        self.assertEqual(ask("Say hello", a), ("hit", HELLO))
        self.assertEqual(ask("Say hello", a, stream=True), ("hit", HELLO))   # stream or not
        self.assertEqual(ask("Say hello", b), ("miss", HELLO))               # another key
        self.assertEqual(ask("Say hello", a, temperature=0.1), ("miss", HELLO))  # another request
        self.assertEqual(len(demo.calls), calls + 3)
        self.assertEqual(ask("hindi please", a, stream=True), ("miss", HINDI))
        self.assertEqual(ask("hindi please", a), ("hit", HINDI))
        self.assertEqual(ask("Say hello", a), ("miss", HELLO))     # size 2: the oldest went
        status, head, _ = chat(gw, "[[error]]", False, a)
        status2, head2, _ = chat(gw, "[[error]]", False, a)
        self.assertEqual((status, head["x-cache"], status2, head2["x-cache"]),
                         (502, "miss", 502, "miss"))                      # errors are not kept
        _, _, body = request(gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": "Say hello"}, a)
        _, head, again = request(gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": "Say hello", "stream": True}, a)
        self.assertEqual((head["x-cache"], sse_events(again)[-1]["response"]["output"][-1]),
                         ("hit", json.loads(body)["output"][-1] | {"id": sse_events(again)[-1]["response"]["output"][-1]["id"]}))
        self.assertTrue(wait_until(lambda: gw.in_flight == 0))   # counted after its answer
        metrics = request(gw.url, "GET", "/metrics", headers=a)[2].decode()
        self.assertIn('bharatgen_cache_total{result="hit"} 4\n', metrics)
        self.assertIn('bharatgen_cache_total{result="miss"} 6\n', metrics)
        gw = start_gateway(self, demo.url, cache_ttl=0.2)
        self.assertEqual(chat(gw, "Say hello")[1]["x-cache"], "miss")
        self.assertEqual(chat(gw, "Say hello")[1]["x-cache"], "hit")
        time.sleep(0.3)
        self.assertEqual(chat(gw, "Say hello")[1]["x-cache"], "miss")         # expired
        self.assertNotIn("x-cache", chat(start_gateway(self, demo.url), "Say hello")[1])


class ReplicaTests(unittest.TestCase):
    def dead_url(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        return "http://127.0.0.1:%d" % port

    def test_round_robin_skips_a_dead_replica_and_health_reports_it(self):
        a, b, dead = start_demo(self), start_demo(self), self.dead_url()
        gw = start_gateway(self, [a.url, dead, b.url], backoff=30)
        for _ in range(6):
            reply = json.loads(chat(gw, "Say hello")[2])
            self.assertEqual(reply["choices"][0]["message"]["content"], HELLO)
        self.assertEqual((len(a.calls), len(b.calls)), (3, 3))
        status, _, body = request(gw.url, "GET", "/health")
        states = json.loads(body)["models"][bg.DEFAULT_MODEL]
        self.assertEqual((status, [s["status"] for s in states]), (200, ["up", "down", "up"]))
        self.assertIn("cannot reach the Gradio app", states[1]["last_error"])

    def test_all_replicas_down_is_502_and_health_503(self):
        gw = start_gateway(self, [self.dead_url(), self.dead_url()], backoff=30)
        status, _, body = chat(gw, "Say hello")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (502, "upstream_unreachable"))
        self.assertEqual(request(gw.url, "GET", "/health")[0], 503)

    def test_overloaded_replica_is_retried_on_the_next(self):
        a, b = start_demo(self), start_demo(self)
        gw = start_gateway(self, [a.url, b.url])
        status, _, body = chat(gw, "[[busy]] hello")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (503, "upstream_overloaded"))
        self.assertEqual(len(a.calls) + len(b.calls), 0)     # both were tried, both refused
        status, _, body = request(gw.url, "GET", "/health")   # busy, not down: still healthy
        states = json.loads(body)["models"][bg.DEFAULT_MODEL]
        self.assertEqual((status, [(s["status"], s["failures"]) for s in states]),
                         (200, [("busy", 0), ("busy", 0)]))
        reply = json.loads(chat(gw, "Say hello")[2])   # busy replicas are still tried
        self.assertEqual(reply["choices"][0]["message"]["content"], HELLO)
        self.assertEqual([s["status"] for s in json.loads(request(gw.url, "GET", "/health")[2])
                          ["models"][bg.DEFAULT_MODEL]].count("up"), 1)

    def test_models_file_declares_several_models(self):
        import tempfile
        six, four = start_demo(self), start_demo(self, version=4, chat_interface=True)
        spec = {"models": [
            {"id": bg.DEFAULT_MODEL, "upstreams": [six.url], "display_name": "Param 1",
             "system_prompt": "From the file."},
            {"id": "echo-4", "upstreams": [four.url], "protocol": "call",
             "params": {"system": "system_prompt"}}]}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        self.addCleanup(os.unlink, f.name)
        gw = start_gateway(self, [], models_file=f.name)
        models = json.loads(request(gw.url, "GET", "/v1/models")[2])["data"]
        self.assertEqual([(m["id"], m.get("display_name")) for m in models],
                         [(bg.DEFAULT_MODEL, "Param 1"), ("echo-4", None)])
        reply = json.loads(chat(gw, "Say hello", model="echo-4")[2])
        self.assertEqual(reply["choices"][0]["message"]["content"], HELLO)
        self.assertEqual((len(four.calls), len(six.calls)), (1, 0))
        chat(gw, "Say hello", model=bg.DEFAULT_MODEL)
        self.assertEqual(six.calls[-1][2], "From the file.")


###############################################################################
# SDK: BharatGenOpenAI ########################################################
###############################################################################

class SDKTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.demo = FakeGradio().start()
        cls.client = bg.BharatGenOpenAI(cls.demo.url, timeout=10)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.demo.stop()

    def test_create_stream_and_not(self):
        reply = self.client.chat.completions.create(
            messages=[{"role": "user", "content": "show formatting"}])
        self.assertEqual(reply.choices[0].message.content, bg._DEMO_FORMATTING)
        self.assertEqual(reply.choices[0].message.reasoning_content, thought_of("show formatting"))
        with self.client.chat.completions.create(
                messages=[{"role": "user", "content": "show formatting"}], stream=True) as stream:
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        self.assertEqual(text, bg._DEMO_FORMATTING)

    def test_responses(self):
        resp = self.client.responses.create(input="Say hello", instructions="Be kind.")
        self.assertEqual((resp.output_text, resp.status, [o.type for o in resp.output],
                          resp.output[0].content[0].text),
                         (HELLO, "completed", ["reasoning", "message"], thought_of("Say hello")))
        self.assertEqual(self.demo.calls[-1][2], "Be kind.")
        with self.client.responses.create(input="hindi please", stream=True) as stream:
            events = list(stream)
        self.assertEqual(("".join(e.delta for e in events if e.type == "response.output_text.delta"),
                          events[-1].type, events[-1].response.output_text),
                         (HINDI, "response.completed", HINDI))

    def test_tools(self):
        reply = self.client.chat.completions.create(
            messages=[{"role": "user", "content": "weather in Pune"}], tools=[WEATHER])
        call = reply.choices[0].message.tool_calls[0]
        self.assertEqual((reply.choices[0].finish_reason, call.function.name,
                          call.function.arguments), ("tool_calls", "get_weather", '{"city": "Pune"}'))
        chunks = list(self.client.chat.completions.create(
            messages=[{"role": "user", "content": "weather in Pune"}], tools=[WEATHER], stream=True))
        self.assertEqual([d.function.to_dict() for c in chunks for d in c.choices[0].delta.tool_calls or ()],
                         [{"name": "get_weather", "arguments": ""}, {"arguments": '{"city": "Pune"}'}])

    def test_models_and_errors(self):
        self.assertEqual([m.id for m in self.client.models.list()], [bg.DEFAULT_MODEL])
        with self.assertRaises(bg.NotFoundError):
            self.client.models.retrieve("other")
        with self.assertRaisesRegex(bg.UpstreamError, "Model is overloaded"):
            self.client.chat.completions.create(messages=[{"role": "user", "content": "[[error]]"}])
        with self.assertRaises(bg.BadRequestError):
            self.client.chat.completions.create(messages=[{"role": "user", "content": "x"}],
                                                temperature=9)

    def test_environment_fills_base_url(self):
        os.environ["BHARATGEN_BASE_URL"] = self.demo.url + "/gradio_api"
        self.addCleanup(os.environ.pop, "BHARATGEN_BASE_URL")
        with bg.BharatGenOpenAI() as client:
            self.assertEqual(client.base_url, self.demo.url)

    def test_async_client(self):
        async def run():
            client = bg.AsyncBharatGenOpenAI(self.demo.url, timeout=10)
            reply = await client.chat.completions.create(
                messages=[{"role": "user", "content": "hindi please"}])
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": "hindi please"}], stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            models = await client.models.list()
            await client.close()
            return reply.choices[0].message.content, "".join(parts), models.data[0].id
        self.assertEqual(asyncio.run(run()), (HINDI, HINDI, bg.DEFAULT_MODEL))


###############################################################################
# Server pieces: keys, rate limits, metrics, and HTTP limits ##################
###############################################################################

class LimitTests(unittest.TestCase):
    def setUp(self):
        self.demo = start_demo(self)

    def test_slow_headers_and_slow_body_are_cut_off(self):
        gw = start_gateway(self, self.demo.url, header_timeout=0.3, body_timeout=0.3)
        started = time.monotonic()
        slow_head, slow_body = at_once(             # side by side
            lambda: raw_exchange(gw.server_address[1], b"POST /v1/chat"),
            lambda: raw_exchange(gw.server_address[1], b"POST /v1/chat/completions HTTP/1.1\r\n"
                                 b"Host: localhost\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 100\r\n\r\n{\"model\""))
        status, _, body = parse_response(slow_head)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (408, "request_timeout"))
        status, _, body = parse_response(slow_body)
        self.assertEqual((status, json.loads(body)["error"]), (408, {
            "message": "the request body did not arrive within 0.3s",
            "type": "invalid_request_error", "param": None, "code": "request_timeout"}))
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(chat(gw, "Say hello")[0], 200)

    def test_header_fields_are_parsed_as_http_server_would(self):
        gw = start_gateway(self, self.demo.url, api_keys=["sk-a"])
        port, body = gw.server_address[1], json.dumps(
            {"model": bg.DEFAULT_MODEL, "messages": [{"role": "user", "content": "Say hello"}]}).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n"
                b"content-type: application/json\r\n"
                b"AUTHORIZATION:Bearer sk-a  \r\nConnection: close\r\n"
                % len(body))
        status, head_in, answer = parse_response(raw_exchange(port, head + b"\r\n" + body))
        self.assertEqual((status, json.loads(answer)["choices"][0]["message"]["content"]),
                         (200, "Hello! How are you doing today?"))
        self.assertRegex(head_in, r"\r\nConnection: close(\r\n|$)")   # said, then done
        for extra, code, message in (
                (b"X-Bad : 1\r\n", 400, "Bad header field ('X-Bad : 1')"),
                (b"NoColon\r\n", 400, "Bad header field ('NoColon')"),
                (b"X-Folded: a\r\n b\r\n", 400, "Bad header field (' b')"),
                (b"X-A: 1\r\n" * 101, 431, "Too many headers")):
            status, _, answer = parse_response(raw_exchange(port, head + extra + b"\r\n" + body))
            self.assertEqual((status, json.loads(answer)["error"]), (code, {
                "message": message, "type": "invalid_request_error", "param": None,
                "code": "bad_request"}))
        self.assertEqual(chat(gw, "Say hello", headers={"authorization": "Bearer sk-a"})[0], 200)

    def test_the_edges_of_http_are_answered_as_http_server_would(self):
        gw = start_gateway(self, self.demo.url)
        port, body = gw.server_address[1], json.dumps(
            {"model": bg.DEFAULT_MODEL, "messages": [{"role": "user", "content": "Say hello"}]}).encode()
        raw = raw_exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nExpect: "
                                 b"100-continue\r\nContent-Length: %d\r\nConnection: close\r\n"
                                 b"Content-Type: application/json\r\n\r\n%s"
                           % (len(body), body))
        interim, _, rest = raw.partition(b"\r\n\r\n")
        status, head, answer = parse_response(rest)
        self.assertEqual((interim, status, json.loads(answer)["choices"][0]["message"]["content"]),
                         (b"HTTP/1.1 100 Continue", 200, "Hello! How are you doing today?"))
        date = re.match(r"HTTP/1\.1 200 OK\r\nServer: bharatgen_openai/%s\r\nDate: ([^\r]+)\r\n"
                        % re.escape(bg.__version__), head).group(1)
        self.assertEqual(date, email.utils.formatdate(
            email.utils.parsedate_to_datetime(date).timestamp(), usegmt=True))
        self.assertLess(abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()), 60)
        for request, status, message, code in (
                (b"GET /%s HTTP/1.1\r\n\r\n" % (b"a" * 65540), 414, http.HTTPStatus(414).phrase,
                 "bad_request"),
                (b"BREW /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", 405, "Unsupported method ('BREW')",
                 "method_not_allowed"),
                (b"GET /health HTTP/2.0\r\n\r\n", 400, "Invalid HTTP version (2.0)", "bad_request"),
                (b"GET /health HTTP/1.1 x\r\n\r\n", 400, "Bad request version ('x')", "bad_request")):
            got_status, head, answer = parse_response(raw_exchange(port, request))
            self.assertEqual((got_status, json.loads(answer)["error"]), (status, {
                "message": message, "type": "invalid_request_error", "param": None, "code": code}))
            self.assertRegex(head, r"\r\nConnection: close(\r\n|$)")
        status, head, answer = parse_response(raw_exchange(port, b"GET /health HTTP/1.0\r\n\r\n"))
        self.assertEqual((status, json.loads(answer)["status"]), (200, "ok"))
        self.assertRegex(head, r"\r\nConnection: close(\r\n|$)")              # HTTP/1.0: closed
        self.assertEqual(chat(gw, "Say hello")[0], 200)

    def test_concurrency_cap_answers_503_at_once(self):
        gw = start_gateway(self, self.demo.url, max_concurrent=2)
        self.demo.gate = threading.Event()             # the two streams wait for it
        self.addCleanup(self.demo.gate.set)
        results = []
        threads = [threading.Thread(target=lambda: results.append(chat(gw, "40 words", stream=True)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        self.assertTrue(wait_until(lambda: len(self.demo.calls) == 2))   # each holds a slot
        started = time.monotonic()
        status, headers, body = chat(gw, "Say hello")
        self.assertLess(time.monotonic() - started, 1)
        self.assertEqual((status, headers["Retry-After"], json.loads(body)["error"]["code"]),
                         (503, "1", "server_overloaded"))
        self.demo.gate.set()
        for t in threads:
            t.join(TIMEOUT)
        self.assertEqual([r[0] for r in results], [200, 200])

    def test_message_and_character_limits(self):
        gw = start_gateway(self, self.demo.url, max_messages=3, max_chars=50)
        status, _, body = chat(gw, [{"role": "user", "content": "a"}] * 4)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "too_many_messages"))
        status, _, body = chat(gw, "x" * 51)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "context_length_exceeded"))

    def test_rate_limits_per_key(self):
        gw = start_gateway(self, self.demo.url, api_keys=["sk-a", "sk-b"], rate_limit_rpm=2,
                           rate_limit_streams=1)
        a, b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
        first = chat(gw, "Say hello", headers=a)
        self.assertEqual((first[0], first[1]["x-ratelimit-limit-requests"],
                          first[1]["x-ratelimit-remaining-requests"],
                          first[1]["x-ratelimit-reset-requests"]), (200, "2", "1", "30s"))
        self.assertEqual(bg._RateLimiter(1).take("k")["x-ratelimit-reset-requests"], "1m0s")
        self.assertEqual([bg._duration(t) for t in (0.0004, 0.25, 1, 59.4, 59.6, 61, 360)],
                         ["1ms", "250ms", "1s", "59s", "1m0s", "1m1s", "6m0s"])
        self.assertEqual(chat(gw, "Say hello", headers=a)[0], 200)
        status, headers, body = chat(gw, "Say hello", headers=a)
        error = json.loads(body)["error"]
        self.assertEqual((status, error["type"], error["code"]), (429, "requests", "rate_limit_exceeded"))
        self.assertTrue(error["message"].startswith("Rate limit reached: 2 requests per minute"))
        self.assertEqual(headers["Retry-After"], "30")
        self.assertEqual(chat(gw, "Say hello", headers=b)[0], 200)       # another key
        gw2 = start_gateway(self, self.demo.url, api_keys=["sk-a"], rate_limit_streams=1)
        self.demo.gate = threading.Event()             # the first stream waits for it
        self.addCleanup(self.demo.gate.set)
        held, calls = [], len(self.demo.calls)
        t = threading.Thread(target=lambda: held.append(chat(gw2, "60 words", stream=True, headers=a)))
        t.start()
        self.assertTrue(wait_until(lambda: len(self.demo.calls) > calls))   # its stream is open
        status, _, body = chat(gw2, "Say hello", stream=True, headers=a)
        self.assertEqual((status, json.loads(body)["error"]["message"]),
                         (429, "Too many concurrent streams: the limit is 1 per key"))
        self.demo.gate.set()
        t.join(TIMEOUT)
        self.assertEqual(held[0][0], 200)

    def test_key_file_reload_and_keys_never_logged(self):
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
            f.write("# team keys\nsk-file-one\n\n")
        self.addCleanup(os.unlink, f.name)
        gw = start_gateway(self, self.demo.url, api_key_file=f.name)
        with self.assertLogs("bharatgen_openai", "INFO") as logs:
            self.assertEqual(chat(gw, "Say hello", headers={"Authorization": "Bearer sk-file-one"})[0], 200)
            self.assertEqual(chat(gw, "Say hello", headers={"Authorization": "Bearer sk-file-two"})[0], 401)
            with open(f.name, "a") as out:
                out.write("sk-file-two\n")
            self.assertEqual(gw.keys.reload(), 2)
            self.assertEqual(chat(gw, "Say hello", headers={"Authorization": "Bearer sk-file-two"})[0], 200)
            wait_for_logs(logs, 3)
        text = "\n".join(logs.output)
        self.assertNotIn("sk-file", text)
        self.assertIn("key=%s" % short_key("sk-file-two"), text)

    def test_access_log_line_and_json_format(self):
        gw = start_gateway(self, self.demo.url, log_format="json")
        with self.assertLogs("bharatgen_openai.access", "INFO") as logs:
            chat(gw, "Say hello", stream=True)
            wait_for_logs(logs, 1)
        line = json.loads(logs.records[-1].getMessage())
        self.assertEqual((line["method"], line["path"], line["status"], line["model"], line["key"]),
                         ("POST", "/v1/chat/completions", 200, bg.DEFAULT_MODEL, "-"))
        self.assertTrue(line["request_id"].startswith("req_"))
        self.assertGreater(line["bytes"], 100)
        self.assertIsInstance(line["ttft"], float)

    def test_metrics(self):
        gw = start_gateway(self, self.demo.url)
        chat(gw, "Say hello")
        chat(gw, "Say hello", stream=True)
        chat(gw, "[[error]]")
        self.assertTrue(wait_until(lambda: gw.in_flight == 0))   # counted after its answer
        status, headers, body = request(gw.url, "GET", "/metrics")
        text = body.decode()
        self.assertEqual((status, headers["Content-Type"]), (200, "text/plain; version=0.0.4; charset=utf-8"))
        self.assertIn('bharatgen_requests_total{route="/v1/chat/completions",status="200"} 2', text)
        self.assertIn('bharatgen_requests_total{route="/v1/chat/completions",status="502"} 1', text)
        self.assertIn('bharatgen_upstream_errors_total{kind="upstream_error"} 1', text)
        self.assertIn("bharatgen_time_to_first_token_seconds_count 1", text)
        self.assertIn("bharatgen_request_duration_seconds_count 2", text)
        self.assertIn("bharatgen_streams_in_flight 0", text)
        self.assertGreater(gw.metrics.value("bharatgen_upstream_bytes_total"), 1000)
        metrics = bg._Metrics()                        # label values escaped as the format says
        metrics.inc("bharatgen_upstream_errors_total", kind=r'a "quoted" \ back\slash')
        self.assertIn('\nbharatgen_upstream_errors_total{kind="%s"} 1\n' % r'a \"quoted\" \\ back\\slash',
                      metrics.render())
        metrics = bg._Metrics()                        # and a newline as \n, on one line
        metrics.inc("bharatgen_upstream_errors_total", kind='two\nlines "q" \\')
        self.assertIn('\nbharatgen_upstream_errors_total{kind="two\\nlines \\"q\\" \\\\"} 1\n',
                      metrics.render())

    def test_cors_origins(self):
        gw = start_gateway(self, self.demo.url, cors_origins=["http://ui.example"], api_keys=["k"])
        status, headers, _ = request(gw.url, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Headers": "authorization, x-stainless-os"})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"], headers["Vary"],
                          headers["Access-Control-Allow-Headers"]),
                         (204, "http://ui.example", "Origin", "authorization, x-stainless-os"))
        status, headers, _ = request(gw.url, "OPTIONS", "/v1/models", headers={"Origin": "http://evil"})
        self.assertEqual(status, 204)
        self.assertNotIn("Access-Control-Allow-Origin", headers)
        status, headers, _ = chat(gw, "Say hello", headers={"Origin": "http://ui.example",
                                                           "Authorization": "Bearer k"})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]), (200, "http://ui.example"))

    def test_non_loopback_bind_without_keys_is_refused(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            bg.main(["serve", "--host", "0.0.0.0", "--port", "0", "--demo"])
        self.assertIn("refusing to serve on 0.0.0.0 with no API key", str(cm.exception.code))


###############################################################################
# HTTP serving: each stream written by its connection's thread ################
###############################################################################

# A self-signed certificate for 127.0.0.1 (its own CA), for the TLS upstream test
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIDHDCCAgSgAwIBAgIUP/yj6H8eg0l8P1R779TeJ5W0LsgwDQYJKoZIhvcNAQEL
BQAwFDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTEyODE1NDYxM1oYDzIxMjYx
MTA0MTU0NjEzWjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwggEiMA0GCSqGSIb3DQEB
AQUAA4IBDwAwggEKAoIBAQDIN5BVDon3paXwpGSLYAlslyH+JnbNJo26OgAwx83Q
a+BDtUzY9WVLHA3dLMC2OV2kNNGloCBfu5YiXVUN/0UcZFbjjSGylWtK33sF0qEa
X7EA6uEaz6BWpV1YEFdW97PWHDyEzhFjbTWUbS4XRtOmd2vhWzD1yT4UeRNT89+O
DiWwa0Qjv6M4/l1hM3kFU5gbKrkpxAoJ8jnhc2aCIkZ2lQ7co3QfzJECs6LEcJpn
ur+KmM0oTA9UQRWX7WnvU5COhCPHgLJF+wTUsPQFRDPadVCGaKVY/tU6+0GwrDPW
+OX+N7fyMn5UN6ISUoR6m1MlpgAGFwFhxxo1IY2pEyPXAgMBAAGjZDBiMB0GA1Ud
DgQWBBTa98NrITrHiBOqLL3Lzoig9BPoSTAfBgNVHSMEGDAWgBTa98NrITrHiBOq
LL3Lzoig9BPoSTAPBgNVHRMBAf8EBTADAQH/MA8GA1UdEQQIMAaHBH8AAAEwDQYJ
KoZIhvcNAQELBQADggEBAEyn9Qy88t+IzyX2jbKljG2Tg8AX2m8Ymtx9Ve9VUFZM
k0pDxxtwXFUtud9x//OZ9ib6276U/QZczX0H7ob0x5tJPYqQLgTnn5TMUss4IIK0
c+N4WXZcpAXkrUkwPJnoXL9MGCQyJwy5+4D8xitiJDRkxKptZ3OPGECLiWoDiKxe
Ko+0t68/rxcMZwW2K5ZQsXXO1YDRsa6NSAOgZFRywZRdwriRzBqxJcMU1cJyCBj/
PHI2Q0lj3kq1ZKLUE6cVtDgp9zC/sruPrrzzJcFY+D97JB0J3ZGrINA2tFOW914i
e5RuFGUCbfP1Qc2QIj04fuVht7iZkvO7clv1zjxPjTY=
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDIN5BVDon3paXw
pGSLYAlslyH+JnbNJo26OgAwx83Qa+BDtUzY9WVLHA3dLMC2OV2kNNGloCBfu5Yi
XVUN/0UcZFbjjSGylWtK33sF0qEaX7EA6uEaz6BWpV1YEFdW97PWHDyEzhFjbTWU
bS4XRtOmd2vhWzD1yT4UeRNT89+ODiWwa0Qjv6M4/l1hM3kFU5gbKrkpxAoJ8jnh
c2aCIkZ2lQ7co3QfzJECs6LEcJpnur+KmM0oTA9UQRWX7WnvU5COhCPHgLJF+wTU
sPQFRDPadVCGaKVY/tU6+0GwrDPW+OX+N7fyMn5UN6ISUoR6m1MlpgAGFwFhxxo1
IY2pEyPXAgMBAAECggEAC5vtKoFlTo60SHe/vLUc1scMmYfxa4PIw/uI90sei+81
WbexdQMFlI1T4Hcv1WEOJO9LGKdoOSTPV77Bp8YdY8ANqbQNOCWhyv2aTIQiAz15
LexwkPVo/p0oBGsuJUTHkKqid7DbIUC70pdiDMd2jjhucOqwtA+vIdDDZiLF256s
BuspGIVKroSYyM0xdR8vf8F9TjxEHE5tJ7U06SSK824cPRk9pnSewf38XsYB+4rX
nKNZbf7qvw4dhH3qreuXP5RtN4rqpCObedTwF/9F09IALp37aaD5ckfSm6d4DLIh
m8QbOO27S+TbRCvDwZ4cv1w9KkkdAp0qTGGAJZwKgQKBgQD2p962uVdpP/b7qWEF
Zxt8vADwX5ulcR6mc0EdAwlPgH3gocNt47BSE0ClIixd8vGtbngtd/B+8URztukr
I69gNBrEPOVOwNccpQC/aWhLj1F9e6WXKUdGC+JmrYUMnLRBco3+2LIzQswrV8nq
7F7vSta3EM2kDyXVoDKzWWYl3wKBgQDPzVHOYVqJeva4qfIY6z7NS7HMCrnALfGo
kzmFbkrPnrWnRubYcdokntOSmgWq1gKGjrlGrAXSRl1VtjVYaA15b7jQc/ZS4Fci
BrNPOUY6AVDTihPCwo3aatWyW2Z/35P7dS5fS48ZYBiFv/0EcYu5t7YwRBbAPOzt
tQOREwgRCQKBgDxn7EEvrtqV0bTcTGh4UeEAYfJ8V6/yviDhhQbH4ZXYz/sdYrEc
2+ed020dq2PuxYVF0qTABOPxzmPQXdY0zRRwbkW07CuXSpc3SbGW7PXkSX7Ds1AL
yeq7qlyfDkCCeBq3JVNOWoX3S+0peMfRz4Ym++KleNc+5nMk4oXN1RhdAoGAKCKt
9ECVbgxT7uLUIb/+B0TheFlx+w5kqHyXFZBx3pv21fI50ABdc8lBcAVTpuVi435Z
hq7fCPgSOuXQc9zVDWlotspO/z7ZVXcZ1ulnCPkMFW+L1YgiQdd0othIedZDDMRb
SoibgPkwg1TLl7oelKZJCBV+l26tDFRz9edJHZECgYBDa/WQHr8l7VaO1YBTlshC
fJLMhbEdu15zWXEigcqNyfxFVMUHR7vxS30Nifs8gIiVRxW+C2FcDAgiRhYpSMyt
hzNDG6tlV4xcrjlDqFKZCKCAJpGs4bx+tzrdrXju5OoKS832raTqQv0vYe6gGCZV
y6hwNtJBrFTtLz+OuvqjoQ==
-----END PRIVATE KEY-----
"""


def tls_server_context(test):
    """``(server context, certificate file)`` for 127.0.0.1, the certificate trusted
    (through SSL_CERT_FILE, as a private CA would be) until the test ends."""
    import ssl
    import tempfile
    folder = tempfile.mkdtemp()
    test.addCleanup(__import__("shutil").rmtree, folder)
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert, "w") as f:
        f.write(TEST_CERT)
    with open(key, "w") as f:
        f.write(TEST_KEY)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = cert
    test.addCleanup(lambda: os.environ.pop("SSL_CERT_FILE") if old is None
                    else os.environ.__setitem__("SSL_CERT_FILE", old))
    return context, cert


class StreamingTests(unittest.TestCase):
    """Each stream is written by its connection's thread: slow clients, TLS, replicas."""

    def test_a_long_stream_is_exact_and_openai_shaped(self):
        demo = start_demo(self)
        answer = bg._demo_reply("300 words", [], "", [0] * 4)[1]
        gw = start_gateway(self, demo.url)
        status, _, body = chat(gw, "300 words", stream=True)
        events = sse_events(body)
        self.assertEqual((status, streamed_text(events)), (200, answer))
        self.assertEqual((events[0]["choices"][0]["delta"], events[-1]), (
            {"role": "assistant", "content": ""}, "[DONE]"))
        self.assertEqual(chat(gw, "Say hello", stream=True, n=2)[0], 200)

    def test_the_replica_that_answers_is_pumped_after_one_that_timed_out(self):
        slow, quick = start_demo(self, gate=threading.Event()), start_demo(self)   # slow: silent
        gw = start_gateway(self, [slow.url, quick.url], first_event_timeout=0.3)
        answer = bg._demo_reply("300 words", [], "", [0] * 4)[1]
        status, _, body = chat(gw, "300 words", stream=True)     # round-robin starts at slow
        self.assertEqual((status, streamed_text(sse_events(body))), (200, answer))
        self.assertEqual((len(slow.calls), len(quick.calls)), (1, 1))

    def test_responses_leave_without_waiting_for_delayed_acks(self):
        # TCP_NODELAY on every connection (socketserver sets it in setup()): without it a
        # kept-alive client waited 40 ms for the body that followed the head
        for handler in (bg._GatewayHandler, bg._DemoHandler):
            self.assertTrue(handler.disable_nagle_algorithm, handler)

    def test_a_slow_client_holds_back_its_own_upstream_only(self):
        demo = start_demo(self, token_delay=0)
        gw = start_gateway(self, demo.url)
        gw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # inherited by accept()
        sock = self.send_stream_request(gw.server_address[1], "4000 words")
        self.assertTrue(wait_until_stalled(sock))  # not reading: the gateway must wait
        self.assertEqual(streamed_text(sse_events(chat(gw, "Say hello", stream=True)[2])), HELLO)
        self.assertEqual(self.read_slowly(sock), bg._demo_reply("4000 words", [], "", [0] * 4)[1])

    def test_a_slow_client_over_tls_gets_its_whole_answer(self):
        context, cert = tls_server_context(self)
        demo = bg.DemoUpstream(token_delay=0)
        demo.socket = context.wrap_socket(demo.socket, server_side=True)
        self.addCleanup(demo.stop)
        gw = Gateway(bg.Config(upstream=["https://127.0.0.1:%d" % demo.server_address[1]],
                               port=0, timeout=10))
        gw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        gw.socket = context.wrap_socket(gw.socket, server_side=True)
        self.addCleanup(gw.stop)
        demo.start()
        gw.start()
        sock = self.send_stream_request(gw.server_address[1], "4000 words",
                                        __import__("ssl").create_default_context(cafile=cert))
        self.assertTrue(wait_until_stalled(sock))
        self.assertEqual(self.read_slowly(sock), bg._demo_reply("4000 words", [], "", [0] * 4)[1])

    @staticmethod
    def send_stream_request(port, prompt, tls=None):
        """A socket with a small receive buffer that has sent one streamed chat request."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", port))
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        body = json.dumps({"model": bg.DEFAULT_MODEL, "stream": True, "max_tokens": 8192,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        return sock

    def read_slowly(self, sock):
        """The streamed text of the response on ``sock``, read a little at a time."""
        raw = bytearray()                          # (linear: a TLS read is one small record)
        while True:
            data = sock.recv(8192)
            if not data:
                break
            if len(raw) // 8192 < (len(raw) + len(data)) // 8192:
                time.sleep(0.0005)                 # a pause every 8 KB
            raw += data
        sock.close()
        head, _, chunked = bytes(raw).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        payload, at = [], 0
        while True:                                # undo the chunked framing
            end = chunked.index(b"\r\n", at)
            size = int(chunked[at:end], 16)
            if size == 0:
                break
            payload.append(chunked[end + 2:end + 2 + size])
            at = end + 4 + size
        return streamed_text(sse_events(b"".join(payload)))

    def test_a_tls_upstream(self):
        context, _ = tls_server_context(self)
        demo = FakeGradio()
        demo.socket = context.wrap_socket(demo.socket, server_side=True)
        demo.start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, "https://127.0.0.1:%d" % demo.server_address[1])
        for prompt, answer in (("300 words", bg._demo_reply("300 words", [], "", [0] * 4)[1]),
                               ("hindi please", HINDI)):
            status, _, body = chat(gw, prompt, stream=True)
            self.assertEqual((status, streamed_text(sse_events(body))), (200, answer))
        status, _, body = chat(gw, "[[fail-midstream]]", stream=True)
        self.assertEqual(sse_events(body)[-2]["error"]["message"],
                         "the Gradio app reported an error: error after output began")


###############################################################################
# The gateway: routes, errors, embeddings, cancelling, the page ###############
###############################################################################

class GatewayTests(_DemoGateway):
    def answer(self, prompt, **extra):
        status, headers, body = chat(self.gw, prompt, **extra)
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def test_non_stream_exact_answers_and_thought(self):
        for prompt, answer in (("Say hello", HELLO), ("show formatting", bg._DEMO_FORMATTING),
                               ("hindi please", HINDI)):
            with self.subTest(prompt=prompt):
                reply = self.answer(prompt)
                self.assertEqual(reply["choices"][0]["message"]["content"], answer)
                self.assertEqual(reply["choices"][0]["message"]["reasoning_content"],
                                 thought_of(prompt))
                self.assertEqual(reply["object"], "chat.completion")
                self.assertTrue(reply["id"].startswith("chatcmpl-"))
                u = reply["usage"]
                self.assertEqual(u["total_tokens"], u["prompt_tokens"] + u["completion_tokens"])

    def test_stream_equals_non_stream_and_is_well_formed(self):
        for prompt in ("Say hello", "show formatting", "hindi please", "300 words"):
            with self.subTest(prompt=prompt):
                expected = self.answer(prompt)["choices"][0]["message"]["content"]
                status, headers, body = chat(self.gw, prompt, stream=True)
                self.assertEqual(status, 200)
                self.assertEqual(headers["Content-Type"], "text/event-stream; charset=utf-8")
                self.assertTrue(headers["x-request-id"].startswith("req_"))
                events = sse_events(body)
                self.assertEqual(events[-1], "[DONE]")
                chunks = events[:-1]
                self.assertEqual(streamed_text(chunks), expected)
                self.assertEqual([c["choices"][0]["delta"].get("role") for c in chunks][:2],
                                 ["assistant", None])
                self.assertEqual(sum(1 for c in chunks if c["choices"][0]["delta"].get("role")), 1)
                finishes = [c["choices"][0]["finish_reason"] for c in chunks]
                self.assertEqual(finishes[-1], "stop")
                self.assertEqual(finishes.count(None), len(finishes) - 1)
                self.assertEqual(len({c["id"] for c in chunks}), 1)
                self.assertTrue(all(c["usage"] is None for c in chunks))

    def test_an_image_for_an_app_that_takes_text_only_is_a_400(self):
        status, _, body = chat(self.gw, [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
        self.assertEqual((status, json.loads(body)["error"]), (400, {
            "message": "messages[0].content[1] is an image, but this model's app takes text only",
            "type": "invalid_request_error", "param": "messages[0].content[1]",
            "code": "unsupported_content_type"}))

    def test_answers_about_html_come_through_whole(self):
        for prompt, answer in HTML_ANSWERS.items():
            for stream in (False, True):
                status, _, body = chat(self.gw, prompt, stream=stream)
                text = streamed_text(sse_events(body)) if stream else \
                    json.loads(body)["choices"][0]["message"]["content"]
                self.assertEqual((status, text), (200, answer), (prompt, stream))

    def test_reasoning_streams_before_the_answer(self):
        _, _, body = chat(self.gw, "Say hello", stream=True)
        kinds = [k for c in sse_events(body)[1:-1] for k in c["choices"][0]["delta"]]
        self.assertEqual(kinds, sorted(kinds, key=lambda k: k != "reasoning_content"))
        self.assertIn("reasoning_content", kinds)

    def test_history_and_system_prompt_reach_the_upstream(self):
        messages = [{"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "tell me the history"}]
        reply = self.answer(messages, temperature=0.2, max_tokens=640, top_p=0.5, top_k=7)
        sent = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]
        self.assertEqual(self.demo.calls[-1], ["tell me the history", sent, "Be terse.",
                                               0.2, 640, 0.5, 7])
        self.assertEqual(reply["choices"][0]["message"]["content"],
                         "SYSTEM=Be terse. | HISTORY=" + json.dumps(sent, sort_keys=True))

    def test_params_reach_the_upstream_and_max_completion_tokens_wins(self):
        reply = self.answer("params", temperature=1.5, max_tokens=10,
                            max_completion_tokens=200, top_p=0.3)
        self.assertEqual(reply["choices"][0]["message"]["content"],
                         "PARAMS temperature=1.5 max_tokens=200 top_p=0.3 top_k=50")

    def test_stop_sequences_streamed_and_not(self):
        for stop in ("doing", ["xyz", "w a"]):
            reply = self.answer("Say hello", stop=stop)
            expected = {"doing": "Hello! How are you ", "w a": "Hello! Ho"}[
                stop if isinstance(stop, str) else "w a"]
            self.assertEqual(reply["choices"][0]["message"]["content"], expected)
            _, _, body = chat(self.gw, "Say hello", stream=True, stop=stop)
            self.assertEqual(streamed_text(sse_events(body)), expected)

    def test_n_choices_are_independent_and_exact(self):
        reply = self.answer("Say hello", n=3)
        self.assertEqual([(c["index"], c["message"]["content"]) for c in reply["choices"]],
                         [(0, HELLO), (1, HELLO), (2, HELLO)])
        _, _, body = chat(self.gw, "hindi please", stream=True, n=2)
        events = sse_events(body)[:-1]
        for i in (0, 1):
            self.assertEqual(streamed_text(events, index=i), HINDI)
            self.assertEqual([c["choices"][0]["finish_reason"] for c in events
                              if c["choices"][0]["index"] == i].count("stop"), 1)

    def test_include_usage_adds_a_last_chunk_with_empty_choices(self):
        _, _, body = chat(self.gw, "Say hello", stream=True, stream_options={"include_usage": True})
        events = sse_events(body)
        self.assertEqual(events[-1], "[DONE]")
        last = events[-2]
        self.assertEqual(last["choices"], [])
        self.assertEqual(last["usage"]["total_tokens"],
                         last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"])
        self.assertTrue(all(e["usage"] is None for e in events[:-2]))

    def test_content_parts_and_developer_role(self):
        reply = self.answer([{"role": "developer", "content": "Dev."},
                             {"role": "user", "content": [{"type": "text", "text": "Say "},
                                                          {"type": "text", "text": "hello"}]}])
        self.assertEqual(reply["choices"][0]["message"]["content"], HELLO)
        self.assertEqual(self.demo.calls[-1][:3], ["Say hello", [], "Dev."])

    def test_concurrent_streams_are_all_exact(self):
        results, errors = [], []
        gate = self.demo.gate = threading.Event()       # all 16 run at once, then go on
        self.addCleanup(setattr, self.demo, "gate", None)
        self.addCleanup(gate.set)

        def one(i):
            try:
                prompt = ("Say hello", "hindi please", "show formatting", "120 words")[i % 4]
                _, _, body = chat(self.gw, prompt, stream=True)
                results.append((prompt, streamed_text(sse_events(body))))
            except Exception as exc:       # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        self.assertTrue(wait_until(lambda: self.demo.active_streams == 16))
        gate.set()
        for t in threads:
            t.join(TIMEOUT)
        self.assertEqual(errors, [])
        expected = {"Say hello": HELLO, "hindi please": HINDI,
                    "show formatting": bg._DEMO_FORMATTING,
                    "120 words": bg._demo_reply("120 words", [], "", [0] * 4)[1]}
        self.assertEqual(len(results), 16)
        for prompt, text in results:
            self.assertEqual(text, expected[prompt])

    def test_models_and_health(self):
        status, headers, body = request(self.gw.url, "GET", "/v1/models")
        models = json.loads(body)
        self.assertEqual((status, models["object"], [m["id"] for m in models["data"]]),
                         (200, "list", [bg.DEFAULT_MODEL]))
        status, _, body = request(self.gw.url, "GET", "//v1//models/bharatgen-param-17b/")
        self.assertEqual((status, json.loads(body)["id"]), (200, bg.DEFAULT_MODEL))
        status, _, body = request(self.gw.url, "GET", "/health")
        self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))
        status, headers, body = request(self.gw.url, "HEAD", "/v1/models")
        self.assertEqual((status, body, int(headers["Content-Length"]) > 50), (200, b"", True))

    def test_legacy_completions(self):
        status, _, body = request(self.gw.url, "POST", "/v1/completions",
                                  {"model": bg.DEFAULT_MODEL, "prompt": ["Say hello", "hindi please"]})
        texts = [(c["index"], c["text"]) for c in json.loads(body)["choices"]]
        self.assertEqual((status, texts), (200, [(0, HELLO), (1, HINDI)]))
        _, _, body = request(self.gw.url, "POST", "/v1/completions",
                             {"model": bg.DEFAULT_MODEL, "prompt": "Say hello", "stream": True, "echo": True})
        events = sse_events(body)
        self.assertEqual("".join(e["choices"][0]["text"] for e in events[:-1]), "Say hello" + HELLO)

    def test_responses_api(self):
        status, _, body = request(self.gw.url, "POST", "/v1/responses",
                                  {"model": bg.DEFAULT_MODEL, "input": "Say hello",
                                   "instructions": "Be kind."})
        resp = json.loads(body)
        self.assertEqual((status, resp["object"], resp["status"], resp["incomplete_details"]),
                         (200, "response", "completed", None))
        thought = "The user said: Say hello. Let me think step by step."
        self.assertEqual([(o["type"], o["id"][:4], o["status"], o["content"]) for o in resp["output"]],
                         [("reasoning", "rs_" + resp["output"][0]["id"][3], "completed",
                           [{"type": "reasoning_text", "text": thought}]),
                          ("message", "msg_", "completed",
                           [{"type": "output_text", "text": HELLO, "annotations": []}])])
        self.assertEqual(self.demo.calls[-1][2], "Be kind.")
        status, _, body = request(self.gw.url, "POST", "/v1/responses",
                                  {"model": bg.DEFAULT_MODEL, "stream": True, "input": [
                                      {"role": "user", "content": [{"type": "input_text",
                                                                    "text": "hindi please"}]}]})
        text = body.decode("utf-8")
        kinds = [k for k in re.findall(r"^event: (\S+)$", text, re.M) if not k.endswith(".delta")]
        self.assertEqual(kinds, [
            "response.created", "response.in_progress",
            "response.output_item.added", "response.content_part.added",
            "response.reasoning_text.done", "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added", "response.content_part.added",
            "response.output_text.done", "response.content_part.done",
            "response.output_item.done", "response.completed"])
        events = sse_events(body)
        self.assertEqual([e["sequence_number"] for e in events], list(range(len(events))))
        self.assertEqual("".join(e["delta"] for e in events
                                 if e["type"] == "response.output_text.delta"), HINDI)
        self.assertEqual("".join(e["delta"] for e in events
                                 if e["type"] == "response.reasoning_text.delta"),
                         "The user said: hindi please. Let me think step by step.")
        self.assertEqual([o["type"] for o in events[-1]["response"]["output"]],
                         ["reasoning", "message"])

    def test_max_tokens_used_up_is_finish_reason_length(self):
        """The demo stops at max_tokens; the gateway says "length" (chat, stream, legacy
        completions) and "incomplete" (responses), and "stop" for a stop sequence."""
        for stream in (False, True):
            status, _, body = chat(self.gw, "300 words", stream, max_tokens=40)
            if stream:
                events = sse_events(body)[:-1]
                finish = [e["choices"][0]["finish_reason"] for e in events]
                text = streamed_text(events)
                self.assertEqual(finish[-1], "length")
            else:
                choice = json.loads(body)["choices"][0]
                text = choice["message"]["content"]
                self.assertEqual(choice["finish_reason"], "length")
            self.assertEqual(text, "Param is a bilingual model trained for India, and this demo "
                                   "answer repeats a fixed text so that its length can be chosen. "
                                   "Param")
        _, _, body = chat(self.gw, "300 words", max_tokens=40, stop=["Param is a bi"])
        self.assertEqual(json.loads(body)["choices"][0]["finish_reason"], "stop")
        _, _, body = chat(self.gw, "3 words", max_tokens=40)
        self.assertEqual(json.loads(body)["choices"][0]["finish_reason"], "stop")
        _, _, body = request(self.gw.url, "POST", "/v1/completions", {
            "model": bg.DEFAULT_MODEL, "prompt": "300 words", "max_tokens": 40})
        self.assertEqual(json.loads(body)["choices"][0]["finish_reason"], "length")
        for stream in (False, True):
            _, _, body = request(self.gw.url, "POST", "/v1/responses", {
                "model": bg.DEFAULT_MODEL, "input": "300 words", "max_output_tokens": 40,
                "stream": stream})
            resp = sse_events(body)[-1]["response"] if stream else json.loads(body)
            self.assertEqual((resp["status"], resp["incomplete_details"],
                              resp["output"][-1]["status"]),
                             ("incomplete", {"reason": "max_output_tokens"}, "incomplete"))
            if stream:
                self.assertEqual(sse_events(body)[-1]["type"], "response.incomplete")

    def test_cors_preflight(self):
        gw = start_gateway(self, self.demo.url, cors_origins=["*"])
        status, headers, body = request(gw.url, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://x", "Access-Control-Request-Headers": "authorization, x-stainless-os"})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"],
                          headers["Access-Control-Allow-Headers"]),
                         (204, "*", "authorization, x-stainless-os"))


class GatewayErrorTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.demo = FakeGradio().start()
        cls.gw = Gateway(bg.Config(upstream=cls.demo.url, port=0, timeout=0.5,
                                   api_keys=["sk-one", "sk-two"],
                                   max_body_bytes=10000)).start()
        cls.auth = {"Authorization": "Bearer sk-two"}

    @classmethod
    def tearDownClass(cls):
        cls.gw.stop()
        cls.demo.stop()

    def assert_error(self, result, status, message, type_="invalid_request_error", param=None,
                     code=None):
        got_status, headers, body = result
        self.assertEqual((got_status, json.loads(body)), (status, {"error": {
            "message": message, "type": type_, "param": param, "code": code}}))
        return headers

    def test_keys(self):
        self.assert_error(chat(self.gw, "hi"), 401, "Missing API key: send the header "
                          "'Authorization: Bearer <key>'", code="invalid_api_key")
        self.assert_error(chat(self.gw, "hi", headers={"Authorization": "Bearer sk-three"}),
                          401, "Incorrect API key provided", code="invalid_api_key")
        self.assertEqual(chat(self.gw, "Say hello", headers=self.auth)[0], 200)
        self.assertEqual(request(self.gw.url, "GET", "/health")[0], 200)

    def test_malformed_json_and_wrong_types(self):
        self.assert_error(request(self.gw.url, "POST", "/v1/chat/completions", raw=b"{nope",
                                  headers=self.auth), 400,
                          "could not parse the JSON body: Expecting property name enclosed in "
                          "double quotes: line 1 column 2 (char 1)", code="invalid_json")
        self.assert_error(request(self.gw.url, "POST", "/v1/chat/completions", raw=b"\xff\xfe",
                                  headers=self.auth), 400,
                          "the request body is not valid UTF-8", code="invalid_body")
        self.assert_error(request(self.gw.url, "POST", "/v1/chat/completions", [1],
                                  headers=self.auth), 400,
                          "the request body must be a JSON object", code="invalid_type")
        self.assert_error(chat(self.gw, "hi", headers=self.auth, temperature="hot"), 400,
                          "'temperature' must be a number, not \"hot\"", param="temperature",
                          code="invalid_type")
        self.assert_error(chat(self.gw, "hi", headers=self.auth, top_p=3), 400,
                          "'top_p' must be between 0 and 1; got 3", param="top_p",
                          code="invalid_value")
        self.assert_error(chat(self.gw, "hi", headers=self.auth, stream="yes"), 400,
                          "'stream' must be a boolean", param="stream", code="invalid_type")
        self.assert_error(request(self.gw.url, "POST", "/v1/chat/completions",
                                  raw=b"[" * 100000 + b"]" * 100000, headers=self.auth),
                          413, "the request body has 200000 bytes; the limit is 10000",
                          code="request_too_large")

    def test_values_outside_the_apps_sliders(self):
        for stream in (False, True):
            self.assert_error(chat(self.gw, "hi", stream, self.auth, max_tokens=8193), 400,
                              "max_tokens=8193 is more than this model accepts (at most 8192)",
                              param="max_tokens", code="invalid_value")
            self.assert_error(chat(self.gw, "hi", stream, self.auth, max_completion_tokens=9000),
                              400, "max_completion_tokens=9000 is more than this model accepts "
                              "(at most 8192)", param="max_completion_tokens", code="invalid_value")
            self.assert_error(chat(self.gw, "hi", stream, self.auth, top_k=101, n=2), 400,
                              "top_k=101 is more than this model accepts (at most 100)",
                              param="top_k", code="invalid_value")
        self.assert_error(request(self.gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": "hi", "max_output_tokens": 10000}, self.auth), 400,
            "max_output_tokens=10000 is more than this model accepts (at most 8192)",
            param="max_output_tokens", code="invalid_value")
        status, _, body = chat(self.gw, "params", headers=self.auth, max_tokens=8192, top_k=100)
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                         (200, "PARAMS temperature=0.7 max_tokens=8192 top_p=0.95 top_k=100"))
        self.assertEqual(request(self.gw.url, "GET", "/health")[0], 200)

    def test_unknown_model_route_and_method(self):
        self.assert_error(chat(self.gw, "hi", headers=self.auth, model="gpt-4"), 404,
                          "The model 'gpt-4' does not exist; this server serves 'bharatgen-param-17b'",
                          param="model", code="model_not_found")
        self.assert_error(request(self.gw.url, "GET", "/v1/nothing", headers=self.auth), 404,
                          "Unknown request URL: GET /v1/nothing. Please check the URL for typos; "
                          "this server serves /v1/chat/completions, /v1/completions, "
                          "/v1/responses, /v1/embeddings and /v1/models", code="unknown_url")
        headers = self.assert_error(request(self.gw.url, "GET", "/v1/chat/completions",
                                            headers=self.auth), 405,
                                    "GET is not allowed on /v1/chat/completions; use POST",
                                    code="method_not_allowed")
        self.assertEqual(headers["Allow"], "POST")
        self.assert_error(request(self.gw.url, "POST", "/v1/embeddings",
                                  {"model": bg.DEFAULT_MODEL, "input": "x"}, headers=self.auth), 404,
                          "bharatgen-param-17b is a chat model and serves no embeddings", param="model",
                          code="model_not_found")

    def test_upstream_failures_map_to_statuses(self):
        headers = self.assert_error(chat(self.gw, "[[error]]", headers=self.auth), 502,
                                    "the Gradio app reported an error: Model is overloaded, try again",
                                    "upstream_error", code="upstream_error")
        self.assertEqual(headers["x-should-retry"], "false")
        self.assert_error(chat(self.gw, "[[hang]]", stream=True, headers=self.auth), 504,
                          "the Gradio app sent no output within 0.5s", "upstream_error",
                          code="upstream_timeout")
        deadline = time.monotonic() + 5           # the cancel ends the job's 30 s hang
        while self.demo.active_streams and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(self.demo.active_streams, 0)
        headers = self.assert_error(chat(self.gw, "[[busy]]", headers=self.auth), 503,
                                    "the Gradio app's queue is full; try again later",
                                    "upstream_error", code="upstream_overloaded")
        self.assertEqual(headers["Retry-After"], "1")
        # the server keeps serving afterwards
        self.assertEqual(chat(self.gw, "Say hello", headers=self.auth)[0], 200)

    def test_failure_mid_stream_sends_an_error_event_then_ends(self):
        for prompt, message in (("[[fail-midstream]]", "the Gradio app reported an error: "
                                                       "error after output began"),
                                ("[[drop]]", None)):
            status, _, body = chat(self.gw, prompt, stream=True, headers=self.auth)
            events = sse_events(body)
            self.assertEqual(status, 200)
            self.assertEqual(events[-1], "[DONE]")
            error = events[-2]["error"]
            self.assertEqual(error["type"], "upstream_error")
            if message:
                self.assertEqual(error["message"], message)
            self.assertGreater(len(streamed_text(events[:-2])), 0)

    def test_unreachable_upstream_is_502(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        gw = start_gateway(self, "http://127.0.0.1:%d" % port)
        status, _, body = chat(gw, "hi")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (502, "upstream_unreachable"))


def demo_vector(text):
    """The demo upstream's embedding of ``text`` (16 numbers from its SHA-256, of length 1)."""
    raw = [b - 127.5 for b in hashlib.sha256(text.encode()).digest()[:16]]
    return [x / (sum(y * y for y in raw) ** 0.5) for x in raw]


class EmbeddingTests(unittest.TestCase):
    """/v1/embeddings in front of the demo upstream's embedding endpoint."""

    def setUp(self):
        self.demo = start_demo(self)
        self.gw = start_gateway(self, self.demo.url, demo=True)

    def embed(self, **body):
        status, _, answer = request(self.gw.url, "POST", "/v1/embeddings", body)
        return status, json.loads(answer)

    def test_floats_base64_and_a_batch(self):
        status, answer = self.embed(input=["hello", "नमस्ते"])
        tokens = bg.estimate_tokens("hello") + bg.estimate_tokens("नमस्ते")
        self.assertEqual((status, answer["model"], answer["object"], answer["usage"]),
                         (200, "bharatgen-demo-embedding", "list",
                          {"prompt_tokens": tokens, "total_tokens": tokens}))
        self.assertEqual([d["embedding"] for d in answer["data"]],
                         [demo_vector("hello"), demo_vector("नमस्ते")])   # to the last bit
        status, answer = self.embed(input="hello", encoding_format="base64")
        self.assertEqual(base64.b64decode(answer["data"][0]["embedding"]),
                         struct.pack("<16f", *demo_vector("hello")))
        status, answer = self.embed(input="hello", dimensions=4)
        cut = demo_vector("hello")[:4]
        self.assertEqual(answer["data"][0]["embedding"],
                         [x / sum(y * y for y in cut) ** 0.5 for x in cut])
        self.assertEqual([len(d["embedding"]) for d in self.embed(input=["x"] * 40)[1]["data"]],
                         [16] * 40)

    def test_what_is_refused(self):
        for body, status, param, message in [
                ({"input": [[15339, 1917]]}, 400, "input", "'input' holds token ids; this server "
                 "embeds text: send strings (for LangChain's OpenAIEmbeddings, "
                 "check_embedding_ctx_length=False)"),
                ({"input": [1, 2]}, 400, "input", "'input' holds token ids; this server embeds "
                 "text: send strings (for LangChain's OpenAIEmbeddings, "
                 "check_embedding_ctx_length=False)"),
                ({"input": []}, 400, "input", "'input' must be a string or a non-empty list of "
                 "strings"),
                ({"input": ["x"] * 2049}, 400, "input", "the input is more than this server takes "
                 "(2048 texts, 1000000 characters)"),
                ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format",
                 "'encoding_format' must be 'float' or 'base64'"),
                ({"input": "x", "model": bg.DEFAULT_MODEL}, 404, "model",
                 "bharatgen-param-17b is a chat model and serves no embeddings")]:
            with self.subTest(body=str(body)[:60]):
                got, answer = self.embed(**body)
                self.assertEqual((got, answer["error"]["param"], answer["error"]["message"]),
                                 (status, param, message))
        status, _, answer = chat(self.gw, "Say hello", model="bharatgen-demo-embedding")
        self.assertEqual((status, json.loads(answer)["error"]["message"]), (
            400, "bharatgen-demo-embedding is an embedding model: ask /v1/embeddings"))

    def test_the_sdk_against_the_app_and_against_the_gateway(self):
        with bg.BharatGenOpenAI(self.demo.url) as client:
            reply = client.embeddings.create(input=["a", "b"], model="anything")
        self.assertEqual([d.embedding for d in reply.data], [demo_vector("a"), demo_vector("b")])
        with bg.BharatGenOpenAI(self.gw.url + "/v1") as client:
            reply = client.embeddings.create(input="a", model="bharatgen-demo-embedding")
        self.assertEqual((reply.data[0].embedding, reply.usage.total_tokens), (demo_vector("a"), 1))
        with bg.BharatGenOpenAI(self.gw.url + "/v1") as client, self.assertRaises(bg.NotFoundError):
            client.embeddings.create(input="a", model=bg.DEFAULT_MODEL)


class CancellationTests(unittest.TestCase):
    def wait_for(self, predicate, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.005)
        return False

    def test_client_disconnect_closes_the_upstream_stream(self):
        for queue in (True, False):
            demo = start_demo(self, token_delay=0.01, queue=queue)
            gw = start_gateway(self, demo.url)
            threads_before = threading.active_count()
            sock = socket.create_connection(("127.0.0.1", gw.server_address[1]), timeout=TIMEOUT)
            body = json.dumps({"model": bg.DEFAULT_MODEL, "stream": True,
                               "messages": [{"role": "user", "content": "2000 words"}]}).encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.assertIn(b"200 OK", sock.recv(4096))
            self.assertTrue(self.wait_for(lambda: demo.active_streams == 1))
            sock.close()
            self.assertTrue(self.wait_for(lambda: demo.active_streams == 0), "upstream left open")
            self.assertTrue(self.wait_for(lambda: len(demo.cancels) == 1), "no cancel sent")
            # the kept-alive upstream connections closed, and their threads gone (the cancel's
            # connection comes to rest after it was counted: closed when it does)
            self.assertTrue(self.wait_for(lambda: gw.backend.close() or
                                          threading.active_count() <= threads_before))

    def test_a_demo_client_that_stops_reading_holds_up_only_its_own_stream(self):
        demo = start_demo(self, queue=False)        # /call: every event is the whole reply
        gw = start_gateway(self, demo.url)
        data = ["5000 words", [], "", 0.7, 1024, 0.95, 50]
        status, _, body = request(demo.url, "POST", "/gradio_api/call/chat_fn_1", {"data": data})
        self.assertEqual(status, 200)
        slow = socket.socket()
        self.addCleanup(slow.close)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(TIMEOUT)
        slow.connect(("127.0.0.1", demo.server_address[1]))
        slow.sendall(b"GET /gradio_api/call/chat_fn_1/%s HTTP/1.1\r\nHost: localhost\r\n\r\n"
                     % json.loads(body)["event_id"].encode())
        self.assertIn(b"200 OK", slow.recv(1024))
        self.assertTrue(wait_until_stalled(slow))   # its socket buffers fill; it reads no more
        status, _, body = chat(gw, "Say hello")
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                         (200, HELLO))
        slow.close()
        self.assertTrue(self.wait_for(lambda: demo.active_streams == 0), "the stalled stream stays")

    def test_stop_sequence_ends_the_upstream_call_early(self):
        demo = start_demo(self, token_delay=0.002)
        gw = start_gateway(self, demo.url)
        started = time.monotonic()
        reply = json.loads(chat(gw, "2000 words", stop="India")[2])
        self.assertEqual(reply["choices"][0]["message"]["content"], "Param is a bilingual model trained for ")
        self.assertLess(time.monotonic() - started, 2)            # the whole answer takes 4 s
        self.assertTrue(self.wait_for(lambda: demo.active_streams == 0))
        self.assertTrue(self.wait_for(lambda: len(demo.cancels) == 1))


class PageTests(unittest.TestCase):
    """The browser page at / and the monitor's JSON at /v1/dashboard."""

    def setUp(self):
        self.demo = start_demo(self)

    def test_page_is_served_without_a_key_under_a_strict_csp_and_holds_no_secret(self):
        gw = start_gateway(self, self.demo.url, api_keys=["sk-page-secret"])
        status, headers, body = request(gw.url, "GET", "/")
        self.assertEqual((status, headers["Content-Type"], body), (200, "text/html; charset=utf-8",
                                                                   bg._PAGE.encode("utf-8")))
        page = bg._PAGE

        def digest(tag):
            text = re.search(r"<%s>(.*?)</%s>" % (tag, tag), page, re.S).group(1)
            return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()
        self.assertEqual(headers["Content-Security-Policy"],
                         "default-src 'none'; connect-src 'self'; img-src data:; base-uri 'none'; "
                         "form-action 'none'; frame-ancestors 'none'; script-src 'sha256-%s'; "
                         "style-src 'sha256-%s'" % (digest("script"), digest("style")))
        self.assertEqual((headers["X-Content-Type-Options"], headers["Referrer-Policy"]),
                         ("nosniff", "no-referrer"))
        self.assertNotIn(b"sk-page-secret", body)
        # one script and one style, both covered by the hashes: no inline handlers or style
        # attributes (the CSP would block them), nothing loaded from elsewhere, no HTML sinks
        self.assertEqual((page.count("<script"), page.count("<style")), (1, 1))
        self.assertIsNone(re.search(r"<[a-z][^>]*\s(on[a-z]+|style|src|href)=", page))
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                     "http://", "https://"):
            self.assertNotIn(sink, page)
        self.assertEqual(request(gw.url, "HEAD", "/")[::2], (200, b""))
        self.assertEqual(request(gw.url, "POST", "/", {})[0], 405)

    def test_models_tell_the_page_demo_limits_and_images_when_known(self):
        """GET /v1/models keeps OpenAI's fields and adds the page's: demo, the app's slider
        ranges, images; each only when known, and never waiting long on a silent upstream."""
        openai_fields = ("id", "created", "object", "owned_by")
        gw = start_gateway(self, self.demo.url, demo=True)
        status, _, body = request(gw.url, "GET", "/v1/models")
        model = json.loads(body)["data"][0]
        self.assertEqual((status, model), (200, {
            "id": bg.DEFAULT_MODEL, "created": gw.backend.created, "object": "model",
            "owned_by": "bharatgen (demo upstream: canned answers)", "demo": True,
            "limits": {"temperature": [0, 2], "max_tokens": [1, 8192], "top_p": [0, 1],
                       "top_k": [1, 100]}}))
        self.assertEqual(json.loads(request(gw.url, "GET", "/v1/models/" + bg.DEFAULT_MODEL)[2]),
                         {k: model[k] for k in openai_fields})       # and the SDK's object:
        self.assertEqual(bg.BharatGenOpenAI(base_url=gw.url + "/v1").models.list().data[0].id,
                         bg.DEFAULT_MODEL)
        images = ImageGradio().start()
        self.addCleanup(images.stop)
        gw = start_gateway(self, images.url)
        chat(gw, "Say hello")                                  # discovery has run
        model = json.loads(request(gw.url, "GET", "/v1/models")[2])["data"][0]
        self.assertEqual((model["owned_by"], "demo" in model, model["images"], model["limits"]["max_tokens"]),
                         ("bharatgen", False, True, [1, 512]))
        silent = socket.create_server(("127.0.0.1", 0))         # connects, never answers
        self.addCleanup(silent.close)
        gw = start_gateway(self, "http://127.0.0.1:%d" % silent.getsockname()[1])
        discovering = lambda: sum(t.name == "bharatgen-discover" for t in threading.enumerate())
        threads = discovering()

        def models(after_discovery_began=False):
            if after_discovery_began:
                self.assertTrue(wait_until(lambda: discovering() > threads))
            started = time.monotonic()
            status, _, body = request(gw.url, "GET", "/v1/models")
            return time.monotonic() - started, status, sorted(json.loads(body)["data"][0])
        for took, status, fields in at_once(models, lambda: models(True), lambda: models(True)):
            self.assertLess(took, 2)                  # side by side, two once discovery began
            self.assertEqual((status, fields), (200, sorted(openai_fields)))
        self.assertEqual(discovering(), threads + 1)            # one discovery, waited on
        down = start_gateway(self, "http://127.0.0.1:9")
        self.assertEqual(sorted(json.loads(request(down.url, "GET", "/v1/models")[2])["data"][0]),
                         sorted(openai_fields))

    def test_dashboard_needs_a_key(self):
        gw = start_gateway(self, self.demo.url, api_keys=["k1"])
        for headers, message in (({}, "Missing API key: send the header 'Authorization: Bearer <key>'"),
                                 ({"Authorization": "Bearer nope"}, "Incorrect API key provided")):
            status, _, body = request(gw.url, "GET", "/v1/dashboard", headers=headers)
            self.assertEqual((status, json.loads(body)), (401, {"error": {
                "message": message, "type": "invalid_request_error", "param": None,
                "code": "invalid_api_key"}}))
        self.assertEqual(request(gw.url, "GET", "/dashboard", headers={"Authorization": "Bearer k1"})[0],
                         200)

    def test_dashboard_counts_requests_tokens_errors_and_keys(self):
        gw = start_gateway(self, self.demo.url, api_keys=["k2"], admin_keys=["k1"])
        k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
        usage = json.loads(chat(gw, "Say hello", headers=k1)[2])["usage"]
        chat(gw, "Say hello", stream=True, headers=k1)
        chat(gw, "[[error]]", headers=k2)
        events = sse_events(chat(gw, "[[fail-midstream]]", stream=True, headers=k2)[2])
        self.assertEqual(events[-2]["error"]["type"], "upstream_error")
        events = [e for e in events if "choices" in e]
        midstream_out = bg.estimate_tokens(streamed_text(events, "reasoning_content")) + \
            bg.estimate_tokens(streamed_text(events))
        chat(gw, "Say hello", headers={"Authorization": "Bearer wrong"})
        for path in ("/", "/metrics", "/health", "/v1/dashboard"):     # not counted
            request(gw.url, "GET", path, headers=k1)
        deadline = time.monotonic() + TIMEOUT          # a request is counted out after its answer
        while gw.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, body = request(gw.url, "GET", "/v1/dashboard", headers=k1)
        d = json.loads(body)
        self.assertEqual((status, headers["Content-Type"], headers["Cache-Control"]),
                         (200, "application/json", "no-store"))
        self.assertEqual(sorted(d), ["models", "recent", "requests_in_flight", "streams_open",
                                     "totals", "uptime_seconds", "version"])
        error_in = bg._conversation([{"role": "user", "content": "[[error]]"}]).prompt_tokens
        midstream = bg._conversation([{"role": "user", "content": "[[fail-midstream]]"}]).prompt_tokens
        tokens_in = 2 * usage["prompt_tokens"] + error_in + midstream
        tokens_out = 2 * usage["completion_tokens"] + midstream_out
        self.assertEqual(d["totals"], {"requests": 5, "by_status": {"200": 3, "401": 1, "502": 1},
                                       "tokens_in": tokens_in, "tokens_out": tokens_out,
                                       "upstream_errors": {"upstream_error": 2}, "rate_limited": 0})
        recent = d["recent"]
        self.assertEqual(sorted(recent), ["by_status", "errors", "keys", "latency", "requests",
                                          "seconds", "series", "tokens_in", "tokens_out", "ttft"])
        self.assertEqual((recent["seconds"], recent["requests"], recent["by_status"], recent["errors"],
                          recent["tokens_in"], recent["tokens_out"]),
                         (600, 5, {"200": 3, "401": 1, "502": 1},
                          {"upstream_error": 2, "invalid_request_error": 1}, tokens_in, tokens_out))
        self.assertEqual(recent["keys"], {
            short_key("k1"): {"requests": 2, "errors": 0, "tokens_in": 2 * usage["prompt_tokens"],
                                 "tokens_out": 2 * usage["completion_tokens"]},
            short_key("k2"): {"requests": 2, "errors": 2, "tokens_in": error_in + midstream,
                                 "tokens_out": midstream_out}})
        own = json.loads(request(gw.url, "GET", "/v1/dashboard", headers=k2)[2])["recent"]["keys"]
        self.assertEqual(own, {short_key("k2"): recent["keys"][short_key("k2")]})  # not an admin
        self.assertGreater(midstream_out, 0)          # the thought it sent before failing
        ttft, latency = recent["ttft"], recent["latency"]           # 2 streams, 2 answers
        self.assertTrue(0 < ttft["p50"] <= ttft["p95"] < TIMEOUT, ttft)
        self.assertTrue(0 < latency["p50"] <= latency["p95"] < TIMEOUT, latency)
        series = recent["series"]
        self.assertEqual((len(series), sorted(series[0])), (60, ["errors", "latency_p50", "requests", "t"]))
        self.assertEqual((sum(p["requests"] for p in series), sum(p["errors"] for p in series)), (5, 3))
        self.assertEqual([p["t"] - series[0]["t"] for p in series[:3]], [0, 10, 20])
        self.assertEqual(d["models"], {bg.DEFAULT_MODEL: [{"url": gw.backend.routes[
            bg.DEFAULT_MODEL].pool.replicas[0].client.base_url, "status": "up", "failures": 0,
            "last_error": None}]})
        self.assertEqual((d["requests_in_flight"], d["streams_open"], d["version"]),
                         (0, 0, bg.__version__))

    def test_replica_credentials_are_not_shown(self):
        gw = start_gateway(self, ["http://user:secret@127.0.0.1:9/"])
        for path in ("/v1/dashboard", "/health"):
            body = request(gw.url, "GET", path)[2].decode()
            self.assertEqual(("secret" in body, json.loads(body)["models"][bg.DEFAULT_MODEL][0]["url"]),
                             (False, "http://***@127.0.0.1:9"), body)

    def test_dashboard_window_is_bounded_and_expires_and_a_cache_shows_when_present(self):
        gw = start_gateway(self, self.demo.url, rate_limit_rpm=1, cache_ttl=60)
        self.assertEqual([chat(gw, "Say hello")[1]["x-cache"] for _ in range(1)], ["miss"])
        m = gw.metrics
        for i in range(20005):
            m.record("/v1/models", 200, 0.001)
        first = m.recent()
        self.assertEqual((first["requests"], first["seconds"] < 600), (20000, True))  # the oldest
        m.record("/v1/models", 200, 0.001)                  # were dropped, and it says so
        self.assertIs(m.recent(), first)      # a full window is summed at most once a second
        m.window, m.bucket = 0.5, 0.1
        m.clock = lambda: time.time() + 1.1                  # 1.1 s on: all are out of it
        for _ in range(3):                                    # polling takes no rate limit
            status, _, body = request(gw.url, "GET", "/v1/dashboard")
            self.assertEqual(status, 200)
        d = json.loads(body)
        self.assertEqual((d["recent"]["requests"], len(d["recent"]["series"]), d["totals"]["requests"],
                          d["cache"]), (0, 5, 20007, {"hits": 0, "misses": 1, "size": 1,
                                                      "bytes": gw.backend.cache.bytes}))
        self.assertTrue(0 < gw.backend.cache.bytes < 2000, gw.backend.cache.bytes)


###############################################################################
# The demo upstream: every gateway test runs on it ############################
###############################################################################
# (no test class of its own)


###############################################################################
# Benchmark: run from the command line, in CLITests ###########################
###############################################################################
# (no test class of its own)


###############################################################################
# Command line ################################################################
###############################################################################

class CLITests(unittest.TestCase):
    def test_help_and_version(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as cm:
            bg.main(["--help"])
        self.assertEqual(cm.exception.code, 0)
        self.assertIn("serve", out.getvalue())
        proc = subprocess.run([sys.executable, "-m", "bharatgen_openai", "--version"], cwd=str(HERE),
                              capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(proc.stdout.strip(), "bharatgen_openai " + bg.__version__)
        for command, present, absent in (("info", "--connect-timeout", "--system-prompt"),
                                         ("chat", "--system-prompt", "--cache-ttl"),
                                         ("serve", "--tool-repairs", "--show-reasoning")):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
                bg.main([command, "--help"])
            self.assertEqual((present in out.getvalue(), absent in out.getvalue(),
                              re.search(r"\n  --\S+(?: \S+)?\n(?!  {10})", out.getvalue())),
                             (True, False, None), out.getvalue())    # every flag has its help

    def test_bench_compares_the_gateway_with_direct_calls(self):
        proc = subprocess.run([sys.executable, "bharatgen_openai.py", "bench", "--concurrency", "2",
                               "--words", "5", "--token-delay", "0.001", "--repeat", "2"],
                              cwd=str(HERE), capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        rows = [line.split() for line in proc.stdout.splitlines() if line[:5].strip() == "2"]
        self.assertEqual([r[1] for r in rows], ["gateway", "direct", "ratio"])
        for r in rows[:2]:
            self.assertEqual((r[2], r[7]), ("2", "0"))        # requests, errors
        self.assertRegex(rows[0][9], r"^\d+MB$")                  # the gateway's peak memory

    def test_chat_one_prompt_prints_the_answer(self):
        demo = start_demo(self)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = bg.main(["chat", "--upstream", demo.url, "hindi", "please"])
        self.assertEqual((code, out.getvalue()), (0, HINDI + "\n"))

    def test_interactive_chat_keeps_history_and_resets(self):
        demo = start_demo(self)
        out, err, stdin = io.StringIO(), io.StringIO(), io.StringIO(
            "Say hello\ntell me the history\n/reset\ntell me the history\n/exit\n")
        old, sys.stdin = sys.stdin, stdin
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = bg.main(["chat", "--upstream", demo.url])
        finally:
            sys.stdin = old
        history = [{"content": [{"text": "Say hello", "type": "text"}], "role": "user"},
                   {"content": [{"text": HELLO, "type": "text"}], "role": "assistant"}]
        system = bg.DEFAULT_SYSTEM_PROMPT
        self.assertEqual((code, out.getvalue()), (0, (
            ">>> %s\n>>> SYSTEM=%s | HISTORY=%s\n>>> >>> SYSTEM=%s | HISTORY=[]\n>>> "
            % (HELLO, system, json.dumps(history, sort_keys=True), system))))
        self.assertIn("(conversation forgotten)", err.getvalue())

    def test_chat_shows_the_reasoning_when_asked(self):
        demo = start_demo(self)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            bg.main(["chat", "--upstream", demo.url, "--show-reasoning", "Say hello"])
        self.assertEqual(out.getvalue(), "[thinking] %s\n\n%s\n" % (thought_of("Say hello"), HELLO))

    def test_info_prints_what_was_found(self):
        demo = start_demo(self)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bg.main(["info", "--upstream", demo.url])
        self.assertIn("gradio:         6.31.0, API at /gradio_api", out.getvalue())
        self.assertIn("chat endpoint:  /chat_fn_1", out.getvalue())
        self.assertIn("  top_k            Slider     <- OpenAI top_k (1 to 100)\n", out.getvalue())
        self.assertIn("openai fields:  system -> its input, history -> its input, temperature ->"
                      " its input, max_tokens -> its input, top_p -> its input, top_k -> its "
                      "input\n", out.getvalue())
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            bg.main(["info", "--demo"])
        self.assertIn("gradio:         6.31.0, API at /gradio_api", out.getvalue())
        chat_interface = start_demo(self, chat_interface=True)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bg.main(["info", "--upstream", chat_interface.url])
        self.assertIn("history:        not an input: folded into the message\n", out.getvalue())
        self.assertIn("openai fields:  system -> its input, history -> the message, temperature "
                      "-> its input, max_tokens -> nowhere, top_p -> nowhere, top_k -> nowhere",
                      out.getvalue())

    def test_info_follows_the_models_file_and_serve_logs_each_discovery(self):
        demo, plain = start_demo(self), PlainChatInterface().start()
        self.addCleanup(plain.stop)
        path = os.path.join(self.tmp(), "models.json")
        with open(path, "w") as f:
            json.dump({"models": [{"id": "param", "upstreams": [demo.url]},
                                  {"id": "plain", "upstreams": [plain.url]}]}, f)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bg.main(["info", "--config", path])
        self.assertEqual(re.findall(r"model: +(\S+)\napp: +(\S+)", out.getvalue()),
                         [("param", demo.url), ("plain", plain.url)])
        gw = bg.GatewayServer(bg.Config(models_file=path, port=0))
        self.addCleanup(gw.server_close)
        with self.assertLogs("bharatgen_openai", "INFO") as logs:
            bg._announce(gw)
        self.assertEqual(logs.output[1], "INFO:bharatgen_openai:model 'plain': %s is Gradio "
                         "6.31.0, endpoint /respond; system -> the message, history -> the "
                         "message, temperature -> nowhere, max_tokens -> nowhere, top_p -> "
                         "nowhere, top_k -> nowhere" % plain.url)
        dead = bg.GatewayServer(bg.Config(upstream=["http://127.0.0.1:9"], port=0))
        self.addCleanup(dead.server_close)
        with self.assertLogs("bharatgen_openai", "WARNING") as logs:
            bg._announce(dead)
        self.assertIn("cannot reach the Gradio app at http://127.0.0.1:9", logs.output[0])

    def tmp(self):
        import tempfile
        path = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, path)
        return path

    def test_info_on_something_that_is_not_gradio_says_so(self):
        gw = start_gateway(self, start_demo(self).url)
        with self.assertRaises(SystemExit) as cm:
            bg.main(["info", "--upstream", gw.url + "/v1"])
        self.assertEqual(str(cm.exception), "info: %s/v1 does not answer as a Gradio app: "
                         "neither /config nor /info describes one" % gw.url)
        with self.assertRaises(bg.UpstreamError) as cm:         # the gateway's root, not /v1
            bg.BharatGenOpenAI(gw.url).chat.completions.create(messages=[{"role": "user",
                                                                          "content": "Hi"}])
        self.assertEqual(cm.exception.message, "%s does not answer as a Gradio app: neither "
                         "/config nor /info describes one; it answers as an OpenAI API: did you "
                         "mean %s/v1?" % (gw.url, gw.url))
        with self.assertRaises(SystemExit) as cm:
            bg.main(["serve", "--demo", "--upstream", gw.url])
        self.assertEqual(cm.exception.code, 2)

    def test_bad_flag_values_exit_with_a_message(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            bg.main(["serve", "--reasoning", "loud"])
        self.assertEqual(cm.exception.code, 2)

    def test_serve_demo_in_a_subprocess(self):
        proc = subprocess.Popen([sys.executable, "bharatgen_openai.py", "serve", "--port", "0",
                                 "--token-delay", "0"], cwd=str(HERE), stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, BHARATGEN_UPSTREAM=""))
        self.addCleanup(proc.wait, TIMEOUT)
        self.addCleanup(proc.terminate)
        lines, deadline = [], time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            m = re.search(r"OpenAI API at (http://[\d.:]+)/v1", line)
            if m:
                break
        else:
            self.fail("serve did not start: %r" % lines)
        self.assertIn("DEMO", "".join(lines))
        reply = json.loads(chat(type("G", (), {"url": m.group(1)}), "Say hello")[2])
        self.assertEqual(reply["choices"][0]["message"]["content"], HELLO)
        proc.stderr.close()


###############################################################################
# Whole-server properties: faults, framing, attacks, bounds, load, shutdown ###
###############################################################################

class FuzzTests(unittest.TestCase):
    """Malformed requests, from a fixed seed: each gets a 4xx OpenAI error (or, when the
    fuzzer happened to build a valid request, a 200), never a 5xx or a silent close, and
    the server still answers a good request afterwards."""

    COUNT = 3000

    def test_malformed_requests(self):
        import random
        rng = random.Random(20261124)
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, header_timeout=2, body_timeout=2, max_body_bytes=65536)
        port = gw.server_address[1]
        good = json.dumps({"model": bg.DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}]})

        def body_variant():
            choice = rng.randrange(9)
            if choice == 0:
                return good[:rng.randrange(len(good))].encode()            # truncated JSON
            if choice == 1:
                return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            if choice == 2:
                return (b"[" * rng.randrange(1000, 60000))                  # deep nesting
            if choice == 3:
                field = rng.choice(["temperature", "top_p", "max_tokens", "n", "stop", "messages",
                                    "stream", "model", "top_k", "stream_options", "seed"])
                value = rng.choice([1e308, -1e308, 10 ** 400, "x", [], {}, None, True, -1,
                                    [[["deep"]]], "\ud800", 2 ** 70])
                try:
                    return json.dumps(dict(json.loads(good), **{field: value})).encode()
                except ValueError:
                    return b'{"temperature": 1e999999}'
            if choice == 4:
                msgs = rng.choice([[], [{}], [{"role": "user"}], [{"role": 1, "content": "x"}],
                                   [{"role": "user", "content": [{"type": "weird"}]}], "hi",
                                   [{"role": "assistant", "content": "x"}], [None]])
                return json.dumps({"model": bg.DEFAULT_MODEL, "messages": msgs}).encode()
            if choice == 5:
                return b'{"model": "bharatgen-param-17b", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
            if choice == 6:
                return json.dumps([good]).encode()
            if choice == 7:
                return b"null"
            return b""

        def request_variant():
            choice = rng.randrange(8)
            path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/responses",
                               "/v1/models/%ff", "/v1/\x01", "/../../etc/passwd", "/v1/chat/completions?x=%zz"])
            body = body_variant()
            if choice == 0:                                                  # wrong method
                method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "FOO", "TRACE"])
                return b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (
                    method.encode(), path.encode(), len(body), body), False
            if choice == 1:                                                  # bad request line
                return rng.choice([b"GARBAGE\r\n\r\n", b"POST\r\n\r\n", b"\r\n\r\nPOST /x\r\n\r\n",
                                   b"POST /v1/chat/completions HTTP/9.9\r\n\r\n",
                                   b"POST /v1/chat/completions HTTP/1.1 extra\r\n\r\n",
                                   b"POST " + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"]), True
            if choice == 2:                                                  # bad headers
                header = rng.choice([b"Content-Length: abc", b"Content-Length: -5",
                                     b"Content-Length: 99999999999", b"NoColonHere",
                                     b"X-" + b"a" * 70000 + b": 1",
                                     b"Transfer-Encoding: chunked\r\n\r\nzz",
                                     b"\xff\xfe: \xff"])
                return b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n%s\r\n\r\n" % header, True
            if choice == 3:                                                  # many headers
                return b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X-A: 1\r\n" * 150 + b"\r\n", True
            if choice == 4:                                                  # truncated body
                return b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: " \
                       b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body) + 10, body), True
            return b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" \
                   b"Content-Length: %d\r\n\r\n%s" % (path.encode("latin-1", "replace"), len(body), body), False

        problems = []
        for i in range(self.COUNT):
            data, shut = request_variant()
            raw = raw_exchange(port, data, shut_write=shut, timeout=5)
            status, head, body = parse_response(raw)
            ok = status is not None and (400 <= status < 500 or status == 200)
            if ok and status != 200:
                try:
                    error = json.loads(body)["error"]
                    ok = set(error) == {"message", "type", "param", "code"}
                except (ValueError, KeyError, TypeError):
                    ok = False
            if not ok:
                problems.append((data[:120], raw[:300]))
        self.maxDiff = None
        self.assertEqual(problems[:3], [])
        status, _, body = request(gw.url, "POST", "/v1/chat/completions", json.loads(good))
        self.assertEqual(status, 200)


class FaultTests(unittest.TestCase):
    """Each upstream failure: the status or stream error, in time, and no thread left behind."""

    def test_each_upstream_failure(self):
        demo = start_demo(self)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        dead = "http://127.0.0.1:%d" % sock.getsockname()[1]
        sock.close()
        gw = start_gateway(self, demo.url, timeout=0.3)
        refused = start_gateway(self, dead)
        bad_endpoint = start_gateway(self, demo.url, endpoint="no_such_fn")
        slow = start_demo(self, token_delay=0.04)       # 18 tokens: 0.7 s, past the timeout
        slow_gw = start_gateway(self, slow.url, timeout=0.4)
        chat(gw, "Say hello")                    # warm up: discovery done, threads settled
        self.assertTrue(wait_until(lambda: gw.connections == 0))
        before = threading.active_count()
        cases = [(refused, "Say hello", False, 502, "upstream_unreachable"),
                 (gw, "[[hang]]", False, 504, "upstream_timeout"),
                 (gw, "[[stall]]", True, 200, "upstream_timeout"),
                 (gw, "[[drop]]", True, 200, "upstream_unreachable"),
                 (gw, "[[malformed]]", False, 502, "upstream_error"),
                 (bad_endpoint, "Say hello", False, 502, "upstream_error"),
                 (gw, "[[error]]", False, 502, "upstream_error"),
                 (gw, "[[error]]", True, 502, "upstream_error"),
                 (slow_gw, "Say hello", True, 200, None)]             # a slow drip still completes
        answers = {}

        def ask(i, server, prompt, stream):        # all at once: the timeouts run side by side
            started = time.monotonic()
            answers[i] = chat(server, prompt, stream=stream), time.monotonic() - started
        threads = [threading.Thread(target=ask, args=(i,) + c[:3]) for i, c in enumerate(cases)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        for i, (server, prompt, stream, status, code) in enumerate(cases):
            with self.subTest(prompt=prompt, stream=stream):
                (got, _, body), took = answers[i]
                self.assertLess(took, 10)
                self.assertEqual(got, status)
                if got != 200:
                    self.assertEqual(json.loads(body)["error"]["code"], code)
                else:
                    events = sse_events(body)
                    self.assertEqual(events[-1], "[DONE]")
                    if code:
                        self.assertEqual(events[-2]["error"]["code"], code)
                    else:
                        self.assertEqual(streamed_text(events), HELLO)
        def at_rest():                             # kept-alive upstream connections hold a demo
            for server in (gw, bad_endpoint, slow_gw, refused):   # thread each: not a leak (a
                server.backend.close()                           # cancel's, once it is at rest)
            return threading.active_count() <= before
        wait_until(at_rest)
        self.assertLessEqual(threading.active_count(), before)


# -- security: request framing ---------------------------------------------------------

PIPELINED = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"      # must never be answered


def header_values(head, name):
    """The values of every ``name`` field in a response head (case-insensitive)."""
    out = []
    for line in head.split("\r\n")[1:]:
        field, sep, value = line.partition(":")
        if sep and field.lower() == name.lower():
            out.append(value.strip())
    return out


class FramingTests(unittest.TestCase):
    """Requests a strict HTTP/1.1 parser refuses: each is answered once, with
    "Connection: close", and the bytes after it (a pipelined GET /v1/models) never run."""

    def setUp(self):
        self.demo = start_demo(self)
        self.gw = start_gateway(self, self.demo.url, header_timeout=2, body_timeout=2)
        self.port = self.gw.server_address[1]

    def answer(self, data, port=None, timeout=5.0):
        """The responses to ``data`` + the pipelined request, read until the server closes."""
        raw = read_until_close(self, port or self.port, data + PIPELINED, timeout)
        self.raw = raw
        return split_responses(raw)

    def assert_refused(self, data, status, code, port=None):
        """``data`` (+ a pipelined request) gets exactly one response: ``status`` with an
        OpenAI error of ``code``, "Connection: close", then the connection ends."""
        responses = self.answer(data, port)
        self.assertEqual([r[0] for r in responses], [status], responses)
        self.assertEqual(len(re.findall(rb"HTTP/1\.[01] \d{3} ", self.raw)), 1, self.raw)
        _, head, body = responses[0]
        self.assertRegex(head, r"\r\nConnection: close(\r\n|$)")
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertIsInstance(error["message"], str)
        self.assertEqual((error["param"], error["code"]), (None, code))
        if status < 500:
            self.assertEqual(error["type"], "invalid_request_error")
        return head, error

    def assert_still_serving(self, gw=None):
        self.assertEqual(request((gw or self.gw).url, "GET", "/v1/models")[0], 200)

    def post(self, fields, body=CHAT_72):
        """A chat request with these header fields (bytes, each ending in CRLF) and body."""
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                b"application/json\r\n" + fields + b"\r\n" + body)

    # -- Content-Length and Transfer-Encoding --------------------------------------------

    def test_content_length_with_transfer_encoding_is_400(self):
        for fields in (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                       b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"):
            with self.subTest(fields=fields):
                self.assert_refused(self.post(fields, b"0\r\n\r\n"), 400, "bad_request")
        self.assert_still_serving()

    def test_repeated_or_malformed_content_length_is_400(self):
        cases = [(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
                 (b"Content-Length: 72\r\nContent-Length: 72\r\n", CHAT_72),
                 (b"Content-Length: 5, 6\r\n", b"hello"),
                 (b"Content-Length: 5, 5\r\n", b"hello")]
        cases += [(b"Content-Length: %s\r\n" % value, CHAT_72)
                  for value in (b"+72", b"7_2", b"-1", b"0x48", b"abc", b"\xd9\xa72", b"72\xa0",
                                b"\x8572")]
        for fields, body in cases:
            with self.subTest(fields=fields):
                self.assert_refused(self.post(fields, body), 400, "bad_request")
        self.assert_still_serving()

    def test_chunked_request_body_is_411(self):
        chunked = b"48\r\n" + CHAT_72 + b"\r\n0\r\n\r\n"
        for fields, body in ((b"Transfer-Encoding: chunked\r\n", chunked),
                             (b"Transfer-Encoding: chunked\r\n", b"-1\r\n"),    # never read
                             (b"transfer-encoding: CHUNKED\r\n", chunked)):
            with self.subTest(fields=fields, body=body[:8]):
                self.assert_refused(self.post(fields, body), 411, "length_required")
        self.assert_still_serving()

    def test_other_transfer_encodings_are_501(self):
        chunked = b"48\r\n" + CHAT_72 + b"\r\n0\r\n\r\n"
        for value in (b"chunked, identity", b"gzip, chunked", b"xchunked", b"gzip"):
            with self.subTest(value=value):
                self.assert_refused(self.post(b"Transfer-Encoding: %s\r\n" % value, chunked),
                                    501, "not_implemented")
        self.assert_still_serving()

    # -- field lines -----------------------------------------------------------------------

    def test_bad_field_lines_are_400(self):
        for line in (b"X Bad: 1", b"X-Bad : 1", b"X\x01: 1", b"NoColon",
                     b"X-A: a\x00b", b"X-A: a\rb", b"X-A: a\x1bb", b"X-A: a\x7fb",
                     b"X-A: a\r\n b", b"X-A: a\r\n\tb"):
            with self.subTest(line=line):
                self.assert_refused(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n%s\r\n\r\n" % line,
                                    400, "bad_request")
        # HTAB inside a value is allowed: both requests are answered
        responses = split_responses(read_until_close(
            self, self.port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-A: a\tb\r\n\r\n"
            b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
        self.assertEqual([r[0] for r in responses], [200, 200], responses)
        self.assert_still_serving()

    def test_missing_or_repeated_host_is_400(self):
        for data in (b"GET /v1/models HTTP/1.1\r\n\r\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nhost: x\r\n\r\n"):
            with self.subTest(data=data):
                self.assert_refused(data, 400, "bad_request")
        self.assert_still_serving()

    def test_non_ascii_digit_in_the_version_is_400(self):
        self.assert_refused(b"GET / HTTP/\xc2\xb2.1\r\nHost: localhost\r\n\r\n", 400, "bad_request")
        self.assert_refused(b"GET /health HTTP/1.\xd9\xa1\r\nHost: localhost\r\n\r\n", 400, "bad_request")
        self.assert_still_serving()

    # -- bodies nobody reads ---------------------------------------------------------------

    def test_a_body_on_a_route_that_does_not_read_it_ends_the_connection(self):
        for method, path, status in ((b"GET", b"/health", 200), (b"GET", b"/v1/models", 200),
                                     (b"OPTIONS", b"/v1/chat/completions", 204),
                                     (b"GET", b"/v1/nothing", 404),
                                     (b"GET", b"/v1/chat/completions", 405)):
            with self.subTest(method=method, path=path):
                responses = self.answer(b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n"
                                        b"hello" % (method, path))
                self.assertEqual([r[0] for r in responses], [status], responses)
                self.assertRegex(responses[0][1], r"\r\nConnection: close(\r\n|$)")
        self.assert_still_serving()

    # -- slow clients ----------------------------------------------------------------------

    def test_a_dripped_request_head_is_408_and_closed(self):
        gw = start_gateway(self, self.demo.url, header_timeout=0.25)
        port = gw.server_address[1]
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(sock.close)
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)   # (side by side)
        self.addCleanup(silent.close)
        head = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"
        started = time.monotonic()
        for i in range(len(head)):                 # 4 s if never cut off: bounded at 5 s
            if time.monotonic() - started > 5:
                break
            try:
                sock.sendall(head[i:i + 1])
            except OSError:
                break
            if select.select([sock], [], [], 0.05)[0]:
                break                              # the server has said something (or closed)
        responses = split_responses(drain(self, sock))
        took = time.monotonic() - started
        self.assertEqual([r[0] for r in responses], [408], responses)
        self.assertRegex(responses[0][1], r"\r\nConnection: close(\r\n|$)")
        self.assertEqual(json.loads(responses[0][2])["error"]["code"], "request_timeout")
        self.assertLess(took, 3)
        # a connection that sends nothing is closed after header_timeout, without a word
        self.assertEqual(drain(self, silent, timeout=4), b"")
        self.assertLess(time.monotonic() - started, 3)
        self.assert_still_serving(gw)

    def test_http_1_0_stream_is_raw_sse_then_close(self):
        body = json.dumps({"model": bg.DEFAULT_MODEL, "stream": True,
                           "messages": [{"role": "user", "content": "Say hello"}]}).encode()
        raw = read_until_close(self, self.port, b"POST /v1/chat/completions HTTP/1.0\r\n"
                               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body), timeout=10)
        head, _, payload = raw.partition(b"\r\n\r\n")
        head = head.decode("latin-1")
        self.assertRegex(head, r"^HTTP/1\.[01] 200 ")
        self.assertEqual(header_values(head, "Transfer-Encoding"), [])
        self.assertRegex(head, r"\r\nConnection: close(\r\n|$)")
        self.assertTrue(header_values(head, "Content-Type")[0].startswith("text/event-stream"))
        self.assertTrue(payload.endswith(b"data: [DONE]\n\n"), payload[-200:])
        self.assertEqual(streamed_text(sse_events(payload)), HELLO)

    # -- connection and send limits --------------------------------------------------------

    def test_connections_beyond_max_connections_get_503_at_once(self):
        gw = start_gateway(self, self.demo.url, max_connections=3)
        port = gw.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        for sock in idle:
            self.addCleanup(sock.close)
        self.assertTrue(wait_until(lambda: gw.connections == 3))   # it has taken all three
        started = time.monotonic()
        responses = split_responses(read_until_close(self, port, PIPELINED, timeout=5))
        self.assertLess(time.monotonic() - started, 1)
        self.assertEqual([r[0] for r in responses], [503], responses)
        self.assertRegex(responses[0][1], r"\r\nConnection: close(\r\n|$)")
        self.assertEqual(json.loads(responses[0][2])["error"]["code"], "server_overloaded")
        idle[0].close()
        deadline, statuses = time.monotonic() + 5, []
        while time.monotonic() < deadline:          # the server notices the close soon
            responses = split_responses(read_until_close(
                self, port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
            statuses.append(responses[0][0] if responses else None)
            if statuses[-1] != 503:
                break
            time.sleep(0.05)
        self.assertEqual(statuses[-1], 200, statuses)
        self.assertEqual(set(statuses[:-1]) - {503}, set())

    def test_a_client_that_stops_reading_loses_its_stream_and_slot(self):
        demo = start_demo(self, token_delay=0.0005)
        gw = start_gateway(self, demo.url, send_timeout=0.25, max_concurrent=1)
        gw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # inherited by accept()
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", gw.server_address[1]))
        body = json.dumps({"model": bg.DEFAULT_MODEL, "stream": True,
                           "messages": [{"role": "user", "content": "20000 words"}]}).encode()
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        begun = b""
        while b"\r\n" not in begun:                   # the status line: the stream has begun
            chunk = sock.recv(64)
            self.assertTrue(chunk, begun)
            begun += chunk
        self.assertTrue(begun.startswith(b"HTTP/1.1 200 "), begun)   # and is never read again
        statuses = []
        while time.monotonic() - started < 10:
            status, _, answer = chat(gw, "Say hello")
            statuses.append(status)
            if status == 200:
                self.assertEqual(json.loads(answer)["choices"][0]["message"]["content"], HELLO)
                break
            self.assertEqual((status, json.loads(answer)["error"]["code"]),
                             (503, "server_overloaded"))
            time.sleep(0.02)
        self.assertEqual((statuses[0], statuses[-1]), (503, 200), statuses)   # held, then freed
        self.assertLess(time.monotonic() - started, 10)
        rest = drain(self, sock)                     # the stalled stream was ended
        self.assertNotIn(b"data: [DONE]", rest)
        self.assertLess(len(rest), 1 << 20)

    # -- logs, CORS, health ----------------------------------------------------------------

    def test_text_access_log_escapes_what_the_client_sent(self):
        with self.assertLogs("bharatgen_openai.access", "INFO") as logs:
            for model in ("param-1\nFORGED 200", "param-1\x1b[2J\x85\u2028\x9b\x7f"):
                status, _, body = chat(self.gw, "Say hello", model=model)
                self.assertEqual((status, json.loads(body)["error"]["code"]),
                                 (404, "model_not_found"))
            wait_for_logs(logs, 2)
        messages = [r.getMessage() for r in logs.records]
        self.assertEqual(len(messages), 2, messages)          # one line per request
        for message in messages:
            self.assertNotIn("\n", message)
            self.assertNotIn("\r", message)
            for character in "\x1b\x85\u2028\x9b\x7f":
                self.assertNotIn(character, message)
        forged = [m for m in messages if "FORGED" in m]     # the lines may come in any order
        self.assertEqual(len(forged), 1, messages)
        self.assertIn("param-1\\nFORGED 200", forged[0])

    def test_cors_allow_headers_reflect_only_clean_values(self):
        gw = start_gateway(self, self.demo.url, cors_origins=["*"])
        port = gw.server_address[1]

        def preflight(value):
            return self.answer(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                               b"Origin: http://ui.example\r\nAccess-Control-Request-Method: POST"
                               b"\r\nAccess-Control-Request-Headers: " + value + b"\r\n"
                               b"Connection: close\r\n\r\n", port)

        # raw CRLF: the second line is a request field of its own, never a response field
        responses = preflight(b"x-evil\r\nSet-Cookie: a=b")
        self.assertEqual([r[0] for r in responses], [204], responses)
        head = responses[0][1]
        self.assertEqual(header_values(head, "Set-Cookie"), [])
        allowed = header_values(head, "Access-Control-Allow-Headers")
        self.assertEqual(len(allowed), 1, head)
        self.assertNotIn("set-cookie", allowed[0].lower())
        self.assertNotIn("a=b", allowed[0])
        # a bare CR inside the value is a framing error
        head, _ = self.assert_refused(
            b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: http://ui.example\r\n"
            b"Access-Control-Request-Headers: x-evil\rSet-Cookie: a=b\r\n\r\n", 400, "bad_request",
            port)
        self.assertEqual(header_values(head, "Set-Cookie"), [])
        # characters outside a token: the default list, not the value
        for value in (b"x-evil, set-cookie: a=b", b"x-evil;a=b", b"x-\xc3\xa9vil", b"x-evil a"):
            with self.subTest(value=value):
                responses = preflight(value)
                self.assertEqual([r[0] for r in responses], [204], responses)
                allowed = header_values(responses[0][1], "Access-Control-Allow-Headers")
                self.assertEqual(len(allowed), 1, responses[0][1])
                self.assertTrue(allowed[0].startswith("authorization, content-type"), allowed)
                self.assertNotIn("vil", allowed[0])
        responses = preflight(b"x-stainless-os, authorization")
        self.assertEqual([r[0] for r in responses], [204], responses)
        self.assertEqual(header_values(responses[0][1], "Access-Control-Allow-Headers"),
                         ["x-stainless-os, authorization"])
        self.assertEqual(header_values(responses[0][1], "Access-Control-Allow-Origin"), ["*"])

    def test_health_says_only_ok_without_a_key(self):
        gw = start_gateway(self, self.demo.url, api_keys=["sk-a"])
        self.assertEqual(chat(gw, "Say hello", headers={"Authorization": "Bearer sk-a"})[0], 200)
        for headers in (None, {"Authorization": "Bearer sk-wrong"}):
            with self.subTest(headers=headers):
                status, _, body = request(gw.url, "GET", "/health", headers=headers)
                self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        status, _, body = request(gw.url, "GET", "/health",
                                  headers={"Authorization": "Bearer sk-a"})
        report = json.loads(body)
        self.assertEqual((status, report["status"]), (200, "ok"))
        self.assertIn(bg.DEFAULT_MODEL, report["models"])


# -- what one request can do: each attack of the security review, with its bound ------------

class Answering(FakeGradio):
    """The demo upstream answering fixed texts: a prompt that holds one of ``answers``'
    keys gets its text (repairs and the rest, the demo's answers)."""

    def __init__(self, answers, **kwargs):
        self.answers = answers
        super().__init__(**kwargs)

    def reply(self, message, history, system, params):
        for key, answer in self.answers.items():
            if key in message:
                return thought_of(message), answer
        return super().reply(message, history, system, params)


def json_format(schema, strict=False):
    return {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": strict}}


def anyof_chain(levels, leaf):
    """A schema whose ``anyOf`` branches both lead to the next level: 2^levels paths."""
    defs = {"L%d" % i: {"anyOf": [{"$ref": "#/$defs/L%d" % (i + 1)}] * 2} for i in range(levels)}
    defs["L%d" % levels] = leaf
    return {"type": "object", "properties": {"v": {"$ref": "#/$defs/L0"}}, "$defs": defs}


class StreamWatch:
    """A streamed chat read in a thread, noting when each block arrived: the longest
    silence says whether another client's work froze the gateway."""

    def __init__(self, test, gw, prompt):
        self.times, self.done = [], threading.Event()
        conn = http.client.HTTPConnection("127.0.0.1", gw.server_address[1], timeout=TIMEOUT)
        test.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": bg.DEFAULT_MODEL, "stream": True,
            "messages": [{"role": "user", "content": prompt}]}),
            {"Content-Type": "application/json"})
        self.resp = conn.getresponse()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        test.addCleanup(self.thread.join, TIMEOUT)

    def _read(self):
        while self.resp.read1(65536):
            self.times.append(time.monotonic())
        self.done.set()

    def longest_gap(self, start, end):
        times = [start] + [t for t in self.times if start < t < end] + [end]
        return max(b - a for a, b in zip(times, times[1:]))


class AttackTests(unittest.TestCase):
    """Each attack of the security review, through the real server, with its bound: the
    statuses, the work done, and another client served meanwhile."""

    @slow
    def test_a_backtracking_pattern_runs_in_a_worker_and_freezes_nothing(self):
        reply = '{"x": "%s!"}' % ("a" * 28)           # ^(a+)+$: 2^28 steps in Python's re
        demo = Answering({"redos": reply, "quadratic": '{"x": "%s"}' % ("a" * 9000)},
                         token_delay=0.002).start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url)
        watch = StreamWatch(self, gw, "300 words")       # another client, streaming
        schema = {"type": "object", "properties": {"x": {"type": "string",
                                                         "pattern": "^(a+)+$"}}}
        started = time.monotonic()
        status, _, body = chat(gw, "redos", response_format=json_format(schema))
        took = time.monotonic() - started
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                         (200, reply))                  # not checked in time: taken as it is
        self.assertTrue(0.9 < took < 5, took)           # the match was cut at its 1 s deadline
        health = time.monotonic()
        self.assertEqual(request(gw.url, "GET", "/health")[0], 200)
        self.assertLess(time.monotonic() - health, 0.5)
        self.assertTrue(watch.done.wait(TIMEOUT))
        self.assertLess(watch.longest_gap(started, started + took), 0.5)   # it kept flowing
        status, _, body = chat(gw, "redos", response_format=json_format(schema, strict=True))
        self.assertEqual((status, json.loads(body)["error"]), (400, {
            "message": "response_format: the pattern '^(a+)+$' could not be matched within 1s",
            "type": "invalid_request_error", "param": "response_format",
            "code": "invalid_schema"}))
        schema["properties"]["x"]["pattern"] = r"\w+\s*="   # quadratic on one long word
        started = time.monotonic()
        self.assertEqual(chat(gw, "quadratic", response_format=json_format(schema))[0], 200)
        self.assertLess(time.monotonic() - started, 5)

    def test_branches_over_refs_are_checked_once_each(self):
        leaf = {"type": "string"}
        demo = Answering({"expo": '<tool_call>{"name": "f", "arguments": {"v": 5}}</tool_call>'})
        demo.start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url, tool_repairs=0)
        tool = {"type": "function", "function": {"name": "f", "parameters": anyof_chain(40, leaf)}}
        started = time.monotonic()
        status, _, body = chat(gw, "expo", tools=[tool])            # 2^40 paths, checked once
        self.assertEqual((status, json.loads(body)["choices"][0]["finish_reason"]), (200, "stop"))
        self.assertLess(time.monotonic() - started, 5)
        schema = bg._Schema(anyof_chain(60, leaf), "s")    # 2^60 paths (100 levels: 3.9's stack)
        started = time.monotonic()
        self.assertEqual(schema.error({"v": 5}), "$.v fits none of the schemas it may take")
        self.assertLess(time.monotonic() - started, 1)
        wide = {"type": "array", "items": {"anyOf": [{"$ref": "#"}, {"$ref": "#"}, leaf]}}
        value = json.loads("[" * 60 + "]" * 60)
        self.assertEqual(bg._Schema(wide, "s").error(value), None)
        big = [[1] * 300] * 300                       # 90,000 places: over the budget of steps
        self.assertEqual(bg._Schema({"type": "array", "items": {"type": "array", "items": {
            "anyOf": [{"type": "string"}, {"type": "integer"}]}}}, "s").error(big),
            "it is too large to check against the schema (200000 steps, 1s)")

    @slow
    def test_patterns_are_compiled_in_the_workers_within_the_request_s_second(self):
        patterns = bg._Patterns(workers=1)
        self.addCleanup(patterns.close)
        slow = {"type": "object", "properties": {"p%d" % i: {"type": "string", "pattern": "(?i)"
                + "[\\x01-\\uffff]" * 40 + "x%d" % i} for i in range(20)}}   # ~0.3 s each
        started = time.monotonic()
        bg._Schema(slow, "response_format", False, patterns)      # not strict: not compiled
        self.assertLess(time.monotonic() - started, 0.5)
        with self.assertRaisesRegex(bg.BadRequestError, "cannot be checked here"):
            bg._Schema(slow, "response_format", True, patterns)   # strict: a second in all
        self.assertLess(time.monotonic() - started, 3)
        many = {"type": "object", "patternProperties": {"^a%d$" % i: {} for i in range(3000)}}
        started = time.monotonic()
        self.assertEqual(bg._Schema(many, "s", False, patterns).error({"x": 1, "y": 2}),
                         None)                          # unchecked past its second, not spawned
        self.assertLess(time.monotonic() - started, 3)
        with self.assertRaisesRegex(bg.BadRequestError, "over 64 KB"):
            bg._Schema({"properties": {"p%d" % i: {"pattern": "a" * 900} for i in range(80)}}, "s")
        patterns._slots.acquire()                       # every worker busy: the server's load
        self.addCleanup(patterns._slots.release)
        with self.assertRaises(bg.ServerOverloadedError):
            patterns.search("a", "a", time.monotonic() + 0.2)

    def test_results_are_remembered_by_place_not_by_the_path_s_text(self):
        schema = bg._Schema({"type": ["object", "integer"], "additionalProperties": {"$ref": "#"}},
                            "s")
        for value in ({"a.b": 1, "a": {"b": "x"}}, {"a": {"b": "x"}, "a.b": 1}):
            self.assertEqual(schema.error(value), '$.a.b should be of type object or integer, '
                             'not "x"')

    def test_a_replica_that_failed_at_the_start_is_down_until_it_answers(self):
        gw = start_gateway(self, "http://127.0.0.1:9")
        bg._announce(gw)
        status, _, body = request(gw.url, "GET", "/health")
        self.assertEqual((status, json.loads(body)["status"]), (503, "unavailable"))

    def test_embeddings_count_toward_tokens_a_minute_and_stop_when_the_client_leaves(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, demo=True, rate_limit_tpm=100)
        status, headers, _ = request(gw.url, "POST", "/v1/embeddings", {"input": ["hello"] * 60})
        self.assertEqual((status, headers["x-ratelimit-remaining-tokens"]), (200, "40"))
        status, _, body = request(gw.url, "POST", "/v1/embeddings", {"input": ["hello"] * 60})
        self.assertEqual((status, json.loads(body)["error"]["code"]), (429, "rate_limit_exceeded"))
        slow = start_demo(self, token_delay=0.05)
        gw = start_gateway(self, slow.url, demo=True)
        calls = len(slow.calls)
        body = json.dumps({"input": ["x"] * 400}).encode()
        sock = socket.create_connection(("127.0.0.1", gw.server_address[1]), timeout=5)
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + TIMEOUT
        while len(slow.calls) < calls + 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()
        before = len(slow.calls)                         # the request and the app at rest:
        self.assertTrue(wait_until(lambda: gw.in_flight == 0 and slow.active_streams == 0))
        self.assertLessEqual(len(slow.calls) - before, 8)    # those under way, no more

    def test_a_big_enum_is_made_canonical_once(self):
        items = list(range(2000))
        demo = Answering({"enum": json.dumps({"x": items})}).start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url, max_body_bytes=1 << 21)
        schema = {"type": "object", "properties": {"x": {"type": "array", "items": {
            "enum": list(range(20000))}}}}
        started = time.monotonic()
        status, _, body = chat(gw, "enum", response_format=json_format(schema, strict=True),
                               max_tokens=8192)
        self.assertEqual((status, json.loads(json.loads(body)["choices"][0]["message"]["content"])),
                         (200, {"x": items}))
        self.assertLess(time.monotonic() - started, 5)      # 2000 x 20,000 before: minutes

    def test_stop_sequences_are_bounded_and_cut_in_linear_time(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url)
        status, _, body = chat(gw, "Say hello", stop=["x" * 257])
        self.assertEqual((status, json.loads(body)["error"]["param"],
                          json.loads(body)["error"]["message"]),
                         (400, "stop", "a stop sequence may have at most 256 characters"))
        stops = ["a" * 255 + "b", "Param" * 51, "words " * 42, "x" * 256]
        started = time.monotonic()
        status, _, body = chat(gw, "3000 words", stop=stops, max_tokens=8192)
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                         (200, bg._demo_reply("3000 words", [], "", [0] * 4)[1]))
        self.assertLess(time.monotonic() - started, 10)
        cutter, started = bg._StopCutter(["a" * 255 + "b"] * 4), time.monotonic()
        self.assertEqual(sum(len(cutter.feed("a" * 50)) for _ in range(20000)), 1000000 - 255)
        self.assertLess(time.monotonic() - started, 3)        # quadratic before: minutes

    def test_upstream_credentials_are_shown_nowhere(self):
        secret = "S3cretPass"
        demo = start_demo(self)
        live = demo.url.replace("//", "//user:%s@" % secret)
        down = "http://user:%s@127.0.0.1:9/?token=%s" % (secret, secret)
        gw = start_gateway(self, [live, down], api_keys=["k"])
        key = {"Authorization": "Bearer k"}
        outputs = []
        with self.assertLogs("bharatgen_openai", "DEBUG") as logs:
            for _ in range(3):
                outputs.append(chat(gw, "Say hello", headers=key)[2])
            for path in ("/health", "/v1/dashboard", "/metrics"):
                outputs.append(request(gw.url, "GET", path, headers=key)[2])
            dead = start_gateway(self, down)
            outputs.append(chat(dead, "Say hello")[2])                 # a 502
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                for upstream in (live, down):
                    try:
                        bg.main(["info", "--upstream", upstream])
                    except SystemExit as exc:
                        outputs.append(str(exc))
                try:
                    bg.main(["serve", "--upstream", "http://u:%s@bad host/" % secret])
                except SystemExit as exc:
                    outputs.append(str(exc.code))
            outputs += [out.getvalue(), err.getvalue()]
        text = "\n".join(o.decode() if isinstance(o, bytes) else str(o) for o in outputs)
        text += "\n".join(logs.output)
        self.assertIn("http://***@127.0.0.1:9:", text)
        self.assertIn("502", text)
        self.assertNotIn(secret, text)
        basic = "Basic " + base64.b64encode(("user:" + secret).encode()).decode()
        self.assertIn(basic, demo.auth_seen)                  # the URL's credentials are used

    def test_one_address_cannot_take_every_connection(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, max_connections=64, max_client_connections=4)
        port, held = gw.server_address[1], []

        def connect():
            sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                            source_address=("127.0.0.2", 0))
            self.addCleanup(sock.close)
            return sock
        for _ in range(4):
            held.append(connect())
        deadline = time.monotonic() + TIMEOUT
        while gw.clients.get("127.0.0.2") != 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = [drain(self, connect()) for _ in range(6)]
        self.assertEqual([r[:12] for r in refused], [b"HTTP/1.1 503"] * 6)
        self.assertIn(b"this address has its limit of 4 connections open", refused[0])
        self.assertEqual([request(gw.url, "GET", "/health")[0] for _ in range(40)], [200] * 40)
        proxied = start_gateway(self, demo.url, max_client_connections=4,
                                trusted_proxies=["127.0.0.2"])
        port = proxied.server_address[1]
        for _ in range(8):                                    # a proxy carries many clients
            held.append(connect())
        sock = connect()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertEqual(drain(self, sock)[:12], b"HTTP/1.1 200")

    @slow
    @unittest.skipUnless(sys.platform.startswith("linux") and hasattr(
        __import__("resource"), "prlimit"), "needs Linux's prlimit and /proc")
    def test_the_open_file_limit_sizes_the_connections_and_a_failing_accept_backs_off(self):
        import resource
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "bharatgen_openai.py"), "serve", "--demo", "--port", "0",
             "--max-connections", "1024"], stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)))
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.kill)
        lines, url = [], None
        while url is None:
            line = proc.stderr.readline()
            self.assertTrue(line, "".join(lines))
            lines.append(line)
            m = re.search(r"OpenAI API at (http://\S+)/v1", line)
            url = m and m.group(1)
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        self.assertEqual(request(url, "GET", "/health")[0], 200)
        self.assertIn("--max-connections 1024 is lowered to 86: the open-file limit is 300",
                      "".join(lines))
        files = len(os.listdir("/proc/%d/fd" % proc.pid))
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (files + 2, 300))
        port = int(url.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        before = sum(int(x) for x in open("/proc/%d/stat" % proc.pid).read().rsplit(")", 1)[1]
                     .split()[11:13])
        time.sleep(1.5)                               # what a spinning loop would burn
        after = sum(int(x) for x in open("/proc/%d/stat" % proc.pid).read().rsplit(")", 1)[1]
                    .split()[11:13])
        self.assertLess((after - before) / os.sysconf("SC_CLK_TCK"), 0.5)
        for sock in socks:
            sock.close()
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (300, 300))
        self.assertEqual(request(url, "GET", "/health")[0], 200)
        self.assertEqual(sum("cannot accept connections at %s" % url in line for line in lines), 1,
                         lines)

    def test_the_cache_is_bounded_in_bytes(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, cache_ttl=60, cache_bytes=16 << 10)
        big = [chat(gw, "600 words", max_tokens=8192)[1]["x-cache"] for _ in range(2)]
        self.assertEqual(big, ["miss", "miss"])                # over an eighth: not kept
        for i in range(24):                                    # over 1 KB each: 24 KB in all
            self.assertEqual(chat(gw, "%d words" % (60 + i), max_tokens=8192)[0], 200)
        cache = gw.backend.cache
        self.assertTrue(0 < cache.bytes <= 16 << 10 and len(cache) < 24, (cache.bytes, len(cache)))
        self.assertEqual(cache.bytes, sum(item[3] for item in cache._items.values()))
        self.assertEqual(chat(gw, "83 words", max_tokens=8192)[1]["x-cache"], "hit")
        self.assertEqual(chat(gw, "60 words", max_tokens=8192)[1]["x-cache"], "miss")

    def test_images_are_uploaded_once_a_request_and_capped(self):
        demo = ImageGradio().start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url)
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        message = [{"role": "user", "content": [{"type": "text", "text": "Hi"}] + [image] * 16}]
        self.assertEqual(chat(gw, message, n=4)[0], 200)
        self.assertEqual(len(demo.uploads), 1)                   # 16 x 4 before
        other = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        self.assertEqual(chat(gw, [dict(message[0], content=[image, other])], n=3)[0], 200)
        self.assertEqual(len(demo.uploads), 3)
        status, _, body = chat(gw, [dict(message[0], content=[image] * 17)])
        self.assertEqual((status, json.loads(body)["error"]), (400, {
            "message": "a message may hold at most 16 images", "type": "invalid_request_error",
            "param": "messages[0].content[16]", "code": "too_many_images"}))
        self.assertEqual(len(demo.uploads), 3)

    def test_keys_are_known_by_their_whole_digest_and_wrong_ones_are_limited(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, api_keys=["k1", "k2"], rate_limit_rpm=5)
        for key in ("k1", "k2"):
            self.assertEqual(chat(gw, "Say hello", headers={"Authorization": "Bearer " + key})[0], 200)
        self.assertEqual(sorted(gw.limiter._buckets), sorted(
            "key:" + hashlib.sha256(k.encode()).hexdigest() for k in ("k1", "k2")))
        for method, path in (("GET", "/v1/nope"), ("POST", "/v1/models"), ("GET", "/metrics")):
            status, _, body = request(gw.url, method, path, {} if method == "POST" else None)
            self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_api_key"))
        statuses = [chat(gw, "Say hello", headers={"Authorization": "Bearer wrong%d" % i})[0]
                    for i in range(27)]
        self.assertEqual(statuses, [401] * 2 + [429] * 25)   # 3 of 5 went on the paths above
        status, headers, body = chat(gw, "Say hello", headers={"Authorization": "Bearer bad"})
        self.assertEqual((status, json.loads(body)["error"]["message"][:60]), (
            429, "Rate limit reached: 5 requests with a wrong API key per minu"))
        self.assertEqual(chat(gw, "Say hello", headers={"Authorization": "Bearer k1"})[0], 200)
        k = {"Authorization": "Bearer k1"}
        self.assertEqual(request(gw.url, "GET", "/v1/nope", headers=k)[0], 404)
        self.assertEqual(request(gw.url, "POST", "/v1/models", {}, headers=k)[0], 405)

    def test_schema_numbers_are_a_check_or_a_400_never_a_500(self):
        demo = Answering({"tiny": '{"v": 3.5}', "huge": '{"v": 1%s}' % ("0" * 400)}).start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url)
        for prompt, multiple in (("tiny", 5e-324), ("huge", 5e-324), ("huge", 0.7), ("tiny", 1e308)):
            schema = {"type": "object", "properties": {"v": {"multipleOf": multiple}}}
            status, _, body = chat(gw, prompt, response_format=json_format(schema))
            self.assertEqual(status, 200, (prompt, multiple, body))
        self.assertIsNone(bg._Schema({"multipleOf": 5e-324}, "s").error(3.5))
        self.assertIsNone(bg._Schema({"multipleOf": 5e-324}, "s").error(10 ** 400))
        self.assertEqual(bg._Schema({"multipleOf": 0.7}, "s").error(10 ** 400),
                         "$ should be multipleOf 0.7")
        status, _, body = chat(gw, "tiny", response_format=json_format({"multipleOf": -1}))
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "invalid_schema"))

    def test_json_logs_escape_what_is_not_printable(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, log_format="json")
        odd = "m\u0085\u2028\u009b\u202e\U000e0001नमस्ते"
        with self.assertLogs("bharatgen_openai.access", "INFO") as logs:
            chat(gw, "Say hello", model=odd)
            wait_for_logs(logs, 1)
        record = logs.records[0]
        line = bg._JSONFormatter().format(record)
        self.assertEqual(json.loads(line)["model"], odd)
        for char in odd[1:6]:
            self.assertNotIn(char, line)
            self.assertNotIn(char, record.getMessage())
        self.assertIn("नमस्ते", line)

    def test_with_no_keys_a_foreign_host_and_a_plain_text_body_are_refused(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, allowed_hosts=["my.box"])
        body = json.dumps({"messages": [{"role": "user", "content": "Say hello"}]}).encode()
        for host, status in (("attacker.example", 403), ("localhost:8000", 200),
                             ("a.localhost", 200), ("127.0.0.1:80", 200), ("[::1]:8000", 200),
                             ("my.box:8000", 200), ("localhost.attacker.example", 403)):
            got, _, answer = request(gw.url, "POST", "/v1/chat/completions", raw=body,
                                     headers={"Host": host})
            self.assertEqual(got, status, (host, answer))
        self.assertEqual(json.loads(answer)["error"], {
            "message": "the Host 'localhost.attacker.example' is not a name this server answers "
                       "to with no API key; give --allowed-host localhost.attacker.example, or "
                       "API keys", "type": "invalid_request_error", "param": None,
            "code": "host_not_allowed"})
        self.assertEqual(request(gw.url, "GET", "/", headers={"Host": "evil.example"})[0], 403)
        for kind, status in (("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                             ("application/json; charset=utf-8", 200), ("Application/JSON", 200)):
            got, _, answer = request(gw.url, "POST", "/v1/chat/completions", raw=body,
                                     headers={"Content-Type": kind})
            self.assertEqual(got, status, (kind, answer))
        self.assertEqual(json.loads(request(gw.url, "POST", "/v1/chat/completions", raw=body,
                                            headers={"Content-Type": "text/plain"})[2])["error"], {
            "message": "send the body as JSON with 'Content-Type: application/json' (not "
                       "text/plain)", "type": "invalid_request_error", "param": None,
            "code": "unsupported_media_type"})
        keyed = start_gateway(self, demo.url, api_keys=["k"])
        self.assertEqual(request(keyed.url, "POST", "/v1/chat/completions", raw=body, headers={
            "Host": "attacker.example", "Authorization": "Bearer k"})[0], 200)

    def test_silence_is_counted_in_output_events_and_a_heartbeat_flood_is_cut(self):
        for behaviour, status, code in (("trickle", 504, "upstream_timeout"),
                                        ("heartbeats", 502, "upstream_error")):
            fake = FaultyGradio(self, behaviour)
            gw = start_gateway(self, fake.url, timeout=0.5)    # a byte each 0.2 s
            started = time.monotonic()
            events = sse_events(chat(gw, "hi", stream=True)[2])
            self.assertLess(time.monotonic() - started, 4, behaviour)   # 40 s past before
            self.assertEqual((events[-2]["error"]["code"], events[-1]), (code, "[DONE]"))
            if behaviour == "heartbeats":
                self.assertEqual(events[-2]["error"]["message"],
                                 "the Gradio app sent 1001 events with no output in a row")
                self.assertLess(fake.sent, 16 << 20)     # socket buffers; 100 MB before

    def test_a_client_that_leaves_a_non_streamed_answer_stops_its_work(self):
        demo = start_demo(self, token_delay=0.01)
        gw = start_gateway(self, demo.url)
        body = json.dumps({"model": bg.DEFAULT_MODEL, "n": 4, "max_tokens": 8192, "messages": [
            {"role": "user", "content": "2000 words"}]}).encode()
        sock = socket.create_connection(("127.0.0.1", gw.server_address[1]), timeout=5)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + TIMEOUT
        while len(demo.running) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()                                     # held answers: nothing written yet
        while (len(demo.cancels) < 4 or demo.running) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual((len(demo.cancels), demo.running), (4, {}))
        sock = socket.create_connection(("127.0.0.1", gw.server_address[1]), timeout=5)
        body = json.dumps({"model": bg.DEFAULT_MODEL, "stream": True, "max_tokens": 8192,
                           "response_format": {"type": "json_object"}, "messages": [
                               {"role": "user", "content": "2000 words"}]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        while not demo.running and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()                                     # a held stream: the same
        while (len(demo.cancels) < 5 or demo.running) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual((len(demo.cancels), demo.running), (5, {}))

    def test_a_silent_app_costs_waiting_requests_one_timeout_not_one_each(self):
        held = []

        def serve(server):                       # takes connections, answers nothing
            server.settimeout(0.1)
            while len(held) < 30 and not getattr(server, "done", False):
                try:
                    held.append(server.accept()[0])
                except socket.timeout:
                    continue
                except OSError:
                    return
        port, _ = scripted_server(self, serve)
        self.addCleanup(lambda: [c.close() for c in held])
        gw = start_gateway(self, "http://127.0.0.1:%d" % port, connect_timeout=0.25)
        results, started = [], time.monotonic()
        threads = [threading.Thread(target=lambda: results.append(chat(gw, "hi")[0]))
                   for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual(sorted(results), [504] * 6)
        self.assertLess(time.monotonic() - started, 1.25)    # 6 x 0.25 s one after another before

    def test_a_body_of_many_small_containers_is_refused_before_it_is_parsed(self):
        gw = start_gateway(self, start_demo(self).url)
        body = b'{"messages": [{"role": "user", "content": "hi"}], "x": [' + b"{}," * 200000 + b"{}]}"
        status, _, answer = request(gw.url, "POST", "/v1/chat/completions", raw=body)
        self.assertEqual((status, json.loads(answer)["error"]["message"]),
                         (400, "the JSON body holds over 200000 objects and arrays"))

    def test_json_is_looked_for_within_bounds(self):
        started = time.monotonic()
        self.assertIsNone(bg._json_in("[" * 64 + "1," * 400000))
        self.assertLess(time.monotonic() - started, 2)       # 64 full parses before: ~10 s

    def test_an_app_that_closes_each_connection_and_a_server_that_is_not_gradio(self):
        class Closing(bg._DemoHandler):
            protocol_version = "HTTP/1.0"                # every answer ends its connection
        demo = start_demo(self)
        demo.RequestHandlerClass = Closing
        gw = start_gateway(self, demo.url)
        for stream in (False, True):
            self.assertEqual(chat(gw, "Say hello", stream=stream)[0], 200)
        class Files(http.server.SimpleHTTPRequestHandler):     # python -m http.server
            def log_message(self, *args):
                pass
        files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
        threading.Thread(target=files.serve_forever, args=(0.05,), daemon=True).start()
        self.addCleanup(files.server_close)
        self.addCleanup(files.shutdown)
        url = "http://127.0.0.1:%d" % files.server_address[1]
        for _ in range(50):                              # a race gave EBADF in 5 of 8 before
            with self.assertRaisesRegex(bg.UpstreamError, "^%s does not answer as a Gradio app"
                                        % re.escape(url)):
                bg.GradioClient(url).discover()

    def test_the_demo_keeps_no_job_after_it_ends(self):
        demo = bg.DemoUpstream().start()
        self.addCleanup(demo.stop)
        gw = start_gateway(self, demo.url)
        for _ in range(5):
            self.assertEqual(chat(gw, "Say hello " + "x" * 100000)[0], 200)
        deadline = time.monotonic() + TIMEOUT             # the last stream ends after its answer
        while demo.running and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual((demo.jobs, demo.running, hasattr(demo, "calls")), ({}, {}, False))
        client = gradio_client(self, demo.url, protocol="call")
        for _ in range(300):                              # submitted, never streamed
            client.http.json("POST", "/gradio_api/call/chat_fn_1", {"data": ["x" * 1000]})
        self.assertEqual(len(demo.jobs), 64)

    def test_a_trusted_proxy_without_x_forwarded_for_is_the_client(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, trusted_proxies=["127.0.0.1"], rate_limit_rpm=100)
        with self.assertLogs("bharatgen_openai.access", "INFO") as logs:
            self.assertEqual(chat(gw, "Say hello")[0], 200)
            wait_for_logs(logs, 1)
        self.assertTrue(logs.output[0].startswith('INFO:bharatgen_openai.access:127.0.0.1 "POST'),
                        logs.output)
        self.assertEqual(list(gw.limiter._buckets), ["ip:127.0.0.1"])


class BoundsTests(unittest.TestCase):
    """What a client can make the gateway hold, and for how long."""

    def setUp(self):
        self.demo = start_demo(self)
        self.gw = start_gateway(self, self.demo.url, header_timeout=2, body_timeout=2)
        self.port = self.gw.server_address[1]

    def test_a_request_head_over_64_kib_in_all_is_431(self):
        fields = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
        raw = read_until_close(self, self.port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
                               + fields + b"\r\n")
        [(status, head, body)] = split_responses(raw)
        self.assertEqual((status, json.loads(body)["error"]["message"]), (431, "Line too long"))
        self.assertEqual(request(self.gw.url, "GET", "/v1/models", headers={
            "X-%d" % i: "a" * 1000 for i in range(60)})[0], 200)

    def test_a_request_line_with_other_separators_is_400(self):
        for line in (b"GET\x1c/v1/models HTTP/1.1", b"GET /v1/models\xa0HTTP/1.1",
                     b"GET /v1/models\rHTTP/1.1", b"GET  /v1/models HTTP/1.1",
                     b"GET /v1/mod\xc3\xa9ls HTTP/1.1"):
            with self.subTest(line=line):
                [(status, head, body)] = split_responses(read_until_close(
                    self, self.port, line + b"\r\nHost: localhost\r\n\r\n"))
                self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "bad_request"))
                self.assertRegex(head, r"\r\nConnection: close(\r\n|$)")

    def test_100_continue_only_when_the_body_is_wanted(self):
        gw = start_gateway(self, self.demo.url, api_keys=["sk-a"])
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                b"Content-Type: application/json\r\nContent-Length: 72\r\n%s\r\n")
        raw = read_until_close(self, gw.server_address[1], head % b"")
        self.assertTrue(raw.startswith(b"HTTP/1.1 401 "), raw[:80])        # no 100 first
        sock = socket.create_connection(("127.0.0.1", gw.server_address[1]), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(head % b"Authorization: Bearer sk-a\r\n")
        self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(CHAT_72)
        raw = b""
        while not (b"\r\n\r\n" in raw and _complete(raw)):
            raw += sock.recv(65536)
        [(status, _, body)] = split_responses(raw)
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                         (200, HELLO))

    def test_a_slow_body_holds_no_slot(self):
        gw = start_gateway(self, self.demo.url, max_concurrent=1, body_timeout=3)
        sock = socket.create_connection(("127.0.0.1", gw.server_address[1]), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{")
        self.assertTrue(wait_until(lambda: gw.in_flight == 1))    # reading its body
        self.assertEqual(chat(gw, "Say hello")[0], 200)

    def test_one_request_starts_at_most_16_generations(self):
        status, _, body = request(self.gw.url, "POST", "/v1/completions",
                                  {"prompt": ["Say hello"] * 9, "n": 2})
        self.assertEqual((status, json.loads(body)["error"]), (400, {
            "message": "9 prompts with n=2 would start 18 generations; this server starts "
                       "at most 16 for one request", "type": "invalid_request_error",
            "param": "prompt", "code": "invalid_value"}))
        self.assertEqual(self.demo.calls, [])

    def test_a_lone_surrogate_comes_back_as_the_json_escape_it_came_as(self):
        status, _, body = request(self.gw.url, "POST", "/v1/responses", raw=(
            b'{"input": "Say hello", "metadata": {"a": "\\ud800"}}'))
        self.assertEqual((status, json.loads(body)["metadata"]), (200, {"a": "\ud800"}))
        for stream in (False, True):
            status, _, body = chat(self.gw, "\udfff Say hello", stream=stream)
            text = streamed_text(sse_events(body), "reasoning_content") if stream else \
                json.loads(body)["choices"][0]["message"]["reasoning_content"]
            self.assertEqual((status, text), (200, thought_of("\udfff Say hello")))
        self.assertEqual(request(self.gw.url, "GET", "/health")[0], 200)

    def test_empty_data_lines_count_toward_the_event_limit(self):
        lines = iter([b"data:\n" * 60, b"data:\n" * 60, b""])
        with self.assertRaisesRegex(bg.UpstreamError, "an event of over 100 bytes"):
            list(bg._iter_sse(lambda: next(lines), 100))

    def test_an_upstream_that_goes_on_after_the_end_does_not_delay_the_answer(self):
        fake = faulty_gradio(self, "ping_after_complete")
        gw = start_gateway(self, fake.url, timeout=5)
        answers = {}

        def ask(stream):                           # both at once: each may read on for 1 s
            started = time.monotonic()
            answers[stream] = chat(gw, "Say hello", stream=stream), time.monotonic() - started
        threads = [threading.Thread(target=ask, args=(stream,)) for stream in (False, True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        for stream in (False, True):
            (status, _, body), took = answers[stream]
            text = streamed_text(sse_events(body)) if stream else \
                json.loads(body)["choices"][0]["message"]["content"]
            self.assertEqual((status, text), (200, HELLO))
            self.assertLess(took, 3)


class LoadTests(unittest.TestCase):
    def test_200_concurrent_streams_all_exact(self):
        demo = start_demo(self, token_delay=0.01)
        gw = start_gateway(self, demo.url)
        results, errors = [], []
        barrier = threading.Barrier(200, timeout=TIMEOUT)

        def one(i):
            try:
                barrier.wait()
                prompt = ("Say hello", "hindi please")[i % 2]
                status, _, body = chat(gw, prompt, stream=True)
                results.append((status, prompt, streamed_text(sse_events(body))))
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        expected = {"Say hello": HELLO, "hindi please": HINDI}
        self.assertEqual(len(results), 200)
        self.assertEqual([(s, t) for s, p, t in results if (s, t) != (200, expected[p])], [])


class ShutdownTests(unittest.TestCase):
    def test_sigterm_lets_a_stream_in_flight_finish(self):
        import signal
        proc = subprocess.Popen([sys.executable, "bharatgen_openai.py", "serve", "--demo",
                                 "--port", "0", "--token-delay", "0.004", "--grace", "20"],
                                cwd=str(HERE), stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, BHARATGEN_UPSTREAM=""))
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        deadline, url = time.monotonic() + TIMEOUT, None
        while time.monotonic() < deadline and url is None:
            m = re.search(r"OpenAI API at (http://[\d.:]+)/v1", proc.stderr.readline())
            url = m and m.group(1)
        self.assertIsNotNone(url)
        gw = type("G", (), {"url": url})
        result = []
        t = threading.Thread(target=lambda: result.append(chat(gw, "120 words", stream=True)))
        t.start()
        self.assertTrue(wait_until(lambda: streams_in_flight(url) == 1))   # 0.5 s of it to go
        proc.send_signal(signal.SIGTERM)
        t.join(TIMEOUT)
        try:
            err = proc.communicate(timeout=TIMEOUT)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            self.fail("serve did not stop: %s" % proc.communicate()[1][-2000:])
        self.assertEqual(proc.returncode, 0, err[-2000:])
        expected = bg._demo_reply("120 words", [], "", [0] * 4)[1]
        self.assertEqual(result[0][0], 200)
        self.assertEqual(streamed_text(sse_events(result[0][2])), expected)
        self.assertIn("stopped", err)


class DrainTests(unittest.TestCase):
    """``GatewayServer.drain`` as a load balancer sees it: ``/health`` and new requests are
    503s at once, the listener stays open and what is in flight finishes."""

    def open_stream(self, gw, prompt):
        conn = http.client.HTTPConnection("127.0.0.1", gw.server_port, timeout=TIMEOUT)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": prompt}], "stream": True}),
            {"Content-Type": "application/json", "Authorization": "Bearer sk-a"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        return resp

    def start_draining(self, gw, grace):
        result = []
        t = threading.Thread(target=lambda: result.append(gw.drain(grace)))
        t.start()
        self.addCleanup(t.join, TIMEOUT)
        self.assertTrue(gw.draining.wait(TIMEOUT))
        return t, result

    def test_health_and_new_requests_are_503_while_a_stream_finishes(self):
        demo = HeldGradio().start()             # the stream waits until the test is done
        self.addCleanup(demo.stop)
        gate = demo.release
        self.addCleanup(gate.set)
        gw = start_gateway(self, demo.url, api_keys=["sk-a"])
        self.assertEqual(request(gw.url, "GET", "/health")[0], 200)
        resp = self.open_stream(gw, "150 words")
        t, result = self.start_draining(gw, grace=TIMEOUT)
        status, _, body = request(gw.url, "GET", "/health")     # a new connection: accepted
        self.assertEqual((status, json.loads(body)), (503, {"status": "draining"}))
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        for extra in (b"", b"Expect: 100-continue\r\n"):      # the body is never sent
            status, head_text, body = parse_response(raw_exchange(gw.server_port,
                                                                  head[:-2] + extra + b"\r\n"))
            self.assertEqual((status, json.loads(body)["error"]["code"]),
                             (503, "server_shutting_down"), head_text)
            self.assertLessEqual({"Retry-After: 1", "Connection: close"},
                                 set(head_text.split("\r\n")))
            self.assertNotIn(b"100 Continue", head_text.encode())
        status, _, body = request(gw.url, "GET", "/v1/models", headers={"Authorization": "Bearer sk-a"})
        self.assertEqual((status, json.loads(body)["error"]["type"]), (503, "server_error"))
        self.assertTrue(t.is_alive())                            # still serving the stream
        gate.set()
        events = sse_events(resp.read())
        self.assertEqual(streamed_text(events), bg._demo_reply("150 words", [], "", [0] * 4)[1])
        self.assertEqual(events[-1], "[DONE]")
        t.join(TIMEOUT)
        self.assertEqual(result, [True])
        with self.assertRaises(OSError):                         # then the listener is closed
            socket.create_connection(("127.0.0.1", gw.server_port), timeout=TIMEOUT).close()

    def test_a_drain_with_nothing_in_flight_ends_at_once(self):
        gw = start_gateway(self, start_demo(self).url)
        started = time.monotonic()
        self.assertTrue(gw.drain(30))
        self.assertLess(time.monotonic() - started, 2)

    def test_closing_cuts_the_streams_still_running_after_the_grace(self):
        demo = start_demo(self, token_delay=0.01)
        gw = start_gateway(self, demo.url, api_keys=["sk-a"])
        resp = self.open_stream(gw, "2000 words")
        started = time.monotonic()
        t, result = self.start_draining(gw, grace=0.1)
        events = sse_events(resp.read())
        t.join(TIMEOUT)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(result, [False])
        self.assertEqual((events[-2]["error"]["code"], events[-1]), ("server_shutting_down", "[DONE]"))


NGINX = "/usr/sbin/nginx"


def readme_nginx_block():
    """The first nginx block under the README's "## Deployment": the recipe as it is pasted."""
    text = (HERE / "README.md").read_text(encoding="utf-8")
    return re.search(r"\n```nginx\n(.*?)```\n", text[text.index("\n## Deployment\n"):],
                     re.S).group(1)


class _Child:
    """``python bharatgen_openai.py ARGS`` in a process of its own, its stderr read by a
    thread into ``lines`` (so its pipe never fills)."""

    def __init__(self, args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("BHARATGEN_")}
        self.proc = subprocess.Popen([sys.executable, "bharatgen_openai.py"] + args, cwd=str(HERE),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines, self.closed, self.changed = [], False, threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def wait_for(self, pattern, start=0, timeout=TIMEOUT):
        """The first match of ``pattern`` in the lines from ``start`` on, waited for."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines[start:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise AssertionError("no %r from %s: %s" % (pattern, self.proc.args[2:4],
                                                                "".join(self.lines)[-2000:]))
                self.changed.wait(left)

    def stop(self):
        """SIGTERM, then SIGKILL if it has not exited within 5 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reader.join(5)
        self.proc.stderr.close()


@needs("http.client", NGINX)            # nginx, from Debian (.ci/run installs it)
class DeploymentTests(unittest.TestCase):
    """The README's deployment, run: its nginx block, ports filled in, in front of three
    ``serve`` copies (keys from one keys file, rate limits on) over one demo upstream,
    each copy a process of its own; then copies are killed, drained and reloaded.  The
    copies and nginx are the class's: a test that stops a copy starts it again on its
    port, and each test has keys of its own (the rate limits count per key)."""

    KEYS = ["sk-deploy-%02d" % i for i in range(72)]
    RPM = 3
    used = 0                               # the tests that took their keys

    @classmethod
    def setUpClass(cls):
        import shutil
        import tempfile
        cls.demo = HeldGradio().start()
        cls.addClassCleanup(cls.demo.stop)
        cls.demo_url = cls.demo.url
        cls.dir = tempfile.mkdtemp()
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        os.chmod(cls.dir, 0o755)            # nginx's worker, as nobody when run by root
        cls.keys_file = os.path.join(cls.dir, "keys")
        cls.write_keys(cls.KEYS)
        cls.copies = [cls.start_copy() for _ in range(3)]
        cls.addClassCleanup(lambda: [copy.stop() for copy in cls.copies])
        cls.ports = [cls.port_of(copy) for copy in cls.copies]
        cls.url = "http://127.0.0.1:%d" % cls.start_nginx()

    def setUp(self):
        n, type(self).used = type(self).used, type(self).used + 1
        self.keys = self.KEYS[12 * n:12 * n + 12]
        self.assertEqual(len(self.keys), 12, "more tests than keys")
        self.demo.release = threading.Event()
        self.addCleanup(self.demo.release.set)

    @classmethod
    def start_copy(cls, port=0):
        return _Child(["serve", "--host", "127.0.0.1", "--port", str(port), "--upstream",
                       cls.demo_url, "--api-key-file", cls.keys_file, "--trusted-proxy",
                       "127.0.0.1", "--rate-limit-rpm", str(cls.RPM), "--grace", "10"])

    @staticmethod
    def port_of(copy):
        return int(copy.wait_for(r"OpenAI API at http://127\.0\.0\.1:(\d+)/v1").group(1))

    def restart_later(self, copy):
        """Copy ``copy`` (stopped by the test) started again on its port, after the test."""
        i = self.copies.index(copy)

        def restart():
            self.demo.release.set()
            self.copies[i].stop()
            self.copies[i] = self.start_copy(self.ports[i])
            self.assertEqual(self.port_of(self.copies[i]), self.ports[i])
        self.addCleanup(restart)

    @classmethod
    def write_keys(cls, keys):
        with open(cls.keys_file + ".new", "w") as f:
            f.write("# the gateway's keys\n" + "".join(k + "\n" for k in keys))
        os.chmod(cls.keys_file + ".new", 0o600)
        os.replace(cls.keys_file + ".new", cls.keys_file)    # read whole, or not at all

    @classmethod
    def start_nginx(cls):
        """nginx with the README's block in a config of its own; its port."""
        block = readme_nginx_block()
        placeholders = re.findall(r"server 127\.0\.0\.1:(\d+)", block)
        assert len(placeholders) == 3, block
        ports = dict(zip(placeholders, map(str, cls.ports)))
        block = re.sub(r"(server 127\.0\.0\.1:)(\d+)", lambda m: m.group(1) + ports[m.group(2)],
                       block)
        port = _free_port()
        block, n = re.subn(r"\blisten 80;", "listen 127.0.0.1:%d;" % port, block)
        assert n == 1, block
        d = cls.dir
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write("daemon off;\nmaster_process off;\npid %s/nginx.pid;\n"
                    "error_log %s/error.log info;\nevents { worker_connections 256; }\nhttp {\n"
                    "    log_format upstreams '$upstream_http_x_request_id|$status|"
                    "$upstream_addr|$upstream_status';\n"
                    "    access_log %s/access.log upstreams;\n" % (d, d, d)
                    + "".join("    %s_temp_path %s/%s;\n" % (kind, d, kind) for kind in
                              ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
                    + block + "}\n")
        proc = subprocess.Popen([NGINX, "-p", d, "-c", conf, "-e", d + "/error.log"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

        def stop():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        cls.addClassCleanup(stop)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                time.sleep(0.02)
        with open(d + "/error.log") as f:
            raise AssertionError("nginx did not start: %s" % f.read()[-2000:])

    # -- through nginx ----------------------------------------------------------------

    def call(self, method, path, key=None, body=None, headers=None):
        headers = dict(headers or {})
        if key:
            headers["Authorization"] = "Bearer " + key
        return request(self.url, method, path, body, headers)

    def hello(self, key):
        status, headers, body = self.call("POST", "/v1/chat/completions", key, {
            "messages": [{"role": "user", "content": "Say hello"}]})
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], HELLO)
        return headers["x-request-id"]

    def upstreams(self, request_id):
        """``[(copy's port, its status), ...]``: the copies nginx tried for a request, in order."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with open(os.path.join(self.dir, "access.log")) as f:
                for line in f:
                    ids, _, addrs, statuses = line.rstrip("\n").split("|")
                    if request_id in ids:
                        return [(int(a.rpartition(":")[2]), int(s)) for a, s in
                                zip(addrs.split(", "), statuses.split(", "))]
            time.sleep(0.02)
        self.fail("nginx logged no request %s" % request_id)

    def copy_of(self, key):
        """The port of the copy ``key``'s requests go to (the dashboard spends no request)."""
        status, headers, _ = self.call("GET", "/v1/dashboard", key)
        self.assertEqual(status, 200)
        return self.upstreams(headers["x-request-id"])[-1][0]

    def open_stream(self, key, prompt, port=None):
        """A streamed chat through nginx (or straight to the copy on ``port``), head read."""
        conn = http.client.HTTPConnection("127.0.0.1", port or int(self.url.rpartition(":")[2]),
                                          timeout=TIMEOUT)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": prompt}], "stream": True}),
            {"Content-Type": "application/json", "Authorization": "Bearer " + key})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        return resp

    @staticmethod
    def first_text(resp):
        """Read up to the first event with answer text; the bytes read."""
        seen = b""
        while b'"content"' not in seen:
            line = resp.readline()
            if not line:
                raise AssertionError("the stream ended before any text: %r" % seen)
            seen += line
        return seen

    def expected(self, prompt):
        return bg._demo_reply(prompt, [], "", [0] * 4)[1]

    # -- the tests ------------------------------------------------------------------------

    def test_the_page_models_health_and_a_stream_not_buffered(self):
        status, headers, body = self.call("GET", "/")
        self.assertEqual((status, headers["Content-Type"]), (200, "text/html; charset=utf-8"))
        self.assertEqual(self.call("GET", "/health")[:1], (200,))
        status, _, body = self.call("GET", "/v1/models", self.keys[0],
                                    headers={"Host": "api.example.com"})   # any Host, with keys
        self.assertEqual((status, json.loads(body)["data"][0]["id"]), (200, bg.DEFAULT_MODEL))
        resp = self.open_stream(self.keys[0], "300 words")
        first = self.first_text(resp)        # while the answer is held: nothing held it back
        self.demo.release.set()
        events = sse_events(first + resp.read())
        self.assertEqual((streamed_text(events), events[-1]), (self.expected("300 words"), "[DONE]"))

    def test_a_key_gets_exactly_its_rate_limit_whichever_copy_it_lands_on(self):
        homes = {}
        for key in self.keys:
            homes.setdefault(self.copy_of(key), key)
            if len(homes) == 2:
                break
        self.assertEqual(len(homes), 2, "all of %d keys went to one copy" % len(self.keys))
        for port, key in homes.items():
            answers = [self.call("GET", "/v1/models", key) for _ in range(self.RPM + 2)]
            self.assertEqual([a[0] for a in answers], [200] * self.RPM + [429, 429])
            self.assertEqual(json.loads(answers[-1][2])["error"]["code"], "rate_limit_exceeded")
            self.assertEqual({self.upstreams(a[1]["x-request-id"])[-1][0] for a in answers}, {port})

    def test_a_copy_killed_mid_stream_cuts_that_stream_and_the_others_answer(self):
        key = self.keys[0]
        port = self.copy_of(key)
        resp = self.open_stream(key, "2000 words")
        self.first_text(resp)
        copy = self.copies[self.ports.index(port)]
        self.restart_later(copy)
        copy.proc.kill()
        copy.proc.wait(TIMEOUT)
        with self.assertRaises(http.client.IncompleteRead) as cm:   # never a clean, short end
            resp.read()
        self.assertNotIn(b"[DONE]", cm.exception.partial)
        for key in self.keys:                                        # theirs moved on
            self.assertNotEqual(self.upstreams(self.hello(key))[-1][0], port)

    def test_sigterm_drains_a_copy_while_nginx_sends_new_requests_elsewhere(self):
        import signal
        key = self.keys[0]
        port = self.copy_of(key)
        copy = self.copies[self.ports.index(port)]
        self.restart_later(copy)
        streams = [self.open_stream(key, "600 words") for _ in range(2)]
        starts = [self.first_text(resp) for resp in streams]
        copy.proc.send_signal(signal.SIGTERM)
        copy.wait_for(r"stopping: /health and new requests get 503")
        status, _, body = request("http://127.0.0.1:%d" % port, "GET", "/health")
        self.assertEqual((status, json.loads(body)), (503, {"status": "draining"}))
        tried = self.upstreams(self.hello(key))                 # a POST, sent on by nginx
        self.assertEqual(tried[0], (port, 503))
        self.assertNotEqual(tried[-1][0], port)
        for other in self.keys[1:]:
            self.assertEqual(self.call("GET", "/v1/models", other)[0], 200)
        self.demo.release.set()
        for start, resp in zip(starts, streams):                # the streams end whole
            events = sse_events(start + resp.read())
            self.assertEqual((streamed_text(events), events[-1]), (self.expected("600 words"), "[DONE]"))
        self.assertEqual(copy.proc.wait(TIMEOUT), 0)
        copy.wait_for(r"^stopped$")                              # none was cut

    def test_with_every_copy_draining_a_client_gets_their_503_not_nginx_502(self):
        import signal
        streams = [self.open_stream(self.keys[0], "500 words", port) for port in self.ports]
        for resp in streams:
            self.first_text(resp)
        for copy in self.copies:
            self.restart_later(copy)
            copy.proc.send_signal(signal.SIGTERM)
        for copy in self.copies:
            copy.wait_for(r"stopping: /health and new requests get 503")
        for key in self.keys[:3]:            # max_fails=0: no copy is taken out by a 503
            status, headers, body = self.call("POST", "/v1/chat/completions", key, {
                "messages": [{"role": "user", "content": "Say hello"}]})
            self.assertEqual(status, 503, body[:300])     # not nginx's "no live upstreams"
            self.assertEqual((json.loads(body)["error"]["code"], headers["Retry-After"]),
                             ("server_shutting_down", "1"))
            self.assertEqual([s for _, s in self.upstreams(headers["x-request-id"])], [503] * 3)
        self.demo.release.set()
        for resp in streams:
            self.assertEqual(sse_events(resp.read())[-1], "[DONE]")

    def test_sighup_reloads_the_keys_file_in_every_copy(self):
        import signal
        new, removed = "sk-deploy-new", self.keys[0]
        self.assertEqual(self.call("GET", "/v1/models", new)[0], 401)
        self.assertEqual(self.call("GET", "/v1/models", removed)[0], 200)
        self.write_keys([k for k in self.KEYS if k != removed] + [new])
        marks = [len(c.lines) for c in self.copies]
        for copy in self.copies:
            copy.proc.send_signal(signal.SIGHUP)
        for copy, mark in zip(self.copies, marks):
            copy.wait_for(r"reloaded %d API keys" % len(self.KEYS), start=mark)
        self.assertEqual(self.call("GET", "/v1/models", new)[0], 200)
        status, _, body = self.call("GET", "/v1/models", removed)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_api_key"))


###############################################################################
# Using it: a new user at the command line, and the README's examples #########
###############################################################################

class UsabilityTests(unittest.TestCase):
    """What a new user meets at the command line (issue 17's first part)."""

    def serve(self, *flags):
        proc = subprocess.Popen([sys.executable, "bharatgen_openai.py", "serve", "--demo",
                                 "--token-delay", "0.01"] + list(flags), cwd=str(HERE),
                                stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, BHARATGEN_UPSTREAM=""))
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def test_a_second_ctrl_c_stops_at_once(self):
        import signal
        proc = self.serve("--port", "0", "--grace", "30")
        deadline, url = time.monotonic() + TIMEOUT, None
        while time.monotonic() < deadline and url is None:
            m = re.search(r"OpenAI API at (http://[\d.:]+)/v1", proc.stderr.readline())
            url = m and m.group(1)
        result = []
        t = threading.Thread(target=lambda: result.append(
            chat(type("G", (), {"url": url}), "2000 words", stream=True)))
        t.start()
        self.assertTrue(wait_until(lambda: streams_in_flight(url) == 1))
        proc.send_signal(signal.SIGINT)                # taken: it drains, /health says so
        self.assertTrue(wait_until(lambda: request(url, "GET", "/health")[0] == 503))
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=TIMEOUT)[1]
        t.join(TIMEOUT)
        self.assertLess(time.monotonic() - started, 8)
        self.assertIn("stopping now: cutting off the streams", err)
        events = sse_events(result[0][2])
        self.assertEqual((events[-2]["error"]["code"], events[-1]), ("server_shutting_down", "[DONE]"))

    def test_a_port_in_use_is_one_line_and_exit_2(self):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        proc = self.serve("--port", str(taken.getsockname()[1]))
        err = proc.communicate(timeout=TIMEOUT)[1]
        self.assertEqual(proc.returncode, 2)
        self.assertRegex(err.splitlines()[-1], r"^error: cannot listen on 127\.0\.0\.1 port \d+: "
                         r".+; choose another with --port \(0 picks a free one\)$")
        self.assertNotIn("Traceback", err)

    def test_the_sdk_and_chat_speak_openai_to_a_v1_url(self):
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, api_keys=["sk-a"])
        with bg.BharatGenOpenAI(gw.url + "/v1", api_key="sk-a") as client:
            reply = client.chat.completions.create(messages=[{"role": "user", "content": "Say hello"}])
            self.assertEqual((reply.choices[0].message.content,
                              reply.choices[0].message.reasoning_content, reply.model),
                             (HELLO, thought_of("Say hello"), bg.DEFAULT_MODEL))
            chunks = list(client.chat.completions.create(
                messages=[{"role": "user", "content": "hindi please"}], stream=True))
            self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks
                                     if c.choices), HINDI)
            self.assertEqual([m.id for m in client.models.list()], [bg.DEFAULT_MODEL])
            call = client.chat.completions.create(messages=[{"role": "user", "content": "weather in Pune"}],
                                                  tools=[WEATHER]).choices[0].message.tool_calls[0]
            self.assertEqual((call.id[:5], call.function.name, call.function.arguments),
                             ("call_", "get_weather", '{"city": "Pune"}'))
            resp = client.responses.create(input="Say hello", max_output_tokens=100)
            self.assertEqual((resp.output_text, resp.output[0].content[0].text, resp.id[:5]),
                             (HELLO, thought_of("Say hello"), "resp_"))
            events = list(client.responses.create(input="hindi please", stream=True))
            self.assertEqual(("".join(e.delta for e in events
                                      if e.type == "response.output_text.delta"),
                              events[-1].response.output_text), (HINDI, HINDI))
            with self.assertRaises(bg.NotFoundError) as cm:
                client.chat.completions.create(model="gpt-4", messages=[{"role": "user",
                                                                         "content": "hi"}])
            self.assertEqual((cm.exception.status_code, cm.exception.param), (404, "model"))
        with bg.BharatGenOpenAI(gw.url + "/v1", api_key="wrong") as client:
            with self.assertRaises(bg.AuthenticationError):
                client.models.list()
        os.environ["OPENAI_API_KEY"] = "sk-a"
        self.addCleanup(os.environ.pop, "OPENAI_API_KEY", None)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(bg.main(["chat", "--upstream", gw.url + "/v1", "Say hello"]), 0)
        self.assertEqual(out.getvalue(), HELLO + "\n")

    def test_a_malformed_upstream_is_refused_at_start(self):
        for url in ("not a url", "ftp://example.org/", "http://", "http://host:port/"):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
                bg.main(["serve", "--upstream", url, "--port", "0"])
            self.assertEqual(cm.exception.code, 2)
            self.assertIn("error: upstream %r is not a URL of a Gradio app" % url, err.getvalue())

    def test_flags_are_not_abbreviated_and_log_level_goes_anywhere(self):
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as cm:
            bg.main(["serve", "--prot", "9000"])
        self.assertEqual(cm.exception.code, 2)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(bg.main(["info", "--demo", "--log-level", "WARNING"]), 0)
        self.assertIn("chat endpoint:  /chat_fn_1", out.getvalue())

    def test_behind_a_trusted_proxy_the_forwarded_client_is_the_client(self):
        demo = start_demo(self)
        for trusted, expected in ((["127.0.0.0/8"], [200, 200, 429]), ([], [200, 429, 429])):
            gw = start_gateway(self, demo.url, rate_limit_rpm=1, trusted_proxies=trusted)
            with self.assertLogs("bharatgen_openai.access", "INFO") as logs:
                statuses = [request(gw.url, "GET", "/v1/models", headers={
                    "X-Forwarded-For": "6.6.6.6, %s" % client})[0]
                    for client in ("203.0.113.7", "198.51.100.9", "198.51.100.9")]
                wait_for_logs(logs, 3)
            self.assertEqual(statuses, expected)
            self.assertEqual(sorted(r.getMessage().split(" ")[0] for r in logs.records),
                             ["198.51.100.9", "198.51.100.9", "203.0.113.7"] if trusted
                             else ["127.0.0.1"] * 3)         # logged after each answer

    def test_json_logs_are_json_on_every_line(self):
        formatter = bg._JSONFormatter()
        plain = logging.LogRecord("bharatgen_openai", logging.WARNING, __file__, 1,
                                  "upstream %s down", ("x",), None)
        access = logging.LogRecord("bharatgen_openai.access", logging.INFO, __file__, 1,
                                   json.dumps({"status": 200, "path": "/v1/models"}), None, None)
        lines = [json.loads(formatter.format(r)) for r in (plain, access)]
        self.assertEqual([{k: v for k, v in line.items() if k != "time"} for line in lines], [
            {"level": "WARNING", "logger": "bharatgen_openai", "message": "upstream x down"},
            {"level": "INFO", "logger": "bharatgen_openai.access", "status": 200,
             "path": "/v1/models"}])
        self.assertRegex(lines[0]["time"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

    def test_the_chat_repl_in_a_terminal(self):
        import pty
        demo = start_demo(self, token_delay=0.002)
        pid, fd = pty.fork()
        if pid == 0:                                   # the child: the REPL on the terminal
            import signal                              # Ctrl-C must reach it, even if this
            signal.signal(signal.SIGINT, signal.SIG_DFL)   # test runs with SIGINT ignored
            os.chdir(str(HERE))
            os.execv(sys.executable, [sys.executable, "bharatgen_openai.py", "chat",
                                      "--show-reasoning", "--upstream", demo.url])
        def reap():
            try:
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
            except ChildProcessError:           # reaped by the test already
                pass
            os.close(fd)
        self.addCleanup(reap)
        seen = []

        def until(text, timeout=TIMEOUT):
            deadline = time.monotonic() + timeout
            while text not in "".join(seen) and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.1)[0]:
                    try:
                        seen.append(os.read(fd, 65536).decode("utf-8", "replace"))
                    except OSError:
                        break
            self.assertIn(text, "".join(seen))
        until(">>> ")
        os.write(fd, b"/help\r")
        until("/help\r\n/reset forgets")
        until(">>> ")
        os.write(fd, b"/nope at all\r")                # not sent to the model
        until("unknown command /nope; /reset forgets the conversation")
        os.write(fd, b"Answer\rin hindi\r")            # pasted: one message
        until(HINDI + "\r\n>>> ")
        self.assertEqual(demo.calls[-1][0], "Answer\nin hindi")
        os.write(fd, b"2000 words\r")
        until("Param is a bilingual")
        os.write(fd, b"\x03")                          # Ctrl-C: this answer only
        until("[stopped]")
        os.write(fd, b"[[error]]\r")
        until("error: the Gradio app reported an error: Model is overloaded, try again")
        self.assertEqual(("".join(seen).count("Model is overloaded"), "WARNING" in "".join(seen)),
                         (1, False))                    # said once
        os.write(fd, b"Say hello\r")
        until(HELLO + "\r\n>>> ")
        os.write(fd, b"\x04")                          # Ctrl-D leaves
        deadline, status = time.monotonic() + TIMEOUT, None
        while status is None and time.monotonic() < deadline:
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else time.sleep(0.05)
        self.assertEqual(status, 0)                     # exited, with 0
        self.assertIn("\x1b[2mThe user said: Say hello. Let me think step by step.\x1b[0m\r\n\r\n"
                      + HELLO, "".join(seen))           # the colours reset after the thought


    def test_chat_with_a_dead_upstream_says_so_before_the_first_prompt(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            bg.main(["chat", "--upstream", "http://127.0.0.1:9"])
        self.assertEqual((str(cm.exception), err.getvalue()), (
            "error: cannot reach the Gradio app at http://127.0.0.1:9: [Errno 111] Connection "
            "refused", ""))


class ReadmeTests(unittest.TestCase):
    def test_every_python_block_runs_as_pasted(self):
        """Against ``serve``'s address and the demo upstream's (the README's placeholders);
        a block that needs a package CI installs runs where it is installed."""
        import importlib.util
        demo = start_demo(self)
        gw = start_gateway(self, demo.url, demo=True)        # as serve --demo: its embeddings
        blocks = re.findall(r"```python\n(.*?)```", (HERE / "README.md").read_text("utf-8"), re.S)
        self.assertGreaterEqual(len(blocks), 5)
        for block in blocks:
            with self.subTest(block=block.split("\n")[0]):
                if "needs a GPU" in block:
                    continue
                missing = [m for m in ("openai", "langchain_openai") if re.search(
                    r"^(from|import) %s\b" % m, block, re.M) and not importlib.util.find_spec(m)]
                if missing and os.environ.get("BHARATGEN_REQUIRE_EXTRAS") != "1":
                    self.skipTest("%s is not installed" % missing[0])
                code = block.replace("http://127.0.0.1:8000", gw.url).replace(
                    "https://<id>.gradio.live/", demo.url)
                done = subprocess.run([sys.executable, "-c", code], cwd=str(HERE), timeout=60,
                                      capture_output=True, text=True)
                self.assertEqual((done.returncode, done.stderr), (0, ""))
                self.assertTrue(done.stdout.strip())


###############################################################################
# Real clients and real Gradio (optional packages) ############################
###############################################################################

@needs("openai")
class OpenAISDKTests(_RealClientBase):
    """The official openai SDK, sync and async, against the gateway."""

    def client(self, key="sk-test"):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=TIMEOUT)

    def test_chat_exact_streamed_and_not(self):
        client = self.client()
        for prompt, answer in (("Say hello", HELLO), ("show formatting", bg._DEMO_FORMATTING),
                               ("hindi please", HINDI)):
            reply = client.chat.completions.create(
                model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}])
            message = reply.choices[0].message
            self.assertEqual((message.content, message.model_extra["reasoning_content"]),
                             (answer, thought_of(prompt)))
            self.assertEqual((reply.choices[0].finish_reason, reply.id[:9]), ("stop", "chatcmpl-"))
            self.assertEqual(reply.usage.total_tokens,
                             reply.usage.prompt_tokens + reply.usage.completion_tokens)
            chunks = list(client.chat.completions.create(
                model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}], stream=True,
                stream_options={"include_usage": True}))
            self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), answer)
            self.assertEqual([c.choices[0].delta.role for c in chunks if c.choices][:2], ["assistant", None])
            self.assertEqual(sum(1 for c in chunks if c.choices and c.choices[0].finish_reason), 1)
            self.assertEqual((chunks[-1].choices, chunks[-1].usage.total_tokens > 0), ([], True))
            self.assertTrue(all(c.usage is None for c in chunks[:-1]))

    def test_stream_helper_merges_deltas_cleanly(self):
        with self.client().chat.completions.stream(
                model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "hindi please"}]) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        self.assertEqual((final.choices[0].message.content, final.choices[0].message.role),
                         (HINDI, "assistant"))

    def test_request_fields(self):
        client = self.client()
        reply = client.chat.completions.create(
            model=bg.DEFAULT_MODEL, max_completion_tokens=200, n=2, stop=["doing"], seed=1, user="u",
            messages=[{"role": "developer", "content": "Dev."},
                      {"role": "user", "content": [{"type": "text", "text": "Say hello"}]}])
        self.assertEqual([(c.index, c.message.content) for c in reply.choices],
                         [(0, "Hello! How are you "), (1, "Hello! How are you ")])
        self.assertEqual(self.demo.calls[-1][2], "Dev.")
        reply = client.chat.completions.create(model=bg.DEFAULT_MODEL, max_completion_tokens=200,
                                               messages=[{"role": "user", "content": "params"}],
                                               extra_body={"top_k": 7})
        self.assertEqual(reply.choices[0].message.content,
                         "PARAMS temperature=0.7 max_tokens=200 top_p=0.95 top_k=7")

    def test_responses_api_function_calls_and_parse(self):
        import pydantic
        from typing import List

        class Point(pydantic.BaseModel):
            x: int
            tags: List[str]

        client, tool = self.client(), dict(WEATHER["function"], type="function")
        resp = client.responses.create(model=bg.DEFAULT_MODEL, input="weather in Pune", tools=[tool])
        calls = [o for o in resp.output if o.type == "function_call"]
        self.assertEqual([(c.name, c.arguments, c.call_id[:5]) for c in calls],
                         [("get_weather", '{"city": "Pune"}', "call_")])
        with client.responses.stream(model=bg.DEFAULT_MODEL, input="weather in Pune",
                                     tools=[tool]) as stream:
            final = stream.get_final_response()
        self.assertEqual([(o.name, o.arguments) for o in final.output if o.type == "function_call"],
                         [("get_weather", '{"city": "Pune"}')])
        items = [{"role": "user", "content": "weather in Pune"}]
        items += [o.model_dump(exclude_none=True) for o in resp.output]
        items.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "rain"})
        resp = client.responses.create(model=bg.DEFAULT_MODEL, input=items, tools=[tool])
        self.assertEqual(resp.output_text, "Here is what the tools said: get_weather: rain")
        parsed = client.responses.parse(model=bg.DEFAULT_MODEL, input="a point",
                                        text_format=Point).output_parsed
        self.assertEqual(parsed, Point(x=1, tags=["Param"]))

    def test_errors_raise_the_sdk_exceptions(self):
        import openai
        client = self.client()
        with self.assertRaises(openai.BadRequestError) as cm:
            client.chat.completions.create(model=bg.DEFAULT_MODEL, temperature=5,
                                           messages=[{"role": "user", "content": "x"}])
        self.assertEqual((cm.exception.status_code, cm.exception.param, cm.exception.code),
                         (400, "temperature", "invalid_value"))
        with self.assertRaises(openai.BadRequestError) as cm:
            client.chat.completions.create(model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}])
        self.assertEqual(cm.exception.code, "unsupported_content_type")
        with self.assertRaises(openai.NotFoundError) as cm:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(cm.exception.code, "model_not_found")
        with self.assertRaises(openai.AuthenticationError):
            self.client("sk-wrong").models.list()
        with self.assertRaises(openai.InternalServerError) as cm:
            client.chat.completions.create(model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "[[error]]"}])
        self.assertEqual(cm.exception.status_code, 502)
        self.assertIn("Model is overloaded, try again", cm.exception.message)
        with self.assertRaises(openai.APIError) as cm:
            for _ in client.chat.completions.create(model=bg.DEFAULT_MODEL, stream=True, messages=[
                    {"role": "user", "content": "[[fail-midstream]]"}]):
                pass
        self.assertEqual(cm.exception.message, "the Gradio app reported an error: error after output began")

    def test_models_completions_and_embeddings(self):
        import openai
        client = self.client()
        self.assertEqual([m.id for m in client.models.list()], [bg.DEFAULT_MODEL])
        self.assertEqual(client.models.retrieve(bg.DEFAULT_MODEL).owned_by, "bharatgen")
        self.assertEqual(client.completions.create(model=bg.DEFAULT_MODEL, prompt="Say hello").choices[0].text, HELLO)
        self.assertEqual("".join(c.choices[0].text for c in client.completions.create(
            model=bg.DEFAULT_MODEL, prompt="Say hello", stream=True) if c.choices), HELLO)
        with self.assertRaises(openai.NotFoundError):
            client.embeddings.create(model=bg.DEFAULT_MODEL, input="x")

    def test_responses_api(self):
        import openai
        client = self.client()
        resp = client.responses.create(model=bg.DEFAULT_MODEL, input="Say hello", instructions="Be kind.")
        self.assertEqual((resp.output_text, resp.status), (HELLO, "completed"))
        self.assertEqual((resp.output[0].type, resp.output[0].content[0].text),
                         ("reasoning", thought_of("Say hello")))
        self.assertEqual(self.demo.calls[-1][2], "Be kind.")
        events = list(client.responses.create(model=bg.DEFAULT_MODEL, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "hindi please"}]}], stream=True))
        self.assertEqual("".join(e.delta for e in events if e.type == "response.output_text.delta"), HINDI)
        self.assertEqual((events[0].type, events[-1].type), ("response.created", "response.completed"))
        with client.responses.stream(model=bg.DEFAULT_MODEL, input="show formatting") as stream:
            for _ in stream:
                pass
            final = stream.get_final_response()
            self.assertEqual((final.output_text, final.output[0].content[0].text),
                             (bg._DEMO_FORMATTING, thought_of("show formatting")))
        with self.assertRaises(openai.APIError):
            for _ in client.responses.create(model=bg.DEFAULT_MODEL, input="[[fail-midstream]]", stream=True):
                pass
        # a conversation carried on by sending the SDK's own output items back
        items = [{"role": "user", "content": "Say hello"}]
        items += [o.model_dump(exclude_none=True) for o in resp.output]
        items.append({"role": "user", "content": [{"type": "input_text", "text": "tell me the history"}]})
        resp = client.responses.create(model=bg.DEFAULT_MODEL, input=items, instructions="Be terse.")
        history = [{"role": r, "content": [{"type": "text", "text": t}]}
                   for r, t in (("user", "Say hello"), ("assistant", HELLO))]
        self.assertEqual(self.demo.calls[-1][:3], ["tell me the history", history, "Be terse."])
        self.assertEqual(resp.output_text, "SYSTEM=Be terse. | HISTORY=" + json.dumps(history, sort_keys=True))
        with self.assertRaises(openai.BadRequestError) as caught:
            client.responses.create(model=bg.DEFAULT_MODEL, input="hi", max_output_tokens=9000)
        self.assertEqual(caught.exception.body["param"], "max_output_tokens")

    def test_async_client(self):
        import openai

        async def run():
            client = openai.AsyncOpenAI(base_url=self.base_url, api_key="sk-test", max_retries=0,
                                        timeout=TIMEOUT)
            reply = await client.chat.completions.create(
                model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "show formatting"}])
            stream = await client.chat.completions.create(
                model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "show formatting"}], stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            resp = await client.responses.create(model=bg.DEFAULT_MODEL, input="hindi please")
            try:
                await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
            except openai.NotFoundError as exc:
                missing = exc.code
            await client.close()
            return reply.choices[0].message.content, "".join(parts), resp.output_text, missing
        self.assertEqual(asyncio.run(run()), (bg._DEMO_FORMATTING, bg._DEMO_FORMATTING, HINDI,
                                              "model_not_found"))


@needs("langchain_openai")
class LangChainTests(_RealClientBase):
    def llm(self, **kwargs):
        from langchain_openai import ChatOpenAI
        return ChatOpenAI(base_url=self.base_url, api_key="sk-test", model=bg.DEFAULT_MODEL,
                          max_retries=0, timeout=TIMEOUT, **kwargs)

    def test_invoke_stream_and_history(self):
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
        llm = self.llm()
        self.assertEqual(llm.invoke("Say hello").content, HELLO)
        self.assertEqual("".join(c.content for c in llm.stream("hindi please")), HINDI)
        reply = llm.invoke([SystemMessage("Be terse."), HumanMessage("Hi"), AIMessage("Hello!"),
                            HumanMessage("tell me the history")])
        history = self.demo.calls[-1][1]
        self.assertEqual(history, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}])
        self.assertEqual(reply.content, "SYSTEM=Be terse. | HISTORY=" + json.dumps(history, sort_keys=True))
        self.assertEqual(self.llm(stop=["doing"], temperature=0.1).invoke("Say hello").content,
                         "Hello! How are you ")

    def test_the_thought_through_langchain(self):
        reply = self.llm(use_responses_api=True).invoke("Say hello")    # as the README says
        thought = [b for b in reply.content if b["type"] == "reasoning"][0]
        self.assertEqual((thought["content"][0]["text"], reply.text),
                         (thought_of("Say hello"), HELLO))


AFTER_A_TOOL = [{"role": "user", "content": "What is the weather in Pune?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Pune"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "31 C, sunny"},
                {"role": "assistant", "content": "It is 31 C and sunny in Pune."}]
COUNTS = {"type": "function", "function": {"name": "tally", "parameters": {   # zod's z.record
    "type": "object", "properties": {"counts": {"type": "object", "propertyNames": {
        "enum": ["a", "b"]}, "additionalProperties": {"type": "integer"}}},
    "required": ["counts"], "additionalProperties": False}}}


@needs("openai")
class AgentTests(_RealClientBase):
    """What agent frameworks send that OpenAI accepts: a conversation ending on the
    assistant (LangGraph's structured last call), item references (the Vercel AI SDK),
    the schema keywords zod and pydantic write."""

    def client(self):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key="sk-test", max_retries=0,
                             timeout=TIMEOUT)

    def test_a_conversation_ending_on_the_assistant_is_answered(self):
        import openai
        import pydantic

        class Weather(pydantic.BaseModel):
            city: str
            temperature: int
        client = self.client()
        for extra in ({}, {"tools": [dict(WEATHER, function=dict(WEATHER["function"], strict=True))]}):
            reply = client.chat.completions.parse(model=bg.DEFAULT_MODEL, messages=AFTER_A_TOOL,
                                                  response_format=Weather, **extra)
            self.assertEqual(reply.choices[0].message.parsed, Weather(city="Param", temperature=1))
            self.assertEqual(self.demo.calls[-1][:2], [
                "Give your last reply again, in the output format.", [
                    {"role": "user", "content": [{"type": "text", "text": AFTER_A_TOOL[0]["content"]}]},
                    {"role": "assistant", "content": [{"type": "text", "text": '<tool_call>\n{"name": '
                     '"get_weather", "arguments": {"city": "Pune"}}\n</tool_call>'}]},
                    {"role": "user", "content": [{"type": "text", "text": '<tool_response>\n{"name": '
                     '"get_weather", "content": "31 C, sunny"}\n</tool_response>'}]},
                    {"role": "assistant", "content": [{"type": "text", "text":
                                                       "It is 31 C and sunny in Pune."}]}]])
        reply = client.chat.completions.create(model=bg.DEFAULT_MODEL, messages=AFTER_A_TOOL)
        self.assertEqual((reply.choices[0].finish_reason, self.demo.calls[-1][0]),
                         ("stop", "Go on from your last reply."))
        with self.assertRaises(openai.BadRequestError) as cm:        # calls with no results
            client.chat.completions.create(model=bg.DEFAULT_MODEL, messages=AFTER_A_TOOL[:2])
        self.assertEqual(cm.exception.body["message"], "the last message calls tools: send each "
                         "call's result in a 'tool' message after it")

    @needs("langchain_openai")
    def test_langchain_structured_output_after_the_assistant(self):
        import pydantic
        from langchain_core.messages import AIMessage, HumanMessage
        from langchain_openai import ChatOpenAI

        class Weather(pydantic.BaseModel):
            city: str
            temperature: int
        llm = ChatOpenAI(base_url=self.base_url, api_key="sk-test", model=bg.DEFAULT_MODEL,
                         max_retries=0, timeout=TIMEOUT)
        for method in ("json_schema", "function_calling"):
            answer = llm.with_structured_output(Weather, method=method).invoke(
                [HumanMessage("What is the weather in Pune?"), AIMessage("31 C and sunny.")])
            self.assertEqual(answer, Weather(city="Param", temperature=1), method)

    def test_item_references_on_the_responses_api(self):
        first = json.loads(request(self.gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": "What is the weather in Pune?",
            "tools": [dict(WEATHER["function"], type="function")]},
            {"Authorization": "Bearer sk-test"})[2])
        reasoning, call = first["output"][0], first["output"][-1]
        self.assertEqual((reasoning["type"], call["type"]), ("reasoning", "function_call"))
        items = [{"role": "user", "content": "What is the weather in Pune?"},
                 {"type": "item_reference", "id": reasoning["id"]},
                 {"type": "function_call", "call_id": call["call_id"], "name": call["name"],
                  "arguments": call["arguments"]},
                 {"type": "function_call_output", "call_id": call["call_id"], "output": "31 C"}]
        status, _, body = request(self.gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": items}, {"Authorization": "Bearer sk-test"})
        self.assertEqual((status, json.loads(body)["output"][-1]["content"][0]["text"]),
                         (200, "Here is what the tools said: get_weather: 31 C"))
        items[1]["id"] = "msg_0123"
        status, _, body = request(self.gw.url, "POST", "/v1/responses", {
            "model": bg.DEFAULT_MODEL, "input": items}, {"Authorization": "Bearer sk-test"})
        self.assertEqual((status, json.loads(body)["error"]), (400, {
            "message": 'input[1] refers to the item "msg_0123", which this server does not keep '
                       "(it stores nothing): send the item itself, or store: false",
            "type": "invalid_request_error", "param": "input[1]", "code": "invalid_value"}))

    def test_the_keywords_zod_and_pydantic_write(self):
        import openai
        client = self.client()
        reply = client.chat.completions.create(
            model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "Count them"}],
            tools=[COUNTS, WEATHER], tool_choice={"type": "function", "function": {"name": "tally"}})
        call = reply.choices[0].message.tool_calls[0].function
        self.assertEqual((call.name, json.loads(call.arguments)), ("tally", {"counts": {}}))
        strict = json.loads(json.dumps(COUNTS))
        strict["function"].update(strict=True)
        strict["function"]["parameters"]["unevaluatedProperties"] = False
        with self.assertRaises(openai.BadRequestError) as cm:
            client.chat.completions.create(model=bg.DEFAULT_MODEL, tools=[strict],
                                           messages=[{"role": "user", "content": "Count them"}])
        self.assertEqual((cm.exception.body["param"], cm.exception.body["message"]), (
            "tools[0].function.parameters", "tools[0].function.parameters: this server cannot "
            "check the keyword 'unevaluatedProperties'"))
        shape = bg._shape({"tools": [COUNTS]}, 0)
        for counts, error in (({"a": 1, "b": 2}, None), ({"c": 1}, "the call of tally is invalid: "
                              "arguments.counts.c (its name) should be one of [\"a\", \"b\"]"),
                              ({"a": "x"}, "the call of tally is invalid: arguments.counts.a "
                               "should be of type integer, not \"x\"")):
            call = '<tool_call>{"name": "tally", "arguments": %s}</tool_call>' % json.dumps(
                {"counts": counts})
            self.assertEqual(shape.check(call)[2], error)

    @needs("langchain_openai")
    def test_langchain_binds_a_tool_whose_schema_has_property_names(self):
        import typing
        import pydantic
        from langchain_openai import ChatOpenAI

        class Tally(pydantic.BaseModel):
            """Count the letters."""
            counts: typing.Dict[typing.Literal["a", "b"], int]
        schema = Tally.model_json_schema()
        self.assertIn("propertyNames", schema["properties"]["counts"])   # what pydantic writes
        llm = ChatOpenAI(base_url=self.base_url, api_key="sk-test", model=bg.DEFAULT_MODEL,
                         max_retries=0, timeout=TIMEOUT)
        reply = llm.bind_tools([Tally], tool_choice="Tally").invoke("Count them")
        self.assertEqual(reply.tool_calls[0]["args"], {"counts": {}})


@needs("gradio")
@needs("openai")
class RealEmbeddingTests(unittest.TestCase):
    """A real Gradio app that computes vectors (one text at a time, or a list), behind the
    gateway, through the openai SDK (floats, and its default base64) and LangChain."""

    @staticmethod
    def vector(text):
        import math
        return [math.sin(len(text) + i) / 3.0 for i in range(8)]

    def setUp(self):
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        import gradio as gr
        import warnings
        caught = warnings.catch_warnings()
        caught.__enter__()
        self.addCleanup(caught.__exit__, None, None, None)
        warnings.filterwarnings("ignore", module=r"gradio\.")
        with gr.Blocks() as one:
            box, out = gr.Textbox(), gr.JSON()
            box.submit(self.vector, box, out, api_name="embed")
        with gr.Blocks() as many:
            texts, out = gr.JSON(), gr.JSON()
            texts.change(lambda ts: [self.vector(t) for t in ts], texts, out, api_name="embed_all")
        models = {"models": [{"id": "one", "kind": "embedding", "upstreams": [_launch(self, gr, one)]},
                             {"id": "many", "kind": "embedding", "upstreams": [_launch(self, gr, many)]}]}
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(models, f)
        self.addCleanup(os.unlink, f.name)
        self.gw = bg.GatewayServer(bg.Config(models_file=f.name, port=0, timeout=30)).start()
        self.addCleanup(self.gw.stop)

    def test_the_openai_sdk_and_langchain(self):
        import openai
        client = openai.OpenAI(base_url=self.gw.url + "/v1", api_key="x", max_retries=0)
        texts = ["a", "Param", "नमस्ते दुनिया"]
        for model in ("one", "many"):
            floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
            self.assertEqual([d.embedding for d in floats.data], [self.vector(t) for t in texts])
            default = client.embeddings.create(model=model, input=texts)    # base64 asked
            self.assertEqual([d.embedding for d in default.data],
                             [list(struct.unpack("<8f", struct.pack("<8f", *self.vector(t))))
                              for t in texts])
            raw = json.loads(request(self.gw.url, "POST", "/v1/embeddings", {
                "model": model, "input": texts, "encoding_format": "base64"})[2])
            self.assertEqual([base64.b64decode(d["embedding"]) for d in raw["data"]],
                             [struct.pack("<8f", *self.vector(t)) for t in texts])
        try:
            from langchain_openai import OpenAIEmbeddings
        except ImportError:
            if os.environ.get("BHARATGEN_REQUIRE_EXTRAS") == "1":
                raise
            return
        lc = OpenAIEmbeddings(base_url=self.gw.url + "/v1", api_key="x", model="one",
                              check_embedding_ctx_length=False)        # as the README says
        as32 = [list(struct.unpack("<8f", struct.pack("<8f", *self.vector(t)))) for t in texts]
        self.assertEqual(lc.embed_documents(texts), as32)          # it asks for base64
        self.assertEqual(lc.embed_query("Param"), as32[1])


def _param_app(gr, outcomes=None):
    """A real Gradio app with the Param app's signature and HTML (the demo's answers).

    ``outcomes`` gets ``(message, "completed" or "cancelled", snapshots sent)``; a message
    with "slowly" waits 20 ms before each snapshot.
    """
    def chat_fn(message, history, system_prompt, temperature, max_tokens, top_p, top_k):
        if "[[error]]" in message:
            raise error("Model is overloaded, try again")
        hist = [{"role": h["role"], "content": h["content"]} for h in history or []]
        thought, answer = bg._demo_reply(message, hist, system_prompt,
                                         [temperature, max_tokens, top_p, top_k])
        if message in HTML_ANSWERS:
            thought, answer = thought_of(message), HTML_ANSWERS[message]
        chat = list(history or []) + [{"role": "user", "content": message}]
        sent = 0
        try:
            for text in bg._demo_html(thought, answer):
                if "slowly" in message:
                    time.sleep(0.02)
                sent += 1
                yield chat + [{"role": "assistant", "content": text}], ""
                if "[[fail-midstream]]" in message and sent == len(thought.split()) + 4:
                    raise error("the GPU went away")
            if outcomes is not None:
                outcomes.append((message, "completed", sent))
        except GeneratorExit:                   # Gradio cancelled the job
            if outcomes is not None:
                outcomes.append((message, "cancelled", sent))
            raise

    def error(message):                         # without a printed traceback where possible
        try:
            return gr.Error(message, print_exception=False)
        except TypeError:
            return gr.Error(message)

    with gr.Blocks() as app:
        try:
            chatbot = gr.Chatbot(type="messages")          # Gradio 5 (pairs by default)
        except TypeError:
            chatbot = gr.Chatbot()                         # Gradio 6: messages only
        message = gr.Textbox()
        system = gr.Textbox(value=bg.DEFAULT_SYSTEM_PROMPT)
        sliders = [gr.Slider(0, 2, value=0.7), gr.Slider(1, 4096, value=1024, step=1),
                   gr.Slider(0, 1, value=0.95), gr.Slider(1, 100, value=50, step=1)]
        message.submit(chat_fn, [message, chatbot, system] + sliders, [chatbot, message],
                       api_name="chat_fn_1")
    return app


@needs("gradio")
class RealGradioTests(unittest.TestCase):
    """The gateway in front of a real Gradio server running a Param-shaped app."""

    @classmethod
    def setUpClass(cls):
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        import gradio as gr
        import warnings
        # Gradio's queue warns about pandas on every job, and its launch leaves event
        # loops to the garbage collector: warnings that are not ours
        cls.warnings = warnings.catch_warnings()
        cls.warnings.__enter__()
        warnings.filterwarnings("ignore", module=r"gradio\.")
        warnings.filterwarnings("ignore", "unclosed event loop", ResourceWarning)
        cls.gr, cls.outcomes, cls.major = gr, [], int(gr.__version__.split(".")[0])
        cls.app = _param_app(gr, cls.outcomes)
        port = _free_port()
        cls.app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                               quiet=True, show_error=True)
        cls.url = "http://127.0.0.1:%d" % port

    @classmethod
    def tearDownClass(cls):
        cls.app.close()
        import gc
        gc.collect()                            # those event loops, under the filters
        cls.warnings.__exit__(None, None, None)

    def gateways(self):
        for protocol in ("queue", "call"):
            with self.subTest(protocol=protocol):
                gw = start_gateway(self, self.url, protocol=protocol, timeout=TIMEOUT)
                gw.protocol = protocol
                yield gw

    def error(self, gw, message):
        """The error a gateway reports: Gradio before 6.13 sends /call errors without text."""
        if gw.protocol == "call" and self.major < 6:
            return "the Gradio app failed without a message (it may hide errors; see its logs)"
        return "the Gradio app reported an error: " + message

    def wait_for_outcome(self):
        deadline = time.monotonic() + 5
        while not self.outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
        return [o[:2] for o in self.outcomes]

    def test_answers_about_html_come_through_whole(self):
        for gw in self.gateways():
            for prompt, answer in HTML_ANSWERS.items():
                for stream in (False, True):
                    status, _, body = chat(gw, prompt, stream=stream)
                    text = streamed_text(sse_events(body)) if stream else \
                        json.loads(body)["choices"][0]["message"]["content"]
                    self.assertEqual((status, text), (200, answer), (prompt, stream))

    def test_discovery(self):
        info = gradio_client(self, self.url + "/gradio_api").discover()
        self.assertEqual((info.prefix, info.endpoint, info.history_format, info.use_queue),
                         ("/gradio_api", "chat_fn_1", "parts" if self.major >= 6 else "messages",
                          True))
        self.assertEqual([r for r, _ in info.inputs], ["message", "history", "system", "temperature",
                                                       "max_tokens", "top_p", "top_k"])
        self.assertEqual(info.limits, {"temperature": (0, 2), "max_tokens": (1, 4096),
                                       "top_p": (0, 1), "top_k": (1, 100)})

    def test_text_history_and_errors_over_both_protocols(self):
        messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}]
        history = [{"content": [{"text": "Hi", "type": "text"}], "role": "user"},
                   {"content": [{"text": "Hello!", "type": "text"}], "role": "assistant"}]
        if self.major < 6:                              # Gradio 5: content as strings
            history = [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"}]
        for gw in self.gateways():
            for prompt, answer in (("Say hello", HELLO), ("show formatting", bg._DEMO_FORMATTING),
                                   ("hindi please", HINDI),
                                   ("tell me the history", "SYSTEM=Be terse. | HISTORY=" +
                                    json.dumps(history, sort_keys=True))):
                with self.subTest(prompt=prompt):
                    conv = messages + [{"role": "user", "content": prompt}]
                    status, _, body = chat(gw, conv)
                    self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                                     (200, answer))
                    self.assertEqual(streamed_text(sse_events(chat(gw, conv, stream=True)[2])), answer)
            for stream in (False, True):
                status, _, body = chat(gw, "[[error]]", stream)
                self.assertEqual((status, json.loads(body)["error"]["message"]),
                                 (502, self.error(gw, "Model is overloaded, try again")))

    def test_sampling_values_and_the_apps_slider_ranges(self):
        for gw in self.gateways():
            status, _, body = chat(gw, "params", temperature=0.2, max_tokens=4096, top_p=0.5, top_k=7)
            self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                             (200, "PARAMS temperature=0.2 max_tokens=4096 top_p=0.5 top_k=7"))
            status, _, body = chat(gw, "params", max_tokens=8192)
            self.assertEqual((status, json.loads(body)), (400, {"error": {
                "message": "max_tokens=8192 is more than this model accepts (at most 4096)",
                "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_value"}}))

    def test_app_error_mid_stream(self):
        full = bg._demo_reply("[[fail-midstream]]", [], None, [None] * 4)[1]
        for gw in self.gateways():
            message = self.error(gw, "the GPU went away")
            status, _, body = chat(gw, "[[fail-midstream]]")
            self.assertEqual((status, json.loads(body)["error"]["message"]), (502, message))
            status, _, body = chat(gw, "[[fail-midstream]]", stream=True)
            events = sse_events(body)
            self.assertEqual((status, events[-2], events[-1]), (200, {"error": {
                "message": message, "type": "upstream_error", "param": None,
                "code": "upstream_error"}}, "[DONE]"))
            text = streamed_text(events[:-2])
            self.assertTrue(full.startswith(text) and text != full, text)

    def test_full_queue_is_503(self):
        url = _launch(self, self.gr, _param_app(self.gr), max_size=0)
        for protocol in ("queue", "call"):
            gw = start_gateway(self, url, protocol=protocol, timeout=TIMEOUT)
            for stream in (False, True):
                with self.subTest(protocol=protocol, stream=stream):
                    status, headers, body = chat(gw, "Say hello", stream)
                    self.assertEqual((status, headers.get("Retry-After"), json.loads(body)), (503, "1", {
                        "error": {"message": "the Gradio app's queue is full; try again later",
                                  "type": "upstream_error", "param": None,
                                  "code": "upstream_overloaded"}}))

    def test_tools_and_structured_output_with_the_openai_sdk(self):
        """The official SDK's tool loop and ``parse()`` through this app, over both protocols."""
        import openai
        import pydantic
        from typing import List

        class Point(pydantic.BaseModel):
            x: int
            tags: List[str]

        class Trip(pydantic.BaseModel):                 # nested: its schema has $defs
            name: str
            stops: List[Point]

        for gw in self.gateways():
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0,
                                   timeout=TIMEOUT)
            ask = [{"role": "user", "content": "What is the weather in Pune and Delhi?"}]
            expected = [("get_weather", {"city": "Pune"}), ("get_weather", {"city": "Delhi"})]
            reply = client.chat.completions.create(model=bg.DEFAULT_MODEL, messages=ask,
                                                   tools=[WEATHER])
            message = reply.choices[0].message
            self.assertEqual((reply.choices[0].finish_reason, [
                (c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]),
                ("tool_calls", expected))
            with client.chat.completions.stream(model=bg.DEFAULT_MODEL, messages=ask,
                                                tools=[WEATHER]) as stream:
                final = stream.get_final_completion().choices[0]
            self.assertEqual((final.finish_reason, [
                (c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls]),
                ("tool_calls", expected))
            weather = {"Pune": "31 C", "Delhi": "25 C"}
            loop = ask + [message.model_dump(exclude_none=True)] + [
                {"role": "tool", "tool_call_id": c.id,
                 "content": weather[json.loads(c.function.arguments)["city"]]}
                for c in message.tool_calls]
            reply = client.chat.completions.create(model=bg.DEFAULT_MODEL, messages=loop,
                                                   tools=[WEATHER])
            self.assertEqual((reply.choices[0].message.content, reply.choices[0].finish_reason),
                             ("Here is what the tools said: get_weather: 31 C; get_weather: 25 C",
                              "stop"))
            named = client.chat.completions.create(
                model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "weather in Agra"}],
                tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
            self.assertEqual(named.choices[0].message.tool_calls[0].function.arguments,
                             '{"city": "Agra"}')
            with self.assertRaises(openai.APIStatusError) as caught:
                client.chat.completions.create(
                    model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "[[no-call]] hi"}],
                    tools=[WEATHER], tool_choice="required")
            self.assertEqual((caught.exception.status_code, caught.exception.body["code"]),
                             (502, "invalid_model_output"))
            parsed = client.chat.completions.parse(
                model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "plan a trip"}],
                response_format=Trip).choices[0].message.parsed
            self.assertEqual(parsed, Trip(name="Param", stops=[Point(x=1, tags=["Param"])]))
            with self.assertRaises(openai.APIStatusError) as caught:
                client.chat.completions.parse(
                    model=bg.DEFAULT_MODEL, messages=[{"role": "user", "content": "[[bad-json]]"}],
                    response_format=Point)
            self.assertEqual(caught.exception.status_code, 502)

    def test_langchain_tools_and_structured_output(self):
        """LangChain's ``bind_tools`` and ``with_structured_output`` through this app."""
        from langchain_core.messages import HumanMessage, ToolMessage
        from langchain_core.tools import tool
        from langchain_openai import ChatOpenAI
        import pydantic
        from typing import List

        @tool
        def get_weather(city: str) -> str:
            """The weather in a city now."""
            return {"Pune": "31 C"}.get(city, "unknown")

        class Point(pydantic.BaseModel):
            x: int
            tags: List[str]

        gw = start_gateway(self, self.url, timeout=TIMEOUT)
        llm = ChatOpenAI(base_url=gw.url + "/v1", api_key="x", model=bg.DEFAULT_MODEL,
                         max_retries=0, timeout=TIMEOUT)
        bound = llm.bind_tools([get_weather])
        history = [HumanMessage("What is the weather in Pune?")]
        ai = bound.invoke(history)
        self.assertEqual([(c["name"], c["args"]) for c in ai.tool_calls],
                         [("get_weather", {"city": "Pune"})])
        streamed = None
        for chunk in bound.stream(history):
            streamed = chunk if streamed is None else streamed + chunk
        self.assertEqual([(c["name"], c["args"]) for c in streamed.tool_calls],
                         [("get_weather", {"city": "Pune"})])
        history += [ai, ToolMessage(get_weather.invoke(ai.tool_calls[0]["args"]),
                                    tool_call_id=ai.tool_calls[0]["id"])]
        self.assertEqual(bound.invoke(history).content,
                         "Here is what the tools said: get_weather: 31 C")
        for method in ("json_schema", "function_calling"):     # a format, or a forced call
            with self.subTest(method=method):
                self.assertEqual(llm.with_structured_output(Point, method=method).invoke(
                    "a point please"), Point(x=1, tags=["Param"]))

    def test_stop_and_disconnect_cancel_the_gradio_job(self):
        prompt = "300 words slowly"             # about 330 snapshots, 20 ms apart
        for gw in self.gateways():
            for stream in (False, True):
                del self.outcomes[:]
                status, _, body = chat(gw, prompt, stream, stop=["bilingual"])
                text = (streamed_text(sse_events(body)) if stream
                        else json.loads(body)["choices"][0]["message"]["content"])
                self.assertEqual((status, text), (200, "Param is a "))
                self.assertEqual(self.wait_for_outcome(), [(prompt, "cancelled")])
                self.assertLess(self.outcomes[0][2], 150)
            del self.outcomes[:]
            conn = http.client.HTTPConnection(*gw.server_address[:2], timeout=TIMEOUT)
            try:
                conn.request("POST", "/v1/chat/completions", json.dumps({
                    "model": bg.DEFAULT_MODEL, "stream": True,
                    "messages": [{"role": "user", "content": prompt}]}),
                    {"Content-Type": "application/json"})
                resp = conn.getresponse()
                self.assertEqual(resp.status, 200)
                self.assertTrue(resp.read1(1000).startswith(b"data: "))
                conn.sock.shutdown(socket.SHUT_RDWR)     # the client goes away mid-stream
            finally:
                conn.close()
            self.assertEqual(self.wait_for_outcome(), [(prompt, "cancelled")])
            status, _, body = chat(gw, "Say hello")            # the queue is free again
            self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], HELLO)


@needs("gradio")
@needs("openai")
class RealChatInterfaceTests(unittest.TestCase):
    """Real ``gr.ChatInterface`` shapes behind the gateway, driven by the official openai
    SDK: thoughts as ``gr.ChatMessage`` (one message then a list, or lists from the
    start), a plain one given a system prompt, a multimodal one."""

    @classmethod
    def setUpClass(cls):
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        import gradio as gr
        import warnings
        cls.warnings = warnings.catch_warnings()
        cls.warnings.__enter__()
        warnings.filterwarnings("ignore", module=r"gradio\.")
        warnings.filterwarnings("ignore", "unclosed event loop", ResourceWarning)
        cls.calls = []

        def one_then_list(message, history):
            thought = gr.ChatMessage(content="", metadata={"title": "Thinking", "status": "pending"})
            for word in "Consider the question carefully.".split():
                thought.content = (thought.content + " " + word).strip()
                yield thought
            thought.metadata["status"] = "done"
            yield thought
            answer = ""
            for word in "The capital of India is New Delhi.".split():
                answer = (answer + " " + word).strip()
                yield [thought, gr.ChatMessage(content=answer)]

        def lists(message, history):
            thought = gr.ChatMessage(content="A short thought.",
                                     metadata={"title": "Thinking", "status": "done"})
            yield [thought]
            yield [thought, gr.ChatMessage(content="Answer one.")]

        def plain(message, history):
            cls.calls.append(message)
            yield "You said: " + message

        def multimodal(message, history):
            cls.calls.append(message)
            files = [f if isinstance(f, str) else f.get("path") for f in message["files"]]
            sizes = [os.path.getsize(f) for f in files]
            yield "Text was: %s" % message["text"] + ("; files of %s bytes" % sizes if files else "")

        def chat_interface(fn, **kwargs):
            try:
                return gr.ChatInterface(fn, type="messages", **kwargs)     # Gradio 5
            except TypeError:
                return gr.ChatInterface(fn, **kwargs)                      # Gradio 6
        cls.apps = {"one_then_list": chat_interface(one_then_list), "lists": chat_interface(lists),
                    "plain": chat_interface(plain),
                    "multimodal": chat_interface(multimodal, multimodal=True)}
        cls.urls = {}
        for name, app in cls.apps.items():
            port = _free_port()
            app.queue().launch(server_name="127.0.0.1", server_port=port,
                               prevent_thread_lock=True, quiet=True, show_error=True)
            cls.urls[name] = "http://127.0.0.1:%d" % port

    @classmethod
    def tearDownClass(cls):
        for app in cls.apps.values():
            app.close()
        import gc
        gc.collect()
        cls.warnings.__exit__(None, None, None)

    def ask(self, name, messages, **extra):
        """``[(content, reasoning)]``: non-streamed, then streamed, through the openai SDK."""
        import openai
        gw = start_gateway(self, self.urls[name], timeout=TIMEOUT, **extra)
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(client.close)
        reply = client.chat.completions.create(model=bg.DEFAULT_MODEL, messages=messages)
        message = reply.choices[0].message
        out = [(message.content, (message.model_extra or {}).get("reasoning_content"))]
        content, reasoning = [], []
        for chunk in client.chat.completions.create(model=bg.DEFAULT_MODEL, messages=messages,
                                                    stream=True):
            for choice in chunk.choices:
                content.append(choice.delta.content or "")
                reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
        out.append(("".join(content), "".join(reasoning) or None))
        return out

    def test_chat_message_thoughts_are_the_reasoning(self):
        hi = [{"role": "user", "content": "What is the capital of India?"}]
        self.assertEqual(self.ask("one_then_list", hi), [(
            "The capital of India is New Delhi.", "Consider the question carefully.")] * 2)
        self.assertEqual(self.ask("lists", hi), [("Answer one.", "A short thought.")] * 2)

    def test_a_plain_chat_interface_gets_the_system_prompt_in_the_message(self):
        messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
        self.assertEqual(self.ask("plain", messages), [
            ("You said: System: Be terse.\n\nUser: Hi", None)] * 2)

    def test_a_multimodal_chat_interface_gets_text_and_files(self):
        self.assertEqual(self.ask("multimodal", [{"role": "user", "content": "Hi"}]),
                         [("Text was: Hi", None)] * 2)
        self.assertEqual(self.calls[-1], {"text": "Hi", "files": []})
        png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06"
               b"\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe"
               b"\x02\xfe\xa7\x35\x81\x84\x00\x00\x00\x00IEND\xaeB`\x82")
        url = "data:image/png;base64," + __import__("base64").b64encode(png).decode()
        self.assertEqual(self.ask("multimodal", [{"role": "user", "content": [
            {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]}]),
            [("Text was: What is it?; files of [%d] bytes" % len(png), None)] * 2)


class _PrefixProxy(http.server.ThreadingHTTPServer):
    """A reverse proxy serving ``upstream`` under /llm/ (the prefix stripped), streaming each
    response through chunk by chunk; ``paths`` holds every path it was asked for."""

    daemon_threads = True

    def __init__(self, upstream):
        self.upstream, self.paths = upstream, []
        super().__init__(("127.0.0.1", 0), _PrefixHandler)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]


class _PrefixHandler(http.server.BaseHTTPRequestHandler):
    def forward(self):
        self.server.paths.append(self.path)
        if not (self.path + "/").startswith("/llm/"):
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        host, port = self.server.upstream.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        try:
            conn.request(self.command, self.path[4:] or "/", body or None, {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
            resp = conn.getresponse()
            self.send_response(resp.status)
            for name, value in resp.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length",
                                        "date", "server"):
                    self.send_header(name, value)
            self.end_headers()                         # HTTP/1.0: the body ends at close
            for chunk in iter(lambda: resp.read1(65536), b""):
                self.wfile.write(chunk)
                self.wfile.flush()
        finally:
            conn.close()

    do_GET = do_POST = forward

    def log_message(self, *args):
        pass


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def png(width, height, rgb):
    """A PNG of one colour (for the image button)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + bytes(rgb) * width for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# Markdown as people (and models) write it; the demo echoes a system prompt back as its answer.
MARKDOWN = """Intro

| name | n | note |
|:-:|--:|---|
| a **b** | 1 | `c\\|d` |
| e | 2 |

> quoted *text*
> > nested

- one
  - one.a
    - one.a.i
- two [site](https://example.org/x?a=1&b=2) and [mail](mailto:a@example.org)

3. third
4. fourth

[bad](javascript:alert(1)) <javascript:alert(2)> [data](data:text/html,x) see https://example.com/p.

```python
print('hi')
```

End"""


@needs("selenium", CHROMIUM, CHROMEDRIVER)
class BrowserTests(unittest.TestCase):
    """The page at / in headless Chromium, against a keyed gateway and the demo upstream (no
    token delay unless a test times something), at 1280x800 and 390x844, light and dark.
    Screenshots go to $BHARATGEN_SCREENSHOTS (or a temporary directory); their paths are
    printed."""

    KEY = "sk-browser"
    SIZES = {"wide": (1280, 800), "narrow": (390, 844)}

    @classmethod
    def setUpClass(cls):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        import tempfile
        cls.demo = FakeGradio().start()
        cls.gw = bg.GatewayServer(bg.Config(upstream=[cls.demo.url], port=0, timeout=10, demo=True,
                                            api_keys=[cls.KEY])).start()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900"):
            options.add_argument(arg)
        try:
            cls.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        except Exception:
            cls.gw.stop()
            cls.demo.stop()
            raise
        cls.driver.set_page_load_timeout(TIMEOUT)
        cls.shots = os.environ.get("BHARATGEN_SCREENSHOTS") or tempfile.mkdtemp(prefix="bharatgen-page-")
        os.makedirs(cls.shots, exist_ok=True)

    @classmethod
    def tearDownClass(cls):
        cls.driver.quit()
        cls.gw.stop()
        cls.demo.stop()

    def setUp(self):
        self.viewport("wide")

    def viewport(self, size, dark=False):
        """The window's inner size exactly (a phone's for "narrow"), light or dark."""
        width, height = self.SIZES[size]
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
        self.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]})

    def slow(self, delay=0.01):
        """The demo's tokens ``delay`` seconds apart, for this test."""
        self.demo.token_delay = delay
        self.addCleanup(setattr, self.demo, "token_delay", 0.0)

    def wait(self, predicate, message="", timeout=TIMEOUT):
        from selenium.webdriver.support.ui import WebDriverWait
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda d: predicate(), message)

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def find(self, css):
        return self.driver.find_elements("css selector", css)

    def text(self, css):
        """The textContent of the last element matching ``css`` (folded parts included)."""
        found = self.texts(css)
        return found[-1] if found else None

    def texts(self, css):
        return self.js("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", css)

    def screenshot(self, name):
        path = os.path.join(self.shots, name + ".png")
        self.driver.save_screenshot(path)
        sys.stderr.write("\nscreenshot: %s\n" % path)

    def open_page(self, url=None, key=KEY):
        """A fresh page (nothing stored) given the key, when the server asks for one."""
        url = url or self.gw.url + "/"
        self.driver.get(url)
        self.js("sessionStorage.clear(); localStorage.clear()")
        self.driver.get(url)
        if key:
            self.wait(lambda: self.find("#keyform")[0].is_displayed(), "no key asked for")
            self.wait(lambda: self.text("#keymsg") == "Missing API key: send the header "
                      "'Authorization: Bearer <key>'", "no key message")
            self.driver.switch_to.active_element.send_keys(key + "\n")
        self.models_loaded()
        if key:
            self.assertEqual(self.js("return sessionStorage.getItem('bharatgen_openai.key')"), key)
            self.assertFalse(self.find("#keyform")[0].is_displayed())

    def models_loaded(self):
        self.wait(lambda: self.js("return document.getElementById('model').value") == bg.DEFAULT_MODEL,
                  "the models did not load")

    def send(self, prompt, done=True, answers=None):
        """Type ``prompt`` and press Enter; wait for the answer box (the ``answers``-th), and
        with ``done`` for the answer to end."""
        answers = len(self.find(".answer")) + 1 if answers is None else answers
        self.find("#prompt")[0].send_keys(prompt + "\n")
        self.wait(lambda: len(self.find(".answer")) == answers, "no answer box")
        if done:
            self.wait(lambda: self.find("#send")[0].is_enabled(), "the answer did not end")

    def geometry(self):
        """Where the message box and the conversation are, and how far from its end it is
        scrolled; ``last`` is the newest message's box."""
        return self.js("""const box = id => document.getElementById(id).getBoundingClientRect();
            const log = document.getElementById('log'), msgs = document.querySelectorAll('#turns > .msg');
            const last = msgs[msgs.length - 1].getBoundingClientRect();
            return {ask_top: box('ask').top, ask_bottom: box('ask').bottom, log_top: box('log').top,
                    log_bottom: box('log').bottom, height: innerHeight, last_top: last.top,
                    last_bottom: last.bottom, scrolls: log.scrollHeight > log.clientHeight,
                    gap: log.scrollHeight - log.scrollTop - log.clientHeight, top: log.scrollTop,
                    sideways: document.documentElement.scrollWidth > innerWidth}""")

    def fits(self, css):
        """(text width, room) of the placeholder, or the chosen option, of ``css``."""
        return self.js("""const e = document.querySelector(arguments[0]), s = getComputedStyle(e);
            const g = document.createElement('canvas').getContext('2d');
            g.font = s.font;
            const text = e.tagName === 'SELECT' ? e.selectedOptions[0].text : e.placeholder;
            const arrow = e.tagName === 'SELECT' ? 20 : 0;
            return [Math.ceil(g.measureText(text).width) + arrow,
                    e.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight)];""", css)

    def spy_clipboard(self, api=True, exec_command=True):
        """The clipboard API (and execCommand('copy')) replaced by recorders: window.copied."""
        self.js("""window.copied = [];
            const writeText = t => arguments[0] ? (copied.push(['api', t]), Promise.resolve())
                                                : Promise.reject(new DOMException('no', 'NotAllowedError'));
            Object.defineProperty(navigator, 'clipboard', {value: {writeText}, configurable: true});
            document.execCommand = cmd => arguments[1] &&
                !!copied.push([cmd, document.activeElement.value]);""", api, exec_command)

    # -- the chat ---------------------------------------------------------------------------

    def test_chat_streams_folds_the_thought_keeps_history_and_shows_api_errors(self):
        self.open_page()
        self.assertEqual(self.js("return getComputedStyle(document.body).backgroundColor"),
                         "rgb(255, 255, 255)")                          # light by default
        self.assertEqual((self.find("#demo")[0].is_displayed(), self.text("#empty")),
                         (True, "Ask %s, the built-in demo: canned answers, not the Param model."
                          % bg.DEFAULT_MODEL))
        width, room = self.fits("#model")                               # the whole model id
        self.assertLessEqual(width, room)
        self.find("#setbtn")[0].click()                                 # the settings
        self.assertEqual(self.texts("#settings label"), [
            "Temperature (0–2)", "Max tokens (1–8192)", "Top-p (0–1)", "System prompt"])
        self.assertEqual([self.find("#" + i)[0].get_attribute("max") for i in
                          ("temperature", "max_tokens", "top_p")], ["2", "8192", "1"])
        self.find("#system")[0].send_keys("Be brief.")
        self.assertFalse(self.find("#attach")[0].is_displayed())        # the demo takes text
        self.send("Say hello")
        self.assertEqual(self.text(".answer"), HELLO)
        thought = self.find("details.thought")[-1]
        self.assertEqual((thought.is_displayed(), thought.get_attribute("open"), self.text(
            "details.thought div")), (True, None, thought_of("Say hello")))
        self.assertRegex(self.text("details.thought summary"), r"^Thought for \d+\.\d s$")
        self.send("history please")                                     # the turns so far
        history = self.demo.calls[-1][1]
        self.assertEqual(self.text(".answer"), "SYSTEM=Be brief. | HISTORY=%s"
                         % json.dumps(history, sort_keys=True))
        self.assertEqual([(h["role"], h["content"][0]["text"] if isinstance(h["content"], list)
                           else h["content"]) for h in history],
                         [("user", "Say hello"), ("assistant", HELLO)])
        self.send("show formatting")                                    # markdown, as elements
        self.assertEqual([e.tag_name for e in self.find(".answer")[-1].find_elements("xpath", "./*")],
                         ["p", "ol", "p", "div", "div", "p"])
        self.assertEqual(self.text(".answer p"), "Math: 3 < 5 and 7 > 2; AT&T; 'quotes' \"double\"  "
                                                 "two  spaces.\nTrailing line")
        self.assertEqual(self.texts(".answer ol li")[-3:], ["Red", "Blue", "Green"])
        self.assertEqual(self.text(".answer pre code"), "def f(x):\n    if x:\n        return x * 2\n"
                                                        "    return None")
        self.assertEqual(self.find(".answer pre code")[-2].get_attribute("textContent"),
                         '<div class="box">a < b && c > d</div>')
        self.assertEqual(self.find(".answer div.box"), [])
        self.find("#new")[0].click()                                    # a new chat
        self.assertEqual(self.find("#turns > *"), [])
        self.send("history please")
        self.assertEqual(self.text(".answer"), "SYSTEM=Be brief. | HISTORY=[]")
        max_tokens = self.find("#max_tokens")[0]                        # an API error, as given
        max_tokens.send_keys("0")
        self.send("Say hello", answers=len(self.find(".answer")) + 1)
        status, _, body = chat(self.gw, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Say hello"}], stream=True,
                               headers={"Authorization": "Bearer " + self.KEY}, max_tokens=0)
        error = json.loads(body)["error"]
        self.assertEqual(self.text(".msg.error"), "%d · %s · %s: %sRetry" % (
            status, error["type"], error["code"], error["message"]))
        self.assertEqual(status, 400)
        self.assertEqual(self.js("return getComputedStyle(arguments[0]).borderColor", max_tokens),
                         "rgb(194, 40, 47)")                              # out of the app's range
        self.screenshot("chat-error-wide-light")

    def test_the_box_stays_at_the_bottom_and_the_view_follows_a_long_chat(self):
        for size, dark in (("wide", False), ("narrow", True)):
            with self.subTest(size=size):
                self.viewport(size, dark)
                self.open_page()
                for i in range(8):                      # 8 long answers: each comes into view
                    self.send("%d words" % (300 + i))        # its end shown at the next frame:
                    self.wait(lambda: self.geometry()["gap"] <= 1, "not scrolled to the end")
                    g = self.geometry()
                    self.assertEqual((g["ask_bottom"], g["log_bottom"], g["sideways"]),
                                     (g["height"], g["ask_top"], False), g)
                    self.assertTrue(g["log_top"] < g["last_bottom"] <= g["log_bottom"], g)
                self.assertTrue(g["scrolls"], g)
                self.assertEqual(len(self.texts(".answer")[-1].split()), 307)
                self.assertEqual(self.js("return getComputedStyle(document.body).backgroundColor"),
                                 "rgb(20, 21, 25)" if dark else "rgb(255, 255, 255)")
                self.screenshot("chat-long-%s-%s" % (size, "dark" if dark else "light"))

    def test_following_stops_when_the_reader_scrolls_up_and_the_thought_is_timed(self):
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
        for size, dark in (("narrow", False), ("wide", True)):
            with self.subTest(size=size):
                self.viewport(size, dark)
                self.open_page()
                self.send("300 words")
                self.slow(0.005)
                self.send("3000 words", done=False)
                self.wait(lambda: len(self.text(".answer")) > 300, "no streamed text")
                self.assertLessEqual(self.geometry()["gap"], 1)          # followed so far
                ActionChains(self.driver).scroll_from_origin(
                    ScrollOrigin.from_element(self.find("#log")[0]), 0, -400).perform()
                self.wait(lambda: self.find("#jump")[0].is_displayed(), "no jump control")
                self.wait(lambda: self.geometry()["gap"] > 300, "not scrolled up")
                top, length = self.geometry()["top"], len(self.text(".answer"))
                self.wait(lambda: len(self.text(".answer")) > length + 500, "the answer stopped")
                self.assertEqual(self.geometry()["top"], top)             # it stays where it was
                self.screenshot("chat-scrolled-up-%s-%s" % (size, "dark" if dark else "light"))
                self.find("#jump")[0].click()
                self.wait(lambda: self.geometry()["gap"] <= 1, "not brought back")
                self.assertFalse(self.find("#jump")[0].is_displayed())
                length = len(self.text(".answer"))
                self.wait(lambda: len(self.text(".answer")) > length + 500, "the answer stopped")
                self.assertLessEqual(self.geometry()["gap"], 1)          # following again
                self.find("#stop")[0].click()
                self.wait(lambda: self.find("#send")[0].is_enabled() and self.geometry()["gap"] <= 1,
                          "not at the end when stopped")
        self.slow(0.03)                                   # "Thinking…" while the thought streams
        self.js("""window.seen = [];
            new MutationObserver(() => {
                const s = [...document.querySelectorAll('.thought summary')].pop();
                const a = [...document.querySelectorAll('.answer')].pop();
                if (s && !s.parentNode.hidden) seen.push([s.textContent, a.textContent.length]);
            }).observe(document.getElementById('turns'), {subtree: true, childList: true, characterData: true});""")
        self.send("Say hello")
        seen = self.js("return seen")
        self.assertEqual({label for label, length in seen if length == 0}, {"Thinking…"}, seen)
        self.assertEqual({re.sub(r"\d", "N", label) for label, length in seen if length > 0},
                         {"Thought for N.N s"}, seen)
        self.assertGreaterEqual(float(self.text(".thought summary").split()[2]), 0.2)  # 11 tokens

    def test_markdown_as_people_write_it_links_only_when_safe_and_code_copied(self):
        for size, dark in (("wide", True), ("narrow", False)):
            with self.subTest(size=size):
                self.viewport(size, dark)
                self.open_page()
                self.find("#setbtn")[0].click()
                self.js("arguments[0].value = arguments[1]", self.find("#system")[0], MARKDOWN)
                self.find("#setbtn")[0].click()
                self.send("history please")
                answer = self.find(".answer")[-1]
                self.assertEqual([e.tag_name for e in answer.find_elements("xpath", "./*")],
                                 ["p", "div", "blockquote", "ul", "ol", "p", "div", "p"])
                rows = self.js("""return [...arguments[0].querySelectorAll('tr')].map(r =>
                    [...r.children].map(c => [c.tagName, c.className, c.textContent]))""", answer)
                self.assertEqual(rows, [[["TH", "c", "name"], ["TH", "r", "n"], ["TH", "", "note"]],
                                        [["TD", "c", "a b"], ["TD", "r", "1"], ["TD", "", "c|d"]],
                                        [["TD", "c", "e"], ["TD", "r", "2"], ["TD", "", ""]]])
                self.assertEqual(self.texts(".answer td strong"), ["b"])
                self.assertEqual((self.texts(".answer blockquote > p"), self.texts(".answer blockquote em"),
                                  self.text(".answer blockquote blockquote")),
                                 (["quoted text", "nested"], ["text"], "nested"))
                self.assertEqual(self.js("""const t = e => e.firstChild.textContent;
                    return [...arguments[0].querySelectorAll(':scope > ul > li')].map(li => [t(li),
                        [...li.querySelectorAll(':scope > ul > li')].map(l => [t(l),
                            [...l.querySelectorAll(':scope > ul > li')].map(t)])])""", answer),
                    [["one", [["one.a", ["one.a.i"]]]], ["two ", []]])
                self.assertEqual((self.find(".answer ol")[-1].get_attribute("start"),
                                  self.texts(".answer ol li")), ("3", ["third", "fourth"]))
                links = self.js("""return [...arguments[0].querySelectorAll('a')].map(a =>
                    [a.getAttribute('href'), a.textContent, a.target, a.rel])""", answer)
                self.assertEqual(links, [
                    ["https://example.org/x?a=1&b=2", "site", "_blank", "noopener noreferrer"],
                    ["mailto:a@example.org", "mail", "_blank", "noopener noreferrer"],
                    ["https://example.com/p", "https://example.com/p", "_blank", "noopener noreferrer"]])
                self.assertEqual(self.find(".answer p")[-2].get_attribute("textContent"),
                                 "[bad](javascript:alert(1)) <javascript:alert(2)> [data](data:text/html,x) "
                                 "see https://example.com/p.")           # the rest stays text
                self.assertEqual((self.text(".answer .code span"), self.text(".answer pre code")),
                                 ("python", "print('hi')"))
                self.screenshot("markdown-%s-%s" % (size, "dark" if dark else "light"))
        copy = self.find(".answer .code button")[-1]                     # the code, copied
        for api, exec_command, said, copied in (
                (True, True, "Copied", [["api", "print('hi')"]]),
                (False, True, "Copied", [["copy", "print('hi')"]]),   # refused: execCommand
                (False, False, "Press Ctrl+C", [])):                  # that too: selected
            self.spy_clipboard(api, exec_command)
            copy.click()
            self.wait(lambda: copy.text == said, "not %s" % said)
            self.assertEqual(self.js("return copied"), copied)
        self.assertEqual(self.js("return getSelection().toString()"), "print('hi')")
        self.assertEqual(self.driver.switch_to.active_element, copy)   # focus kept
        self.wait(lambda: copy.text == "Copy", "the button did not reset")

    def test_markdown_is_drawn_in_linear_time_and_streams_as_it_draws_whole(self):
        self.open_page()
        same = self.js("""const text = arguments[0], whole = document.createElement('div');
            renderer(whole)(text, true);
            const streamed = document.createElement('div'), draw = renderer(streamed);
            for (let i = 1; i < text.length; i += 3) draw(text.slice(0, i), false);
            draw(text, true);
            return [whole.innerHTML === streamed.innerHTML, whole.querySelectorAll('*').length]""",
                       MARKDOWN + "\n\n" + MARKDOWN.replace("\n\n", "\n"))
        self.assertEqual(same, [True, same[1]])
        self.assertGreater(same[1], 60)
        took = self.js("""const time = (text, deltas) => {      // ms to stream text in deltas
                const t0 = performance.now(), draw = renderer(document.createElement('div'));
                for (let i = 1; i <= deltas; i++) draw(text.slice(0, Math.round(text.length * i / deltas)), i === deltas);
                return performance.now() - t0;
            };
            const many = n => Array.from({length: n}, (_, i) => i % 3 ? '- item **' + i + '** [x](https://e.org/' + i + ')'
                                                            : '\\n```\\ncode ' + i + '\\n```\\n').join('\\n') + '\\n';
            return {blocks: time(many(3000), 1500),             // 120 KB in 1500 deltas
                    stars: time('*a '.repeat(100000), 1), brackets: time('['.repeat(200000) + '](javascript:x)', 1),
                    angles: time('<'.repeat(200000) + '>', 1), ticks: time('`a'.repeat(100000), 1),
                    under: time('_a_b'.repeat(50000), 1), links: time('https://e.org/'.repeat(20000), 1),
                    quotes: time('>'.repeat(50000) + ' deep', 1),
                    lists: time(Array.from({length: 500}, (_, i) => ' '.repeat(2 * i) + '- x').join('\\n'), 1)}""")
        for name, ms in took.items():
            self.assertLess(ms, 2000, took)

    # -- conversations kept ------------------------------------------------------------------

    def test_chats_are_kept_across_reloads_renamed_deleted_regenerated_and_edited(self):
        self.viewport("narrow")
        self.open_page()
        self.assertFalse(self.find("#side")[0].is_displayed())          # folded on a phone
        self.send("Say hello")
        self.send("tamil please")
        self.find("#sidebtn")[0].click()
        self.find("#new")[0].click()
        self.assertFalse(self.find("#side")[0].is_displayed())
        self.send("hindi please", answers=1)
        self.driver.refresh()                                             # a reload keeps them
        self.models_loaded()
        self.assertEqual((self.texts("#turns .user .text"), self.texts(".answer")),
                         (["hindi please"], [HINDI]))
        self.assertEqual(self.texts("#chats .open"), ["hindi please", "Say hello"])
        stored = self.js("return Object.entries(localStorage)")
        self.assertFalse(any(self.KEY in value for _, value in stored), stored)   # the key is not
        self.viewport("wide")
        self.find("#chats .open")[1].click()
        tamil = bg._demo_reply("tamil please", [], None, [])[1]
        self.assertEqual(self.texts(".answer"), [HELLO, tamil])
        self.spy_clipboard()                                              # copy an answer
        self.find(".bot .acts button")[0].click()
        self.wait(lambda: self.js("return copied") == [["api", HELLO]], "not copied")
        self.assertEqual([b.is_displayed() for b in self.find(".regen")], [False, True])
        calls = len(self.demo.calls)
        self.find(".regen")[-1].click()                                   # regenerate the last
        self.wait(lambda: len(self.demo.calls) == calls + 1 and self.find("#send")[0].is_enabled(),
                  "not regenerated")
        self.assertEqual((self.texts(".answer"), self.demo.calls[-1][0], len(self.demo.calls[-1][1])),
                         ([HELLO, tamil], "tamil please", 2))
        self.find(".user .edit")[0].click()                               # edit and resend
        prompt = self.find("#prompt")[0]
        self.assertEqual((prompt.get_attribute("value"), self.find("#editing")[0].is_displayed()),
                         ("Say hello", True))
        prompt.clear()
        self.send("history please", answers=1)
        self.assertEqual((self.texts("#turns .user .text"), self.demo.calls[-1][1]), (["history please"], []))
        self.find("#chats li[aria-current] button[aria-label=Rename]")[0].click()   # rename
        name = self.driver.switch_to.active_element
        name.send_keys("Greetings\n")
        self.wait(lambda: self.texts("#chats .open") == ["Greetings", "hindi please"], "not renamed")
        self.driver.refresh()
        self.models_loaded()
        self.assertEqual((self.texts("#chats .open"), self.text("#chats li[aria-current] .open")),
                         (["Greetings", "hindi please"], "Greetings"))
        delete = self.find("#chats li button[aria-label=Delete]")[1]       # delete: asked twice
        delete.click()
        self.assertEqual((delete.text, len(self.find("#chats li"))), ("Delete?", 2))
        delete.click()
        self.wait(lambda: self.texts("#chats .open") == ["Greetings"], "not deleted")
        self.js("""localStorage.setItem('bharatgen_openai.chats', JSON.stringify(Array.from({length: 60},
            (_, i) => ({id: 'c' + i, title: 'chat ' + i, at: i, messages: [{role: 'user', content: 'q'}]}))))""")
        self.driver.refresh()                                             # at most 50 kept
        self.models_loaded()
        self.send("Say hello")
        stored = json.loads(self.js("return localStorage.getItem('bharatgen_openai.chats')"))
        self.assertEqual((len(stored), stored[0]["title"], stored[-1]["title"]), (50, "Say hello", "chat 11"))
        self.screenshot("chats-wide-light")
        self.viewport("narrow")
        self.find("#sidebtn")[0].click()
        self.assertEqual(self.driver.switch_to.active_element, self.find("#new")[0])
        self.screenshot("chats-narrow-light")
        self.js("localStorage.setItem('bharatgen_openai.chats', '[{\"title\": 1}, 2'); "
                "localStorage.setItem('bharatgen_openai.prefs', '{')")     # whatever is stored
        self.driver.refresh()
        self.models_loaded()
        self.assertEqual((self.find("#chats li"), self.find("#turns > *")), ([], []))

    def test_two_tabs_share_the_list_of_chats(self):
        self.open_page()
        self.send("Say hello")
        first = self.driver.current_window_handle
        self.driver.switch_to.new_window("tab")
        second = self.driver.current_window_handle

        def close():
            self.driver.switch_to.window(second)
            self.driver.close()
            self.driver.switch_to.window(first)
        self.addCleanup(close)
        self.driver.get(self.gw.url + "/")
        self.driver.switch_to.active_element.send_keys(self.KEY + "\n")   # a key per tab
        self.models_loaded()
        self.find("#new")[0].click()
        self.send("hindi please", answers=1)
        self.driver.switch_to.window(first)          # the first tab sees it, and keeps both
        self.wait(lambda: self.texts("#chats .open") == ["hindi please", "Say hello"], "not shared")
        self.send("tamil please")
        self.assertEqual([c["title"] for c in json.loads(self.js(
            "return localStorage.getItem('bharatgen_openai.chats')"))], ["Say hello", "hindi please"])

    def test_new_chat_mid_answer_and_enter_while_an_input_method_composes(self):
        self.slow()
        self.open_page()
        self.send("3000 words", done=False)
        self.wait(lambda: len(self.text(".answer")) > 100, "no streamed text")
        self.find("#new")[0].click()                    # the old answer stays in the old chat
        self.wait(lambda: self.find("#send")[0].is_enabled(), "the answer did not end")
        self.send("history please")
        self.assertEqual(self.demo.calls[-1][1], [])
        self.find("#chats .open")[1].click()
        self.wait(lambda: len(self.texts(".answer")) == 1 and self.find(".stopped") == [], "old chat")
        self.assertTrue(bg._demo_reply("3000 words", [], None, [])[1].startswith(self.text(".answer")))
        prompt = self.find("#prompt")[0]
        prompt.send_keys("नमस्ते")
        answers = len(self.find(".answer"))
        self.js("arguments[0].dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', "
                "isComposing: true, bubbles: true}))", prompt)
        time.sleep(0.3)
        self.assertEqual((len(self.find(".answer")), prompt.get_attribute("value")),
                         (answers, "नमस्ते"))            # Enter picked a word: nothing sent

    def dashboard(self):
        """(requests that ended 499, errors) in the monitor's window."""
        recent = json.loads(request(self.gw.url, "GET", "/v1/dashboard", headers={
            "Authorization": "Bearer " + self.KEY})[2])["recent"]
        return recent["by_status"].get("499", 0), sum(p["errors"] for p in recent["series"])

    def test_stop_cancels_the_upstream_job(self):
        self.slow()
        self.open_page()
        full = bg._demo_reply("3000 words", [], None, [])[1]
        cancels, (gone, errors) = len(self.demo.cancels), self.dashboard()
        self.send("3000 words", done=False)
        self.wait(lambda: len(self.text(".answer")) > 200, "no streamed text")
        self.assertTrue(self.find("#stop")[0].is_displayed())          # shown before the end
        self.assertFalse(self.find("#send")[0].is_displayed())
        self.find("#stop")[0].click()
        self.wait(lambda: self.find(".stopped"), "not stopped")
        self.wait(lambda: len(self.demo.cancels) == cancels + 1, "no cancel reached the upstream")
        self.wait(lambda: not self.demo.running, "the upstream job still runs")
        text = self.text(".answer")
        self.assertTrue(full.startswith(text) and 200 < len(text) < len(full) / 2, len(text))
        self.assertEqual((self.find("#send")[0].is_displayed(), self.find("#stop")[0].is_displayed(),
                          self.text(".stopped")), (True, False, "Stopped."))
        self.assertEqual([b.text for b in self.find(".bot .acts button") if b.is_displayed()],
                         ["Copy", "Regenerate"])                       # what was said, kept
        self.wait(lambda: self.dashboard() == (gone + 1, errors), "not one 499 (not an error)")
        self.screenshot("chat-stopped-wide-light")

    def test_settings_follow_the_app_and_an_image_is_sent(self):
        app = ImageGradio().start()
        self.addCleanup(app.stop)
        gw = bg.GatewayServer(bg.Config(upstream=[app.url], port=0, timeout=10)).start()
        self.addCleanup(gw.stop)
        self.open_page(gw.url + "/", key=None)
        self.wait(lambda: self.find("#attach")[0].is_displayed(), "no image button")
        self.assertFalse(self.find("#demo")[0].is_displayed())
        image = png(96, 64, (36, 83, 201))
        self.find("#setbtn")[0].click()
        self.assertEqual(self.texts("#settings label")[:3], ["Temperature (0–2)", "Max tokens (1–512)",
                                                            "Top-p (0–1)"])
        for name, value in (("temperature", "0.3"), ("max_tokens", "100"), ("top_p", "0.5")):
            self.find("#" + name)[0].send_keys(value)
        self.js("""const dt = new DataTransfer(), input = document.getElementById('file');
            dt.items.add(new File([Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0))], 'dot.png',
                                  {type: 'image/png'}));
            input.files = dt.files;
            input.dispatchEvent(new Event('change'));""", base64.b64encode(image).decode())
        self.wait(lambda: self.find("#attached img"), "no preview")
        self.assertTrue(self.find("#attached img")[0].get_attribute("src").startswith("data:image/png;base64,"))
        self.send("Say hello")
        self.assertEqual((self.text(".answer"), app.calls[-1][0]["text"], app.calls[-1][3:6]),
                         (HELLO, "Say hello", [0.3, 100, 0.5]))
        self.assertEqual([f["path"] for f in app.calls[-1][0]["files"]], ["/tmp/gradio/upload/image.png"])
        self.assertIn(image, app.uploads[-1])
        self.assertEqual((len(self.find(".user img")), self.find("#attached img")), (1, []))
        self.send("history please")                     # the image goes with its question only
        self.assertEqual((len(app.uploads), self.find(".msg.error")), (1, []))
        self.assertTrue(self.text(".answer").endswith('"type": "text"}], "role": "assistant"}]'))
        self.screenshot("chat-image-wide-light")

    def test_under_a_path_prefix_behind_a_proxy(self):
        self.slow()
        proxy = _PrefixProxy(self.gw.url)
        threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
        self.addCleanup(proxy.server_close)
        self.addCleanup(proxy.shutdown)
        self.open_page(proxy.url + "/llm/")
        self.send("300 words", done=False)                 # it streams through, piece by piece
        self.wait(lambda: 0 < len(self.text(".answer")) and self.find("#stop")[0].is_displayed(),
                  "no streamed text")
        self.wait(lambda: self.find("#send")[0].is_enabled(), "the answer did not end")
        self.assertEqual(self.text(".answer"), bg._demo_reply("300 words", [], None, [])[1])
        self.find("#tab-monitor")[0].click()
        self.wait(lambda: self.find("#m-requests b"), "no monitor numbers")
        self.driver.get(proxy.url + "/llm")                # without the slash too
        self.models_loaded()
        self.assertEqual(self.texts("#chats .open"), ["300 words"])
        self.assertEqual([p for p in proxy.paths if not p.startswith("/llm/")], ["/llm"])
        self.assertEqual(sorted(set(p for p in proxy.paths if p.startswith("/llm/v1"))),
                         ["/llm/v1/chat/completions", "/llm/v1/dashboard", "/llm/v1/models"])
        self.screenshot("chat-prefix-wide-light")

    def test_keyboard_only(self):
        from selenium.webdriver.common.keys import Keys
        self.open_page()                                  # the key typed into the focused field
        active = lambda: self.js("""const e = document.activeElement, s = getComputedStyle(e);
            return [e.id || e.getAttribute('aria-label') || e.textContent, s.outlineStyle !== 'none'
                    && parseFloat(s.outlineWidth) >= 2]""")
        self.find("#prompt")[0].send_keys("Say hello\n")
        self.wait(lambda: self.find("#send")[0].is_enabled() and self.text(".answer") == HELLO, "no answer")
        self.js("document.getElementById('tab-chat').focus()")  # from the top
        stops = [["tab-chat", True]]
        for _ in range(13):
            self.driver.switch_to.active_element.send_keys(Keys.TAB)
            stops.append(active())
        self.assertEqual(stops[:13], [[name, True] for name in (
            "tab-chat", "tab-monitor", "keybtn", "new", "Say hello", "Rename", "Delete", "sidebtn",
            "model", "setbtn", "log", "Edit and send again", "Copy")], stops)
        self.assertRegex(stops[13][0], r"^Thought for \d+\.\d s$")      # the thought, folded
        for _ in range(3):                                 # the answer's Copy, Regenerate, prompt
            self.driver.switch_to.active_element.send_keys(Keys.TAB)
        self.assertEqual(active()[0], "prompt")
        calls = len(self.demo.calls)
        self.driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)
        self.assertEqual(active(), ["Answer again", True])
        self.driver.switch_to.active_element.send_keys(Keys.ENTER)   # Regenerate
        self.wait(lambda: len(self.demo.calls) == calls + 1 and self.find("#send")[0].is_enabled(), "no answer")
        self.assertEqual(active(), ["log", True])          # its button redrawn: focus not lost
        self.screenshot("keyboard-wide-light")
        self.viewport("narrow")                          # the chat list over a phone's page
        self.find("#sidebtn")[0].send_keys(Keys.ENTER)
        self.assertEqual(active()[0], "new")
        self.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        self.assertEqual((self.find("#side")[0].is_displayed(), active()[0]), (False, "sidebtn"))

    # -- the monitor and small things --------------------------------------------------------

    def test_monitor_numbers_move_and_the_chart_is_drawn(self):
        self.open_page()
        self.find("#tab-monitor")[0].click()
        self.wait(lambda: self.find("#m-requests b"), "no monitor numbers")
        before = int(self.text("#m-requests b"))
        for _ in range(2):
            chat(self.gw, "Say hello", headers={"Authorization": "Bearer " + self.KEY})
        self.wait(lambda: self.text("#m-requests b") == str(before + 2), "the numbers did not move")
        tables = self.text("#tables")
        self.assertIn(short_key(self.KEY), tables)
        self.assertIn("%sup0-" % self.gw.backend.routes[bg.DEFAULT_MODEL].pool.replicas[0].client.base_url,
                      tables)                                            # url, state, failures, error
        self.assertRegex(self.text("#m-latency b"), r"^\d+(\.\d\d)?\xa0m?s / \d+(\.\d\d)?\xa0m?s$")
        painted = self.js("""const c = document.getElementById('chart'), g = c.getContext('2d');
            const d = g.getImageData(Math.floor(c.width * 0.9), 0, Math.ceil(c.width * 0.1), c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;""")
        self.assertGreater(painted, 500)                                  # the recent bars
        self.screenshot("monitor-wide-light")

    def test_small_things_on_a_phone_and_in_the_dark(self):
        gw = bg.GatewayServer(bg.Config(upstream=[self.demo.url], port=0, timeout=10)).start()
        self.addCleanup(gw.stop)                           # its first request: the page's models
        for size, dark in (("narrow", True), ("wide", False)):
            with self.subTest(size=size):
                self.viewport(size, dark)
                self.driver.get(gw.url + "/")
                self.models_loaded()
                for css in ("#model", "#key"):             # the model id, the key's placeholder
                    self.js("document.getElementById('keyform').hidden = false")
                    width, room = self.fits(css)
                    self.assertLessEqual(width, room, css)
                self.js("document.getElementById('keyform').hidden = true")
                self.assertEqual(self.js("return document.querySelector('header').offsetHeight < 50"), True)
                self.js("""window.drawn = [];
                    const fill = CanvasRenderingContext2D.prototype.fillText;
                    CanvasRenderingContext2D.prototype.fillText = function (t, ...rest) {
                        drawn.push(t); return fill.call(this, t, ...rest); };""")
                self.find("#tab-monitor")[0].click()
                self.wait(lambda: self.find("#m-requests b"), "no monitor numbers")
                if size == "narrow":
                    self.assertEqual((self.text("#m-requests b"), self.js("return drawn[0]")), ("1", "1 request"))
                self.assertRegex(self.js("return drawn[0]"), r"^(1 request|([02-9]|\d\d+) requests)$")
                d = json.loads(request(gw.url, "GET", "/v1/dashboard")[2])    # long values
                d["recent"]["latency"], d["recent"]["ttft"] = {"p50": 12.345, "p95": 123.456}, {"p50": 0.5, "p95": 1}
                pieces = self.js("""polls++; clearTimeout(timer); draw(arguments[0]);
                    return [...document.querySelectorAll('.card b')].flatMap(b => {
                        const t = b.firstChild, s = t.textContent; let at = 0;
                        return s.split(' / ').map(p => { const r = document.createRange();
                            r.setStart(t, at); r.setEnd(t, at + p.length); at += p.length + 3;
                            return [p, new Set([...r.getClientRects()].map(x => Math.round(x.top))).size]; }); })""", d)
                self.assertEqual({n for _, n in pieces}, {1}, pieces)      # "12.35 s" kept whole
                self.assertIn(["123.46\xa0s", 1], pieces)
                pieces = self.js("""return [...document.querySelectorAll('.url')].flatMap(u =>
                    [...u.childNodes].filter(n => n.nodeType === 3).map(n => {
                        const r = document.createRange(); r.selectNodeContents(n);
                        return [n.textContent, r.getClientRects().length]; }))""")
                self.assertEqual([n for _, n in pieces], [1] * len(pieces), pieces)   # not broken
                self.assertEqual("".join(p for p, _ in pieces), gw.backend.routes[
                    bg.DEFAULT_MODEL].pool.replicas[0].client.base_url)
                self.assertFalse(self.js("return document.documentElement.scrollWidth > innerWidth"))
                self.screenshot("monitor-%s-%s" % (size, "dark" if dark else "light"))


if __name__ == "__main__":
    unittest.main()
