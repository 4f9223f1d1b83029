"""Run a command in its own process and measure it: wall time and the kernel's peak RSS (os.wait4's ru_maxrss),
for the memory benchmarks under bench/. Output goes to temporary files, not pipes, so a chatty child can never
block on a full pipe while we wait for it."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Any


def measure(label: str, cmd: list[str], tail: int = 600) -> dict[str, Any]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {"cmd": label, "exit_code": code, "wall_s": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "stdout_tail": stdout[-tail:], "stderr_tail": stderr[-tail:] if code else ""}
