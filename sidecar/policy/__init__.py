"""Pure decision logic; no I/O.

Every module here is synchronous and deterministic: the clock comes in as ``now`` (monotonic
seconds) and randomness as a number in [0, 1), so adapters own time and entropy and tests own
both.
"""
