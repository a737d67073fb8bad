"""Benchmarks for the sidecar hop: ``python -m bench --help``.

Every role runs in its own process. The baseline roles (``bench.direct``) must never import
``trio_asyncio`` (it changes plain asyncio in the same process), so this package's
``__init__`` imports nothing.
"""
