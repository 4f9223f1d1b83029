"""Serving trtfalcon from NVIDIA Triton Inference Server.

    protocol.py    the one declaration of the model's inputs and outputs (config.pbtxt and model.py both read it)
    repository.py  writes a Triton model repository: config.pbtxt, 1/model.py, 1/trtfalcon.json
    requests.py    turns one Triton request's tensors into a runtime Request, validating every field
    text.py        tokenizer loading, incremental detokenization, stop words
    backend.py     the engine loop behind model.py: one thread owns the LLMEngine, streams, cancels, ends requests
    model.py       the template copied into the repository (imports triton_python_backend_utils: never import it here)
    client.py      tritonclient helpers (gRPC streaming, HTTP), used by the docs and the end-to-end test
"""
