"""Async clients and streams: concurrent calls keep their own scope, and streams are charged.

What it shows:

- ``tokenguard.AsyncOpenAI`` and ``tokenguard.AsyncAnthropic`` (``openai.AsyncOpenAI`` /
  ``anthropic.AsyncAnthropic`` underneath);
- ``asyncio.gather`` of several calls, each under its own ``tokenguard.scope(user=...)``: a
  scope belongs to its task, so every ledger row names the right user;
- async streaming: ``async with client.chat.completions.stream(...)``, ``stream=True`` with
  ``async for``, and ``async with claude.messages.stream(...)``;
- what a stream is charged: the usage the stream reports at its end (exact), an estimate when it
  reports none (marked ``estimated``), and the part received when the caller stops reading early.

It needs no API key and no network: the clients talk to tokenguard's built-in fake API
(``tokenguard.testing.FakeLLM``), in-process. Run it from the repository root::

    python examples/async_streaming.py

With real keys, delete the lines marked "fake API only".
"""

from __future__ import annotations

import asyncio
import tempfile

import tokenguard
from tokenguard.testing import FakeLLM, Reply


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def main() -> None:
    # The fake API answers every call with this text and reports this usage.
    fake = FakeLLM(Reply(text="Streams are charged for what they used.", input_tokens=400, output_tokens=80))

    with tempfile.TemporaryDirectory(prefix="tokenguard-example-") as tmp:
        guard = tokenguard.Guard(
            store=f"sqlite:///{tmp}/ledger.db",
            # each call reserves its worst case before it is sent: max_tokens keeps that small
            budgets=[tokenguard.Budget(limit_usd=1, period="day", per="user")],
        )
        client = tokenguard.AsyncOpenAI(
            guard=guard,
            api_key="sk-fake",  # fake API only: delete with a real OPENAI_API_KEY
            http_client=fake.http_client(async_=True),  # fake API only: delete to talk to api.openai.com
        )
        claude = tokenguard.AsyncAnthropic(
            guard=guard,
            api_key="sk-ant-fake",  # fake API only: delete with a real ANTHROPIC_API_KEY
            http_client=fake.http_client(async_=True),  # fake API only: delete to talk to api.anthropic.com
        )

        # 1. concurrent calls: a scope belongs to the task that set it, so each row names its own user
        async def ask_gpt(user: str, question: str) -> str:
            with tokenguard.scope(user=user, team="research"):
                completion = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=messages(question), max_tokens=200
                )
            return completion.choices[0].message.content or ""

        async def ask_claude(user: str, question: str) -> str:
            with tokenguard.scope(user=user, team="research"):
                message = await claude.messages.create(
                    model="claude-haiku-4-5", messages=messages(question), max_tokens=200
                )
            return message.content[0].text

        await asyncio.gather(
            ask_gpt("alice", "Question 1"),
            ask_gpt("bob", "Question 2"),
            ask_claude("carol", "Question 3"),
            ask_gpt("alice", "Question 4"),
        )
        for user in ("alice", "bob", "carol"):
            stats = guard.stats(user=user)
            print(f"gather: {user:5} calls={stats.calls} spent_usd={stats.spent_usd}")

        print()
        with tokenguard.scope(user="dave", team="research"):
            # 2. the stream helper; the stream reports its usage at the end because include_usage asks
            async with client.chat.completions.stream(
                model="gpt-4o", messages=messages("One"), max_tokens=200, stream_options={"include_usage": True}
            ) as stream:
                text = "".join([event.delta async for event in stream if event.type == "content.delta"])
                final = await stream.get_final_completion()
            print(f"2. stream helper: {text!r}, {final.usage.completion_tokens} output tokens reported")

            # 3. stream=True with no usage in the stream: tokenguard estimates it and marks the row
            chunks = await client.chat.completions.create(
                model="gpt-4o", messages=messages("Two"), max_tokens=200, stream=True
            )
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in chunks if chunk.choices])
            print(f"3. stream=True: {text!r}")

            # 4. a stream the caller stops reading early: what was received is still charged
            chunks = await client.chat.completions.create(
                model="gpt-4o", messages=messages("Three"), max_tokens=200, stream=True
            )
            async for _ in chunks:
                break
            await chunks.close()
            print("4. stream=True, abandoned after its first chunk")

            # 5. Anthropic's stream always reports its usage
            async with claude.messages.stream(
                model="claude-haiku-4-5", messages=messages("Four"), max_tokens=200
            ) as stream:
                text = "".join([piece async for piece in stream.text_stream])
            print(f"5. anthropic stream: {text!r}")

        print(f"\n   {'outcome':10} {'vendor':9} {'model':16} {'in':>4} {'out':>4} {'cost USD':>10}  charged from")
        for number, row in enumerate(guard.store.rows(scope={"user": "dave"}), start=2):
            source = "an estimate" if row.estimated else "the stream's usage"
            print(
                f"{number}. {row.outcome:10} {row.vendor:9} {row.model:16} {row.usage.input_tokens:4} "
                f"{row.usage.output_tokens:4} {row.cost_usd!s:>10}  {source}"
            )
        print(f'\nguard.spent(user="dave") = {guard.spent(user="dave")!r}')
        print(f'guard.spent(team="research") = {guard.spent(team="research")!r}')

        await client.close()
        await claude.close()
        guard.close()


if __name__ == "__main__":
    asyncio.run(main())
