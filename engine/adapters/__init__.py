"""Thin adapters: NATS, exchanges and MySQL. They translate; the domain decides."""
