"""Hypothesis settings for the property tests of the I/O-free cores
(tests/unit/test_host_slots_model.py, test_call_machine_model.py,
test_core_properties.py) and of the request-head parser against its oracle
(tests/e2e/test_hostile_input.py).

The normal run (CI) runs each test's small default number of examples,
derandomized: the same examples on every run (for a given hypothesis version
and test source), so a new random example can never turn CI red.
`FLEET_INGRESS_PROPERTY_EXAMPLES=N` runs N examples per test from a random seed
instead, a fuzzing run (fuzz/README.md); a failure prints its
`@reproduce_failure` blob.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

ENV = "FLEET_INGRESS_PROPERTY_EXAMPLES"

settings.register_profile(
    "fleet-ingress-ci",
    derandomize=True,
    database=None,  # no example database: nothing carried from one run to the next
    deadline=None,  # timings on a shared host say nothing about the cores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "fleet-ingress-fuzz",
    settings.get_profile("fleet-ingress-ci"),
    derandomize=False,
    print_blob=True,
)


def property_settings(default_examples: int, **kwargs: Any) -> settings:
    """`default_examples` in the normal run, or $FLEET_INGRESS_PROPERTY_EXAMPLES,
    random; `kwargs` (e.g. `stateful_step_count`) as `settings` takes them."""
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        return settings(
            settings.get_profile("fleet-ingress-fuzz"), max_examples=int(wanted), **kwargs
        )
    return settings(
        settings.get_profile("fleet-ingress-ci"), max_examples=default_examples, **kwargs
    )
