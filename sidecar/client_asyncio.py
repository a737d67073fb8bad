"""The asyncio agent client; it lives in ``sidecar.agent.client_asyncio`` (this path keeps
working)."""

from sidecar.agent.client_asyncio import (
    AsyncioAgent as AsyncioAgent,
)
from sidecar.agent.client_asyncio import (
    run_agent_asyncio as run_agent_asyncio,
)
