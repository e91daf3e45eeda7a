"""tokenguard: drop-in guarded OpenAI and Anthropic clients that account for every token and dollar.

Change one import line (``from tokenguard import OpenAI``) or wrap an existing client
(``tokenguard.wrap(client)``), and every call that can cost money is seen, priced to
the exact token with genai-prices, attributed to a ``tokenguard.scope()`` and recorded
in a local ledger.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # the names below are imported on first use (PEP 562): `import tokenguard` stays cheap
    from ._anthropic_clients import Anthropic, AsyncAnthropic
    from ._budget import Alert, Budget, BudgetStatus, SpendRate, WebhookAlerts, log_alert
    from ._cache import Cache, cache_control
    from ._clients import wrap
    from ._decorator import guarded
    from ._errors import (
        BudgetExceeded,
        CircuitOpen,
        ConfigurationError,
        LoopDetected,
        StoreUnavailable,
        TokenguardError,
        TokenguardWarning,
        UnpricedModelError,
        UnpricedModelWarning,
    )
    from ._guard import Guard, default_guard, record_outcome, set_default_guard
    from ._ledger import LedgerRow, OutcomeRow, Stats, Store
    from ._loops import LoopDetector
    from ._openai_clients import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI
    from ._pricing import register_price
    from ._retry import CircuitBreaker, Retry
    from ._scope import current_scope, scope
    from ._usage import Usage

# where each public name lives; importing the SDKs (seconds) waits until a name needs them,
# so the pytest plugin and the command line start fast
_HOME: dict[str, str] = {
    "Alert": "._budget",
    "Budget": "._budget",
    "BudgetStatus": "._budget",
    "SpendRate": "._budget",
    "WebhookAlerts": "._budget",
    "log_alert": "._budget",
    "Cache": "._cache",
    "cache_control": "._cache",
    "Anthropic": "._anthropic_clients",
    "AsyncAnthropic": "._anthropic_clients",
    "AsyncAzureOpenAI": "._openai_clients",
    "AsyncOpenAI": "._openai_clients",
    "AzureOpenAI": "._openai_clients",
    "OpenAI": "._openai_clients",
    "wrap": "._clients",
    "guarded": "._decorator",
    "BudgetExceeded": "._errors",
    "CircuitOpen": "._errors",
    "ConfigurationError": "._errors",
    "LoopDetected": "._errors",
    "StoreUnavailable": "._errors",
    "TokenguardError": "._errors",
    "TokenguardWarning": "._errors",
    "UnpricedModelError": "._errors",
    "UnpricedModelWarning": "._errors",
    "Guard": "._guard",
    "default_guard": "._guard",
    "record_outcome": "._guard",
    "set_default_guard": "._guard",
    "LedgerRow": "._ledger",
    "OutcomeRow": "._ledger",
    "Stats": "._ledger",
    "Store": "._ledger",
    "LoopDetector": "._loops",
    "register_price": "._pricing",
    "CircuitBreaker": "._retry",
    "Retry": "._retry",
    "current_scope": "._scope",
    "scope": "._scope",
    "Usage": "._usage",
}


def __getattr__(name: str) -> _typing.Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'tokenguard' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "Alert",
    "Anthropic",
    "AsyncAnthropic",
    "AsyncAzureOpenAI",
    "AsyncOpenAI",
    "AzureOpenAI",
    "Budget",
    "BudgetExceeded",
    "BudgetStatus",
    "Cache",
    "CircuitBreaker",
    "CircuitOpen",
    "ConfigurationError",
    "Guard",
    "LedgerRow",
    "LoopDetected",
    "LoopDetector",
    "OpenAI",
    "OutcomeRow",
    "Retry",
    "SpendRate",
    "Stats",
    "Store",
    "StoreUnavailable",
    "TokenguardError",
    "TokenguardWarning",
    "UnpricedModelError",
    "UnpricedModelWarning",
    "Usage",
    "WebhookAlerts",
    "__version__",
    "cache_control",
    "current_scope",
    "default_guard",
    "guarded",
    "log_alert",
    "record_outcome",
    "register_price",
    "scope",
    "set_default_guard",
    "wrap",
]
