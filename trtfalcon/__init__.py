"""trtfalcon: deploy Falcon-H1 hybrid Transformer + Mamba2 models on NVIDIA GPUs."""

__version__ = "0.1.0"
