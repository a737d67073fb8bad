"""The trio agent client; it lives in ``sidecar.agent.client`` (this path keeps working)."""

from sidecar.agent.client import (
    AgentCalls as AgentCalls,
)
from sidecar.agent.client import (
    AgentClient as AgentClient,
)
from sidecar.agent.client import (
    DeadlineExpired as DeadlineExpired,
)
from sidecar.agent.client import (
    Failure as Failure,
)
from sidecar.agent.client import (
    HandshakeRefused as HandshakeRefused,
)
from sidecar.agent.client import (
    InvalidRequest as InvalidRequest,
)
from sidecar.agent.client import (
    Message as Message,
)
from sidecar.agent.client import (
    Messages as Messages,
)
from sidecar.agent.client import (
    PublishRefused as PublishRefused,
)
from sidecar.agent.client import (
    SidecarClosed as SidecarClosed,
)
from sidecar.agent.client import (
    SidecarError as SidecarError,
)
from sidecar.agent.client import (
    UnknownDelivery as UnknownDelivery,
)
from sidecar.agent.client import (
    UnknownReason as UnknownReason,
)
from sidecar.agent.client import (
    connect_unix as connect_unix,
)
from sidecar.agent.client import (
    error_for as error_for,
)
from sidecar.agent.client import (
    open_agent as open_agent,
)
from sidecar.agent.client import (
    reason_for as reason_for,
)
from sidecar.agent.client import (
    run_agent as run_agent,
)
