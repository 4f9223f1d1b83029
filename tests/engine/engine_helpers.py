"""Helpers shared by the engine tests."""


def tensorrt_available() -> str | None:
    """None when TensorRT (>= 11) and a CUDA GPU are both here, else the reason the engine tests skip."""
    try:
        from trtfalcon.tensorrt_import import import_tensorrt

        import_tensorrt()
    except Exception as e:  # noqa: BLE001
        return f"TensorRT 11 not usable here: {str(e)[:160]}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (TensorRT's builder and engines need one)"
    return None
