"""Every exception and warning tokenguard raises itself.

The tree::

    TokenguardError                 base of everything tokenguard raises itself
    ├── ConfigurationError          a bad setting (also a ValueError); names the setting and the value
    │   └── StoreUnavailable        the ledger store cannot be opened or written
    ├── UnpricedModelError          a model with no known price where a price is required
    ├── BudgetExceeded              a cap refused the call before it was sent
    ├── CircuitOpen                 an endpoint failing again and again is resting; nothing was sent
    └── LoopDetected                the same request repeated too often in the window

    TokenguardWarning               base of tokenguard's warnings
    └── UnpricedModelWarning        a call to a model with no known price was recorded unpriced

Vendor errors (``openai.RateLimitError``, ``anthropic.OverloadedError`` ...) are never
wrapped: they reach the caller as the vendor raised them. This module must not import
the vendor SDKs.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

__all__ = [
    "BudgetExceeded",
    "CircuitOpen",
    "ConfigurationError",
    "LoopDetected",
    "StoreUnavailable",
    "TokenguardError",
    "TokenguardWarning",
    "UnpricedModelError",
    "UnpricedModelWarning",
]


class TokenguardError(Exception):
    """Base class of every exception tokenguard raises itself."""

    def __reduce__(self) -> tuple[Any, ...]:
        # the subclasses take keyword-only arguments: rebuild from the message and the
        # attributes, so the errors cross process boundaries (pools, queues) intact
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls: type[Exception], args: tuple[Any, ...], state: dict[str, Any]) -> Exception:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigurationError(TokenguardError, ValueError):
    """A setting has a value tokenguard cannot use; the message names the setting and the value."""

    def __init__(self, setting: str, value: object, reason: str) -> None:
        self.setting = setting
        self.value = value
        self.reason = reason
        super().__init__(f"{setting}={value!r}: {reason}")


class StoreUnavailable(ConfigurationError):
    """The ledger store named by ``store=`` / ``TOKENGUARD_STORE`` cannot be opened or written."""


class UnpricedModelError(TokenguardError, LookupError):
    """A call needs a price (a USD budget applies, or ``require_prices=True``) and the model has none.

    Nothing was sent. Register a price with ``Guard.register_price()`` / ``tokenguard.register_price()``
    for private or self-hosted models.
    """

    def __init__(self, vendor: str, model: str) -> None:
        self.vendor = vendor
        self.model = model
        super().__init__(
            f"no price is known for {vendor} model {model!r}, and this call requires one; "
            f"nothing was sent. Register one with tokenguard.register_price({model!r}, "
            f"input_mtok=..., output_mtok=...)"
        )


class BudgetExceeded(TokenguardError):
    """A budget could not reserve the call's worst-case cost; nothing was sent.

    ``spent_usd`` is what the budget has settled this period, ``needed_usd`` the call's
    worst case, ``limit_usd`` the cap (for a token-only budget these three are token
    counts, and ``unit`` is ``"tokens"``). ``held_usd`` is held by calls still in flight;
    ``resets_at`` is when the period ends (``None`` for ``"total"``).
    """

    def __init__(
        self,
        *,
        budget: Any,
        scope: Mapping[str, str],
        spent_usd: Decimal,
        limit_usd: Decimal,
        needed_usd: Decimal,
        held_usd: Decimal = Decimal(0),
        resets_at: datetime | None = None,
        unit: str = "USD",
    ) -> None:
        self.budget = budget
        self.scope = dict(scope)
        self.spent_usd = spent_usd
        self.limit_usd = limit_usd
        self.needed_usd = needed_usd
        self.held_usd = held_usd
        self.resets_at = resets_at
        self.unit = unit
        left = _plain(max(limit_usd - spent_usd - held_usd, Decimal(0)))
        name = budget.describe() if hasattr(budget, "describe") else repr(budget)
        who = f" for {', '.join(f'{k}={v}' for k, v in self.scope.items())}" if self.scope else ""
        resets = f"resets at {resets_at:%Y-%m-%d %H:%M} UTC" if resets_at else "never resets (period 'total')"
        held = f" (+{_plain(held_usd)} held by calls in flight)" if held_usd else ""
        super().__init__(
            f"budget {name}{who} exceeded: {_plain(spent_usd)} {unit} spent{held} of {_plain(limit_usd)}, "
            f"{left} left; this call could cost up to {_plain(needed_usd)} {unit}. Nothing was sent; "
            f"the budget {resets}."
        )


def _plain(amount: Decimal) -> str:
    """A Decimal without exponent or trailing zeros: 0.0100 -> 0.01, 0E-8 -> 0."""
    text = format(amount.normalize(), "f")
    return text


class CircuitOpen(TokenguardError):
    """Calls to this vendor, base URL and model failed ``failures`` times in a row; for the
    breaker's cool-down, calls to them fail fast with this error instead of being sent.

    ``target`` is ``(vendor, base_url, model)``, ``retry_in_s`` the time until a trial call
    is let through, ``last_error`` the vendor error that opened the circuit (by name).
    """

    def __init__(self, *, target: tuple[str, str, str], failures: int, retry_in_s: float, last_error: str) -> None:
        self.target = target
        self.failures = failures
        self.retry_in_s = retry_in_s
        self.last_error = last_error
        vendor, base_url, model = target
        super().__init__(
            f"circuit open for {vendor} model {model!r} at {base_url}: {failures} failures in a row "
            f"(last: {last_error}); nothing was sent. A trial call goes through in {retry_in_s:.1f}s"
        )


class LoopDetected(TokenguardError):
    """The same request was seen more than ``max_repeats`` times inside ``window_s``; it was not sent.

    ``repeats`` counts this request; ``fingerprint`` identifies the repeated request (a
    hash: no prompt text); ``level`` says which check saw it (``"exact"``, ``"normalized"``,
    ``"tool_calls"``, or ``"cool-down"`` for a request refused again right after a block);
    ``scope`` is the call's attribution. In warn mode the same object is handed to
    ``on_loop`` and the call goes ahead.
    """

    def __init__(
        self,
        *,
        repeats: int,
        window_s: float,
        fingerprint: str,
        level: str = "exact",
        scope: Mapping[str, str] | None = None,
        mode: str = "block",
        **extra: Any,
    ) -> None:
        self.repeats = repeats
        self.window_s = window_s
        self.fingerprint = fingerprint
        self.level = level
        self.scope = dict(scope or {})
        self.mode = mode
        who = f" for {', '.join(f'{k}={v}' for k, v in self.scope.items())}" if self.scope else ""
        what = {
            "exact": "the same request",
            "normalized": "the same request, up to a counter or a timestamp,",
            "tool_calls": "the same tool call with the same arguments",
            "cool-down": "a request just refused as a loop",
        }.get(level, "the same request")
        tail = "it was not sent" if mode == "block" else "it was sent (warn mode)"
        if level == "cool-down":
            message = f"loop detected{who}: {what} was sent again during its cool-down; {tail}"
        else:
            message = f"loop detected{who}: {what} {repeats} times within {window_s:g}s; {tail}"
        super().__init__(f"{message} (fingerprint {fingerprint[:12]})")


class TokenguardWarning(UserWarning):
    """Base class of tokenguard's warnings."""


class UnpricedModelWarning(TokenguardWarning):
    """A call to a model with no known price was recorded with no cost (``cost_usd=None``)."""
