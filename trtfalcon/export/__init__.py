"""ONNX export of a deploy checkpoint: the graph TensorRT builds (plugin nodes, FP8 Q/DQ, external weights).

    from trtfalcon.export import export_onnx
    export_onnx("runs/tiny-deploy", "runs/tiny-onnx", dtype="fp32")

See trtfalcon/export/onnx.py for the graph and the output directory's layout.
"""

from trtfalcon.export.onnx import (
    DATA_FILE, DEFAULT_OPSET, EXPORT_FILES, MANIFEST_FILE, MODEL_FILE, export_onnx, is_export_dir, read_manifest,
)

__all__ = ["DATA_FILE", "DEFAULT_OPSET", "EXPORT_FILES", "MANIFEST_FILE", "MODEL_FILE", "export_onnx", "is_export_dir",
           "read_manifest"]
