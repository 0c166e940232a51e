import os

# Before anything imports torch: OpenMP threads that spin while they wait make a loaded
# machine (CI's 2 cores, tests that start peer processes) many times slower; passive
# waits cost nothing when the machine is idle. Server processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.filter_too_much]
# "ci" (the default) is derandomized so that a landing is reproducible; "explore" searches
# anew on each run (HYPOTHESIS_PROFILE=explore make test) and turns finds into regression tests.
settings.register_profile("ci", deadline=None, max_examples=200, derandomize=True, suppress_health_check=_SLOW_OK)
settings.register_profile("explore", deadline=None, max_examples=1000, suppress_health_check=_SLOW_OK)
settings.register_profile("dev", deadline=None, max_examples=50, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
