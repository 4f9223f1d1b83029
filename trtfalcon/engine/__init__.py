"""Build stage: build configs (schema + memory planner) and the TensorRT 11 engine build (build.py, the only place
the builder imports tensorrt)."""
