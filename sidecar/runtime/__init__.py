"""The drivers: trio services that feed the pure core and policies events and carry out
what they decide through the adapters (consumer/engine, agent sessions, backpressure
monitors, observability, the DLQ writer). ``sidecar.supervisor`` wires them."""
