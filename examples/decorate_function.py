"""``@tokenguard.guarded``: protect a function you already have that calls an LLM inside.

What it shows:

- ``@tokenguard.guarded`` (the default guard) on a sync function, and
  ``@tokenguard.guarded(guard=..., project=..., scope_from=...)`` on an async one;
- the function-level cache: calling the function again with the same arguments (in the same
  scope) returns the kept result without running it, so nothing is sent; the ledger records a
  ``cache_hit`` row that saved what the first run cost;
- attribution: the calls made inside are labelled ``function=<module.qualname>`` plus the
  decorator's attributes, so ``guard.spent(function=...)`` and ``tokenguard report --by function``
  show what each function costs; one user's cached answer is never handed to another.

It needs no API key and no network: the clients talk to tokenguard's built-in fake API
(``tokenguard.testing.FakeLLM``), in-process. The ledger and the cache are kept in a temporary
directory, deleted at the end. Run it from the repository root::

    python examples/decorate_function.py

With a real key, delete the lines marked "fake API only".
docs/decorator.md describes every option (retry, loops, ``cost=``, ``outcome=``, ``key=``).
"""

from __future__ import annotations

import asyncio
import tempfile

import tokenguard
from tokenguard.testing import FakeLLM, Reply

fake = FakeLLM(Reply(text="A short summary.", input_tokens=3000, output_tokens=150))

# One guard for the application. Its ledger and cache go to a temporary directory, deleted at the end.
workdir = tempfile.TemporaryDirectory(prefix="tokenguard-example-")
guard = tokenguard.Guard(
    store=f"sqlite:///{workdir.name}/ledger.db",
    cache=tokenguard.Cache(path=f"{workdir.name}/cache"),  # also keeps the decorated functions' results
)
tokenguard.set_default_guard(guard)  # what a bare @tokenguard.guarded and clients built without guard= use

# The application's clients, built once, with no guard=: they report to tokenguard.default_guard().
client = tokenguard.OpenAI(
    api_key="sk-fake",  # fake API only: delete with a real OPENAI_API_KEY
    http_client=fake.http_client(),  # fake API only: delete to talk to api.openai.com
)
async_client = tokenguard.AsyncOpenAI(
    api_key="sk-fake",  # fake API only: delete with a real OPENAI_API_KEY
    http_client=fake.http_client(async_=True),  # fake API only: delete to talk to api.openai.com
)


# An existing function: only the decorator line is new.
@tokenguard.guarded
def summarize(text: str) -> str:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"Summarise:\n{text}"}], max_tokens=200
    )
    return completion.choices[0].message.content or ""


# An async function, with a guard named and attribution: every call is labelled project=support
# and with the user its arguments name (so its cached results are that user's own).
@tokenguard.guarded(guard=guard, project="support", scope_from=lambda ticket, user: {"user": user})
async def draft_reply(ticket: str, user: str) -> str:
    completion = await async_client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": f"Draft a reply to: {ticket}"}], max_tokens=300
    )
    return completion.choices[0].message.content or ""


def sent() -> int:
    """The requests that reached the (fake) API so far."""
    return len(fake.money_requests)


async def main() -> None:
    report = "Q3 revenue rose 12% on strong subscription growth ..."
    summarize(report)
    print(f"summarize, first call:  requests sent so far = {sent()}")
    summarize(report)
    print(f"summarize, same text:   requests sent so far = {sent()} (the kept result was returned)")

    ticket = "My invoice shows the wrong VAT number."
    await asyncio.gather(draft_reply(ticket, user="alice"), draft_reply(ticket, user="bob"))
    print(f"draft_reply for alice and bob: requests sent so far = {sent()} (one each: not shared)")
    await draft_reply(ticket, user="alice")
    print(f"draft_reply for alice again:   requests sent so far = {sent()}")

    print(f"\n{'outcome':10} {'vendor':9} {'cost USD':>10} {'saved USD':>10}  scope")
    for row in guard.store.rows():
        scope = ", ".join(f"{k}={v}" for k, v in row.scope.items())
        print(f"{row.outcome:10} {row.vendor:9} {row.cost_usd!s:>10} {row.saved_usd or '':>10}  {scope}")

    print()  # function= is the module and name of the function (__main__ when run as a script)
    print(f'guard.spent(function="__main__.summarize") = {guard.spent(function="__main__.summarize")!r}')
    print(f'guard.spent(project="support", user="alice") = {guard.spent(project="support", user="alice")!r}')
    stats = guard.stats()
    print(f"guard.stats(): calls={stats.calls} cache_hits={stats.cache_hits} saved_usd={stats.saved_usd}")

    client.close()
    await async_client.close()
    guard.close()
    workdir.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
