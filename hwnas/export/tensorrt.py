"""TensorRT engines from ONNX (TensorRT 10 and 11).

Both versions: explicit-batch networks only, ``build_serialized_network`` to build,
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` to run. TensorRT 10
has the FP16 builder flag; TensorRT 11 removed it (networks are strongly typed: FP16 comes
from an FP16 ONNX graph), so FP16 is requested only where the flag exists, and
``fp16_supported()`` says which happened. Device memory comes from PyTorch CUDA tensors.

This module imports ``tensorrt`` lazily: importing it on a machine without TensorRT is fine;
calling it there raises a clear error.
"""

from __future__ import annotations

from typing import Sequence

from hwnas.errors import HwnasError


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise HwnasError("TensorRT is not installed: pip install 'hwnas[gpu]' (tensorrt>=10), "
                         "on a machine with an NVIDIA GPU") from None
    return trt


def fp16_supported() -> bool:
    trt = _trt()
    return hasattr(trt.BuilderFlag, "FP16")


def build_engine(onnx_bytes: bytes, fp16: bool = True, input_shape: Sequence[int] | None = None,
                 max_batch: int | None = None, workspace_gb: float = 2.0) -> bytes:
    """Serialized TensorRT engine (a plan) for an ONNX model. With a dynamic batch axis,
    ``max_batch`` sets the optimization profile (min 1, opt and max ``max_batch``)."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # deprecated no-op in 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HwnasError(f"TensorRT could not parse the ONNX model: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    inp = network.get_input(0)
    if any(d == -1 for d in inp.shape):
        shape = list(input_shape or inp.shape)
        lo, hi = list(shape), list(shape)
        lo[0], hi[0] = 1, max_batch or max(1, shape[0])
        opt = list(hi)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise HwnasError("TensorRT failed to build the engine (see its log above)")
    return bytes(plan)


class TrtEngine:
    """A deserialized engine with one input and one output bound to CUDA tensors."""

    def __init__(self, plan: bytes):
        import torch

        trt = _trt()
        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise HwnasError("TensorRT could not deserialize the engine (built by another version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def bind(self, input_shape: Sequence[int]) -> None:
        torch = self.torch
        name = self.inputs[0]
        if not self.context.set_input_shape(name, tuple(input_shape)):
            raise HwnasError(f"TensorRT refused input shape {tuple(input_shape)} for {name!r} (outside "
                             "the engine's optimization profile?); build the engine for that shape")
        dtype = torch.float16 if str(self.engine.get_tensor_dtype(name)).endswith("HALF") else torch.float32
        self.x = torch.randn(*input_shape, device="cuda", dtype=dtype)
        self.context.set_tensor_address(name, self.x.data_ptr())
        self.outs = []
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            odt = torch.float16 if str(self.engine.get_tensor_dtype(out)).endswith("HALF") else torch.float32
            t = torch.empty(shape, device="cuda", dtype=odt)
            self.context.set_tensor_address(out, t.data_ptr())
            self.outs.append(t)
        self.stream.wait_stream(torch.cuda.current_stream())  # the buffers made, before any run

    def execute(self) -> None:
        """Enqueue one run on the engine's own stream (on the legacy default stream TensorRT
        adds synchronizations of its own to each run, which would be timed with it)."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise HwnasError("TensorRT could not run the engine (execute_async_v3 returned False; "
                             "see its log above)")

    def infer(self, x):
        """Run on a CUDA tensor ``x``; returns the first output (a new tensor)."""
        torch = self.torch
        if tuple(x.shape) != tuple(self.x.shape):
            self.bind(tuple(x.shape))
        self.stream.wait_stream(torch.cuda.current_stream())  # x is ready
        with torch.cuda.stream(self.stream):
            self.x.copy_(x.to(self.x.dtype))
            self.execute()
            out = self.outs[0].float().clone()
        self.stream.synchronize()
        return out
