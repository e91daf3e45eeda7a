"""Observability (issue 7, item 6): a structured log record per call, and opt-in OpenTelemetry
spans and metrics following the GenAI semantic conventions."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from decimal import Decimal

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tokenguard
from tokenguard import _telemetry
from tokenguard.testing import FakeLLM, Reply

MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    """An SDK tracer and meter with in-memory exporters, handed to tokenguard's telemetry."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(trace, "get_tracer", tracer_provider.get_tracer)
    from opentelemetry import metrics

    monkeypatch.setattr(metrics, "get_meter", meter_provider.get_meter)
    yield exporter, reader
    tracer_provider.shutdown()
    meter_provider.shutdown()


def test_each_call_is_a_genai_span_under_the_callers_span(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    exporter, reader = otel
    guard = tokenguard.Guard(store="memory://", otel=True, settle_delay_s=0)
    client = FakeLLM(Reply(input_tokens=1500, output_tokens=300)).openai(guard=guard)
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("handle request") as parent, tokenguard.scope(user="alice"):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    span = spans["chat gpt-4o"]
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] == 1500
    assert attrs["gen_ai.usage.output_tokens"] == 300
    assert attrs["tokenguard.scope.user"] == "alice"
    row = next(iter(guard.store.rows()))
    assert Decimal(str(attrs["tokenguard.cost_usd"])) == row.cost_usd
    assert span.kind == trace.SpanKind.CLIENT
    metrics = {
        m.name: m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    usage = metrics["gen_ai.client.token.usage"].data.data_points
    assert {dict(p.attributes)["gen_ai.token.type"]: p.sum for p in usage} == {"input": 1500, "output": 300}
    assert "gen_ai.client.operation.duration" in metrics
    assert "tokenguard.cost" in metrics


def test_a_blocked_call_is_an_error_span(otel: tuple[InMemorySpanExporter, InMemoryMetricReader]) -> None:
    exporter, _ = otel
    guard = tokenguard.Guard(
        store="memory://", otel=True, settle_delay_s=0, budgets=[tokenguard.Budget(limit_usd=Decimal("0.000001"))]
    )
    client = FakeLLM().openai(guard=guard)
    with pytest.raises(tokenguard.BudgetExceeded):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    guard.flush()
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == trace.StatusCode.ERROR
    assert dict(span.attributes or {})["tokenguard.outcome"] == "blocked"


def test_telemetry_is_off_by_default(otel: tuple[InMemorySpanExporter, InMemoryMetricReader]) -> None:
    exporter, _ = otel
    guard = tokenguard.Guard(store="memory://", settle_delay_s=0)
    FakeLLM().openai(guard=guard).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert exporter.get_finished_spans() == ()
    with pytest.raises(tokenguard.ConfigurationError, match="otel"):
        tokenguard.Guard(store="memory://", otel="yes")  # type: ignore[arg-type]


def test_a_failing_exporter_never_fails_the_call(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = tokenguard.Guard(store="memory://", otel=True, settle_delay_s=0)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("collector down")

    monkeypatch.setattr(_telemetry.Telemetry, "record", broken)
    reply = FakeLLM().openai(guard=guard).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert reply.choices[0].message.content
    assert len(list(guard.store.rows())) == 1


def test_each_call_is_a_structured_debug_record(caplog: pytest.LogCaptureFixture) -> None:
    guard = tokenguard.Guard(store="memory://", settle_delay_s=0)
    client = FakeLLM(Reply(input_tokens=1200, output_tokens=40)).openai(guard=guard, api_key="sk-secret-123")
    with caplog.at_level(logging.DEBUG, logger="tokenguard.calls"), tokenguard.scope(project="search"):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    (record,) = [r for r in caplog.records if r.name == "tokenguard.calls"]
    fields = record.tokenguard  # type: ignore[attr-defined]
    assert fields["model"] == "gpt-4o"
    assert fields["input_tokens"] == 1200
    assert fields["outcome"] == "ok"
    assert fields["scope"] == {"project": "search"}
    assert Decimal(fields["cost_usd"]) > 0
    assert "sk-secret-123" not in record.getMessage() + repr(fields)
