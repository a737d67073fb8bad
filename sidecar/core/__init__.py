"""The delivery core: message types and the delivery ledger, free of I/O and event loops.

Everything here takes the time and the random draw from its caller, so it runs unchanged
under trio's virtual clock in tests and under the real clock in the daemon.
"""
