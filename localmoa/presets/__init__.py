"""From the models a machine has and its memory budget to a commented models.toml for a preset:
what ``localmoa init --preset NAME`` writes (localmoa.cli.init does the finding and writing).

Two steps, both pure: :mod:`~localmoa.presets.choice` picks the models, their contexts and
samples for the budget; :mod:`~localmoa.presets.text` renders them as a commented file and reads
it back through localmoa.config.
"""

from __future__ import annotations

from localmoa.presets.choice import (
    CONTEXTS,
    JUDGE_MAX_TOKENS,
    MAX_TOKENS,
    PRESETS,
    SELF_SAMPLES,
    TOP_K,
    Candidate,
    Chosen,
    Preset,
    Selection,
    choose,
)
from localmoa.presets.text import ENSEMBLE, TEMPERATURE, WIDTH, Written, render, write_preset

__all__ = [
    "CONTEXTS",
    "ENSEMBLE",
    "JUDGE_MAX_TOKENS",
    "MAX_TOKENS",
    "PRESETS",
    "SELF_SAMPLES",
    "TEMPERATURE",
    "TOP_K",
    "WIDTH",
    "Candidate",
    "Chosen",
    "Preset",
    "Selection",
    "Written",
    "choose",
    "render",
    "write_preset",
]
