"""Compression techniques (one module each), their registry and the joint plan.

Technique modules are imported on first use of the registry (``spaces.registry.discover``),
not here: adding one means adding its module, nothing else.
"""
