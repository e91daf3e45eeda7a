"""An agent stuck in a loop is stopped before its repeats are sent.

What it shows, with ``LoopDetector(max_repeats=3, window_s=600)`` (the 4th identical request in
10 minutes, in the same scope, raises ``tokenguard.LoopDetected`` and is not sent):

1. exact repeats: an agent that asks the same question again and again;
2. near-repeats: an agent whose prompt changes only by an attempt counter and the current time,
   which the detector's "normalized" level (on by default) treats as the same request; then the
   cool-down, which refuses the loop's next attempt too;
3. what is *not* a loop: a batch job over different tickets, whose prompts differ only in the
   ticket number, is never refused (a number that jumps is another item, not a counter).

The agent's own ``max_steps`` is 10; the detector stops it at the 4th step. For each part it
prints the attempts made, the requests that reached the (fake) API, and the exception's
``.repeats``, ``.level`` and ``.fingerprint`` (a hash: never the prompt). What the detector
cannot tell from a batch job, a loop whose prompt carries a fresh random id (a UUID) each time,
is described in docs/loops.md, with the third level (the same tool call over a growing
conversation).

It needs no API key and no network: the client talks to tokenguard's built-in fake API
(``tokenguard.testing.FakeLLM``), in-process. Run it from the repository root::

    python examples/agent_loop.py

With a real key, delete the lines marked "fake API only".
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import tokenguard
from tokenguard.testing import FakeLLM, Reply

SYSTEM = {"role": "system", "content": "You are an operations assistant. Be brief."}


def ask(client: tokenguard.OpenAI, prompt: str) -> str:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[SYSTEM, {"role": "user", "content": prompt}], max_tokens=20
    )
    return reply.choices[0].message.content or ""


def run_agent(client: tokenguard.OpenAI, prompt_for: Callable[[int], str], max_steps: int = 10) -> int:
    """A naive agent: re-asks until the answer says 'done' (the fake never does). Returns the
    number of attempts it made; the loop detector's refusal ends it early."""
    for step in range(1, max_steps + 1):
        prompt = prompt_for(step)
        try:
            answer = ask(client, prompt)
        except tokenguard.LoopDetected as loop:
            print(f"  step {step}: {prompt!r} refused, not sent")
            print(f"  LoopDetected: repeats={loop.repeats} level={loop.level!r} fingerprint={loop.fingerprint}")
            return step
        print(f"  step {step}: {prompt!r} sent, answer {answer!r}")
        if "done" in answer:
            return step
    return max_steps


def deploy_check(step: int) -> str:
    """A prompt that changes every time, but only by a counter and the current time."""
    return f"Attempt {step} at {datetime.now(UTC).isoformat(timespec='milliseconds')}: check the deploy."


def main() -> None:
    fake = FakeLLM(Reply(text="not yet", input_tokens=40, output_tokens=3))  # the deploy never finishes
    guard = tokenguard.Guard(
        store="memory://",  # the loop history lives in the store; SQLite or Redis share it between processes
        loops=tokenguard.LoopDetector(max_repeats=3, window_s=600),
    )
    client = tokenguard.OpenAI(
        guard=guard,
        api_key="sk-fake",  # fake API only: delete with a real OPENAI_API_KEY
        http_client=fake.http_client(),  # fake API only: delete to talk to api.openai.com
    )

    print("1. exact repeats")
    before = len(fake.money_requests)
    with tokenguard.scope(job="deploy-watcher"):  # loop histories are kept per scope
        attempts = run_agent(client, lambda step: "Has the deploy of release 7 finished?")
    print(f"  exact: {attempts} attempts, {len(fake.money_requests) - before} requests sent\n")

    print("2. near-repeats: only a counter and the time change")
    before = len(fake.money_requests)
    with tokenguard.scope(job="deploy-retrier"):
        attempts = run_agent(client, deploy_check)
        print(f"  near-repeats: {attempts} attempts, {len(fake.money_requests) - before} requests sent")
        try:  # the job tries once more right away: the loop is in its cool-down (60 s by default)
            ask(client, deploy_check(attempts + 1))
            print("  one more attempt: sent\n")
        except tokenguard.LoopDetected as loop:
            print(f"  one more attempt: refused (level={loop.level!r}), not sent\n")

    print("3. a batch job is not a loop: the ticket number jumps")
    before = len(fake.money_requests)
    tickets = [4312, 1187, 2290, 3071, 4475, 1502]
    with tokenguard.scope(job="ticket-summaries"):
        for ticket in tickets:
            ask(client, f"Summarise ticket #{ticket} in one line.")  # LoopDetected here would end the script
    print(f"  batch: {len(tickets)} tickets, {len(fake.money_requests) - before} requests sent, none refused\n")

    stats = guard.stats()
    print(
        f"guard.stats(): calls={stats.calls} loops_blocked={stats.loops_blocked} spent_usd={stats.spent_usd} "
        f"(requests that reached the API: {len(fake.money_requests)})"
    )
    client.close()
    guard.close()


if __name__ == "__main__":
    main()
