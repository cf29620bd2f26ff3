"""Canonical datasets and the readers of the formats users bring."""
