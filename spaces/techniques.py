"""Imports every technique module so that its ``@register_technique`` runs.

Adding a technique means adding its module here and nothing else.
"""

from __future__ import annotations

from spaces import (
    actquant,  # noqa: F401
    binary,  # noqa: F401
    codebook,  # noqa: F401
    floats,  # noqa: F401
    intk,  # noqa: F401
    lowrank,  # noqa: F401
    prune,  # noqa: F401
    structured,  # noqa: F401
    sws,  # noqa: F401
)
