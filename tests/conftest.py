import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.filter_too_much]
settings.register_profile("ci", deadline=None, max_examples=200, suppress_health_check=_SLOW_OK)
settings.register_profile("dev", deadline=None, max_examples=50, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
