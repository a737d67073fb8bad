"""The client libraries agents use to talk to the sidecar (trio and asyncio)."""
