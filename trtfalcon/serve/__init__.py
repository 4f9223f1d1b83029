"""Serving trtfalcon from NVIDIA Triton Inference Server.

    protocol.py    the one declaration of the model's inputs and outputs (config.pbtxt and model.py both read it)
    repository.py  writes a Triton model repository: config.pbtxt, 1/model.py, 1/trtfalcon.json
    requests.py    turns one Triton request's tensors into a runtime Request, validating every field
    text.py        tokenizer loading, incremental detokenization, stop words
    backend.py     the engine loop behind model.py: one thread owns the LLMEngine, streams, cancels, ends requests
    metrics.py     the instance's own Prometheus series on Triton's metrics port (pools, in flight, outcomes)
    model.py       the template copied into the repository (imports triton_python_backend_utils: never import it here)
    client.py      clients: gRPC streaming (tritonclient), the HTTP generate endpoint; used by docs, tests, bench
    server.py      finds and runs a real tritonserver (container's or the nvidia-pytriton wheel's): --launch, tests
"""
