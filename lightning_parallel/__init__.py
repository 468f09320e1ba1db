"""lightning-parallel: data, tensor and pipeline parallelism for unmodified Lightning modules."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_parallel.layout import Layout, LayoutError
from lightning_parallel.progress import StepProgressBar
from lightning_parallel.strategy import HybridParallel
from lightning_parallel.throughput import Throughput
from lightning_parallel.timeline import PipelineTimeline

__all__ = ["HybridParallel", "Layout", "LayoutError", "PipelineTimeline", "StepProgressBar", "Throughput"]
__version__ = "0.1.0.dev0"

if HybridParallel.strategy_name not in StrategyRegistry:
    # Lets `Trainer(strategy="hybrid")` work once lightning_parallel is imported.
    HybridParallel.register_strategies(StrategyRegistry)
