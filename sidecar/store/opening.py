"""Choosing and opening the backend a configuration URL names.

Apart from the contract (``base``) so that the backends, which implement the contract,
are not imported by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.store.base import DeadLetterStore, parse_store_url


def open_store(url: str, **options: Any) -> DeadLetterStore:
    """Open the store a configuration URL names.

    ``sqlite:///rel.db``, ``sqlite:////abs.db`` or a plain path -> SQLite (the default,
    embedded); ``mongodb://`` or ``mongodb+srv://`` -> MongoDB (database from the URI
    path, default "sidecar"); ``postgresql://`` or ``postgres://`` -> PostgreSQL, shared by
    a fleet (libpq URL; tables in the URL's search_path). ``options`` go to the backend's
    constructor.
    """
    kind, target = parse_store_url(url)
    if kind == "sqlite":
        from sidecar.store.sqlite import SqliteStore

        return SqliteStore(target if target == ":memory:" else Path(target).expanduser(), **options)
    if kind == "postgresql":
        from sidecar.store.postgres import PostgresStore

        return PostgresStore(target, **options)
    from sidecar.store.mongo import MongoStore

    return MongoStore(target, **options)
