"""The static HTML report (`grounding report`): shard sets, provenance, score histograms, galleries, metrics."""

from grounding.report.build import ReportResult, build_report

__all__ = ["ReportResult", "build_report"]
