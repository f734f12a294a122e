"""Wall time, CPU time and peak RSS of a command, each run in a fresh process.

Linux carries a process's RSS high-water mark across fork and exec: a child started by a large benchmark process
would report at least the parent's RSS as its own peak. So the command runs as the child of a small measuring
process (a bare Python), which reads its child's usage with getrusage(RUSAGE_CHILDREN).
"""

from __future__ import annotations

import json
import subprocess
import sys

RUNNER = (
    "import json, resource, subprocess, sys, time\n"
    "cmd = json.loads(sys.argv[1])\n"
    "t0 = time.perf_counter()\n"
    "proc = subprocess.run(cmd, capture_output=True, text=True)\n"
    "wall = time.perf_counter() - t0\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime\n"
    "print(json.dumps({'rc': proc.returncode, 'wall_s': wall, 'peak_mb': peak, 'cpu_s': cpu, "
    "'stdout': proc.stdout[-4000:], 'stderr': proc.stderr[-4000:]}))\n"
)


def measure(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run `cmd` in a child of a fresh measuring process; raises RuntimeError when it fails.

    Returns rc, wall_s, cpu_s (user + system), peak_mb (the child's ru_maxrss in MiB) and the last 4000
    characters of its stdout and stderr. `cwd`: where `cmd` runs (default: the current directory).
    """
    runner = [sys.executable, "-c", RUNNER, json.dumps(cmd)]
    out = subprocess.run(runner, capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"measuring process failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result['rc']}):\n{result['stderr']}")
    return result
