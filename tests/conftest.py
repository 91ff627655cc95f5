from __future__ import annotations

from hypothesis import HealthCheck, settings

# Shared, noisy 2-core machines: no per-example deadline, no data-generation speed check.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150, derandomize=False
)
settings.load_profile("ci")
