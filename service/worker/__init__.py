"""Execution: the run queue (claims, leases, reaper) and the long-lived worker loop."""
