"""URLs as they may be shown: no credential in a URL reaches an error message, a log line, a
repr, a report or the command line's output.

One rule for every URL tokenguard shows (store and cache URLs, vendor base URLs, webhook URLs):
the userinfo becomes ``***`` (the user name too: ``https://KEY:@host`` is a common way to pass a
key), a query string becomes ``?***`` (``?password=``, ``?api-key=``), a fragment is dropped, and
where the path itself is the secret (a webhook's ``/services/T0/B0/XXXX``) the path becomes
``/***``.
"""

from __future__ import annotations

__all__ = ["redact_url"]


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """``url`` fit to show (see the module's rule); ``keep_path=False`` hides the path too.

    >>> redact_url("redis://app:hunter2@cache:6379/0?prefix=x")
    'redis://***@cache:6379/0?***'
    >>> redact_url("https://hooks.slack.com/services/T0/B0/XXXX", keep_path=False)
    'https://hooks.slack.com/***'
    """
    text = url.partition("#")[0]
    text, query_sep, _ = text.partition("?")
    query = "?***" if query_sep else ""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return ("***" if not keep_path and text else text) + query
    authority, slash, path = rest.partition("/")
    _, at, host = authority.rpartition("@")
    if at:
        host = "***@" + host
    if not keep_path and path:
        path = "***"
    return f"{scheme}://{host}{slash}{path}{query}"
