"""A toy machine whose figures are easy to work out by hand, shared by the cost-model tests.

1 GB models: decode alone at bandwidth/size = 10 tokens/s (bandwidth-bound, share 1); a load
takes 1 GB / 1 GB/s + 0.5 s = 1.5 s.
"""

from __future__ import annotations

import math

from localmoa.planning.profiles import Profile
from localmoa.planning.timing import CallSpec

GB = 10**9

BOUND = Profile(
    name="bound",
    memory_bytes=100 * GB,
    bandwidth=10 * GB,
    compute=1e15,
    disk=1 * GB,
    load_init_s=0.5,
    stream_cap=math.inf,
)
CAPPED = Profile(**{**BOUND.__dict__, "name": "capped", "stream_cap": 2.5})
"""The same machine whose runtime caps a stream at 2.5 tokens/s: each uses a quarter of it."""
SIZES = {m: 1 * GB for m in "abcde"}


def stage(*calls: tuple[str, int]) -> list[CallSpec]:
    return [CallSpec(model, 0, tokens) for model, tokens in calls]
