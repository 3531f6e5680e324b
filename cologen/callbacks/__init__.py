"""Lightning callbacks of CoLoGen runs."""

from .sample_validation import SampleValidation
from .stage_benchmark import StageEndBenchmark
from .summary import MetricsSummary
from .throughput import RunThroughput
from .weight_average import EMAWeightAveraging

__all__ = ["EMAWeightAveraging", "MetricsSummary", "RunThroughput", "SampleValidation", "StageEndBenchmark"]
