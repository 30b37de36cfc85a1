"""What a timing depends on: the machine it was measured on (shared by the benchmark grid and the study)."""

import os
import platform
import subprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info():
    """CPU model and vector units, cores, memory, Python and the project commit; nothing here needs TensorFlow."""
    info = {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                cpu.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    info["cpu"] = cpu.get("model name", platform.processor() or "unknown")
    if "cpu family" in cpu:
        info["cpu"] += f" (family {cpu['cpu family']}, model {cpu.get('model', '?')})"
    flags = set(cpu.get("flags", "").split())
    info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
    try:
        with open("/proc/meminfo") as f:
            total_kib = int(f.readline().split()[1])
        info["memory_gb"] = total_kib * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        info["memory_gb"] = None
    try:
        info["git"] = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        info["git"] += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        info["git"] = "unknown"
    return info
