"""The pure domain core: no I/O, no clock, no randomness. Same inputs, same outputs."""
