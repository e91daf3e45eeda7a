"""Anthropic quickstart: the same guard for Claude, by import or by wrapping a client you have.

What it shows:

- ``from tokenguard import Anthropic`` instead of ``from anthropic import Anthropic``;
- ``tokenguard.wrap(client)``: a guarded copy of an ``anthropic.Anthropic`` you already built
  (the original stays unguarded);
- ``messages.create`` and ``messages.stream``, priced from the usage Anthropic reports;
- a repeat answered from the cache for $0 (Anthropic calls are cached inside
  ``tokenguard.cache_control(always=True)``);
- attribution with ``tokenguard.scope(...)``, the ledger rows, ``guard.spent()`` and ``guard.stats()``.

It needs no API key and no network: the clients talk to tokenguard's built-in fake API
(``tokenguard.testing.FakeLLM``), in-process. The ledger and the cache are kept in a temporary
directory, deleted at the end. Run it from the repository root::

    python examples/anthropic_quickstart.py

With a real key, delete the lines marked "fake API only": the clients then read
``ANTHROPIC_API_KEY`` like ``anthropic.Anthropic()`` does.
"""

from __future__ import annotations

import tempfile

import anthropic

import tokenguard
from tokenguard import Anthropic  # the one-line change; was: from anthropic import Anthropic
from tokenguard.testing import FakeLLM, Reply

QUESTION = [{"role": "user", "content": "Name one reason to cap an AI budget per user."}]


def main() -> None:
    # The fake API answers every call with this text and reports this usage.
    fake = FakeLLM(
        Reply(text="One user's runaway script cannot spend everyone's money.", input_tokens=900, output_tokens=120)
    )

    with tempfile.TemporaryDirectory(prefix="tokenguard-example-") as tmp:
        guard = tokenguard.Guard(
            store=f"sqlite:///{tmp}/ledger.db",  # the ledger (default: your user data dir)
            budgets=[tokenguard.Budget(limit_usd=2, period="day", per="user")],  # $2 a day for each user
            cache=tokenguard.Cache(path=f"{tmp}/cache"),  # used inside tokenguard.cache_control(always=True)
        )

        # 1. the import change: a tokenguard.Anthropic is an anthropic.Anthropic
        claude = Anthropic(
            guard=guard,
            api_key="sk-ant-fake",  # fake API only: delete with a real ANTHROPIC_API_KEY
            http_client=fake.http_client(),  # fake API only: delete to talk to api.anthropic.com
        )
        with tokenguard.scope(user="alice", project="support"):
            message = claude.messages.create(model="claude-sonnet-4-5", max_tokens=300, messages=QUESTION)
            print("create:", message.content[0].text)

            with claude.messages.stream(model="claude-haiku-4-5", max_tokens=300, messages=QUESTION) as stream:
                text = "".join(stream.text_stream)  # the text as it arrives
            print("stream:", text, f"(usage: {stream.get_final_message().usage.output_tokens} output tokens)")

        # 2. wrapping: the client your code already builds, guarded without touching its construction
        existing = anthropic.Anthropic(
            api_key="sk-ant-fake",  # fake API only: delete with a real ANTHROPIC_API_KEY
            http_client=fake.http_client(),  # fake API only: delete to talk to api.anthropic.com
        )
        wrapped = tokenguard.wrap(existing, guard=guard)
        print("wrapped is an anthropic.Anthropic:", isinstance(wrapped, anthropic.Anthropic))
        with tokenguard.scope(user="bob", project="support"), tokenguard.cache_control(always=True):
            first = wrapped.messages.create(model="claude-haiku-4-5", max_tokens=300, messages=QUESTION)
            again = wrapped.messages.create(model="claude-haiku-4-5", max_tokens=300, messages=QUESTION)
            print("cached repeat is the same answer:", again.content[0].text == first.content[0].text)

        # the original client is left as it was: its calls are not guarded, and appear in no ledger row
        existing.messages.create(model="claude-haiku-4-5", max_tokens=300, messages=QUESTION)
        print(f"\nrequests that reached the API: {len(fake.money_requests)} (the cache hit was not sent)")

        print(f"\n{'outcome':10} {'user':6} {'model':18} {'in':>4} {'out':>4} {'cost USD':>10} {'saved USD':>10}")
        for row in guard.store.rows():
            print(
                f"{row.outcome:10} {row.scope['user']:6} {row.model:18} {row.usage.input_tokens:4} "
                f"{row.usage.output_tokens:4} {row.cost_usd!s:>10} {row.saved_usd or '':>10}"
            )

        print()
        print(f'guard.spent(period="day", user="alice") = {guard.spent(period="day", user="alice")!r}')
        print(f'guard.spent(user="bob")                 = {guard.spent(user="bob")!r}')
        stats = guard.stats(project="support")
        print(
            f'guard.stats(project="support"): calls={stats.calls} cache_hits={stats.cache_hits} '
            f"saved_usd={stats.saved_usd} spent_usd={stats.spent_usd}"
        )
        for user in ("alice", "bob"):
            (status,) = guard.budget_status(user=user)
            print(f"budget {status.budget.describe()} for {user}: {status.remaining_usd} USD left")

        for client in (claude, wrapped, existing):
            client.close()
        guard.close()


if __name__ == "__main__":
    main()
