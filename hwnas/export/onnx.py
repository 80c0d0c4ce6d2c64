"""ONNX export used everywhere a network leaves PyTorch: latency profiling of single ops,
end-to-end latency validation, and deployment. One exporter, so what is timed is what is
deployed.

The TorchScript-based exporter (``dynamo=False``) is used: on this project's blocks it is
8-20x faster than the dynamo exporter and its graphs match PyTorch to ~1e-7; torch marks it
deprecated, so ``exporter="dynamo"`` is available for when it goes.
"""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import torch
from torch import nn

DEFAULT_OPSET = 17
#: what export_onnx writes for a given network; bumped when that changes in a way that moves
#: latencies, so latency tables measured on older graphs are refused (LatencyTable.check).
#: 2: input permutations of stride-2 units and the head folded into weights; L2 normalization
#: as ReduceL2/Clip/Div (1: Gathers there, normalization with Shape/Expand).
GRAPH_FORM = 2


def export_onnx(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    input_name: str = "image",
    output_name: str = "embedding",
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "legacy",
    metadata: dict[str, str] | None = None,
    deploy_form: bool = True,
) -> bytes:
    """Serialized ONNX model of ``module`` (in eval mode) for inputs of ``input_shape``.

    A module with a ``deploy_form()`` (``SubNet``) is exported in that form: the same
    function with its channel permutations folded into the weights (``deploy_form=False``:
    as it is, to measure what the fold saves — benchmarks/bench_graph.py)."""
    if deploy_form and callable(getattr(module, "deploy_form", None)):
        module = module.deploy_form()
    was = module.training
    module.eval()
    x = torch.zeros(*input_shape)
    buf = io.BytesIO()
    dyn = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*will be removed.*")
            if exporter == "legacy":
                torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=opset,
                                  input_names=[input_name], output_names=[output_name],
                                  dynamic_axes=dyn, do_constant_folding=True)
                data = buf.getvalue()
            elif exporter == "dynamo":
                prog = torch.onnx.export(
                    module, (x,), dynamo=True, opset_version=max(opset, 18),
                    input_names=[input_name], output_names=[output_name],
                    dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None)
                data = prog.model_proto.SerializeToString()
            else:
                raise ValueError(f"exporter {exporter!r} must be 'legacy' or 'dynamo'")
    finally:
        module.train(was)
    if metadata:
        import onnx

        model = onnx.load_from_string(data)
        for k, v in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, str(v)
        data = model.SerializeToString()
    return data
