"""The runtimes a target is checked in, each imported only inside the function that runs it: ONNX
Runtime (``ort``: a decoder with explicit KV cache; ``genai``: onnxruntime-genai's generator),
TensorRT (``tensorrt``: a plain engine; ``tensorrt_llm``: TensorRT-LLM's ``LLM`` API) and vLLM
(``vllm``: the offline ``LLM`` and the OpenAI server). Each runtime's ``generate`` runs in a child
process of its own (``child.run_child``) and returns a ``parity.RuntimeRun``: the prompts'
log-probabilities and the greedy continuations with their top-k, for ``parity.check``."""
