"""Credentials out of everything the daemon prints: logs, /status, errors, tool output.

One function for every URL the daemon knows (broker, store, webhook), built on the standard
URL parser, with a conservative fallback for URLs the parser reads differently from a
driver (a password holding an unescaped ``/``, ``?`` or ``#``).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit


def redact_url(url: str) -> str:
    """The URL without ``user:password@`` and without query options or fragment (they can
    hold secrets too). Never raises: text that is not a URL comes back with anything that
    could be userinfo removed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url else "***"
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None and "@" not in rest[len(parts.netloc) :]:
        # The parser's authority holds every "@": drop up to the last one of it.
        host = parts.netloc.rpartition("@")[2]
        return f"{scheme}://{host}{_before_query(rest[len(parts.netloc) :])}"
    # An "@" after what the parser took for the authority: a password with "/", "?" or
    # "#" in it (or an "@" in the path). Either way everything up to the last "@" may be
    # secret, and so may anything after a "?" or "#".
    return f"{scheme}://{_before_query(rest.rpartition('@')[2])}"


def _userinfo_candidates(url: str) -> list[str]:
    """What may be ``user:password`` in a URL: the parser's reading, and everything up to
    the last "@" (a password with "/", "?" or "#" in it ends the parser's authority)."""
    rest = url.partition("://")[2]
    if "@" not in rest:
        return []
    out = [rest.rpartition("@")[0]]
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = ""
    if "@" in netloc:
        out.append(netloc.rpartition("@")[0])
    return out


def _before_query(text: str) -> str:
    return text.partition("?")[0].partition("#")[0]


def scrub(text: str, url: str) -> str:
    """Remove any credential of ``url`` that a driver message might echo back."""
    secrets: set[str] = {url}
    for userinfo in _userinfo_candidates(url):
        user, _, password = userinfo.partition(":")
        for secret in (userinfo, user, password):
            if secret:
                secrets.update({secret, unquote(secret)})
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:  # a 1-2 character "secret" would mangle every message
            text = text.replace(secret, "***")
    return text
