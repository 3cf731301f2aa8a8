"""jpipe.pipeline: the SPMD executor (any valid schedule) and the AD-GPipe baseline."""

from jpipe.pipeline.costs import StageCosts, measure_costs
from jpipe.pipeline.executor import forward, forward_loss, value_and_grad
from jpipe.pipeline.gpipe_autodiff import gpipe_autodiff
from jpipe.pipeline.options import PipelineOptions, PipelinePlan
from jpipe.pipeline.placement import StagePlacement
from jpipe.pipeline.program import Program, compile_program
from jpipe.pipeline.stage import Layered, layered

__all__ = [
    "Layered",
    "PipelineOptions",
    "PipelinePlan",
    "Program",
    "StageCosts",
    "StagePlacement",
    "compile_program",
    "forward",
    "forward_loss",
    "gpipe_autodiff",
    "layered",
    "measure_costs",
    "value_and_grad",
]
