"""Data recipes: the ShapeWorld generator, converters of public releases, and the shard validator.

Every recipe writes the one shard format described in `docs/data.md`.
"""
