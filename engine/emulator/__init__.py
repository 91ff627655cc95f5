"""Stand-ins for real venues, for tests and rehearsals; never used for live trading."""
