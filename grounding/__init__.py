"""grounding: the reproducible teacher pipeline for weakly supervised visual grounding."""

__version__ = "0.1.0"
