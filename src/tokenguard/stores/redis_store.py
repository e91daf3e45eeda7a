"""``redis://host:6379/0``: one set of budgets, loop history and ledger for a whole fleet.

Every process on every host that names the same Redis (and prefix) enforces the same caps.

* **Budgets**: reserve, settle and the other budget operations are Lua scripts, one round
  trip each, atomic on the server. Money is whole nano-dollars kept as (dollars, nanos)
  pairs, so the scripts compare exactly whatever the amount. Every key of a budget key is
  hash-tagged (``tokenguard:b:{<digest>}:<period>:c``), so one budget key lives in one
  slot of a Redis Cluster; counters and holds expire an hour after their period ends.
  Threshold alerts fire once across the fleet (``SET NX``).
* **Loop detector**: each scope's history is a few lists under one hash tag, read and
  written by two scripts with a version check (compare-and-set), retried on a conflict.
* **Ledger**: rows go to a capped stream (``max_rows``, default 500,000, trimmed
  approximately) written behind the call like SQLite's, and into running totals per hour
  (kept 48 hours), per day (kept ``days``, default 100) and for all time — for all calls
  and for each ``attribute=value`` of their scope. ``spent()`` and ``stats()`` read the
  totals (filters on none or one scope attribute, any period) or, for filters on several
  attributes, the stream — if it still holds the period, else a clear error says so.
  ``rows()`` reads the stream; ``tokenguard report`` reads it too, and, for the days before
  it holds every row, a daily tally per set of labels (vendor, endpoint, model, scope,
  outcome), kept ``days``.
* **Failure policy** (``on_failure``): ``"closed"`` (default) — with Redis unreachable a
  budget cannot be checked, so a call under a budget is refused with ``StoreUnavailable``
  and nothing is sent. ``"open"`` — the budgets and loop checks of this process fall back
  to its own memory with a loud error in the log; the spend settled meanwhile is added to
  Redis when it returns. Every command has a timeout (``timeout``, default 0.5 s) and one
  reconnect; after a failure Redis is not tried again for ``retry_s`` (1 s), so a dead
  Redis costs a call at most about a second, then nothing.

See docs/scaling.md for the key layout and how it scales.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from types import MappingProxyType
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode

from .._budget import Claim, Fired, Refusal, Totals, crossed, from_nano, to_nano
from .._errors import ConfigurationError, StoreUnavailable
from .._ledger import COUNTS, LedgerRow, OutcomeRow, Stats, Store, Tally, counts_of, matches_scope
from .._loops import Decision
from .._periods import PERIODS, period_end
from .._redact import redact_url
from .._usage import Usage
from ._writebehind import WriteBehind
from .memory import MemoryStore

__all__ = ["RedisStore", "close_client", "redis_client", "split_url", "url_number", "url_switch"]

log = logging.getLogger("tokenguard")
T = TypeVar("T")

_B: Final = 10**9
_HOUR_KEEP_S: Final = 48 * 3600
_LOOP_TRIES: Final = 50
_SKEW_S: Final = 300.0  # clocks of hosts and the Redis server may differ this much
_ROWS_BATCH: Final = 5000
_TOUCHED: Final = 4096  # budget keys remembered per process, for reclaiming dead processes' holds
_OPTIONS: Final = ("prefix", "on_failure", "timeout", "rows", "days", "retry_s", "cluster", "ledger")

# -- Lua ------------------------------------------------------------------------------------------
# Amounts are (dollars, nanos) pairs of Lua numbers, exact to 2^53 dollars. A budget key's period is
# ONE hash: sd/sn (spent), hd/hn (held), st/ht (tokens), and per owner ("host|pid") the fields
# <owner>:d, :n, :t (what it holds), :e (its lease: when the hold lapses) and :g (its generation: a
# hold swept while its owner lives is a new generation when the owner reserves again, and a settle
# releases only what the current generation holds). A hold released to zero
# keeps its fields (so the hot path is one HMGET and one HSET per key); lapsed owners are swept only
# where a lapsed hold matters: when a claim does not fit, and when the totals are read.

_LUA_COMMON: Final = """
local B = 1000000000
local function num(v) if v then return tonumber(v) else return 0 end end
local function fmt(x) return string.format('%.0f', x) end
local function norm(d, n)
  local c = math.floor(n / B)
  d = d + c
  n = n - c * B
  if d < 0 then return 0, 0 end
  return d, n
end
local function drop(C, who)
  local v = redis.call('HMGET', C, 'hd', 'hn', 'ht', who .. ':d', who .. ':n', who .. ':t')
  local d, n, t = num(v[4]), num(v[5]), num(v[6])
  local hd, hn = norm(num(v[1]) - d, num(v[2]) - n)
  redis.call('HSET', C, 'hd', fmt(hd), 'hn', fmt(hn), 'ht', fmt(math.max(num(v[3]) - t, 0)))
  redis.call('HDEL', C, who .. ':d', who .. ':n', who .. ':t', who .. ':e', who .. ':g')
  if d + n + t > 0 then return 1 end
  return 0
end
local function sweep(C, now)
  local all = redis.call('HGETALL', C)
  local gone = 0
  for i = 1, #all, 2 do
    local f = all[i]
    if string.sub(f, -2) == ':e' and tonumber(all[i+1]) <= now then
      gone = gone + drop(C, string.sub(f, 1, -3))
    end
  end
  return gone
end
"""

# Several calls' reservations in one script (a process's concurrent calls are sent together, see
# _Batcher). KEYS: the hash of each budget key. ARGV: owner, now, expires_at, then per key: its
# expire-at ('' never), limit dollars, limit nanos, limit tokens ('' for no limit); then per call: the
# number c of its claims and c (key index, dollars, nanos, tokens). Each call is all-or-nothing, in
# order. Returns seven values per call: 0 when held, else the index (in the call) of the first claim
# that does not fit and its key's sd, sn, hd, hn, st, ht; then per key this owner's hold generation
# and the key's sd, sn, hd, hn, st, ht after the script.
_LUA_RESERVE: Final = (
    _LUA_COMMON
    + """
local owner, now, expires = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local keys = {}
local function load(k)
  local c = redis.call('HMGET', KEYS[k], 'sd', 'sn', 'hd', 'hn', 'st', 'ht',
    owner .. ':d', owner .. ':n', owner .. ':t', owner .. ':g')
  local s = keys[k]
  s.sd, s.sn, s.hd, s.hn, s.st, s.ht = num(c[1]), num(c[2]), num(c[3]), num(c[4]), num(c[5]), num(c[6])
  s.od, s.on, s.ot, s.g = num(c[7]), num(c[8]), num(c[9]), c[10]
  s.new = not (c[1] or c[3] or c[5])
end
local a = 4
for k = 1, #KEYS do
  keys[k] = {at = ARGV[a], ld = ARGV[a+1], ln = ARGV[a+2], lt = ARGV[a+3], dd = 0, dn = 0, dt = 0, swept = false}
  load(k)
  a = a + 4
end
local function fits(s, ud, un, ut)
  if s.ld ~= '' then
    local d, m = norm(s.sd + s.hd + s.dd + ud, s.sn + s.hn + s.dn + un)
    local ld, ln = tonumber(s.ld), tonumber(s.ln)
    if d > ld or (d == ld and m > ln) then return false end
  end
  return s.lt == '' or s.st + s.ht + s.dt + ut <= tonumber(s.lt)
end
local out = {}
while a <= #ARGV do
  local c = tonumber(ARGV[a])
  local refused = false
  for j = 0, c - 1 do
    local b = a + 1 + 4 * j
    local k = tonumber(ARGV[b])
    local s = keys[k]
    local ud, un, ut = tonumber(ARGV[b+1]), tonumber(ARGV[b+2]), tonumber(ARGV[b+3])
    if not fits(s, ud, un, ut) and not s.swept then
      s.swept = true
      if sweep(KEYS[k], now) > 0 then load(k) end
    end
    if not fits(s, ud, un, ut) then
      local hd, hn = norm(s.hd + s.dd, s.hn + s.dn)
      for _, v in ipairs({j + 1, fmt(s.sd), fmt(s.sn), fmt(hd), fmt(hn), fmt(s.st), fmt(s.ht + s.dt)}) do
        out[#out+1] = v
      end
      refused = true
      break
    end
  end
  if not refused then
    for j = 0, c - 1 do
      local b = a + 1 + 4 * j
      local s = keys[tonumber(ARGV[b])]
      s.dd, s.dn = norm(s.dd + tonumber(ARGV[b+1]), s.dn + tonumber(ARGV[b+2]))
      s.dt = s.dt + tonumber(ARGV[b+3])
      s.held = true
    end
    for _ = 1, 7 do out[#out+1] = 0 end
  end
  a = a + 1 + 4 * c
end
for k = 1, #KEYS do
  local s = keys[k]
  if s.held then
    if not s.g then s.g = tostring(redis.call('HINCRBY', KEYS[k], 'gen', 1)) end
    local hd, hn = norm(s.hd + s.dd, s.hn + s.dn)
    local od, on = norm(s.od + s.dd, s.on + s.dn)
    redis.call('HSET', KEYS[k], 'hd', fmt(hd), 'hn', fmt(hn), 'ht', fmt(s.ht + s.dt),
      owner .. ':d', fmt(od), owner .. ':n', fmt(on), owner .. ':t', fmt(s.ot + s.dt), owner .. ':e', expires,
      owner .. ':g', s.g)
    if s.new and s.at ~= '' then redis.call('EXPIREAT', KEYS[k], s.at) end
  end
  out[#out+1] = s.g or ''
  -- where the key stands now (spent and held, with this script's holds): a fail-open fallback
  -- starts from it
  local hd, hn = norm(s.hd + s.dd, s.hn + s.dn)
  for _, v in ipairs({fmt(s.sd), fmt(s.sn), fmt(hd), fmt(hn), fmt(s.st), fmt(s.ht + s.dt)}) do out[#out+1] = v end
end
return out
"""
)

# KEYS: the hash of each budget key. ARGV: owner, then per key: the number r of releases and r
# (generation, dollars, nanos, tokens) to release from this owner's hold — only those of the hold's
# current generation ('' for any) —, the key's expire-at ('' never), the number m of additions, and m
# (dollars, nanos, tokens) to add to the spend, in order. Returns, per addition,
# the spent dollars, nanos and tokens right after it (so each threshold alert names the spend it
# crossed at).
_LUA_SETTLE: Final = (
    _LUA_COMMON
    + """
local owner = ARGV[1]
local out = {}
local a = 2
for k = 1, #KEYS do
  local C = KEYS[k]
  local c = redis.call('HMGET', C, 'sd', 'sn', 'hd', 'hn', 'st', 'ht',
    owner .. ':d', owner .. ':n', owner .. ':t', owner .. ':g')
  local rd, rn, rt = 0, 0, 0
  local r = tonumber(ARGV[a])
  for j = 0, r - 1 do
    local b = a + 1 + 4 * j
    if ARGV[b] == '' or ARGV[b] == c[10] then
      rd, rn = norm(rd + tonumber(ARGV[b+1]), rn + tonumber(ARGV[b+2]))
      rt = rt + tonumber(ARGV[b+3])
    end
  end
  a = a + 1 + 4 * r
  local hd, hn, ht = num(c[3]), num(c[4]), num(c[6])
  local fields = {}
  if rd + rn + rt > 0 and (c[7] or c[9]) then
    -- only what this owner still holds is released: a swept hold was taken off the key already,
    -- and since a sweep the owner may hold less than it releases now
    local od, on, ot = num(c[7]), num(c[8]), num(c[9])
    if od < rd or (od == rd and on < rn) then rd, rn = od, on end
    rt = math.min(rt, ot)
    od, on = norm(od - rd, on - rn)
    fields = {owner .. ':d', fmt(od), owner .. ':n', fmt(on), owner .. ':t', fmt(ot - rt)}
    hd, hn = norm(hd - rd, hn - rn)
    ht = math.max(ht - rt, 0)
  end
  local at, m = ARGV[a], tonumber(ARGV[a+1])
  local sd, sn, st = num(c[1]), num(c[2]), num(c[5])
  for j = 1, m do
    local b = a - 1 + 3 * j
    sd, sn = norm(sd + tonumber(ARGV[b]), sn + tonumber(ARGV[b+1]))
    st = st + tonumber(ARGV[b+2])
    out[#out+1] = fmt(sd)
    out[#out+1] = fmt(sn)
    out[#out+1] = fmt(st)
  end
  redis.call('HSET', C, 'sd', fmt(sd), 'sn', fmt(sn), 'hd', fmt(hd), 'hn', fmt(hn), 'st', fmt(st), 'ht', fmt(ht),
    unpack(fields))
  if not (c[1] or c[3] or c[5]) and at ~= '' then redis.call('EXPIREAT', C, at) end
  a = a + 2 + 3 * m
end
return out
"""
)

# KEYS: one budget key's hash. ARGV: now. Drops lapsed holds; returns sd, sn, hd, hn, st, ht.
_LUA_TOTALS: Final = (
    _LUA_COMMON
    + """
sweep(KEYS[1], tonumber(ARGV[1]))
local c = redis.call('HMGET', KEYS[1], 'sd', 'sn', 'hd', 'hn', 'st', 'ht')
return {fmt(num(c[1])), fmt(num(c[2])), fmt(num(c[3])), fmt(num(c[4])), fmt(num(c[5])), fmt(num(c[6]))}
"""
)

# KEYS: budget keys' hashes. ARGV: now, host prefix ("host|"), then (key index, owner) pairs to drop.
# Drops lapsed holds and the named owners' holds; returns how many of them held anything, then the
# owners on this host that hold something (index, owner, ...).
_LUA_RECLAIM: Final = (
    _LUA_COMMON
    + """
local now, host = tonumber(ARGV[1]), ARGV[2]
local gone = 0
for k = 1, #KEYS do gone = gone + sweep(KEYS[k], now) end
for j = 3, #ARGV, 2 do gone = gone + drop(KEYS[tonumber(ARGV[j])], ARGV[j+1]) end
local out = {gone}
for k = 1, #KEYS do
  local all = redis.call('HGETALL', KEYS[k])
  for i = 1, #all, 2 do
    local f = all[i]
    if string.sub(f, -2) == ':e' and string.sub(f, 1, #host) == host then
      out[#out+1] = k
      out[#out+1] = string.sub(f, 1, -3)
    end
  end
end
return out
"""
)

# The loop detector. KEYS: version, then (entries, cool-down) per loop key. ARGV: now, window_s, keep.
# Returns the version, then per key: its cool-down ('' for none) and its entries in the window,
# newest first (each "ts|detail"), as {cooldown, n, e1, ..., en}.
_LUA_LOOP_READ: Final = """
local now, window, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {redis.call('GET', KEYS[1]) or '0'}
for i = 2, #KEYS, 2 do
  out[#out+1] = redis.call('GET', KEYS[i+1]) or ''
  local entries = {}
  for _, e in ipairs(redis.call('LRANGE', KEYS[i], 0, keep - 1)) do
    local bar = string.find(e, '|', 1, true)
    if tonumber(string.sub(e, 1, bar - 1)) > now - window then entries[#entries+1] = e end
  end
  out[#out+1] = #entries
  for _, e in ipairs(entries) do out[#out+1] = e end
end
return out
"""

# KEYS as for the read. ARGV: the version read, now, keep, record (0/1), keep-for ms, cool-down until,
# cool-down ms, then per loop key: its detail, whether it is quarantined (0/1), the detail it is quarantined with.
# Returns 0 when another process wrote since the read (nothing applied), else 1.
_LUA_LOOP_WRITE: Final = """
local version = redis.call('GET', KEYS[1]) or '0'
if version ~= ARGV[1] then return 0 end
local now, keep, record = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local keep_ms, cool, cool_ms = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
for i = 2, #KEYS, 2 do
  local a = 8 + (i - 2) / 2 * 3
  local detail, quarantined = ARGV[a], ARGV[a+1] == '1'
  if record then
    if redis.call('LPUSH', KEYS[i], now .. '|' .. detail) > keep then redis.call('LTRIM', KEYS[i], 0, keep - 1) end
    redis.call('PEXPIRE', KEYS[i], keep_ms)
  end
  if quarantined then
    redis.call('SET', KEYS[i+1], cool .. '|' .. ARGV[a+2], 'PX', math.max(cool_ms, 1))
  end
end
redis.call('SET', KEYS[1], tostring(tonumber(version) + 1), 'PX', keep_ms + math.max(cool_ms, 0) + 60000)
return 1
"""


# -- helpers ----------------------------------------------------------------------------------------


def _pair(nusd: int) -> tuple[int, int]:
    """Nano-dollars as (dollars, nanos)."""
    return divmod(nusd, _B)


def _nano_floor(usd: Decimal) -> int:
    return int(usd.scaleb(9).to_integral_value(rounding=ROUND_FLOOR))


def _period_text(start: float) -> str:
    return str(int(start)) if start == int(start) else repr(start)


_GRACE_S: Final = 3600  # a budget key outlives its period by this much (hosts' clocks differ)
_LONGEST_S: Final = 32 * 86_400  # when the period is unknown: a month, the longest


@functools.lru_cache(maxsize=4096)
def _period_end_ts(period: str, start: float) -> float | None:
    """When the period that starts at ``start`` ends (``None``: never, for "total")."""
    if start == 0.0 or period == "total":
        return None
    if period in PERIODS:
        ends = period_end(period, datetime.fromtimestamp(start, tz=UTC))
        return start + _LONGEST_S if ends is None else ends.timestamp()
    return start + _LONGEST_S


def _expire_at(claim: Claim) -> str:
    """When the keys of ``claim``'s budget key and period may go (``""``: never, for "total")."""
    end = _period_end_ts(claim.period, claim.period_start)
    if end is None:
        return ""
    # never in the past, even for a guard on an injected clock (EXPIREAT in the past deletes the key)
    return str(int(max(end, time.time())) + _GRACE_S)


def _money3(value: Decimal) -> tuple[int, int, int]:
    """USD as (dollars, nanos, attos), exact to 1e-18 USD (finer amounts rounded up)."""
    units = int(value.scaleb(18).to_integral_value(rounding=ROUND_CEILING))
    dollars, rest = divmod(units, 10**18)
    nanos, attos = divmod(rest, _B)
    return dollars, nanos, attos


def _unmoney3(dollars: int, nanos: int, attos: int) -> Decimal:
    value = Decimal(dollars * 10**18 + nanos * _B + attos).scaleb(-18)
    if not value:
        return Decimal(0)
    value = value.normalize()  # 0.000004350000000000 -> 0.00000435
    return value.quantize(Decimal(1)) if value.as_tuple().exponent > 0 else value  # type: ignore[operator]


def _row_counts(row: LedgerRow) -> dict[str, int]:
    """What one row adds to the running totals (its non-zero ``counts_of``, and its money split
    exactly into ``spent_d/_n/_a`` and ``saved_d/_n/_a``)."""
    out = {name: int(value) for name, value in zip(COUNTS, counts_of(row), strict=True) if value}
    for name, money in (("spent", row.cost_usd), ("saved", row.saved_usd)):
        if money:
            for suffix, part in zip("dna", _money3(money), strict=True):
                if part:
                    out[f"{name}_{suffix}"] = part
    return out


def _money_of(counts: Mapping[str, int], name: str) -> Decimal:
    """The USD amount ``name`` ("spent", "saved") that ``_row_counts`` split, added up."""
    return _unmoney3(counts.get(f"{name}_d", 0), counts.get(f"{name}_n", 0), counts.get(f"{name}_a", 0))


# the fields of a day's tally (``Tally``), out of ``_row_counts``
_TALLY_FIELDS: Final = frozenset(
    {"calls", "input_tokens", "output_tokens", "retries", "estimated_calls", "unpriced_calls"}
    | {f"{name}_{part}" for name in ("spent", "saved") for part in "dna"}
)


def _tallies(
    day: datetime, fields: Mapping[bytes, bytes], scope: Mapping[str, str] | None
) -> Iterator[tuple[LedgerRow, Tally]]:
    """A day's tallies (its hash: group id -> labels, ``<group id>:<field>`` -> count) as
    (a row carrying the labels, its tally), those matching ``scope`` only."""
    counts: dict[str, dict[str, int]] = {}
    labels: dict[str, str] = {}
    for raw_name, raw_value in fields.items():
        gid, sep, field = raw_name.decode().partition(":")
        if sep:
            counts.setdefault(gid, {})[field] = int(raw_value)
        else:
            labels[gid] = raw_value.decode()
    for gid, label in sorted(labels.items()):
        vendor, endpoint, model, outcome, error, items = json.loads(label)
        row = LedgerRow(
            ts=day,
            vendor=vendor,
            endpoint=endpoint,
            model=model,
            scope=MappingProxyType(dict(items)),
            outcome=outcome,
            error=error,
        )
        if scope and not matches_scope(row.scope, scope):
            continue
        c = counts.get(gid, {})
        yield (
            row,
            Tally(
                c.get("calls", 0),
                c.get("input_tokens", 0),
                c.get("output_tokens", 0),
                c.get("retries", 0),
                c.get("estimated_calls", 0),
                c.get("unpriced_calls", 0),
                _money_of(c, "spent"),
                _money_of(c, "saved"),
            ),
        )


def _stats_of(totals: dict[str, int]) -> Stats:
    return Stats(
        spent_usd=_money_of(totals, "spent"),
        saved_usd=_money_of(totals, "saved"),
        **{name: totals.get(name, 0) for name in COUNTS},
    )


def _row_json(row: LedgerRow) -> bytes:
    return json.dumps(
        [
            row.ts.timestamp(),
            row.vendor,
            row.endpoint,
            row.model,
            dict(row.scope),
            row.usage.counts(),
            None if row.cost_usd is None else format(row.cost_usd, "f"),
            None if row.saved_usd is None else format(row.saved_usd, "f"),
            row.estimated,
            row.outcome,
            row.error,
            row.attempts,
            row.latency_s,
            row.stream,
            row.request_id,
        ],
        separators=(",", ":"),
    ).encode()


def _row_of(data: bytes) -> LedgerRow:
    r = json.loads(data)
    return LedgerRow(
        ts=datetime.fromtimestamp(r[0], tz=UTC),
        vendor=r[1],
        endpoint=r[2],
        model=r[3],
        scope=MappingProxyType(r[4]),
        usage=Usage(*r[5]),
        cost_usd=None if r[6] is None else Decimal(r[6]),
        saved_usd=None if r[7] is None else Decimal(r[7]),
        estimated=r[8],
        outcome=r[9],
        error=r[10],
        attempts=r[11],
        latency_s=r[12],
        stream=r[13],
        request_id=r[14],
    )


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigurationError(
            "store", "redis://", 'the Redis store needs redis-py: pip install redis (the "redis" extra of tokenguard)'
        ) from None
    return redis


def url_number(
    options: Mapping[str, str], name: str, default: float, low: float, high: float, *, setting: str = "store"
) -> float:
    """The number a URL option gives (``default`` when absent); out of [low, high] is an error naming it."""
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (low <= value <= high):
        raise ConfigurationError(f"{setting} ?{name}=", raw, f"must be a number from {low:g} to {high:g}")
    return value


def url_switch(options: Mapping[str, str], name: str, *, setting: str = "store") -> bool:
    """A true/false URL option (false when absent); anything else is an error naming it."""
    raw = options.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigurationError(f"{setting} ?{name}=", raw, "must be true or false")
    return raw in ("true", "1", "yes")


def redis_client(url: str, *, timeout_s: float, cluster: bool = False) -> Any:
    """A redis-py client for ``url`` (a ``RedisCluster`` with ``cluster``) with bounded timeouts
    and one quick reconnect (no backoff)."""
    redis = _import_redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        if cluster:
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1),
                client_name="tokenguard",
            )
        return redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            client_name="tokenguard",
        )
    except (ValueError, TypeError) as err:
        raise ConfigurationError("store", redact_url(url), f"not a Redis URL redis-py understands: {err}") from None


def close_client(client: Any) -> None:
    """Close a client and its connections (a ``RedisCluster`` leaves its nodes' pools open)."""
    nodes = list(client.get_nodes()) if hasattr(client, "get_nodes") else []
    client.close()
    for node in nodes:
        if node.redis_connection is not None:
            node.redis_connection.connection_pool.disconnect()


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The Redis URL without tokenguard's own query options, and those options."""
    base, _, query = url.partition("?")  # (urlunsplit would turn unix:///path into unix:/path)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        (ours.__setitem__(name, value) if name in _OPTIONS else theirs.append((name, value)))
    return (f"{base}?{urlencode(theirs)}" if theirs else base), ours


class _Ask:
    """One call's reservation waiting to be sent with others."""

    __slots__ = ("claims", "done", "error", "result")

    def __init__(self, claims: list[Claim]) -> None:
        self.claims = claims
        self.done = False
        self.result: Refusal | None = None
        self.error: BaseException | None = None


class _Batcher:
    """Group commit for reservations: while one thread's script is in flight, the reservations
    other threads ask for queue up and go together in the next script.

    A lone call goes at once, as before (no waiting to fill a batch); under load, one round trip
    and one script carry many calls, each still all-or-nothing on its own.
    """

    def __init__(
        self, send: Callable[[list[list[Claim]], tuple[str, int], float, float], list[Refusal | None]]
    ) -> None:
        self._send = send
        self._cond = threading.Condition()
        self._queue: list[_Ask] = []
        self._busy = False

    def reserve(self, claims: list[Claim], owner: tuple[str, int], expires_at: float, now: float) -> Refusal | None:
        ask = _Ask(claims)
        with self._cond:
            self._queue.append(ask)
            while self._busy and not ask.done:
                self._cond.wait()
            if not ask.done:  # this thread sends what is queued
                self._busy = True
                batch, self._queue = self._queue, []
        if not ask.done:
            try:
                results = self._send([a.claims for a in batch], owner, expires_at, now)
                for a, result in zip(batch, results, strict=True):
                    a.result = result
            except BaseException as err:
                for a in batch:
                    a.error = err
            finally:
                with self._cond:
                    for a in batch:
                        a.done = True
                    self._busy = False
                    self._cond.notify_all()
        if ask.error is not None:
            raise ask.error
        return ask.result


class RedisStore(WriteBehind):
    """The ledger, budgets, loop history and outcomes in Redis, shared by every process that
    names the same server and prefix.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
            ``unix:///path/redis.sock?db=0``, with tokenguard's options in the query string
            (they override the keyword arguments): ``prefix``, ``on_failure``, ``timeout``,
            ``rows``, ``days``, ``retry_s``, ``ledger``, and ``cluster=true`` for a Redis
            Cluster (any node's address). Other query options go to redis-py.
        prefix: the namespace of every key (processes share state only under the same prefix).
        on_failure: ``"closed"`` (refuse calls under a budget while Redis is unreachable) or
            ``"open"`` (fall back to this process's memory, with an error in the log).
        timeout_s: the connect and command timeout.
        max_rows: the ledger stream's length (approximate: Redis trims whole nodes).
        days: how long the per-day totals and the reports' daily tallies are kept.
        retry_s: after a failure, Redis is not tried again for this long.
        write_behind_s: ledger rows are written in batches this often (0: every row at once).
        ledger: where the ledger rows go: ``"redis"`` (the stream and running totals), or a
            ``sqlite:///`` URL (each host keeps its own rows; budgets, loops and outcomes stay
            shared) — for fleets whose call rate one Redis stream cannot take (docs/scaling.md).
    """

    remote = True  # the async clients run its round trips off the event loop

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "tokenguard",
        on_failure: str = "closed",
        timeout_s: float = 0.5,
        max_rows: int = 500_000,
        days: int = 100,
        retry_s: float = 1.0,
        write_behind_s: float = 0.05,
        ledger: str = "redis",
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError("store", url, "a Redis store URL starts with redis://, rediss:// or unix://")
        target, options = split_url(url)
        self.url = redact_url(target)
        prefix = options.get("prefix", prefix)
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "{}* \t\n"):
            raise ConfigurationError("store ?prefix=", prefix, "must be a non-empty name without braces, * or spaces")
        on_failure = options.get("on_failure", on_failure)
        if on_failure not in ("closed", "open"):
            raise ConfigurationError("store ?on_failure=", on_failure, 'must be "closed" or "open"')
        self.prefix = prefix
        self.on_failure = on_failure
        self.timeout_s = url_number(options, "timeout", timeout_s, 0.001, 60)
        self.max_rows = int(url_number(options, "rows", max_rows, 1000, 10**9))
        ledger = options.get("ledger", ledger)
        self._ledger: Store | None = None
        if ledger != "redis" and (not isinstance(ledger, str) or not ledger.startswith(("sqlite:///", "memory://"))):
            raise ConfigurationError(
                "store ?ledger=", ledger, "must be redis (the default), sqlite:///path.db or memory://"
            )
        self.days = int(url_number(options, "days", days, 1, 100_000))
        self.retry_s = url_number(options, "retry_s", retry_s, 0, 3600)
        self.cluster = url_switch(options, "cluster")
        self._redis = _import_redis()
        from redis.crc import key_slot

        self._slot: Callable[[str], int] = lambda name: int(key_slot(name.encode()))
        try:
            self._client = redis_client(target, timeout_s=self.timeout_s, cluster=self.cluster)
        except self._redis.RedisError as err:  # a Cluster client asks the nodes for the slots at once
            raise StoreUnavailable("store", self.url, f"cannot reach the Redis Cluster: {err}") from None
        self._scripts = {
            name: self._client.register_script(lua)
            for name, lua in (
                ("reserve", _LUA_RESERVE),
                ("settle", _LUA_SETTLE),
                ("totals", _LUA_TOTALS),
                ("reclaim", _LUA_RECLAIM),
                ("loop_read", _LUA_LOOP_READ),
                ("loop_write", _LUA_LOOP_WRITE),
            )
        }
        self._state_lock = threading.Lock()
        self._down_until = 0.0
        self._down_since: float | None = None
        self._down_mono = 0.0  # time.monotonic() when the operation that found Redis down began
        self._last_error = ""
        self._fallback: MemoryStore | None = None
        self._local_claims: dict[int, Claim] = {}  # claims held by the fallback, by identity
        self._owed: list[tuple[list[Claim], list[Claim]]] = []  # settles Redis missed while down
        self._owner: tuple[str, int] | None = None
        self._indexed: set[tuple[str, float]] = set()
        self._touched: OrderedDict[tuple[str, float], None] = OrderedDict()
        self._marked: set[tuple[str, float, float]] = set()
        self._bkey_names: dict[tuple[str, float], str] = {}
        self._generations: dict[int, bytes] = {}  # id(held claim) -> its hold's generation
        self._last_seen: dict[tuple[str, float], Totals] = {}  # per budget key, after this process's last reservation
        # on a Cluster a call's claims may span slots: each is sent on its own
        self._batcher = None if self.cluster else _Batcher(self._reserve_many)
        self._start_write_behind(write_behind_s)
        try:
            self._client.ping()
        except self._redis.RedisError as err:
            if self.on_failure == "closed":
                close_client(self._client)
                raise StoreUnavailable("store", self.url, f"cannot reach Redis: {err}") from None
            with contextlib.suppress(StoreUnavailable):
                self._call("connecting", self._client.ping)  # starts the outage: logged, fallback on
        if ledger != "redis":
            from . import open_store

            self._ledger = open_store(ledger)

    def _after_fork(self) -> None:
        # (redis-py's pools notice the fork themselves and open the child's own connections)
        super()._after_fork()
        self._state_lock = threading.Lock()
        self._generations = {}
        self._fallback = None
        self._local_claims = {}
        self._owed = []
        self._touched = OrderedDict()
        self._batcher = None if self.cluster else _Batcher(self._reserve_many)

    # -- failure policy -----------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _call(self, what: str, op: Callable[[], T]) -> T:
        """Run ``op`` against Redis; a failure becomes ``StoreUnavailable`` and keeps Redis
        untried for ``retry_s`` (calls fail fast meanwhile)."""
        started = time.monotonic()
        if self._down_until > started:
            raise StoreUnavailable(
                "store", self.url, f"Redis is unreachable ({self._last_error}); {what} was not attempted"
            )
        try:
            result = op()
        except self._redis.RedisError as err:
            if isinstance(err, self._redis.ConnectionError | self._redis.TimeoutError):
                with self._state_lock:
                    self._down_until = time.monotonic() + self.retry_s
                    self._last_error = f"{type(err).__name__}: {err}"
                    if self._down_since is None:
                        self._down_since = time.time()
                        self._down_mono = started
                        self._outage_started()
            raise StoreUnavailable("store", self.url, f"Redis failed during {what}: {err}") from err
        # Redis is back only for an operation that began after the outage did (one that was
        # already under way when another failed proves nothing); settles owed are replayed then
        if (self._down_since is not None or self._owed) and started > self._down_mono:
            self._outage_ended()
        return result

    def _outage_started(self) -> None:
        if self.on_failure == "open":
            log.error(
                "tokenguard: Redis at %s is unreachable (%s). on_failure=open: budgets and loop checks now "
                "count THIS PROCESS ONLY, so fleet-wide caps are not enforced until Redis returns",
                self.url,
                self._last_error,
            )
        else:
            log.error(
                "tokenguard: Redis at %s is unreachable (%s). on_failure=closed: calls under a budget are "
                "refused until it returns",
                self.url,
                self._last_error,
            )

    def _outage_ended(self) -> None:
        with self._state_lock:
            since, self._down_since = self._down_since, None
            owed, self._owed = self._owed, []
            if since is not None:
                self._fallback = None
        if since is not None:
            log.warning("tokenguard: Redis at %s is reachable again after %.1f s", self.url, time.time() - since)
        owner = self._owner
        if owed and owner is not None:
            try:
                self._call("settling what the outage owed", lambda: self._settle_redis(owed, owner))
            except StoreUnavailable:
                with self._state_lock:
                    self._owed[:0] = owed
                return
            log.warning("tokenguard: %d settle(s) made during the outage were added to Redis", len(owed))

    def _local(self) -> MemoryStore:
        """The fail-open fallback: this process's memory, starting where the fleet stood when
        this process last saw each budget key (spent plus held, as spent: on the safe side)."""
        with self._state_lock:
            if self._fallback is None:
                self._fallback = MemoryStore()
                for (key, start), totals in self._last_seen.items():
                    self._fallback.seed(
                        key, start, totals.spent_usd + totals.held_usd, totals.spent_tokens + totals.held_tokens
                    )
            return self._fallback

    @property
    def degraded(self) -> bool:
        """Whether Redis is currently treated as unreachable."""
        return self._down_since is not None

    # -- budgets ------------------------------------------------------------------------------

    def _bkey(self, key: str, period_start: float) -> str:
        """The hash of a budget key's period: ``<prefix>:b:{<digest of the key>}:<period start>``
        (the braces make it a Cluster hash tag: the key and its alert markers share a slot)."""
        name = self._bkey_names.get((key, period_start))
        if name is None:
            tag = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:24]
            name = self._k("b", "{" + tag + "}", _period_text(period_start))
            if len(self._bkey_names) > 100_000:
                self._bkey_names.clear()
            self._bkey_names[(key, period_start)] = name
        return name

    def _index(self, claims: Sequence[Claim]) -> None:
        """List new budget keys of a period (for ``budget_keys``): once per key and process."""
        new = [c for c in claims if (c.key, c.period_start) not in self._indexed]
        if not new:
            return
        pipe = self._client.pipeline(transaction=False)
        for claim in new:
            index = self._k("bk", _period_text(claim.period_start))
            pipe.zadd(index, {claim.key: 0})
            at = _expire_at(claim)
            if at:
                pipe.expireat(index, int(at))
        pipe.execute()
        if len(self._indexed) > 100_000:
            self._indexed.clear()
        self._indexed.update((c.key, c.period_start) for c in new)

    def reserve(
        self, claims: Sequence[Claim], *, owner: tuple[str, int], expires_at: float, now: float
    ) -> Refusal | None:
        """Hold every enforced claim if each fits, in one script (one round trip)."""
        enforced = [c for c in claims if c.enforce]
        if not enforced:
            return None
        self._owner = owner
        try:
            return self._call("a budget reservation", lambda: self._reserve_redis(enforced, owner, expires_at, now))
        except StoreUnavailable:
            if self.on_failure == "closed":
                raise
        refusal = self._local().reserve(enforced, owner=owner, expires_at=expires_at, now=now)
        if refusal is None:
            with self._state_lock:
                for claim in enforced:
                    self._local_claims[id(claim)] = claim
        return refusal

    def _reserve_redis(
        self, claims: list[Claim], owner: tuple[str, int], expires_at: float, now: float
    ) -> Refusal | None:
        held: list[Claim] = []
        try:
            # one script for all the claims; on a Cluster one per slot, each all-or-nothing, and
            # what earlier slots held is given back when a later one refuses
            for group in self._groups(claims, key=lambda claim: claim):
                refusal = self._reserve_group([claim for _, claim in group], owner, expires_at, now)
                if refusal is not None:
                    if held:
                        self._settle_redis([(held, [])], owner)
                    return refusal
                held.extend(claim for _, claim in group)
        except self._redis.RedisError:
            if held:
                with contextlib.suppress(self._redis.RedisError):
                    self._settle_redis([(held, [])], owner)
            raise
        self._index(claims)
        return None

    def _reserve_group(
        self, claims: list[Claim], owner: tuple[str, int], expires_at: float, now: float
    ) -> Refusal | None:
        if self._batcher is not None:
            return self._batcher.reserve(claims, owner, expires_at, now)
        return self._reserve_many([claims], owner, expires_at, now)[0]

    def _reserve_many(
        self, asks: Sequence[Sequence[Claim]], owner: tuple[str, int], expires_at: float, now: float
    ) -> list[Refusal | None]:
        """Reserve each call's claims (all-or-nothing per call, in order) in one script."""
        slots: dict[tuple[str, float], int] = {}
        keys: list[str] = []
        head: list[Any] = [f"{owner[0]}|{owner[1]}", repr(now), repr(expires_at)]
        body: list[Any] = []
        for claims in asks:
            body.append(len(claims))
            for claim in claims:
                ident = (claim.key, claim.period_start)
                if ident not in slots:
                    slots[ident] = len(slots) + 1
                    keys.append(self._bkey(*ident))
                    limit = ("", "") if claim.limit_usd is None else _pair(_nano_floor(claim.limit_usd))
                    tokens_limit = "" if claim.limit_tokens is None else claim.limit_tokens
                    head.extend((_expire_at(claim), *limit, tokens_limit))
                    self._touch(claim)
                body.extend((slots[ident], *_pair(to_nano(claim.usd)), claim.tokens))
        # a script called directly (EVALSHA, loaded on NOSCRIPT): in a pipeline redis-py would
        # ask SCRIPT EXISTS first, a second round trip per call
        reply = self._scripts["reserve"](keys=keys, args=head + body)
        tail = reply[7 * len(asks) :]
        generations = tail[::7]
        with self._state_lock:
            if len(self._last_seen) > 100_000:
                self._last_seen.clear()
            for ident, k in slots.items():
                sd, sn, hd, hn, st, ht = (int(v) for v in tail[7 * (k - 1) + 1 : 7 * k])
                self._last_seen[ident] = Totals(from_nano(sd * _B + sn), from_nano(hd * _B + hn), st, ht)
        results: list[Refusal | None] = []
        for i, claims in enumerate(asks):
            first, sd, sn, hd, hn, st, ht = (int(v) for v in reply[7 * i : 7 * i + 7])
            if first == 0:
                results.append(None)
                with self._state_lock:  # which generation of this process's hold each claim is in
                    for claim in claims:
                        self._generations[id(claim)] = generations[slots[(claim.key, claim.period_start)] - 1]
            else:
                totals = Totals(from_nano(sd * _B + sn), from_nano(hd * _B + hn), st, ht)
                results.append(Refusal(claims[first - 1], totals))
        return results

    def _groups(self, items: Sequence[T], key: Callable[[T], Claim]) -> list[list[tuple[int, T]]]:
        """``items`` (numbered) in one group, or on a Cluster grouped by their budget key's slot."""
        numbered = list(enumerate(items))
        if not self.cluster:
            return [numbered]
        groups: dict[int, list[tuple[int, T]]] = {}
        for index, item in numbered:
            claim = key(item)
            slot = self._slot(self._bkey(claim.key, claim.period_start))
            groups.setdefault(slot, []).append((index, item))
        return list(groups.values())

    def _touch(self, claim: Claim) -> None:
        ident = (claim.key, claim.period_start)
        with self._state_lock:
            self._touched[ident] = None
            self._touched.move_to_end(ident)
            while len(self._touched) > _TOUCHED:
                self._touched.popitem(last=False)

    def settle(
        self,
        batch: Sequence[tuple[Sequence[Claim], Sequence[Claim]]],
        *,
        owner: tuple[str, int],
        now: float,
    ) -> list[Fired]:
        """Release the holds and add the actual amounts (one script for the whole batch); a
        threshold newly reached fires once across the fleet."""
        self._owner = owner
        remote: list[tuple[list[Claim], list[Claim]]] = []
        local: list[tuple[list[Claim], list[Claim]]] = []
        with self._state_lock:
            for held, actual in batch:
                there: list[Claim] = []
                here: list[Claim] = []
                for claim in held:  # a hold taken while Redis was down is the fallback's to release
                    (here if self._local_claims.pop(id(claim), None) is not None else there).append(claim)
                remote.append((there, list(actual)))
                if here:
                    local.append((here, []))
        fired: list[Fired] = []
        if local and self._fallback is not None:
            self._fallback.settle(local, owner=owner, now=now)
        try:
            fired = self._call("settling the budgets", lambda: self._settle_redis(remote, owner))
        except StoreUnavailable:
            if self.on_failure == "closed":
                raise
            with self._state_lock:
                self._owed.extend(remote)
            # meanwhile this process counts its own spend, so its caps still hold for it
            fired = self._local().settle([([], actual) for _, actual in remote], owner=owner, now=now)
        return fired

    def _settle_redis(
        self, batch: Sequence[tuple[Sequence[Claim], Sequence[Claim]]], owner: tuple[str, int]
    ) -> list[Fired]:
        # the whole batch folds into one read and one write per budget key: the releases summed
        # (exact integers), the additions applied in order inside the script
        released: dict[tuple[str, float], dict[bytes, list[int]]] = {}  # generation -> [nano, tokens]
        additions: dict[tuple[str, float], list[Claim]] = {}
        claims: dict[tuple[str, float], Claim] = {}
        for held, actual in batch:
            for claim in held:
                ident = (claim.key, claim.period_start)
                with self._state_lock:
                    generation = self._generations.get(id(claim), b"")
                acc = released.setdefault(ident, {}).setdefault(generation, [0, 0])
                acc[0] += to_nano(claim.usd)
                acc[1] += claim.tokens
                claims.setdefault(ident, claim)
                additions.setdefault(ident, [])
            for claim in actual:
                ident = (claim.key, claim.period_start)
                additions.setdefault(ident, []).append(claim)
                claims[ident] = claim
        if not additions:
            return []
        adds: list[tuple[tuple[Decimal, int], Claim]] = []
        for group in self._groups(list(additions), key=lambda ident: claims[ident]):
            keys: list[str] = []
            args: list[Any] = [f"{owner[0]}|{owner[1]}"]
            for _, ident in group:
                keys.append(self._bkey(*ident))
                releases = released.get(ident, {})
                args.append(len(releases))
                for generation, (release_nano, release_tokens) in releases.items():
                    args.extend((generation, *_pair(release_nano), release_tokens))
                args.extend((_expire_at(claims[ident]), len(additions[ident])))
                for claim in additions[ident]:
                    args.extend((*_pair(to_nano(claim.usd)), claim.tokens))
            reply = self._scripts["settle"](keys=keys, args=args)
            i = 0
            for _, ident in group:
                for claim in additions[ident]:
                    usd = from_nano(int(reply[i]) * _B + int(reply[i + 1]))
                    adds.append(((usd, int(reply[i + 2])), claim))
                    i += 3
        # settled: their generations are done with (kept when the script failed, so that the
        # replay after an outage still knows them)
        with self._state_lock:
            for held, _ in batch:
                for claim in held:
                    self._generations.pop(id(claim), None)
        self._index([claim for _, claim in adds])
        candidates: list[tuple[Claim, float, Decimal, int]] = []
        for (usd, tokens), claim in adds:
            for threshold in crossed(claim, usd, tokens):
                if (claim.key, claim.period_start, threshold) not in self._marked:
                    candidates.append((claim, threshold, usd, tokens))
        if not candidates:
            return []
        # each threshold fires once across the fleet: the first SET NX wins
        pipe = self._client.pipeline(transaction=False)
        for claim, threshold, _, _ in candidates:
            self._alert_key(pipe, claim, threshold)
        won = pipe.execute()
        fired: list[Fired] = []
        seen: set[tuple[str, float, float]] = set()
        for (claim, threshold, usd, tokens), first in zip(candidates, won, strict=True):
            marker = (claim.key, claim.period_start, threshold)
            self._remember_marked(marker)
            if first and marker not in seen:
                seen.add(marker)
                fired.append(Fired(claim.key, claim.period_start, threshold, usd, tokens))
        return fired

    def _alert_key(self, pipe: Any, claim: Claim, threshold: float) -> None:
        name = self._bkey(claim.key, claim.period_start) + f":a:{threshold!r}"
        at = _expire_at(claim)
        if at:
            pipe.set(name, 1, nx=True, exat=int(at))
        else:
            pipe.set(name, 1, nx=True)

    def _remember_marked(self, marker: tuple[str, float, float]) -> None:
        if len(self._marked) > 100_000:
            self._marked.clear()
        self._marked.add(marker)

    def totals(self, key: str, period_start: float, *, now: float) -> Totals:
        """Settled and held amounts of one key (lapsed holds dropped first)."""

        def op() -> Totals:
            sd, sn, hd, hn, st, ht = (
                int(v) for v in self._scripts["totals"](keys=[self._bkey(key, period_start)], args=[repr(now)])
            )
            return Totals(from_nano(sd * _B + sn), from_nano(hd * _B + hn), st, ht)

        try:
            return self._call("reading a budget", op)
        except StoreUnavailable:
            if self.on_failure == "closed":
                raise
            return self._local().totals(key, period_start, now=now)

    def mark_alert(self, key: str, period_start: float, threshold: float) -> bool:
        """Record that an alert fired; ``True`` only the first time, across the fleet (``SET NX``)."""
        marker = (key, period_start, threshold)
        if marker in self._marked:  # this process saw it marked: no round trip per refusal at a cap
            return False

        def op() -> bool:
            pipe = self._client.pipeline(transaction=False)
            self._alert_key(pipe, Claim(key, period_start, Decimal(0), 0, None, None, True), threshold)
            first = bool(pipe.execute()[0])
            self._remember_marked(marker)
            return first

        try:
            return self._call("marking an alert", op)
        except StoreUnavailable:
            if self.on_failure == "closed":
                raise
            return self._local().mark_alert(key, period_start, threshold)

    def reclaim(
        self, *, now: float, host: str, alive: Callable[[int], bool], keys: Sequence[tuple[str, float]] = ()
    ) -> int:
        """Drop lapsed holds, and the holds of processes on ``host`` that are gone, of ``keys``
        (where a call was refused), or else of the budget keys this process used lately."""
        with self._state_lock:
            touched = list(keys) or list(self._touched)
        if not touched:
            return 0

        claims = [Claim(key, start, Decimal(0), 0, None, None, True) for key, start in touched]

        def op() -> int:
            dropped = 0
            for group in self._groups(claims, key=lambda claim: claim):
                keys = [self._bkey(claim.key, claim.period_start) for _, claim in group]
                reply = self._scripts["reclaim"](keys=keys, args=[repr(now), f"{host}|"])
                dropped += int(reply[0])
                dead: list[Any] = []
                for i in range(1, len(reply), 2):
                    who = reply[i + 1].decode()
                    pid = who.rpartition("|")[2]
                    if pid.isdigit() and not alive(int(pid)):
                        dead.extend((int(reply[i]), who))
                if dead:
                    dropped += int(self._scripts["reclaim"](keys=keys, args=[repr(now), "\x00", *dead])[0])
            return dropped

        try:
            return self._call("reclaiming holds", op)
        except StoreUnavailable:
            if self.on_failure == "closed":
                raise
            return self._local().reclaim(now=now, host=host, alive=alive)

    def budget_keys(self, prefix: str, period_start: float) -> list[str]:
        """The budget keys starting with ``prefix`` that were used in the period."""
        index = self._k("bk", _period_text(period_start))

        def op() -> list[str]:
            found: list[str] = []
            start = "[" + prefix
            while True:
                batch = self._client.zrangebylex(index, start, "+", start=0, num=1000)
                for raw in batch:
                    key = raw.decode()
                    if not key.startswith(prefix):
                        return found
                    found.append(key)
                if len(batch) < 1000:
                    return found
                start = "(" + batch[-1].decode()

        return self._call("listing budget keys", op)

    # -- the loop detector --------------------------------------------------------------------

    def loop_observe(
        self,
        keys: Sequence[str],
        details: Sequence[str],
        *,
        now: float,
        window_s: float,
        keep: int,
        decide: Callable[[list[list[tuple[float, str]]], list[tuple[float, str]]], Decision],
        group: str = "",
    ) -> Decision:
        """See ``tokenguard._loops.LoopStore``: atomic across the fleet by compare-and-set on
        the scope's version (``group`` is the scope's digest, the hash tag of its keys)."""
        tag = "{" + (group or "all") + "}"
        names = [self._k("l", tag, "v")]
        for key in keys:
            names.extend((self._k("l", tag, "e", key), self._k("l", tag, "q", key)))

        def op() -> Decision:
            for _ in range(_LOOP_TRIES):
                reply = self._scripts["loop_read"](keys=names, args=[repr(now), repr(window_s), keep])
                version = reply[0]
                histories: list[list[tuple[float, str]]] = []
                blocks: list[tuple[float, str]] = []
                i = 1
                for _key in keys:
                    block = reply[i].decode()
                    count = int(reply[i + 1])
                    entries = [e.decode().split("|", 1) for e in reply[i + 2 : i + 2 + count]]
                    histories.append([(float(ts), detail) for ts, detail in reversed(entries)])
                    until, _, detail = block.partition("|")
                    blocks.append((float(until), detail) if until else (0.0, ""))
                    i += 2 + count
                decision = decide(histories, blocks)
                quarantined = dict(decision.quarantine)
                args: list[Any] = [
                    version,
                    repr(now),
                    keep,
                    int(decision.record),
                    max(int(window_s * 1000), 1),
                    repr(decision.until),
                    int((decision.until - now) * 1000),
                ]
                for key, detail in zip(keys, details, strict=True):
                    args.extend((detail, int(key in quarantined), quarantined.get(key, "")))
                if int(self._scripts["loop_write"](keys=names, args=args)):
                    return decision
            raise StoreUnavailable("store", self.url, "the loop history kept changing under this check")

        try:
            return self._call("a loop check", op)
        except StoreUnavailable:
            if self.on_failure == "closed":
                raise
            return self._local().loop_observe(keys, details, now=now, window_s=window_s, keep=keep, decide=decide)

    # -- the ledger ---------------------------------------------------------------------------

    def _buckets(self, ts: datetime, now: float) -> list[tuple[str, int | None]]:
        """The running-total buckets a row at ``ts`` adds to, with when each expires."""
        hour = ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        day = hour.replace(hour=0)
        out: list[tuple[str, int | None]] = [("t:all", None)]
        hour_ends = (hour + timedelta(hours=1)).timestamp() + _HOUR_KEEP_S
        if hour_ends > now:
            out.append((f"h:{hour:%Y%m%d%H}", int(hour_ends)))
        day_ends = (day + timedelta(days=1)).timestamp() + self.days * 86_400
        if day_ends > now:
            out.append((f"d:{day:%Y%m%d}", int(day_ends)))
        return out

    def _commit(self, rows: list[LedgerRow]) -> None:
        now = time.time()
        totals: dict[str, dict[str, int]] = {}
        expiry: dict[str, int | None] = {}
        labels: dict[str, dict[str, str]] = {}  # daily tallies: hash -> {group id: its labels}
        for row in rows:
            counts = _row_counts(row)
            facets = ["*", *(f"{k}={v}" for k, v in row.scope.items())]
            for bucket, at in self._buckets(row.ts, now):
                for facet in facets:
                    name = self._k("s", bucket, facet)
                    expiry[name] = at
                    acc = totals.setdefault(name, {})
                    for field, value in counts.items():
                        acc[field] = acc.get(field, 0) + value
                if bucket.startswith("d:"):  # the day's tally of calls with the same labels
                    name = self._k("r", bucket[2:])
                    expiry[name] = at
                    label = json.dumps(
                        [row.vendor, row.endpoint, row.model, row.outcome, row.error, sorted(row.scope.items())],
                        separators=(",", ":"),
                    )
                    gid = hashlib.sha1(label.encode(), usedforsecurity=False).hexdigest()[:16]
                    labels.setdefault(name, {})[gid] = label
                    acc = totals.setdefault(name, {})
                    for field, value in counts.items():
                        if field in _TALLY_FIELDS:
                            acc[f"{gid}:{field}"] = acc.get(f"{gid}:{field}", 0) + value

        def op() -> None:
            pipe = self._client.pipeline(transaction=False)
            stream = self._k("rows")
            for row in rows:
                pipe.xadd(stream, {"r": _row_json(row)}, maxlen=self.max_rows, approximate=True)
            for name, known in labels.items():
                for gid, label in known.items():
                    pipe.hsetnx(name, gid, label)
            for name, acc in totals.items():
                for field, value in acc.items():
                    pipe.hincrby(name, field, value)
                at = expiry[name]
                if at is not None:
                    pipe.expireat(name, at)
            pipe.execute()

        self._call("writing the ledger", op)

    def record(self, row: LedgerRow) -> None:
        """Queue one row for Redis (or hand it to the ``ledger=`` store)."""
        if self._ledger is not None:
            self._ledger.record(row)
        else:
            super().record(row)

    def flush(self) -> None:
        """Write the queued rows now."""
        super().flush()
        flush = getattr(self._ledger, "flush", None)
        if callable(flush):
            flush()

    def _read(self, what: str, op: Callable[[], T]) -> T:
        self.flush()
        return self._call(what, op)

    def _stream(self, stream: str, since: datetime | None) -> Iterator[bytes]:
        """The payloads of a stream from about ``since`` on (by entry id, with room for clock skew)."""
        start = "-" if since is None else f"{max(int((since.timestamp() - _SKEW_S) * 1000), 0)}-0"
        while True:
            batch = self._client.xrange(stream, min=start, max="+", count=_ROWS_BATCH)
            for _, fields in batch:
                yield fields[b"r"]
            if len(batch) < _ROWS_BATCH:
                return
            start = "(" + batch[-1][0].decode()

    def rows(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[LedgerRow]:
        """The matching rows the stream still holds (the last ``max_rows``), oldest first."""
        if self._ledger is not None:
            yield from self._ledger.rows(since=since, until=until, scope=scope)
            return

        def op() -> list[LedgerRow]:
            found = []
            for data in self._stream(self._k("rows"), since):
                row = _row_of(data)
                if since is not None and row.ts < since:
                    continue
                if until is not None and row.ts >= until:
                    continue
                if scope and not matches_scope(row.scope, scope):
                    continue
                found.append(row)
            found.sort(key=lambda r: r.ts)
            return found

        yield from self._read("reading the ledger", op)

    def summarised_before(self) -> datetime | None:
        """Where reports switch from daily tallies to single rows: the start of the first whole
        day (UTC) the stream holds every row of, or ``None`` when it holds them all."""
        _, kept_since, trimmed = self.retention()
        if not trimmed or kept_since is None:
            return None
        edge = kept_since + timedelta(seconds=_SKEW_S)
        return edge.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)

    def report_source(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[tuple[LedgerRow, Tally | None]]:
        """What ``tokenguard report`` adds up: the days before the stream holds every row as
        daily tallies (one per day and set of labels: vendor, endpoint, model, scope, outcome;
        such a day counts whole), then the rows the stream holds, one by one."""
        if self._ledger is not None:
            yield from ((row, None) for row in self._ledger.rows(since=since, until=until, scope=scope))
            return
        boundary = self.summarised_before()
        if boundary is not None and (since is None or since < boundary):
            first = (since or datetime.now(UTC) - timedelta(days=self.days)).astimezone(UTC)
            day = first.replace(hour=0, minute=0, second=0, microsecond=0)
            last = boundary if until is None else min(boundary, until)
            days: list[datetime] = []
            while day < last:
                days.append(day)
                day += timedelta(days=1)
            for chunk in range(0, len(days), 50):
                batch = days[chunk : chunk + 50]

                def op(batch: list[datetime] = batch) -> list[Any]:
                    pipe = self._client.pipeline(transaction=False)
                    for when in batch:
                        pipe.hgetall(self._k("r", f"{when:%Y%m%d}"))
                    result: list[Any] = pipe.execute()
                    return result

                for when, fields in zip(batch, self._read("reading the daily tallies", op), strict=True):
                    yield from _tallies(when, fields, scope)
            since = boundary
        yield from ((row, None) for row in self.rows(since=since, until=until, scope=scope))

    def retention(self) -> tuple[int, datetime | None, bool]:
        """The rows the stream holds; since when it holds every row *recorded* (by the Redis
        server's clock; ``None`` when empty) — a row is recorded when its call ends, so a long
        call that started earlier can be among them, and one recorded before can be gone; and
        whether older rows were trimmed from it."""
        if self._ledger is not None:
            return 0, None, False
        return self._read("reading the ledger", self._stream_retention)

    def _stream_retention(self) -> tuple[int, datetime | None, bool]:
        """``retention()``'s reads (within a Redis operation: no flush, no failure handling)."""
        stream = self._k("rows")
        if not self._client.exists(stream):
            return 0, None, False
        info = self._client.xinfo_stream(stream)
        first = info.get("first-entry")
        # the entry id is the server's time of writing: every row written since is here
        kept_since = datetime.fromtimestamp(int(first[0].split(b"-")[0]) / 1000, tz=UTC) if first else None
        return int(info["length"]), kept_since, int(info.get("entries-added", 0)) > int(info["length"])

    def _covers(self, since: datetime | None) -> bool:
        """Whether the stream still holds every row that started at or after ``since``: a row
        trimmed away was recorded before the stream's first entry, and started before it was
        recorded (allowing for hosts' clocks to differ from the server's by ``_SKEW_S``)."""
        _, kept_since, trimmed = self._stream_retention()  # called inside _aggregate's operation
        if not trimmed:
            return True
        return since is not None and kept_since is not None and kept_since + timedelta(seconds=_SKEW_S) <= since

    def _facet_keys(self, since: datetime | None, scope: Mapping[str, str]) -> list[str] | None:
        """The running totals that add up to the rows since ``since`` matching ``scope``, or
        ``None`` when they cannot (several attributes; a start that is not a whole hour or
        day; a start older than the totals are kept)."""
        if len(scope) > 1:
            return None
        facet = "*" if not scope else "{}={}".format(*next(iter(scope.items())))
        if since is None:
            return [self._k("s", "t:all", facet)]
        since = since.astimezone(UTC)
        now = datetime.now(UTC)
        if since.minute or since.second or since.microsecond:
            return None
        keys: list[str] = []
        day = since.replace(hour=0)
        if since.hour:
            if since.timestamp() < now.timestamp() - _HOUR_KEEP_S + 3600:
                return None
            keys.extend(self._k("s", f"h:{since.replace(hour=h):%Y%m%d%H}", facet) for h in range(since.hour, 24))
            day += timedelta(days=1)
        elif since.timestamp() < now.timestamp() - self.days * 86_400:
            return None
        last = now + timedelta(days=2)  # rows stamped by a host whose clock runs ahead
        while day <= last:
            keys.append(self._k("s", f"d:{day:%Y%m%d}", facet))
            day += timedelta(days=1)
        return keys

    def _aggregate(self, since: datetime | None, scope: Mapping[str, str]) -> Stats:
        keys = self._facet_keys(since, scope)

        def op() -> Stats:
            if keys is None:
                if not self._covers(since):
                    when = "from the start" if since is None else f"since {since:%Y-%m-%d %H:%M:%S} UTC"
                    raise ConfigurationError(
                        "scope",
                        dict(scope),
                        f"the Redis ledger keeps totals by one scope attribute and whole hours/days; this query "
                        f"needs single rows, and its stream (the last {self.max_rows:,} rows) no longer holds all "
                        f"of them {when}. Filter on one attribute, or raise ?rows=",
                    )
                found = []
                for data in self._stream(self._k("rows"), since):
                    row = _row_of(data)
                    if (since is None or row.ts >= since) and matches_scope(row.scope, scope):
                        found.append(row)
                return Stats.of(found)
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            acc: dict[str, int] = {}
            for fields in pipe.execute():
                for field, value in fields.items():
                    name = field.decode()
                    acc[name] = acc.get(name, 0) + int(value)
            return _stats_of(acc)

        return self._read("reading the ledger totals", op)

    def spent(self, *, since: datetime | None, scope: Mapping[str, str]) -> Decimal:
        """Settled USD of the matching rows (exact)."""
        if self._ledger is not None:
            return self._ledger.spent(since=since, scope=scope)
        return self._aggregate(since, scope).spent_usd

    def stats(self, *, since: datetime | None, scope: Mapping[str, str]) -> Stats:
        """Totals of the matching rows."""
        if self._ledger is not None:
            return self._ledger.stats(since=since, scope=scope)
        return self._aggregate(since, scope)

    def record_outcome(self, row: OutcomeRow) -> None:
        """Keep one outcome (in a capped stream of its own)."""
        data = json.dumps([row.ts.timestamp(), row.name, dict(row.scope), row.count], separators=(",", ":"))
        self._call(
            "recording an outcome",
            lambda: self._client.xadd(self._k("outcomes"), {"r": data}, maxlen=self.max_rows, approximate=True),
        )

    def outcomes(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[OutcomeRow]:
        """The matching outcomes the stream still holds, oldest first."""

        def op() -> list[OutcomeRow]:
            found = []
            for data in self._stream(self._k("outcomes"), since):
                ts, name, row_scope, count = json.loads(data)
                row = OutcomeRow(datetime.fromtimestamp(ts, tz=UTC), name, MappingProxyType(row_scope), int(count))
                in_time = (since is None or row.ts >= since) and (until is None or row.ts < until)
                if in_time and (not scope or matches_scope(row.scope, scope)):
                    found.append(row)
            found.sort(key=lambda r: r.ts)
            return found

        yield from self._call("reading outcomes", op)

    def close(self) -> None:
        """Write queued rows and close the connections."""
        try:
            self._stop_writer()
            if self._ledger is not None:
                self._ledger.close()
        finally:
            close_client(self._client)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r}, on_failure={self.on_failure!r})"
