"""jpipe.pipeline: the SPMD executor (any valid schedule) and the AD-GPipe baseline."""

from jpipe.pipeline.executor import forward, value_and_grad
from jpipe.pipeline.program import Program, compile_program

__all__ = ["Program", "compile_program", "forward", "value_and_grad"]
