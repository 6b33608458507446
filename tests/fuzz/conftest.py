"""The fuzz suite's budget: one Hypothesis profile, bounded and deterministic.

``ci`` (the default, and what CI runs): 200 examples per property, no per-example
deadline (a loaded 2-core runner must not turn slowness into failures), derandomized
so every run tries the same inputs, and no example database written into the tree.
The whole directory stays under 30 s. ``HYPOTHESIS_PROFILE=explore`` tries ten times as
many random inputs on a developer's machine; a failure it finds is printed with the
``@example`` to pin it here.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    parent=settings.get_profile("ci"),
    max_examples=2000,
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
