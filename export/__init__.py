"""diffusers model to ONNX graphs to TensorRT plans: the exporter side of cfgswitch."""
