"""The one place trtfalcon imports TensorRT, in either of its two builds, and says what is missing.

- TensorRT 11 (`tensorrt`): datacenter GPUs (H100, H200, B200). Its builder needs the GPU it builds for; its
  plugins are quickly deployable plugins (`tensorrt.plugin`) whose kernels the engine embeds.
- TensorRT for RTX (`tensorrt_rtx_bindings`, PyPI wheels `tensorrt-rtx-cu13-libs` + `tensorrt-rtx-cu13-bindings`,
  `pip install 'trtfalcon[rtx]'`): Ampere and newer workstation/consumer GPUs. Its builder needs no GPU once the
  target compute capability is named (RTX_COMPUTE_CAPABILITIES, which has no sm_90/sm_100); it has no
  `tensorrt.plugin` module and no `add_plugin*`, so plugins are `IPluginV3` classes the ONNX parser finds by
  op_type + `plugin_version` + `plugin_namespace` (plugins/tensorrt_rtx.py).

Both are imported lazily, only by the call that needs them (a build, an engine run); nothing else in trtfalcon
imports either module.

The library link, made once, here: TensorRT for RTX's wheel ships `libtensorrt_rtx.so.1` only, but its ONNX parser
dlopen()s the unversioned `libtensorrt_rtx.so` as soon as it creates a plugin for a custom node. The failure
happens inside a noexcept function, so the process aborts ("terminate called without an active exception") with
no Python exception to catch. glibc's dlopen searches the calling library's RPATH, which is `$ORIGIN` (the wheel's
own folder), so one symlink `libtensorrt_rtx.so -> libtensorrt_rtx.so.1` beside the library fixes every process
that uses this installation, without LD_LIBRARY_PATH or a re-exec. `import_tensorrt("tensorrt-rtx")` makes it the
first time (atomically: concurrent first imports are fine) and says how to make it by hand where that folder is
read-only. `pip uninstall` leaves the link behind (it is not in the wheel's RECORD); it is harmless.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtfalcon.errors import MissingDependencyError

TENSORRT_PIN = "11.4.0.106"
TENSORRT_RTX_PIN = "1.7.1.116"


@dataclass(frozen=True)
class TensorRTFlavor:
    name: str  # what build configs' target.builder says
    title: str
    module: str  # the import name
    min_version: tuple[int, ...]
    install: str  # how to get it, for the error messages

    def check_version(self, version: str) -> None:
        found = tuple(int(x) for x in version.split(".")[: len(self.min_version)] if x.isdigit())
        if found < self.min_version:
            want = ".".join(map(str, self.min_version))
            raise MissingDependencyError(f"{self.title} {version} found; trtfalcon needs {self.title} >= {want} "
                                         f"(strongly typed networks, IPluginV3 / AOT plugins); {self.install}")


TENSORRT = TensorRTFlavor(
    "tensorrt", "TensorRT", "tensorrt", (11,),
    f"install TensorRT 11 with its builder libraries from NVIDIA's index: `pip install tensorrt-cu13=={TENSORRT_PIN} "
    "--extra-index-url https://pypi.nvidia.com` (PyPI's tensorrt-cu13-libs is only a stub that downloads from "
    "there), or run inside an NGC TensorRT container (`docker run --gpus all -it nvcr.io/nvidia/tensorrt:<release>-py3`); "
    "the builder also needs an NVIDIA GPU (sm_90 or newer)",
)
TENSORRT_RTX = TensorRTFlavor(
    "tensorrt-rtx", "TensorRT for RTX", "tensorrt_rtx_bindings", (1, 7),
    f"install TensorRT for RTX from PyPI: `pip install 'trtfalcon[rtx]'` (tensorrt-rtx-cu13-libs=={TENSORRT_RTX_PIN} "
    f"and tensorrt-rtx-cu13-bindings=={TENSORRT_RTX_PIN}; the `tensorrt-rtx` metapackage is a stub, install the two "
    "wheels); it builds engines without a GPU",
)
FLAVORS = {f.name: f for f in (TENSORRT, TENSORRT_RTX)}

# What TensorRT for RTX 1.7's builder targets without a GPU (trt.ComputeCapability, "SM89" for sm_89).
RTX_COMPUTE_CAPABILITIES = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_120", "sm_121")

GPU_HINT = "run on a machine with an NVIDIA GPU of compute capability 9.0 or newer (H100, H200, B200) and its driver"


def flavor(name: str) -> TensorRTFlavor:
    if name not in FLAVORS:
        raise MissingDependencyError(f"unknown TensorRT build {name!r}; expected one of {', '.join(FLAVORS)}")
    return FLAVORS[name]


def import_tensorrt(name: str = "tensorrt") -> Any:
    """The TensorRT module of that build ("tensorrt": TensorRT >= 11, "tensorrt-rtx": TensorRT for RTX >= 1.7), or a
    MissingDependencyError naming what is missing and how to get it."""
    f = flavor(name)
    try:
        if f is TENSORRT_RTX:
            import tensorrt_rtx_libs  # loads libtensorrt_rtx before the bindings need it

            _link_unversioned_rtx_library(Path(tensorrt_rtx_libs.__file__).parent)
            import tensorrt_rtx_bindings as trt
        else:
            import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError(f"{f.title} is not installed (`import {f.module}` failed: {e}); {f.install}") from e
    except OSError as e:  # bindings present, their libraries missing or unloadable
        raise MissingDependencyError(f"{f.title}'s libraries cannot be loaded ({e}); {f.install}") from e
    f.check_version(str(getattr(trt, "__version__", "0")))
    return trt


def import_tensorrt_plugin() -> tuple[Any, Any]:
    """(tensorrt, tensorrt.plugin): TensorRT 11's quickly deployable plugin API."""
    trt = import_tensorrt("tensorrt")
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise MissingDependencyError(f"TensorRT {trt.__version__} has no `tensorrt.plugin` (quickly deployable "
                                     f"plugins): {e}; {TENSORRT.install}") from e
    return trt, trtp


RTX_LIBRARY = "libtensorrt_rtx.so"


def _link_unversioned_rtx_library(libdir: Path) -> None:
    """Make `libtensorrt_rtx.so -> libtensorrt_rtx.so.1` beside the library, once (see the module docstring)."""
    if os.name != "posix":
        return
    versioned = libdir / f"{RTX_LIBRARY}.1"
    link = libdir / RTX_LIBRARY
    if link.exists() or not versioned.exists():
        return  # made before (or a layout this link is not for: nothing to fix)
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if d and (Path(d) / RTX_LIBRARY).exists():
            return  # the user provides one on the search path
    tmp = libdir / f".{RTX_LIBRARY}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(versioned.name)
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MissingDependencyError(
            f"TensorRT for RTX's ONNX parser loads {RTX_LIBRARY} (unversioned) when it meets a plugin node, and the "
            f"wheel ships only {versioned.name}; trtfalcon could not create the link {link} ({e}). Create it once: "
            f"`ln -s {versioned.name} {link}` (or put a folder holding such a link on LD_LIBRARY_PATH before "
            "starting Python)"
        ) from e


__all__ = ["FLAVORS", "GPU_HINT", "RTX_COMPUTE_CAPABILITIES", "TENSORRT", "TENSORRT_PIN", "TENSORRT_RTX",
           "TENSORRT_RTX_PIN", "TensorRTFlavor", "flavor", "import_tensorrt", "import_tensorrt_plugin"]
