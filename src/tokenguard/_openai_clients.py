"""The guarded OpenAI clients: ``openai``'s four client classes, each with tokenguard's
shell (``_clients.py``) in front. Importing this module imports ``openai`` and nothing of
``anthropic``."""

from __future__ import annotations

import openai

from ._clients import _NAMED, _AsyncGuarded, _OpenAIResources, _SyncGuarded

__all__ = ["AsyncAzureOpenAI", "AsyncOpenAI", "AzureOpenAI", "OpenAI"]


class OpenAI(_SyncGuarded, _OpenAIResources, openai.OpenAI):
    """``openai.OpenAI`` with every money-spending call accounted for by a tokenguard ``Guard``.

    Takes every ``openai.OpenAI`` argument unchanged, plus ``guard=`` (default: the
    process-wide ``tokenguard.default_guard()``).
    """


class AsyncOpenAI(_AsyncGuarded, _OpenAIResources, openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` guarded by tokenguard (see ``tokenguard.OpenAI``)."""


class AzureOpenAI(_SyncGuarded, _OpenAIResources, openai.AzureOpenAI):
    """``openai.AzureOpenAI`` guarded by tokenguard; priced with genai-prices' Azure prices."""


class AsyncAzureOpenAI(_AsyncGuarded, _OpenAIResources, openai.AsyncAzureOpenAI):
    """``openai.AsyncAzureOpenAI`` guarded by tokenguard."""


_NAMED.update(
    {
        openai.OpenAI: OpenAI,
        openai.AsyncOpenAI: AsyncOpenAI,
        openai.AzureOpenAI: AzureOpenAI,
        openai.AsyncAzureOpenAI: AsyncAzureOpenAI,
    }
)
