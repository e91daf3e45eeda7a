"""tokenguard: drop-in guarded OpenAI and Anthropic clients that account for every token and dollar.

Change one import line (``from tokenguard import OpenAI``) or wrap an existing client
(``tokenguard.wrap(client)``), and every call that can cost money is seen, priced to
the exact token with genai-prices, attributed to a ``tokenguard.scope()`` and recorded
in a local ledger.
"""

from ._budget import Alert, Budget, BudgetStatus, SpendRate, WebhookAlerts, log_alert
from ._cache import Cache, cache_control
from ._clients import Anthropic, AsyncAnthropic, AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI, wrap
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
from ._pricing import register_price
from ._retry import CircuitBreaker, Retry
from ._scope import current_scope, scope
from ._usage import Usage

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
