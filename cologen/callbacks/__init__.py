"""Lightning callbacks of CoLoGen runs."""

from .sample_validation import SampleValidation
from .stage_benchmark import StageEndBenchmark
from .summary import MetricsSummary
from .throughput import RunThroughput

__all__ = ["MetricsSummary", "RunThroughput", "SampleValidation", "StageEndBenchmark"]
