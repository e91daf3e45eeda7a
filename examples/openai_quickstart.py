"""OpenAI quickstart: change one import line, and every call is priced, recorded and capped.

What it shows:

- ``from tokenguard import OpenAI`` instead of ``from openai import OpenAI``: the client is
  still an ``openai.OpenAI``, and every argument stays the same;
- a ``Guard`` with a SQLite ledger, a daily budget and a response cache;
- a chat completion, a streamed one, and a repeat answered from the cache for $0;
- attribution: ``tokenguard.scope(user=..., project=...)`` labels the calls inside it;
- the ledger rows, ``guard.spent(...)`` and ``guard.stats()``.

It needs no API key and no network: the client talks to tokenguard's built-in fake API
(``tokenguard.testing.FakeLLM``), in-process. The ledger and the cache are kept in a temporary
directory, deleted at the end. Run it from the repository root::

    python examples/openai_quickstart.py

With a real key, delete the two lines marked "fake API only" and the client reads
``OPENAI_API_KEY`` like ``openai.OpenAI()`` does.
"""

from __future__ import annotations

import tempfile

import openai

import tokenguard
from tokenguard import OpenAI  # the one-line change; was: from openai import OpenAI
from tokenguard.testing import FakeLLM, Reply

QUESTION = [{"role": "user", "content": "In one sentence: why do budgets need reservations?"}]


def main() -> None:
    # The fake API answers every call with this text and reports this usage.
    fake = FakeLLM(
        Reply(text="So two callers can never spend the same last dollar.", input_tokens=1200, output_tokens=250)
    )

    with tempfile.TemporaryDirectory(prefix="tokenguard-example-") as tmp:
        guard = tokenguard.Guard(
            store=f"sqlite:///{tmp}/ledger.db",  # the ledger: one row per call (default: your user data dir)
            budgets=[tokenguard.Budget(limit_usd=5, period="day")],  # $5 a day in all, checked before each call
            cache=tokenguard.Cache(path=f"{tmp}/cache"),  # repeatable requests (temperature=0) answered at $0
        )
        client = OpenAI(
            guard=guard,
            api_key="sk-fake",  # fake API only: delete with a real OPENAI_API_KEY
            http_client=fake.http_client(),  # fake API only: delete to talk to api.openai.com
        )
        print("client is an openai.OpenAI:", isinstance(client, openai.OpenAI))

        with tokenguard.scope(user="alice", project="search"):
            # 1. a chat completion, priced from the usage in the response. max_tokens bounds the
            #    worst case the budget reserves before sending; temperature=0 makes it cacheable.
            completion = client.chat.completions.create(
                model="gpt-4o", messages=QUESTION, max_tokens=300, temperature=0
            )
            print("answer:", completion.choices[0].message.content)

            # 2. a stream: priced from the usage the stream itself reports at its end
            with client.chat.completions.stream(
                model="gpt-4o-mini", messages=QUESTION, max_tokens=300, stream_options={"include_usage": True}
            ) as stream:
                text = "".join(event.delta for event in stream if event.type == "content.delta")
            print("streamed:", text)

        with tokenguard.scope(user="bob", project="search"):
            # 3. the same request as 1.: answered from the cache, nothing sent, $0. (The cache key is the
            #    request and the API key: the same question gets the same answer, whoever asks.)
            repeat = client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=300, temperature=0)
            print("repeat:", repeat.choices[0].message.content, f"({type(repeat).__name__}, from the cache)")

        print(f"\nrequests that reached the API: {len(fake.money_requests)} of 3 calls")
        print(f"\n{'outcome':10} {'user':6} {'model':12} {'in':>5} {'out':>4} {'cost USD':>11}  saved USD")
        for row in guard.store.rows():  # every call, attributed; API keys and prompts are never stored
            print(
                f"{row.outcome:10} {row.scope['user']:6} {row.model:12} {row.usage.input_tokens:5} "
                f"{row.usage.output_tokens:4} {row.cost_usd!s:>11}  {row.saved_usd or '-'}"
            )

        print()
        print(f'guard.spent(period="day", user="alice") = {guard.spent(period="day", user="alice")!r}')
        print(f'guard.spent(user="bob")                 = {guard.spent(user="bob")!r}')
        print(f'guard.spent(project="search")           = {guard.spent(project="search")!r}')
        stats = guard.stats()
        print(
            f"guard.stats(): calls={stats.calls} cache_hits={stats.cache_hits} saved_usd={stats.saved_usd} "
            f"spent_usd={stats.spent_usd} input_tokens={stats.input_tokens} output_tokens={stats.output_tokens}"
        )
        (budget,) = guard.budget_status()
        resets = f"{budget.resets_at:%Y-%m-%d %H:%M} UTC"
        print(f"budget {budget.budget.describe()}: {budget.remaining_usd} USD left, resets at {resets}")

        client.close()
        guard.close()  # settles what is queued and closes the ledger and the cache


if __name__ == "__main__":
    main()
