"""Quickstart: guard an OpenAI and an Anthropic client, attribute calls, read the ledger.

Runs with no API key and no network: the clients talk to tokenguard's built-in fake API
(``tokenguard.testing.FakeLLM``). With real keys, drop the ``http_client=`` / fake lines:
``tokenguard.OpenAI()`` takes exactly what ``openai.OpenAI()`` takes.

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import tokenguard
from tokenguard.testing import FakeLLM, Reply


def main() -> None:
    ledger = Path(tempfile.mkdtemp()) / "ledger.db"
    guard = tokenguard.Guard(store=f"sqlite:///{ledger}")

    # a fake API that reports realistic usage (1,200 tokens in, 300 cached; 250 out)
    fake = FakeLLM(Reply(text="Revenue rose 12%.", input_tokens=1200, cache_read_tokens=300, output_tokens=250))
    openai_client = fake.openai(guard=guard)  # a tokenguard.OpenAI: isinstance(openai_client, openai.OpenAI)
    claude = fake.anthropic(guard=guard)  # a tokenguard.Anthropic

    question = [{"role": "user", "content": "Summarise the quarterly report in one line."}]
    with tokenguard.scope(user="alice", project="reports"):
        openai_client.chat.completions.create(model="gpt-4o", messages=question)
        with openai_client.chat.completions.stream(model="gpt-4o-mini", messages=question) as stream:
            for _ in stream:
                pass  # no usage in this stream: tokenguard estimates it from the text and marks the row
    with tokenguard.scope(user="bob", project="reports"):
        claude.messages.create(model="claude-haiku-4-5", max_tokens=300, messages=question)

    print(f"ledger: {ledger}\n")
    print(f"{'user':6} {'vendor':10} {'endpoint':17} {'model':18} {'in':>6} {'out':>5} {'cost USD':>12}  note")
    for row in guard.store.rows():
        note = "estimated" if row.estimated else ""
        print(
            f"{row.scope.get('user', '-'):6} {row.vendor:10} {row.endpoint:17} {row.model:18} "
            f"{row.usage.input_tokens:6} {row.usage.output_tokens:5} {row.cost_usd:>12}  {note}"
        )
    print()
    print("alice spent today:", guard.spent(period="day", user="alice"), "USD")
    print("project total:    ", guard.spent(project="reports"), "USD")
    stats = guard.stats()
    print(f"calls={stats.calls} input_tokens={stats.input_tokens} output_tokens={stats.output_tokens}")
    guard.close()


if __name__ == "__main__":
    main()
