"""The query search space (spec, archs, shape resolution, analytic costs)."""

from hwnas.space.ops import OpSpec, all_op_specs, arch_flops, arch_params, resolve_ops
from hwnas.space.spec import BLOCK_OPS, SKIP, Arch, LayerSpec, SearchSpace

__all__ = [
    "Arch", "BLOCK_OPS", "LayerSpec", "OpSpec", "SKIP", "SearchSpace", "all_op_specs",
    "arch_flops", "arch_params", "resolve_ops",
]
