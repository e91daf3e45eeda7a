"""Store URLs as they may be shown: credentials and query strings never reach a message or a log."""

from __future__ import annotations

__all__ = ["redact"]


def redact(url: str) -> str:
    """The URL fit for an error message: any password replaced, any query string dropped."""
    url, query_sep, _ = url.partition("?")
    suffix = "?***" if query_sep else ""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url + suffix
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return (f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://***@{host}") + suffix
