"""Waste workload: what tokenguard saves a simulated organisation, metered by the server.

A deterministic organisation (seeded) runs one "day" against a loopback fake API twice: once
with the bare SDKs (``openai.OpenAI`` / ``anthropic.Anthropic`` with their default
``max_retries=2``), once with ``tokenguard.OpenAI`` / ``tokenguard.Anthropic`` behind one
``Guard``. The application code is the same in both runs: it sets ``tokenguard.scope(user=...)``
and catches every exception the way the app would (a refusal from tokenguard is just another
error to it, and the retry-happy parts of the app retry it too).

**The server meters the bill.** It answers ``/v1/chat/completions`` and ``/v1/messages`` with
usage computed from the request (input = characters / 4 plus framing; output a deterministic
fraction, 40-100%, of ``max_tokens``), and for every answer it generated it adds the price of
that usage (``genai_prices.calc_price``, exact ``Decimal``) to its own meter, per ``x-user`` and
``x-scenario`` header. An answer the client timed out on is billed too (the vendor generated
it); a 429 is not. All money below is the server's meter, never tokenguard's ledger.

**The day.** Every actor runs at once, in threads (a user waits for each answer):

- legit: N users, each a session of distinct chat questions (sampled, temperature 1, a
  system prompt carrying the current time; a few questions asked twice), plus a batch bot:
  tickets with sequential ids and their own text, and orders with jumping ids and identical
  text (items of a batch: they must not look like a loop);
- 1 duplicates: the same users ask an FAQ bot (temperature=0) the same few questions;
- 2a retry-click, bad answer: a user asks for JSON; the answer never parses; they click retry;
- 2b retry-click, timeout: a long report the server takes longer to write than the app waits
  for; the SDK retries each timeout, the user clicks retry; every attempt is billed;
- 3 stuck job: a background job sends the same request hundreds of times;
- 4a counter loop: an agent retries with "Attempt 1", "Attempt 2", ... in its prompt;
- 4b clock loop: an on-call agent (Anthropic) puts the current time in each prompt;
- 5 429 storm: the server answers 429 (``retry-after-ms``) to every request for one model
  for longer than anyone's patience; the app retries each call 5 times on any error,
  around the SDK's own 3 attempts (up to 15 requests a call). After it: a few new calls at
  once (during the circuit breaker's cool-down) and, later, some of the caught requests sent
  again and new recovery calls (these must be answered);
- 6 heavy user: one user sends far more than anyone else (full run: 500 calls with 16 KB
  documents, against 18 short ones for an ordinary user), and re-tries each failed call twice.

**The guard** (what an organisation would configure; times compressed with everything else):
``Cache(backend="memory")`` with the default rule — only temperature=0 / seed requests are
cached, not ``cache_all``: the chat assistant samples on purpose, a regenerate must give a new
answer (docs/cache.md); the FAQ bot and the batch jobs run at temperature 0.
``Retry()`` with its defaults (4 attempts, retry budget 20%) and a ``CircuitBreaker(5, 30 s)``;
``Budget($1/day, per="user")`` and a shared ``Budget($30/day)``; ``LoopDetector()`` with its
defaults (3 repeats in 600 s, normalized). Every call sets ``max_tokens`` (docs/budgets.md:
without it a call reserves the model's whole context window, $1.28 on gpt-4o).

Prompts carry times near the current hour (a chat system prompt, the clock loop), so the
dollar figures move slightly from one invocation to the next; both runs of one invocation
send the same requests.

**Time** is compressed (``--quick``: 20x, else 10x): the SDKs' backoff sleeps (their attempts
are unchanged), tokenguard's delays, cool-down and windows, the server's ``retry-after`` and
delays, the app's pauses. The loop detector's window and cool-down are left at their defaults:
the whole day fits in them.

**Checks** (exit status 1 when one fails; never for a missed savings target):
- false blocks: every call the users needed answered (legit, duplicates, storm recovery) gets
  the same answer in the guarded run as in the unguarded one (0 allowed);
- overshoot: the server-metered spend of each capped scope (each user; everyone) is within
  its cap (0 allowed; skipped if the run crossed midnight UTC, when daily caps reset);
- sanity: those calls were all answered in the unguarded run; nothing raised an exception
  that is neither the vendor's, tokenguard's nor the app's own; tokenguard logged no error.

Also reported, not checked: tokenguard's own ledger against the server's meter (attempts
against requests received, its spend against the bill, its refusals against those the app saw).

Target (issue 11): >= 90% of the total spend cut. The legit workload's spend, and the heavy
user's allowance under the cap, remain; the report says which rows limit the saving.

Run: ``python bench/bench_waste.py`` (``--quick``, ``--json PATH``, ``--seed``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import openai
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price

import tokenguard

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

# -- the organisation's size -------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """How big the day is, and how fast its clock runs."""

    users: int = 20
    chats: int = 12  # legit chat questions per user
    faq_asks: int = 6  # FAQ questions per user (scenario 1)
    faqs: int = 6  # distinct FAQ questions
    tickets: int = 40  # batch items with sequential ids and their own text
    orders: int = 20  # batch items with jumping ids and identical text
    clicks: int = 10  # retry clicks per clicking user (scenario 2)
    stuck: int = 400  # iterations of the stuck job (scenario 3)
    counter: int = 200  # iterations of each counter / clock loop (scenario 4)
    storm_calls: int = 16  # calls caught in the 429 storm (scenario 5)
    heavy_docs: int = 500  # documents the heavy user sends (scenario 6)
    per_user_usd: Decimal = Decimal("1.00")
    shared_usd: Decimal = Decimal("30.00")
    time_scale: float = 0.1  # one simulated second lasts this long


FULL = Size()
QUICK = Size(
    users=6,
    chats=4,
    faq_asks=3,
    faqs=3,
    tickets=10,
    orders=6,
    clicks=6,
    stuck=60,
    counter=40,
    storm_calls=6,
    heavy_docs=80,
    per_user_usd=Decimal("0.25"),
    shared_usd=Decimal("5.00"),
    time_scale=0.05,
)

CHAT_MODEL = "gpt-4o"
REPORT_MODEL = "gpt-4.1"  # the long-report feature (scenario 2b)
STORM_MODEL = "gpt-4o-mini"  # the autocomplete feature (scenario 5)
CLAUDE_MODEL = "claude-haiku-4-5"  # the on-call agent (scenario 4b)

# scenario id (the x-scenario header) -> the row's label, in table order
SCENARIOS = {
    "legit": "legit workload",
    "dup": "1 duplicate questions",
    "click-json": "2a retry-click, bad answer",
    "click-timeout": "2b retry-click, timeout",
    "stuck": "3 stuck job",
    "counter": "4a counter loop",
    "clock": "4b clock loop",
    "storm": "5 429 storm",
    "heavy": "6 heavy user",
}
WASTE = tuple(s for s in SCENARIOS if s != "legit")


# -- the fake API, which meters its own bill ---------------------------------------------------


@dataclass
class Tally:
    """What the server did for one (scenario, user)."""

    requests: int = 0
    billed: int = 0  # answers generated (and billed), a timed-out one included
    rate_limited: int = 0
    usd: Decimal = Decimal(0)


class FakeAPI(ThreadingHTTPServer):
    """A loopback OpenAI + Anthropic API that bills what it answers (``tallies``)."""

    daemon_threads = True
    request_queue_size = 256  # the default listen backlog (5) drops connections when every actor calls at once

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.retry_after_ms = retry_after_ms
        self.lock = threading.Lock()
        self.tallies: defaultdict[tuple[str, str], Tally] = defaultdict(Tally)
        self.storm_models: set[str] = set()
        self.in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def arrived(self, scenario: str, user: str) -> Tally:
        with self.lock:
            t = self.tallies[(scenario, user)]
            t.requests += 1
            self.in_flight += 1
            return t

    def done(self, t: Tally, *, usd: Decimal | None = None, rate_limited: bool = False) -> None:
        with self.lock:
            t.rate_limited += rate_limited
            if usd is not None:
                t.billed += 1
                t.usd += usd
            self.in_flight -= 1

    def meter(self, timeout_s: float = 30.0) -> dict[tuple[str, str], Tally]:
        """The bill, once every request received is finished (a timed-out one is still
        being written, and billed, after its client has gone)."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            if self.in_flight:
                raise RuntimeError(f"{self.in_flight} requests still in flight after {timeout_s}s")
            return {key: replace(t) for key, t in self.tallies.items()}


def _prompt_text(vendor: str, body: dict[str, Any]) -> str:
    parts = [body.get("system") or ""] if vendor == "anthropic" else []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


def answer_of(vendor: str, body: dict[str, Any]) -> tuple[int, int, str]:
    """The usage and the text the server answers ``body`` with: a function of the request
    (never of who sent it), so the same request always gets the same answer."""
    text = _prompt_text(vendor, body)
    messages = len(body.get("messages") or [])
    input_tokens = math.ceil(len(text) / 4) + 3 * messages + 3
    digest = hashlib.sha256(json.dumps([body.get("model"), text], sort_keys=True).encode()).digest()
    limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or 4096)
    output_tokens = max(1, min(limit, round(limit * (0.4 + 0.6 * digest[0] / 255))))
    return input_tokens, output_tokens, f"answer-{digest[:8].hex()}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms Nagle stall
    server: FakeAPI

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        vendor = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}.get(self.path)
        if vendor is None:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        tally = self.server.arrived(self.headers.get("x-scenario", "-"), self.headers.get("x-user", "-"))
        bill: dict[str, Any] = {}
        try:
            self._respond(vendor, body, bill)
        finally:  # the meter counts every request it received as finished, whatever happened
            self.server.done(tally, usd=bill.get("usd"), rate_limited=bill.get("rate_limited", False))

    def _respond(self, vendor: str, body: dict[str, Any], bill: dict[str, Any]) -> None:
        model = str(body.get("model"))
        if model in self.server.storm_models:
            bill["rate_limited"] = True
            wait = self.server.retry_after_ms
            error = {
                "message": f"Rate limit reached for {model} on requests per min (RPM). Please try again in {wait}ms.",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
            if vendor == "anthropic":
                error = {"type": "rate_limit_error", "message": error["message"]}
            self._send(429, {"type": "error", "error": error}, {"retry-after-ms": str(wait)})
            return
        input_tokens, output_tokens, text = answer_of(vendor, body)
        delay_ms = int(self.headers.get("x-sim-delay-ms", "0"))
        if delay_ms:
            time.sleep(delay_ms / 1000)  # writing a long answer
        price = calc_price(
            PriceUsage(input_tokens=input_tokens, output_tokens=output_tokens), model_ref=model, provider_id=vendor
        ).total_price
        bill["usd"] = price  # generated, so billed, whether or not the client waits for it
        if vendor == "openai":
            payload: dict[str, Any] = {
                "id": "chatcmpl-waste",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "logprobs": None,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                    }
                ],
                "usage": {
                    "prompt_tokens": input_tokens,
                    "completion_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens,
                },
            }
        else:
            payload = {
                "id": "msg_waste",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            }
        self._send(200, payload)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client timed out and left; it is billed all the same

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serving(retry_after_ms: int) -> Iterator[FakeAPI]:
    server = FakeAPI(retry_after_ms)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- the bare SDKs, their backoff compressed like every other time ------------------------------


def _compressed(timeout: float, asked: float | None, scale: float) -> float:
    # a server-given Retry-After is already on the compressed clock; the SDK's own backoff is not
    return timeout if asked is not None and math.isclose(timeout, asked) else timeout * scale


class BareOpenAI(openai.OpenAI):
    """``openai.OpenAI`` with its default retries; only its backoff sleeps are compressed."""

    time_scale = 0.1

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any, response_headers: Any = None) -> float:
        timeout = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
        return _compressed(timeout, self._parse_retry_after_header(response_headers), self.time_scale)


class BareAnthropic(anthropic.Anthropic):
    """``anthropic.Anthropic`` with its default retries; only its backoff sleeps are compressed."""

    time_scale = 0.1

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any, response_headers: Any = None) -> float:
        timeout = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
        return _compressed(timeout, self._parse_retry_after_header(response_headers), self.time_scale)


# -- the script of the day (the same for both runs) ---------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One request the application makes."""

    id: str  # stable across runs: the key the two runs' answers are compared by
    scenario: str
    user: str
    must: bool  # a call its user needs answered (legit, duplicates, storm recovery)
    prompt: str
    model: str = CHAT_MODEL
    system: str | None = None
    max_tokens: int = 400
    temperature: float | None = None  # None: the API's default (sampled)
    vendor: str = "openai"
    timeout_s: float | None = None
    delay_ms: int = 0  # how long the server takes to write the answer
    expect_json: bool = False


_VOCABULARY = (
    "the quarterly revenue customer contract renewal shipment invoice warehouse latency service "
    "report region compliance audit budget forecast supplier delivery discount policy refund "
    "account migration database outage incident ticket priority escalation review approval team "
    "schedule deadline milestone release feature roadmap pricing margin inventory order payment "
    "and of to in for with on by from after before under over about against between during "
    "increase decrease stable risk issue change request update summary detail note action owner"
)

FAQS = (
    "How do I reset my VPN password?",
    "What is the travel expense limit for a hotel night?",
    "How many vacation days do new employees get?",
    "How do I request a new laptop?",
    "Where do I find the holiday calendar for this year?",
    "How do I add a colleague to the shared drive?",
    "What is the process to report a security incident?",
    "How do I book a meeting room for more than ten people?",
)
FAQ_SYSTEM = "You are the Acme HR and IT helpdesk bot. Answer from the handbook, briefly."
CHAT_TOPICS = (
    "Draft a reply to {name} about the delayed shipment for order {n}.",
    "Summarize these meeting notes for the {dept} team.",
    "Rewrite this paragraph for a customer-facing announcement.",
    "List the action items in this email thread from {name}.",
    "Explain the variance in the {dept} budget in plain words.",
    "Suggest three subject lines for the newsletter about {dept}.",
    "Translate this note for our supplier in {city} into French.",
    "Write a polite reminder to {name} about invoice {n}.",
)
NAMES = ("Dana", "Omar", "Lena", "Kofi", "Mei", "Ravi", "Sofia", "Tom")
DEPTS = ("sales", "finance", "logistics", "support", "marketing", "platform")
CITIES = ("Lyon", "Porto", "Gdansk", "Osaka", "Austin", "Nairobi")


class Script:
    """The day's requests, from one seed."""

    def __init__(self, size: Size, seed: int) -> None:
        self.size = size
        self.rng = rng = random.Random(seed)
        words = _VOCABULARY.split()
        self.corpus = " ".join(rng.choice(words) for _ in range(40_000))
        # the day's clock: prompts carry simulated times near now (a clock, not another item)
        self.day_start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.users = [f"u{i:02d}" for i in range(1, size.users + 1)]

    def text(self, chars: int) -> str:
        start = self.rng.randrange(0, len(self.corpus) - chars)
        return self.corpus[start : start + chars]

    def stamp(self, seconds: float) -> str:
        return (self.day_start + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def legit_session(self, user: str) -> list[Spec]:
        """A user's chats and FAQ questions, interleaved."""
        rng, size = self.rng, self.size
        chats: list[tuple[str, str]] = []
        for _ in range(size.chats):
            if chats and rng.random() < 0.15:  # asked again (sampled: a new answer is wanted) ...
                again = rng.choice(chats)
                if chats.count(again) < 2:  # ... but not three times: four in ten minutes is a loop
                    chats.append(again)
                    continue
            topic = rng.choice(CHAT_TOPICS).format(
                name=rng.choice(NAMES), dept=rng.choice(DEPTS), city=rng.choice(CITIES), n=rng.randrange(10_000, 99_999)
            )
            chats.append((topic, self.text(rng.randrange(400, 2400))))
        weights = [1 / (rank + 1) for rank in range(size.faqs)]
        asked: Counter[int] = Counter()
        faqs: list[int] = []
        while len(faqs) < size.faq_asks:
            q = rng.choices(range(size.faqs), weights=weights)[0]
            if asked[q] < 2:  # people ask the same thing twice, not four times
                asked[q] += 1
                faqs.append(q)
        steps: list[Spec] = []
        for k, (topic, context) in enumerate(chats):
            system = f"You are Acme's internal assistant. Current time: {self.stamp(k * 47 + rng.randrange(40))}."
            steps.append(Spec(f"{user}/chat{k}", "legit", user, True, f"{topic}\n\n{context}", system=system))
        for k, q in enumerate(faqs):
            spec = Spec(f"{user}/faq{k}", "dup", user, True, FAQS[q], system=FAQ_SYSTEM, max_tokens=300, temperature=0)
            steps.insert(rng.randrange(len(steps) + 1), spec)
        return steps

    def batch(self) -> list[Spec]:
        rng, size = self.rng, self.size
        specs = [
            Spec(
                f"batch/ticket{i}",
                "legit",
                "batch-bot",
                True,
                f"Summarize support ticket #{4310 + i} in two sentences.\n\n{self.text(rng.randrange(600, 1500))}",
                max_tokens=200,
                temperature=0,
            )
            for i in range(size.tickets)
        ]
        ids = [rng.randrange(100_000, 999_999)]
        while len(ids) < size.orders:
            n = rng.randrange(100_000, 999_999)
            if abs(n - ids[-1]) > 1 and n not in ids:  # another order, never the next number
                ids.append(n)
        specs += [
            Spec(
                f"batch/order{i}",
                "legit",
                "batch-bot",
                True,
                f"Classify the complaint about order #{n} as shipping, product, payment or other.\n\n"
                "Complaint: the parcel arrived three days late and the box was damaged.",
                max_tokens=20,
                temperature=0,
            )
            for i, n in enumerate(ids)
        ]
        return specs

    def click_json(self) -> Spec:
        return Spec(
            "click/json",
            "click-json",
            self.users[2 % len(self.users)],
            False,
            "Extract vendor, total and due_date from this invoice as a JSON object.\n\n" + self.text(1200),
            max_tokens=300,
            expect_json=True,
        )

    def click_timeout(self) -> Spec:
        scale = self.size.time_scale
        return Spec(
            "click/timeout",
            "click-timeout",
            self.users[6 % len(self.users)],
            False,
            "Write the full quarterly compliance report for region EMEA from these notes.\n\n" + self.text(3000),
            model=REPORT_MODEL,
            max_tokens=2000,
            timeout_s=2.0 * scale,  # the app waits 2 s ...
            delay_ms=round(5000 * scale),  # ... the server needs 5 s to write it
        )

    def stuck(self) -> Spec:
        return Spec(
            "stuck",
            "stuck",
            "etl-job",
            False,
            "Translate this product catalogue entry into German.\n\n" + self.text(2000),
            max_tokens=600,
        )

    def counter_loop(self) -> list[Spec]:
        logs = self.text(1500)
        return [
            Spec(
                f"counter/{n}",
                "counter",
                "ops-agent",
                False,
                f"Attempt {n}: the nightly export failed again with 'disk quota exceeded on /var/export'. "
                f"Last log lines:\n{logs}\nFix the configuration and run the export again.",
                system="You are an autonomous operations agent.",
                max_tokens=500,
            )
            for n in range(1, self.size.counter + 1)
        ]

    def clock_loop(self) -> list[Spec]:
        metrics = self.text(1200)
        start = 3600 * 2
        return [
            Spec(
                f"clock/{i}",
                "clock",
                "oncall-agent",
                False,
                f"[{self.stamp(start + 30 * i)}] Health check: service payments is DEGRADED. "
                f"Diagnose it from these metrics and restart what is needed.\n{metrics}",
                model=CLAUDE_MODEL,
                vendor="anthropic",
                system="You are the on-call assistant.",
                max_tokens=400,
            )
            for i in range(self.size.counter)
        ]

    def storm(self) -> dict[str, list[Spec]]:
        """The storm's calls, by group: caught in it; made right after it ends (during the
        breaker's cool-down); and, later, caught ones sent again (the same request) and new
        calls (recovery: these must be answered)."""

        def calls(group: str, n: int, must: bool) -> list[Spec]:
            return [
                Spec(
                    f"storm/{group}{i}",
                    "storm",
                    self.users[i % len(self.users)],
                    must,
                    f"Complete this sentence for the user: '{self.text(self.rng.randrange(60, 200))}'",
                    model=STORM_MODEL,
                    max_tokens=60,
                )
                for i in range(n)
            ]

        k, quarter = self.size.storm_calls, max(1, self.size.storm_calls // 4)
        caught = calls("caught", k, False)
        resent = [replace(spec, id=f"storm/resent{i}") for i, spec in enumerate(caught[:quarter])]
        return {
            "caught": caught,
            "after": calls("after", quarter, False),
            "resent": resent,
            "recovery": calls("recovery", k, True),
        }

    def heavy(self) -> list[Spec]:
        return [
            Spec(
                f"heavy/{i}",
                "heavy",
                "u-heavy",
                False,
                f"Review contract C-{self.rng.randrange(10**6, 10**7)} clause by clause and list every risk.\n\n"
                + self.text(16_000),
                max_tokens=1200,
                temperature=0,
            )
            for i in range(self.size.heavy_docs)
        ]


# -- the application (the same code in both runs) -----------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one call gave the application: ``"ok"``, or the exception's class name."""

    spec: Spec
    result: str
    answer: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "ok"


_TOKENGUARD_ERRORS = (tokenguard.TokenguardError,)
_VENDOR_ERRORS = (openai.APIError, anthropic.APIError)


@dataclass
class App:
    """The organisation's code: it calls the clients, and reacts to failures as people and
    programs do. Every call it makes, and every request its users wanted, is recorded."""

    oa: Any
    an: Any
    calls: list[Outcome] = field(default_factory=list)
    wanted: list[Outcome] = field(default_factory=list)  # the final outcome of each request
    unexpected: list[str] = field(default_factory=list)

    def call(self, spec: Spec) -> Outcome:
        headers = {"x-user": spec.user, "x-scenario": spec.scenario}
        if spec.delay_ms:
            headers["x-sim-delay-ms"] = str(spec.delay_ms)
        options: dict[str, Any] = {"extra_headers": headers}
        if spec.timeout_s is not None:
            options["timeout"] = spec.timeout_s
        if spec.temperature is not None:
            options["temperature"] = spec.temperature
        with tokenguard.scope(user=spec.user):
            try:
                if spec.vendor == "anthropic":
                    if spec.system is not None:
                        options["system"] = spec.system
                    message = self.an.messages.create(
                        model=spec.model,
                        max_tokens=spec.max_tokens,
                        messages=[{"role": "user", "content": spec.prompt}],
                        **options,
                    )
                    answer = message.content[0].text
                else:
                    messages = [{"role": "system", "content": spec.system}] if spec.system else []
                    messages.append({"role": "user", "content": spec.prompt})
                    completion = self.oa.chat.completions.create(
                        model=spec.model, max_tokens=spec.max_tokens, messages=messages, **options
                    )
                    answer = completion.choices[0].message.content or ""
                if spec.expect_json:
                    json.loads(answer)
                outcome = Outcome(spec, "ok", answer)
            except json.JSONDecodeError:
                outcome = Outcome(spec, "unparsable answer")
            except Exception as exc:
                if not isinstance(exc, _TOKENGUARD_ERRORS + _VENDOR_ERRORS):
                    self.unexpected.append(f"{spec.id}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
                outcome = Outcome(spec, type(exc).__name__)
        self.calls.append(outcome)
        return outcome

    def once(self, spec: Spec) -> Outcome:
        outcome = self.call(spec)
        self.wanted.append(outcome)
        return outcome

    def persist(self, spec: Spec, tries: int, pause_s: float) -> Outcome:
        """Call again on any error, up to ``tries`` times (what a 'retry' loop or a user's
        'retry' button does: it does not read the error)."""
        for attempt in range(tries):
            outcome = self.call(spec)
            if outcome.ok:
                break
            if attempt + 1 < tries:
                time.sleep(pause_s)
        self.wanted.append(outcome)
        return outcome

    def loop(self, specs: list[Spec]) -> None:
        """A stuck job or agent: it sends each of ``specs`` whatever happens."""
        for spec in specs:
            self.call(spec)


@dataclass(frozen=True)
class Plan:
    """Every request of the day, drawn once from the seed, replayed by both runs."""

    size: Size
    sessions: list[list[Spec]]
    batch: list[Spec]
    click_json: Spec
    click_timeout: Spec
    stuck: Spec
    counter: list[Spec]
    clock: list[Spec]
    storm: dict[str, list[Spec]]
    heavy: list[Spec]

    @classmethod
    def draw(cls, size: Size, seed: int) -> Plan:
        script = Script(size, seed)
        return cls(
            size=size,
            sessions=[script.legit_session(user) for user in script.users],
            batch=script.batch(),
            click_json=script.click_json(),
            click_timeout=script.click_timeout(),
            stuck=script.stuck(),
            counter=script.counter_loop(),
            clock=script.clock_loop(),
            storm=script.storm(),
            heavy=script.heavy(),
        )


def day(app: App, plan: Plan, server: FakeAPI) -> None:
    """Every actor of the organisation's day, at once."""
    size, scale = plan.size, plan.size.time_scale

    def session(specs: list[Spec]) -> Callable[[], None]:
        def actor() -> None:
            for spec in specs:  # a person waits for each answer before asking the next
                app.once(spec)

        return actor

    def clicking(spec: Spec) -> Callable[[], object]:
        return lambda: app.persist(spec, size.clicks, 1.0 * scale)  # a second between clicks

    def at_once(specs: list[Spec]) -> None:
        with ThreadPoolExecutor(len(specs)) as pool:
            list(pool.map(lambda s: app.persist(s, tries=5, pause_s=3.0 * scale), specs))

    def storm() -> None:
        server.storm_models.add(STORM_MODEL)
        at_once(plan.storm["caught"])
        server.storm_models.discard(STORM_MODEL)  # the storm outlasted everyone's patience; it ends now
        at_once(plan.storm["after"])
        time.sleep(40.0 * scale)  # users come back later (after the breaker's 30 s cool-down)
        at_once(plan.storm["resent"] + plan.storm["recovery"])  # the same requests again, and new ones

    def heavy() -> None:
        for spec in plan.heavy:
            app.persist(spec, 3, 0.0)

    actors: list[Callable[[], Any]] = [session(specs) for specs in plan.sessions]
    actors += [
        session(plan.batch),
        clicking(plan.click_json),
        clicking(plan.click_timeout),
        lambda: app.loop([plan.stuck] * size.stuck),
        lambda: app.loop(plan.counter),
        lambda: app.loop(plan.clock),
        storm,
        heavy,
    ]
    with ThreadPoolExecutor(len(actors)) as pool:
        for future in [pool.submit(actor) for actor in actors]:
            future.result()


# -- the two runs ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of the day: what the app saw, what the server billed."""

    app: App
    tallies: dict[tuple[str, str], Tally]
    wall_s: float
    stats: Any = None  # the guard's own stats (guarded run)
    alerts: int = 0
    log_records: Counter[str] = field(default_factory=Counter)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def guard_for(size: Size, alerts: list[tokenguard.Alert]) -> tokenguard.Guard:
    scale = size.time_scale
    return tokenguard.Guard(
        store="memory://",
        cache=tokenguard.Cache(backend="memory"),
        retry=tokenguard.Retry(
            initial_delay_s=0.5 * scale,
            max_delay_s=30 * scale,
            deadline_s=120 * scale,
            retry_budget_window_s=60 * scale,
            circuit_breaker=tokenguard.CircuitBreaker(failures=5, cool_down_s=30 * scale),
        ),
        budgets=[
            tokenguard.Budget(limit_usd=size.per_user_usd, period="day", per="user"),
            tokenguard.Budget(limit_usd=size.shared_usd, period="day"),
        ],
        loops=tokenguard.LoopDetector(),
        on_alert=alerts.append,
    )


def run(plan: Plan, guarded: bool) -> Run:
    size = plan.size
    with serving(retry_after_ms=round(1000 * size.time_scale)) as server:
        key = "sk-waste-bench"
        if guarded:
            alerts: list[tokenguard.Alert] = []
            guard = guard_for(size, alerts)
            oa: Any = tokenguard.OpenAI(api_key=key, base_url=f"{server.url}/v1", guard=guard)
            an: Any = tokenguard.Anthropic(api_key=key, base_url=server.url, guard=guard)
        else:
            oa = BareOpenAI(api_key=key, base_url=f"{server.url}/v1")
            an = BareAnthropic(api_key=key, base_url=server.url)
            oa.time_scale = an.time_scale = size.time_scale
        app = App(oa, an)
        logger = logging.getLogger("tokenguard")
        collect, propagate = _Collect(), logger.propagate
        logger.addHandler(collect)
        logger.propagate = False  # the day's warnings (circuit, budgets) are counted, not printed
        start = time.perf_counter()
        try:
            day(app, plan, server)
        finally:
            wall = time.perf_counter() - start
            logger.removeHandler(collect)
            logger.propagate = propagate
        result = Run(app, server.meter(), wall)
        if guarded:
            guard.flush()
            result.stats = guard.stats()
            result.alerts = len(alerts)
            guard.close()
        oa.close()
        an.close()
    for record in collect.records:
        if record.levelno >= logging.WARNING:
            result.log_records[f"{record.levelname}: {' '.join(str(record.msg).split()[:5])}"] += 1
        if record.levelno >= logging.ERROR:
            result.app.unexpected.append(f"tokenguard logged {record.levelname}: {record.getMessage()}")
    return result


# -- the report ----------------------------------------------------------------------------------


def _usd(tallies: dict[tuple[str, str], Tally], scenario: str | None = None, user: str | None = None) -> Decimal:
    return sum(
        (t.usd for (s, u), t in tallies.items() if (scenario is None or s == scenario) and (user is None or u == user)),
        Decimal(0),
    )


def _requests(tallies: dict[tuple[str, str], Tally], scenarios: tuple[str, ...]) -> int:
    return sum(t.requests for (s, _), t in tallies.items() if s in scenarios)


def _saved(before: Decimal, after: Decimal) -> float | None:
    return float((before - after) / before) if before else None


def compare(size: Size, bare: Run, guarded: Run, crossed_midnight: bool) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    groups = {**{s: (s,) for s in SCENARIOS}, "waste (1-6)": WASTE, "total": tuple(SCENARIOS)}
    for name, members in groups.items():
        u = sum((_usd(bare.tallies, s) for s in members), Decimal(0))
        g = sum((_usd(guarded.tallies, s) for s in members), Decimal(0))
        refused = Counter(
            o.result
            for o in guarded.app.calls
            if o.spec.scenario in members and o.result in ("LoopDetected", "BudgetExceeded", "CircuitOpen")
        )
        rows[name] = {
            "label": SCENARIOS.get(name, name),
            "calls_unguarded": sum(o.spec.scenario in members for o in bare.app.calls),
            "calls_guarded": sum(o.spec.scenario in members for o in guarded.app.calls),
            "requests_unguarded": _requests(bare.tallies, members),
            "requests_guarded": _requests(guarded.tallies, members),
            "usd_unguarded": u,
            "usd_guarded": g,
            "saved": _saved(u, g),
            "refused_guarded": dict(refused),
        }

    # false blocks: every request its user needed, answered the same in both runs
    before = {o.spec.id: o for o in bare.app.wanted if o.spec.must}
    after = {o.spec.id: o for o in guarded.app.wanted if o.spec.must}
    not_answered_unguarded = sorted(i for i, o in before.items() if not o.ok)
    false_blocks = [
        f"{i}: {after[i].result if i in after else 'never made'}"
        + ("" if i not in after or not after[i].ok else " (another answer)")
        for i in sorted(before)
        if i not in after or not after[i].ok or after[i].answer != before[i].answer
    ]
    must_by_scenario = Counter(o.spec.scenario for o in before.values())

    # overshoot: each capped scope's metered spend against its cap
    spend_by_user: defaultdict[str, Decimal] = defaultdict(Decimal)
    for (_, user), t in guarded.tallies.items():
        spend_by_user[user] += t.usd
    top_user = max(spend_by_user, key=lambda u: spend_by_user[u])
    total_guarded = sum(spend_by_user.values(), Decimal(0))
    over_user = {u: s - size.per_user_usd for u, s in spend_by_user.items() if s > size.per_user_usd}
    over_shared = max(total_guarded - size.shared_usd, Decimal(0))
    unguarded_over = sorted({u for (_, u) in bare.tallies if _usd(bare.tallies, user=u) > size.per_user_usd})

    def storm_answered(r: Run) -> Counter[str]:
        return Counter(
            o.spec.id.split("/")[1].rstrip("0123456789") for o in r.app.wanted if o.spec.scenario == "storm" and o.ok
        )

    answered = storm_answered(bare), storm_answered(guarded)
    storm = {
        group: {
            "calls": sum(o.spec.id.startswith(f"storm/{group}") for o in bare.app.wanted),
            "answered": [a[group] for a in answered],
        }
        for group in ("caught", "after", "resent", "recovery")
    }

    stats = guarded.stats
    return {
        "rows": rows,
        "false_blocks": false_blocks,
        "must_answer": dict(must_by_scenario),
        "not_answered_unguarded": not_answered_unguarded,
        "overshoot": {
            "per_user_cap_usd": size.per_user_usd,
            "top_user": top_user,
            "top_user_usd": spend_by_user[top_user],
            "users_over_cap": {u: str(v) for u, v in over_user.items()},
            "shared_cap_usd": size.shared_usd,
            "total_usd": total_guarded,
            "shared_overshoot_usd": over_shared,
            "users_over_cap_unguarded": unguarded_over,
            "checked": not crossed_midnight,
        },
        "storm": storm,
        "ledger": {
            "attempts": stats.attempts,
            "server_requests": _requests(guarded.tallies, tuple(SCENARIOS)),
            "spent_usd": stats.spent_usd,
            "server_usd": total_guarded,
            "estimated_calls": stats.estimated_calls,
            "cache_hits": stats.cache_hits,
            "loops_blocked": stats.loops_blocked,
            "budget_blocks": stats.budget_blocks,
            "blocked": stats.blocked,
            "refusals_seen_by_app": sum(
                o.result in ("LoopDetected", "BudgetExceeded", "CircuitOpen") for o in guarded.app.calls
            ),
            "retries": stats.retries,
            "alerts": guarded.alerts,
            "warnings": dict(guarded.log_records),
        },
        "unexpected": bare.app.unexpected + guarded.app.unexpected,
        "wall_s": [bare.wall_s, guarded.wall_s],
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_report(size: Size, r: dict[str, Any], wall: float) -> None:
    head = (
        f"{'scenario':28} {'calls U':>7} {'calls G':>7} {'req U':>6} {'req G':>6} "
        f"{'$ unguarded':>11} {'$ guarded':>10} {'saved':>6}  refused by tokenguard (G)"
    )
    print(head)
    print("-" * len(head))
    for name, row in r["rows"].items():
        if name == "waste (1-6)":
            print("-" * len(head))
        refused = ", ".join(f"{k} {v}" for k, v in sorted(row["refused_guarded"].items())) or "-"
        print(
            f"{row['label']:28} {row['calls_unguarded']:>7} {row['calls_guarded']:>7} {row['requests_unguarded']:>6} "
            f"{row['requests_guarded']:>6} {row['usd_unguarded']:>11.4f} {row['usd_guarded']:>10.4f} "
            f"{_pct(row['saved']):>6}  {refused}"
        )
    total, waste = r["rows"]["total"], r["rows"]["waste (1-6)"]
    guarded_total = total["usd_guarded"]
    print()
    met = total["saved"] is not None and total["saved"] >= 0.9
    print(
        f"savings: {_pct(total['saved'])} of the total spend cut (target >= 90%: {'met' if met else 'NOT met'}); "
        f"{_pct(waste['saved'])} of the waste scenarios' spend"
    )
    shares = sorted(
        ((row["usd_guarded"], row["label"]) for name, row in r["rows"].items() if name in SCENARIOS),
        reverse=True,
    )
    parts = [f"{label} ${usd:.4f} ({usd / guarded_total:.0%})" for usd, label in shares[:3] if guarded_total]
    print(f"  what the guarded run still pays: {'; '.join(parts)}")
    why = {
        "caught": "the storm outlasts the app's 5 tries",
        "after": "made as the storm ends: the breaker's cool-down",
        "resent": "the caught requests sent again later: the loop detector",
        "recovery": "new requests later",
    }
    groups = "; ".join(
        f"{group} {g['answered'][0]}/{g['answered'][1]} of {g['calls']} ({why[group]})"
        for group, g in r["storm"].items()
    )
    print(
        f"  429 storm, calls answered unguarded/guarded: {groups}. A 429 is not billed: the storm's saving is in "
        "requests; its dollar difference is the calls the guarded app got no answer to, not a saving"
    )
    must = r["must_answer"]
    print(
        f"false blocks: {len(r['false_blocks'])} of {sum(must.values())} calls users needed answered "
        f"({', '.join(f'{SCENARIOS[s]} {n}' for s, n in must.items())})"
    )
    for line in r["false_blocks"][:10]:
        print(f"  {line}")
    o = r["overshoot"]
    if o["checked"]:
        over = sum((Decimal(v) for v in o["users_over_cap"].values()), Decimal(0)) + o["shared_overshoot_usd"]
        print(
            f"overshoot: ${over} — per-user cap ${o['per_user_cap_usd']}/day: top spender {o['top_user']} "
            f"${o['top_user_usd']:.6f} (server meter); shared cap ${o['shared_cap_usd']}/day: ${o['total_usd']:.6f}; "
            f"unguarded, over the per-user cap: {', '.join(o['users_over_cap_unguarded']) or 'nobody'}"
        )
    else:
        print("overshoot: not checked (the run crossed midnight UTC, when the daily caps reset)")
    led = r["ledger"]
    print(
        f"tokenguard's own ledger (guarded): {led['attempts']} attempts "
        f"(server saw {led['server_requests']} requests), "
        f"${led['spent_usd']:.6f} spent (server billed ${led['server_usd']:.6f}; {led['estimated_calls']} calls "
        f"charged an estimate), {led['cache_hits']} cache hits, {led['blocked']} calls refused before sending "
        f"({led['loops_blocked']} loops, {led['budget_blocks']} budgets; the app saw {led['refusals_seen_by_app']} "
        f"refusals), {led['retries']} retries, {led['alerts']} budget alerts"
    )
    if r["not_answered_unguarded"]:
        print(f"INVALID: {len(r['not_answered_unguarded'])} needed calls failed in the unguarded run")
    for line in r["unexpected"][:10]:
        print(f"UNEXPECTED: {line}")
    print(f"wall: unguarded {r['wall_s'][0]:.1f} s, guarded {r['wall_s'][1]:.1f} s, whole benchmark {wall:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller organisation and a faster clock")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    # tokenguard counts tokens offline; an empty tiktoken cache keeps it so whatever this machine has
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", tempfile.mkdtemp(prefix="tiktoken-empty-"))
    started, day_before = time.perf_counter(), datetime.now(UTC).date()
    plan = Plan.draw(size, args.seed)
    bare = run(plan, guarded=False)
    guarded = run(plan, guarded=True)
    crossed_midnight = datetime.now(UTC).date() != day_before
    results = compare(size, bare, guarded, crossed_midnight)
    wall = time.perf_counter() - started
    print_report(size, results, wall)
    o = results["overshoot"]
    overshoot = o["checked"] and (bool(o["users_over_cap"]) or o["shared_overshoot_usd"] > 0)
    failed = bool(results["false_blocks"] or overshoot or results["not_answered_unguarded"] or results["unexpected"])
    results["checks_passed"] = not failed
    results["wall_total_s"] = wall
    save(args.json, "waste", results, quick=args.quick, seed=args.seed, size={**vars(size)})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
