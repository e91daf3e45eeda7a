"""The guarded Anthropic clients: ``anthropic``'s two client classes, each with tokenguard's
shell (``_clients.py``) in front. Importing this module imports ``anthropic`` and nothing of
``openai``."""

from __future__ import annotations

import anthropic

from ._clients import _NAMED, _AnthropicResources, _AsyncGuarded, _SyncGuarded

__all__ = ["Anthropic", "AsyncAnthropic"]


class Anthropic(_SyncGuarded, _AnthropicResources, anthropic.Anthropic):
    """``anthropic.Anthropic`` with every money-spending call accounted for by a tokenguard ``Guard``.

    Takes every ``anthropic.Anthropic`` argument unchanged (``middleware=`` included),
    plus ``guard=``.
    """


class AsyncAnthropic(_AsyncGuarded, _AnthropicResources, anthropic.AsyncAnthropic):
    """``anthropic.AsyncAnthropic`` guarded by tokenguard."""


_NAMED.update({anthropic.Anthropic: Anthropic, anthropic.AsyncAnthropic: AsyncAnthropic})
