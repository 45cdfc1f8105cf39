"""Building a target's artifact from the written checkpoint, each builder run in a child process:
``torch_onnx`` (a KV-cache decoder through torch.onnx), ``genai`` (onnxruntime-genai's model
builder), ``tensorrt`` (a plain TensorRT engine from an ONNX decoder)."""
