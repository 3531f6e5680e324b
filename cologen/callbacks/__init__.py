"""Lightning callbacks of CoLoGen runs."""

from .sample_validation import SampleValidation
from .summary import MetricsSummary

__all__ = ["MetricsSummary", "SampleValidation"]
