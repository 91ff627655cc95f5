"""Wiring per role: the worker, the attribution consumer, and all roles in one process."""
