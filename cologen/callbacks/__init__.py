"""Lightning callbacks of CoLoGen runs."""

from .summary import MetricsSummary
from .validation import SampleValidation

__all__ = ["MetricsSummary", "SampleValidation"]
