"""Export: ONNX (and, with a GPU, TensorRT) artifacts, with parity checks."""
