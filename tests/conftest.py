"""Settings for the whole suite."""

from __future__ import annotations

from hypothesis import settings

# Property tests explore the same examples on every run (a failure in CI reproduces
# locally) and keep no example database between runs.
settings.register_profile("theta", derandomize=True, database=None)
settings.load_profile("theta")
