"""A question-answering service with a per-user daily AI budget (framework-free).

Production code, as it would be written for the real OpenAI API: it builds its own
``tokenguard.OpenAI()`` with no ``guard=`` and no key in the code (the SDK reads
``OPENAI_API_KEY``). ``test_app.py`` tests it offline with tokenguard's pytest plugin.
"""

from __future__ import annotations

import functools
from typing import Any

import openai

import tokenguard

# One place for the guard's settings: production uses them, and so do the tests.
GUARD_SETTINGS: dict[str, Any] = {
    "budgets": [tokenguard.Budget(limit_usd="0.05", period="day", per="user")],  # 5 cents per user per day
    "cache": True,  # temperature=0 answers are reused at $0
    "loops": True,  # the 4th identical request in 10 minutes is refused
}


def configure() -> None:
    """Called once at start-up."""
    tokenguard.set_default_guard(tokenguard.Guard(**GUARD_SETTINGS))


@functools.cache
def llm() -> tokenguard.OpenAI:
    # no guard=: the client reports to tokenguard.default_guard(), looked up at each call
    return tokenguard.OpenAI()


def answer(user: str, question: str) -> str:
    with tokenguard.scope(user=user):
        completion = llm().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": question}],
            max_tokens=200,
            temperature=0,
        )
    return completion.choices[0].message.content or ""


def handle_ask(user: str, question: str) -> tuple[int, dict[str, Any]]:
    """POST /ask -> (status, JSON body)."""
    try:
        return 200, {"answer": answer(user, question)}
    except tokenguard.BudgetExceeded as exc:
        return 402, {
            "error": "You have used today's AI budget.",
            "detail": str(exc),
            "resets_at": exc.resets_at.isoformat() if exc.resets_at else None,
        }
    except tokenguard.LoopDetected as exc:
        return 429, {"error": "This question keeps coming back; try again later.", "detail": str(exc)}
    except openai.APIError as exc:  # what is left after tokenguard's retries: the vendor is down
        return 503, {"error": "The AI service is unavailable; try again later.", "detail": type(exc).__name__}
