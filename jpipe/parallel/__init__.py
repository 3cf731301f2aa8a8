"""jpipe.parallel: mesh axes and construction, logical -> mesh sharding rules, parameter placement."""

from jpipe.parallel.mesh import DATA, MESH_AXES, STAGE, TENSOR, make_mesh
from jpipe.parallel.rules import DEFAULT_RULES, ShardingRules, per_device_bytes, total_bytes

__all__ = [
    "DATA",
    "DEFAULT_RULES",
    "MESH_AXES",
    "STAGE",
    "TENSOR",
    "ShardingRules",
    "make_mesh",
    "per_device_bytes",
    "total_bytes",
]
