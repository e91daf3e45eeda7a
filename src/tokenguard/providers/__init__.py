"""Vendor adapters: one module per vendor, each a pure translation of requests and responses."""

from ._base import Adapter, Endpoint, Observed
from .anthropic import AnthropicAdapter
from .openai import OpenAIAdapter

__all__ = ["Adapter", "AnthropicAdapter", "Endpoint", "Observed", "OpenAIAdapter"]
