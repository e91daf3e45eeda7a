"""The loop detector: runaway jobs and retry-clicking are stopped before they are sent.

Three levels, each over a sliding window and per scope (the attribution of the call):

- **exact**: the same request (what decides the answer: vendor, endpoint, model, system,
  messages / input / prompt, tools, tool choice, response format) more than
  ``max_repeats`` times;
- **normalized**: the same request up to case, whitespace and volatile tokens, where what
  changed looks like a counter or a clock (``attempt 3`` → ``attempt 4``, a timestamp) —
  not like another item (``ticket #4312`` → ``ticket #1187``, another UUID, another date);
- **tool calls**: in a conversation that grows turn by turn, the same latest step — the
  same tool called with the same arguments — again and again (agents stuck in an
  A-B-A-B cycle keep coming back to the same steps).

The history lives in the guard's store (in memory, or shared by processes through SQLite),
bounded per key and in total. docs/loops.md says what each level catches and what it cannot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol, runtime_checkable

from ._canonical import canonical_json as _canonical
from ._errors import ConfigurationError, LoopDetected

__all__ = ["LoopBook", "LoopDetector", "LoopStore", "Prints", "prints_of"]

log = logging.getLogger("tokenguard")

# request fields that decide the answer (sampling settings do not: a loop that also
# varies its temperature is still a loop)
_DECIDING: Final = (
    "model",
    "system",
    "messages",
    "input",
    "instructions",
    "prompt",
    "previous_response_id",
    "conversation",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "text",
    "output_config",
    "output_format",
)

# volatile tokens, in order of precedence; the group name is the kind
_VOLATILE: Final = re.compile(
    # (matched against lower-cased text) a token starts where a word does, with a hex digit
    r"(?<![0-9a-z])(?=[0-9a-f])(?:"
    r"(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b)"
    r"|(?P<stamp>\d{4}-\d{2}-\d{2}[t ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:z|[+-]\d{2}:?\d{2})?)"
    r"|(?P<clock>\d{1,2}:\d{2}:\d{2}(?:\.\d+)?\b)"
    r"|(?P<date>\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\d{1,2}[-/.]\d{1,2}[-/.]\d{4}\b)"
    r"|(?P<epoch>1\d{9}(?:\d{3})?(?:\.\d+)?\b)"
    r"|(?P<hex>(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{8,}\b)"
    # ... and any other number, wherever it starts
    r")|(?<![\d.])(?P<num>\d+(?:\.\d+)?)"
)
# Where a _VOLATILE match can start: a digit that does not continue a number, or a hex letter
# that starts a word and begins a UUID or a hex run with a digit in it. A superset of the starts
# (_mask_volatile tries _VOLATILE at each), found by a scan that skips every other character in C.
_MAY_START: Final = re.compile(r"[0-9a-f](?:(?<=\d)(?<![0-9].)|(?<=(?<![0-9a-z])[a-f])(?=[0-9a-f]{7}-|[0-9a-f]*\d))")
# what a kind of token means when it changes between two requests
_KIND: Final = {
    "uuid": "item",
    "hex": "item",
    "date": "item",
    "stamp": "clock",
    "clock": "clock",
    "epoch": "clock",
    "num": "number",
}
_CLOSE_TO_NOW_S: Final = 86_400.0  # a date-time this close to now is a clock; further away, an item


@dataclass(frozen=True, slots=True)
class LoopDetector:
    """Refuse (or report) a request repeated too often: see docs/loops.md.

    Args:
        max_repeats: how many times the same request may be sent within the window; the
            next one (the ``max_repeats + 1``-th) is a loop.
        window_s: the sliding window, in seconds.
        normalized: also treat as repeats requests that differ only in case, whitespace and
            a counter or a timestamp.
        tool_calls: also count, over a growing conversation, the same latest tool call
            with the same arguments.
        mode: ``"block"`` raises ``LoopDetected`` and sends nothing; ``"warn"`` logs a
            warning, calls ``on_loop``, and lets the call through.
        cool_down_s: after a block, the same request is refused for this long whatever
            the window says, so that waiting a second does not slip past.
        counter_step: the largest change of a number that still looks like a counter
            (``0``: any changed number is another item).
        count_cache_hits: a loop answered from the cache is still a loop (it is counted
            and blocked like any other request); ``False`` looks only at calls that would
            reach the vendor.
        on_loop: called with the ``LoopDetected`` of each loop seen, in both modes (its
            failures are logged, never raised).
    """

    max_repeats: int = 3
    window_s: float = 600.0
    normalized: bool = True
    tool_calls: bool = True
    mode: Literal["block", "warn"] = "block"
    cool_down_s: float = 60.0
    counter_step: float = 1
    count_cache_hits: bool = True
    on_loop: Callable[[LoopDetected], object] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_repeats, bool) or not isinstance(self.max_repeats, int) or self.max_repeats < 1:
            raise ConfigurationError("LoopDetector.max_repeats", self.max_repeats, "must be an int >= 1")
        for name in ("window_s", "cool_down_s", "counter_step"):
            value = getattr(self, name)
            zero_ok = name != "window_s"
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
                or (value == 0 and not zero_ok)
            ):
                need = "a positive number" if not zero_ok else "a number >= 0"
                raise ConfigurationError(f"LoopDetector.{name}", value, f"must be {need}")
        for name in ("normalized", "tool_calls", "count_cache_hits"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"LoopDetector.{name}", getattr(self, name), "must be True or False")
        if self.mode not in ("block", "warn"):
            raise ConfigurationError("LoopDetector.mode", self.mode, 'must be "block" or "warn"')
        if self.on_loop is not None and not callable(self.on_loop):
            raise ConfigurationError("LoopDetector.on_loop", self.on_loop, "must be callable")


# -- fingerprints ------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _when(kind: str, text: str) -> float | None:
    """The time (epoch seconds) a date-time token names, if it can be read."""
    try:
        if kind == "epoch":
            value = float(text)
            return value / 1000 if value > 1e11 else value
        if kind == "stamp":
            parsed = datetime.fromisoformat(text.upper().replace(" ", "T", 1))
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        return None
    return None


def _normalize(text: str, found: list[tuple[str, str]], now: float) -> str:
    """Canonical JSON ``text`` lower-cased, whitespace (escaped or not) collapsed, and volatile
    tokens masked; the masked tokens are appended to ``found`` as (kind, text).

    A date-time far from ``now`` is not a clock but an item (a loop carries the current
    time; a batch over events carries theirs).
    """

    def mask(match: re.Match[str]) -> str:
        group = match.lastgroup or "num"
        kind = _KIND[group]
        if group in ("epoch", "stamp"):
            when = _when(group, match.group(0))
            if when is None or abs(when - now) > _CLOSE_TO_NOW_S:
                kind = "item"
        found.append((kind, match.group(0)))
        return f"<{kind}>"

    return _mask_volatile(_collapse_space(text.lower()), mask)


def _mask_volatile(text: str, mask: Callable[[re.Match[str]], str]) -> str:
    """``_VOLATILE.sub(mask, text)``, found faster in text that is mostly not numbers.

    The regex alone tries its alternatives at every character; here ``_MAY_START`` skips to
    the places a token can start and the regex is tried only there, leftmost first, as
    ``sub`` does (tests/test_loops.py checks the two agree). Prose and code: ~3x faster. Text
    that is mostly digits has a candidate at every number, so the regex's own scan is used.
    """
    if sum(map(text.count, "0123456789")) * 3 > len(text):
        return _VOLATILE.sub(mask, text)
    return _scan_volatile(text, mask)


def _scan_volatile(text: str, mask: Callable[[re.Match[str]], str]) -> str:
    out: list[str] = []
    done = at = 0
    while (candidate := _MAY_START.search(text, at)) is not None:
        start = candidate.start()
        found = _VOLATILE.match(text, start)  # its lookbehinds still see the text before start
        if found is None:
            at = start + 1
            continue
        out += (text[done:start], mask(found))
        done = at = found.end()
    out.append(text[done:])
    return "".join(out)


def _collapse_space(text: str) -> str:
    """JSON ``text`` with each run of blanks and escaped newlines, returns and tabs made one
    space, and a space at either end of a string dropped.

    The same as ``re.sub(r'(?<=")\\s|\\s(?=")', "", re.sub(r"(?:\\s|\\\\[nrt])+", " ", text))``
    (tests/test_loops.py checks it against that), in str methods: ~8x faster on long prompts,
    where the regexes' per-position tries were a third of the loop detector's cost.
    """
    if "\\" in text:
        text = text.replace("\\n", " ").replace("\\r", " ").replace("\\t", " ")
    words = text.split()  # str.split and the regex's \s agree on what a blank is (str.isspace)
    collapsed = " ".join(words)
    if text[:1].isspace():
        collapsed = " " + collapsed
    if words and text[-1].isspace():
        collapsed += " "
    # no two spaces are next to each other now, so dropping one changes no other's neighbours
    return collapsed.replace('" ', '"').replace(' "', '"')


def _arguments(raw: Any) -> Any:
    """Tool arguments as data: a JSON string is parsed, so key order does not matter."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _is_tool_result(block: Any) -> bool:
    return isinstance(block, Mapping) and block.get("type") == "tool_result"


def _latest_tool_step(body: Mapping[str, Any]) -> list[Any] | None:
    """The tool calls of the conversation's latest assistant turn, when the request answers
    them (only tool results follow it); ``None`` otherwise."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for i in range(len(messages) - 1, -1, -1):
            message = messages[i]
            if not isinstance(message, Mapping):
                return None
            role = message.get("role")
            if role == "assistant":
                calls = []
                for call in message.get("tool_calls") or ():  # openai chat
                    function = call.get("function", {}) if isinstance(call, Mapping) else {}
                    calls.append([function.get("name"), _arguments(function.get("arguments"))])
                content = message.get("content")
                for block in content if isinstance(content, list) else ():  # anthropic
                    if isinstance(block, Mapping) and block.get("type") == "tool_use":
                        calls.append([block.get("name"), block.get("input")])
                return calls or None
            if role == "tool":
                continue
            content = message.get("content")
            if role == "user" and isinstance(content, list) and content and all(map(_is_tool_result, content)):
                continue  # anthropic: the tool results of the latest assistant turn
            return None
        return None
    items = body.get("input")
    if isinstance(items, list):  # responses: function_call items, then their outputs
        calls = []
        for item in reversed(items):
            if not isinstance(item, Mapping):
                break
            kind = item.get("type")
            if kind == "function_call_output":
                if calls:
                    break
                continue
            if kind == "function_call":
                calls.append([item.get("name"), _arguments(item.get("arguments"))])
                continue
            break
        return list(reversed(calls)) or None
    return None


@dataclass(frozen=True, slots=True)
class Prints:
    """A request's fingerprints, without the scope (so a repeat can reuse them)."""

    exact: str
    normal: str | None = None
    values: tuple[tuple[str, str], ...] = ()
    tool: str | None = None


def _conversation(body: Mapping[str, Any]) -> list[Any]:
    """What tells one conversation from another: its instructions and its opening message."""
    messages = body.get("messages")
    items = body.get("input")
    first = messages[0] if isinstance(messages, list) and messages else None
    if first is None and isinstance(items, list) and items:
        first = items[0]
    return [body.get("system"), body.get("instructions"), first]


def prints_of(
    detector: LoopDetector, vendor: str, endpoint: str, body: Mapping[str, Any], now: float | None = None
) -> Prints:
    """The fingerprints the detector's levels need, of one request body (``now``: epoch
    seconds, to tell the current time in a prompt from another date-time)."""
    deciding = _canonical([vendor, endpoint, {k: body[k] for k in _DECIDING if k in body}])
    exact = _digest(deciding)
    normal: str | None = None
    values: tuple[tuple[str, str], ...] = ()
    if detector.normalized:
        found: list[tuple[str, str]] = []
        normal = _digest(_normalize(deciding, found, time.time() if now is None else now))
        values = tuple(found)
    tool: str | None = None
    if detector.tool_calls:
        step = _latest_tool_step(body)
        if step:
            tool = _digest(_canonical([vendor, endpoint, body.get("model"), _conversation(body), step]))
    return Prints(exact, normal, values, tool)


# -- the shared history -----------------------------------------------------------------------


History = list[tuple[float, str]]  # (time, detail), oldest first


@dataclass(slots=True)
class Decision:
    """What ``decide`` tells the store to do: note the request, quarantine keys."""

    record: bool
    quarantine: Sequence[tuple[str, str]] = ()  # (key, detail of the refused request)
    until: float = 0.0
    loop: LoopDetected | None = None


@runtime_checkable
class LoopStore(Protocol):
    """The loop detector's state in a store (memory, SQLite, Redis)."""

    def loop_observe(
        self,
        keys: Sequence[str],
        details: Sequence[str],
        *,
        now: float,
        window_s: float,
        keep: int,
        decide: Callable[[list[History], list[tuple[float, str]]], Decision],
        group: str = "",
    ) -> Decision:
        """Atomically (across threads, and processes for a shared store): hand ``decide``
        each key's history inside the window (at most ``keep`` entries, oldest first) and
        each key's cool-down (until when, and the detail of the request refused last;
        ``(0.0, "")`` for none); then apply its decision — append ``(now, detail)`` to each
        key when ``record``, and put the (key, detail) pairs it names in a cool-down until
        ``until``. Entries out of the window are dropped; the total kept is bounded.
        ``group`` names the scope the keys belong to (a shared store keeps a group together,
        e.g. in one Redis Cluster slot)."""


class LoopBook:
    """A guard's loop detection: the detector's settings applied to the store's history."""

    def __init__(self, detector: LoopDetector, store: LoopStore, clock: Callable[[], float]) -> None:
        self.detector = detector
        self._store = store
        self._clock = clock
        self._warned: dict[str, float] = {}  # fingerprint -> when its loop was last logged as a warning

    def now(self) -> float:
        """The detector's clock (epoch seconds)."""
        return self._clock()

    def check(self, prints: Prints, scope: Mapping[str, str]) -> LoopDetected | None:
        """Note one request; return the loop it continues (already raised-worthy in block
        mode, or reported in warn mode), or ``None``."""
        detector = self.detector
        where = _canonical(sorted(scope.items()))
        levels = ["exact"]
        keys = [_digest(f"exact\x00{where}\x00{prints.exact}")]
        details = [""]
        if prints.normal is not None:
            levels.append("normalized")
            keys.append(_digest(f"normal\x00{where}\x00{prints.normal}"))
            details.append(_canonical([v for _, v in prints.values]))
        if prints.tool is not None:
            levels.append("tool_calls")
            keys.append(_digest(f"tool\x00{where}\x00{prints.tool}"))
            details.append("")
        now = self._clock()

        def decide(histories: list[History], blocks: list[tuple[float, str]]) -> Decision:
            found: tuple[str, int, int] | None = None  # (level, repeats, index of the key)
            for i, (level, (until, last)) in enumerate(zip(levels, blocks, strict=True)):
                # in its cool-down a key refuses what continues the loop; for the normalized
                # level, another item of the same shape is not a continuation
                if until > now and (level != "normalized" or self._continues(last, prints.values)):
                    found = ("cool-down", max(detector.max_repeats + 1, len(histories[i]) + 1), i)
                    break
            for i, (level, history) in enumerate(zip(levels, histories, strict=True)):
                if found is not None:
                    break
                repeats = self._streak(history, prints.values) if level == "normalized" else len(history) + 1
                if repeats > detector.max_repeats:
                    found = (level, repeats, i)
            if found is None:
                return Decision(record=True)
            level, repeats, i = found
            loop = LoopDetected(
                repeats=repeats,
                window_s=detector.window_s,
                fingerprint=keys[i],
                level=level,
                scope=dict(scope),
                mode=detector.mode,
            )
            if detector.mode == "warn":
                return Decision(record=True, loop=loop)
            # only the key that looped cools down (each refusal restarts its cool-down)
            return Decision(
                record=False, quarantine=[(keys[i], details[i])], until=now + detector.cool_down_s, loop=loop
            )

        # warn mode lets loops run on: keep more history, so ``repeats`` keeps counting
        keep = detector.max_repeats + 1 if detector.mode == "block" else min(10 * (detector.max_repeats + 1), 1000)
        decision = self._store.loop_observe(
            keys, details, now=now, window_s=detector.window_s, keep=keep, decide=decide, group=_digest(where)
        )
        loop = decision.loop
        if loop is not None:
            self._report(loop)
        return loop

    def _continues(self, detail: str, values: tuple[tuple[str, str], ...]) -> bool:
        """Whether a request with ``values`` continues the run that ended with ``detail``."""
        return self._streak([(0.0, detail)], values) > 1

    def _streak(self, history: History, values: tuple[tuple[str, str], ...]) -> int:
        """How many requests in a row, ending with this one, changed only like a loop does."""
        step = self.detector.counter_step
        current = [v for _, v in values]
        kinds = [k for k, _ in values]
        streak = 1
        for _, detail in reversed(history):
            try:
                previous = json.loads(detail)
            except ValueError:
                break
            if not isinstance(previous, list) or len(previous) != len(current):
                break
            if not all(_loop_like(k, a, b, step) for k, a, b in zip(kinds, previous, current, strict=True)):
                break
            streak += 1
            current = previous
        return streak

    def _report(self, loop: LoopDetected) -> None:
        detector = self.detector
        action = "blocked" if detector.mode == "block" else "let through (warn mode)"
        # one warning per loop per cool-down (at least a minute): a runaway job refused a
        # thousand times must not flood the log; the rest go to DEBUG
        now = self._clock()
        quiet = max(detector.cool_down_s, 60.0)
        if now - self._warned.get(loop.fingerprint, -math.inf) >= quiet:
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned[loop.fingerprint] = now
            log.warning("tokenguard: %s; %s (for %gs, its repeats are logged at DEBUG)", loop, action, quiet)
        else:
            log.debug("tokenguard: %s; %s", loop, action)
        if detector.on_loop is not None:
            try:
                detector.on_loop(loop)
            except Exception:
                log.exception("tokenguard: the on_loop callback failed")


def _loop_like(kind: str, before: Any, after: Any, step: float) -> bool:
    """Whether a masked token changing from ``before`` to ``after`` looks like a loop."""
    if before == after:
        return True
    if kind == "clock":
        return True
    if kind == "number" and step > 0:
        try:
            return abs(float(after) - float(before)) <= step
        except (TypeError, ValueError):
            return False
    return False  # another item: another id, another date, a number that jumped
