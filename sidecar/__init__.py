"""sidecar: a reliability proxy between RabbitMQ and message-driven worker agents."""

__version__ = "0.1.0"
