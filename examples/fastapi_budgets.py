"""A FastAPI service with a daily AI budget per user: over budget, the user gets HTTP 402.

What it shows:

- one ``Guard`` for the app with ``Budget(limit_usd=..., period="day", per="user")``: each user
  has their own daily cap, reserved before a call is sent (nothing is sent over the cap);
- the user taken from a request header (``X-User``) and each call made inside
  ``tokenguard.scope(user=...)``, so the right user's budget is charged;
- an exception handler that turns ``tokenguard.BudgetExceeded`` into ``402 Payment Required``
  with a JSON body (spent, limit, when the budget resets) and a ``Retry-After`` header;
- ``GET /budget``: where the user stands (``guard.budget_status(user=...)``).

Run as a script, it needs no API key and no network::

    python examples/fastapi_budgets.py

It starts tokenguard's fake LLM API on loopback (``tokenguard.testing.FakeServer``), serves the
app with uvicorn on a free loopback port in a thread, asks questions as alice until she gets a
402 while bob still gets 200, prints each status, and shuts everything down. The ledger is kept
in a temporary directory.

Serve it yourself with a real key (run from the repository root; the ledger is then
``TOKENGUARD_STORE``, or tokenguard's default file in your user data directory)::

    OPENAI_API_KEY=sk-... uvicorn examples.fastapi_budgets:app --port 8000
    curl -X POST localhost:8000/ask -H 'X-User: alice' -H 'Content-Type: application/json' \\
         -d '{"question": "What is a token?"}'
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import tokenguard
from tokenguard.testing import FakeLLM, FakeServer, Reply


class Question(BaseModel):
    question: str


def create_app(*, store: str | None = None, daily_limit_usd: Decimal | str = "0.01") -> FastAPI:
    """The app. ``store``: the ledger URL (``None``: ``TOKENGUARD_STORE`` or the default file)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # built at start-up, not at import: the client reads OPENAI_API_KEY (and OPENAI_BASE_URL) here
        guard = tokenguard.Guard(
            store=store,
            budgets=[tokenguard.Budget(limit_usd=daily_limit_usd, period="day", per="user")],
        )
        app.state.guard = guard
        app.state.llm = tokenguard.AsyncOpenAI(guard=guard)
        yield
        await app.state.llm.close()
        guard.close()

    app = FastAPI(title="Ask, within budget", lifespan=lifespan)

    @app.exception_handler(tokenguard.BudgetExceeded)
    async def over_budget(request: Request, exc: tokenguard.BudgetExceeded) -> JSONResponse:
        headers = {}
        if exc.resets_at is not None:  # None only for a period="total" budget, which never resets
            headers["Retry-After"] = str(max(int((exc.resets_at - datetime.now(UTC)).total_seconds()), 1))
        return JSONResponse(
            status_code=402,
            headers=headers,
            content={
                "error": "You have used today's AI budget.",
                "user": exc.scope.get("user"),
                "spent_usd": str(exc.spent_usd + exc.held_usd),  # exact amounts, as strings
                "limit_usd": str(exc.limit_usd),
                "resets_at": exc.resets_at.isoformat() if exc.resets_at else None,
            },
        )

    @app.post("/ask")
    async def ask(body: Question, request: Request, x_user: Annotated[str, Header()]) -> dict[str, str]:
        with tokenguard.scope(user=x_user):  # this user's budget; the ledger row is labelled user=...
            completion = await request.app.state.llm.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": body.question}],
                max_tokens=300,  # bounds the worst case the budget must reserve for this call
            )
        return {"answer": completion.choices[0].message.content or ""}

    @app.get("/budget")
    def budget(request: Request, x_user: Annotated[str, Header()]) -> dict[str, Any]:
        (status,) = request.app.state.guard.budget_status(user=x_user)
        return {
            "user": x_user,
            "spent_usd": str(status.spent_usd),
            "remaining_usd": str(status.remaining_usd),
            "resets_at": status.resets_at.isoformat(),
        }

    return app


app = create_app()  # for `uvicorn examples.fastapi_budgets:app`


# -- the demonstration: run as a script ---------------------------------------------------------


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port, in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    try:
        while not server.started:  # port=0: the OS picks a free port; read it once the server listens
            if not thread.is_alive():
                raise SystemExit("the web server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(method: str, url: str, user: str, payload: dict[str, str] | None = None) -> tuple[int, Any]:
    """One HTTP request as ``user``; returns the status and the JSON body."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data, {"X-User": user, "Content-Type": "application/json"}, method=method)
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with no_proxy.open(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        body = error.read().decode()
        return error.code, json.loads(body) if body.startswith("{") else body


def main() -> None:
    # the fake LLM API: every answer reports 500 input and 200 output tokens (gpt-4o: $0.00325)
    fake = FakeLLM(Reply(text="A token is a piece of a word.", input_tokens=500, output_tokens=200))
    with FakeServer(fake) as llm_api, tempfile.TemporaryDirectory(prefix="tokenguard-example-") as tmp:
        os.environ["OPENAI_BASE_URL"] = llm_api.openai_base_url  # fake API only: delete for the real API
        os.environ["OPENAI_API_KEY"] = "sk-fake"  # fake API only: delete with a real OPENAI_API_KEY
        os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1"  # fake API only: loopback, no proxy

        with serve(create_app(store=f"sqlite:///{tmp}/ledger.db", daily_limit_usd="0.01")) as base:
            print(f"app on {base}, daily budget $0.01 per user\n")
            for attempt in range(1, 10):
                status, body = call("POST", f"{base}/ask", "alice", {"question": f"Question {attempt}"})
                print(f"POST /ask  X-User: alice -> {status}  {json.dumps(body)}")
                if status == 402:
                    break
            status, body = call("POST", f"{base}/ask", "bob", {"question": "Question 1"})
            print(f"POST /ask  X-User: bob   -> {status}  {json.dumps(body)}")
            for user in ("alice", "bob"):
                status, body = call("GET", f"{base}/budget", user)
                print(f"GET /budget X-User: {user:5} -> {status}  {json.dumps(body)}")
        print(f"\nrequests that reached the LLM API: {len(fake.money_requests)}")


if __name__ == "__main__":
    main()
