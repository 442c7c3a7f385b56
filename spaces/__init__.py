"""Compression techniques (one module each), their registry and the joint plan."""

from __future__ import annotations

from spaces import layers, techniques  # noqa: F401
