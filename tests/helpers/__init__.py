"""Helpers shared by the test modules; conftest.py keeps only pytest hooks and fixtures."""

from tests.helpers.broker import (
    BROKER_URL,
    TEST_TIERS,
    amqp,
    delete_queues,
    drain_bodies,
    publish_many,
    queue_count,
    run_amqp,
)
from tests.helpers.sidecar import make_config, record_session_ends, running_sidecar
from tests.helpers.wait import until

__all__ = [
    "BROKER_URL",
    "TEST_TIERS",
    "amqp",
    "delete_queues",
    "drain_bodies",
    "make_config",
    "publish_many",
    "queue_count",
    "record_session_ends",
    "run_amqp",
    "running_sidecar",
    "until",
]
