"""Error types a user sees. Each message names the file, tensor or field, what was expected and what was found."""


class TrtFalconError(Exception):
    """Base of every error trtfalcon raises on purpose; the CLI prints these without a traceback."""


class ConfigError(TrtFalconError, ValueError):
    """A config.json, preset or build config that is invalid or unsupported."""


class CheckpointError(TrtFalconError):
    """A checkpoint that cannot be read or written: missing or corrupt file, wrong tensor name, shape or dtype."""


class RequestError(TrtFalconError, ValueError):
    """A generation request that can never be served (empty prompt, ids outside the vocab, too long)."""


class MissingDependencyError(TrtFalconError, ImportError):
    """An optional dependency (TensorRT, a GPU, triton, onnxruntime) that this path needs is not installed."""
