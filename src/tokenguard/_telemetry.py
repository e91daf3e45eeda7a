"""Observability: a structured log record per call, and (opt-in) OpenTelemetry spans and
metrics following the GenAI semantic conventions.

- Logger ``tokenguard.calls``: one DEBUG record per settled call, its fields in
  ``record.tokenguard`` (a dict: vendor, endpoint, model, outcome, cost_usd as a string,
  tokens, attempts, latency, scope), for a JSON log formatter to pick up.
- ``Guard(otel=True)`` (or ``TOKENGUARD_OTEL=1``): a span per call (``chat gpt-4o``) with
  ``gen_ai.*`` attributes and tokenguard's own (``tokenguard.cost_usd``, ``.outcome``,
  ``.cache_hit``...), parented to the span that was current when the call was made; and
  the ``gen_ai.client.token.usage`` and ``gen_ai.client.operation.duration`` histograms
  plus a ``tokenguard.cost`` counter. It uses whatever tracer and meter providers the
  application configured (no SDK configured: no-ops).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

from ._errors import ConfigurationError
from ._ledger import LedgerRow

__all__ = ["Telemetry", "log_call"]

calls_log = logging.getLogger("tokenguard.calls")

_OPERATION: Final = {
    "chat.completions": "chat",
    "responses": "chat",
    "messages": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
_PROVIDER: Final = {"openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic"}


def fields_of(row: LedgerRow) -> dict[str, Any]:
    """A ledger row as flat, JSON-able log fields (money as exact strings)."""
    return {
        "vendor": row.vendor,
        "endpoint": row.endpoint,
        "model": row.model,
        "outcome": row.outcome,
        "error": row.error,
        "cost_usd": None if row.cost_usd is None else str(row.cost_usd),
        "saved_usd": None if row.saved_usd is None else str(row.saved_usd),
        "input_tokens": row.usage.input_tokens,
        "output_tokens": row.usage.output_tokens,
        "cache_read_tokens": row.usage.cache_read_tokens,
        "estimated": row.estimated,
        "attempts": row.attempts,
        "latency_s": round(row.latency_s, 6),
        "stream": row.stream,
        "request_id": row.request_id,
        "scope": dict(row.scope),
    }


def log_call(row: LedgerRow) -> None:
    """One DEBUG record on ``tokenguard.calls`` for a settled call (free when DEBUG is off)."""
    if not calls_log.isEnabledFor(logging.DEBUG):
        return
    cost = "unpriced" if row.cost_usd is None else f"${row.cost_usd}"
    calls_log.debug(
        "%s %s %s %s %s (%d in, %d out, %d attempt(s), %.3fs)",
        row.vendor,
        row.endpoint,
        row.model,
        row.outcome,
        cost,
        row.usage.input_tokens,
        row.usage.output_tokens,
        row.attempts,
        row.latency_s,
        extra={"tokenguard": fields_of(row)},
    )


class Telemetry:
    """OpenTelemetry spans and metrics for settled calls."""

    def __init__(self) -> None:
        try:
            from opentelemetry import context, metrics, trace
        except ImportError:  # pragma: no cover - anthropic depends on opentelemetry-api
            raise ConfigurationError(
                "otel", True, 'needs opentelemetry-api: pip install opentelemetry-api (the "otel" extra of tokenguard)'
            ) from None
        from . import __version__

        self._context = context
        self._trace = trace
        self._tracer = trace.get_tracer("tokenguard", __version__)
        meter = metrics.get_meter("tokenguard", __version__)
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used by GenAI calls"
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of GenAI calls"
        )
        self._cost = meter.create_counter("tokenguard.cost", unit="USD", description="What the calls cost")
        self._saved = meter.create_counter("tokenguard.saved", unit="USD", description="What the cache saved")

    def current(self) -> Any:
        """The caller's OpenTelemetry context (to parent the call's span)."""
        return self._context.get_current()

    def record(self, row: LedgerRow, parent: Any) -> None:
        """A span and the metrics for one settled call."""
        operation = _OPERATION.get(row.endpoint, row.endpoint)
        base: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": _PROVIDER.get(row.vendor, row.vendor),
            "gen_ai.request.model": row.model,
        }
        attributes: dict[str, Any] = {
            **base,
            "gen_ai.response.model": row.model,
            "gen_ai.usage.input_tokens": row.usage.input_tokens,
            "gen_ai.usage.output_tokens": row.usage.output_tokens,
            "tokenguard.outcome": row.outcome,
            "tokenguard.cache_hit": row.outcome == "cache_hit",
            "tokenguard.estimated": row.estimated,
            "tokenguard.attempts": row.attempts,
            **{f"tokenguard.scope.{k}": v for k, v in row.scope.items()},
        }
        if row.cost_usd is not None:
            attributes["tokenguard.cost_usd"] = str(row.cost_usd)
        if row.saved_usd is not None:
            attributes["tokenguard.saved_usd"] = str(row.saved_usd)
        if row.request_id:
            attributes["gen_ai.response.id"] = row.request_id
        if row.error:
            attributes["error.type"] = row.error
        start = int(row.ts.timestamp() * 1e9)
        end = int((row.ts + timedelta(seconds=row.latency_s)).timestamp() * 1e9)
        span = self._tracer.start_span(
            f"{operation} {row.model}",
            context=parent,
            kind=self._trace.SpanKind.CLIENT,
            attributes=attributes,
            start_time=start,
        )
        if row.outcome in ("error", "blocked"):
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, row.error or row.outcome))
        span.end(end_time=max(end, start))
        metric_attributes: Mapping[str, Any] = {**base, "tokenguard.outcome": row.outcome}
        if row.outcome not in ("blocked", "cache_hit"):
            self._tokens.record(row.usage.input_tokens, {**metric_attributes, "gen_ai.token.type": "input"})
            self._tokens.record(row.usage.output_tokens, {**metric_attributes, "gen_ai.token.type": "output"})
        self._duration.record(row.latency_s, metric_attributes)
        if row.cost_usd:
            self._cost.add(float(row.cost_usd), metric_attributes)
        if row.saved_usd:
            self._saved.add(float(row.saved_usd), metric_attributes)
