"""What every benchmark shares: the machine, timing, memory, growth fits, tables and JSON.

Timing rules of the suite (the machine is often shared, so single timings lie):

* a call is timed until its outputs are in numpy (:func:`fetch`): TensorFlow may return
  before the work is done;
* every function is warmed up first (tracing and the first allocations are not its speed);
* functions that are compared run in *interleaved* rounds (A B C, A B C, ...), so a burst of
  load from another process hits all of them alike, and the *median* round is reported.
"""
import json
import os
import platform
import re
import resource
import statistics
import time

import numpy as np


def machine():
    """Versions and processor of this machine, with its load (shared machines are noisy)."""
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_average_1min": os.getloadavg()[0]}


def write_results(path, result):
    """Write ``result`` as indented JSON to ``path`` (folders created) and say where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


# ------------------------------------------------------------------------ timing
def fetch(outputs):
    """Wait for ``outputs`` (any nest of tensors) by copying them to numpy; other leaves pass."""
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, outputs)


def time_interleaved(calls, warmup=2, repeats=10):
    """Milliseconds per call of each zero-argument callable in ``calls`` ({name: fn}).

    ``warmup`` untimed calls of each, then ``repeats`` rounds that call every function once.
    Returns ``{name: {"median_ms", "min_ms"}}``.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fetch(fn())
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fetch(fn())
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def time_one(fn, warmup=2, repeats=10):
    """Median milliseconds per call of one zero-argument callable (see :func:`time_interleaved`)."""
    return time_interleaved({"fn": fn}, warmup, repeats)["fn"]["median_ms"]


# ------------------------------------------------------------------------ processes
def run_in_own_process(module, arguments):
    """``python -m module *arguments --out FILE`` from the project root -> the JSON it wrote.

    A fresh process has its own peak memory and no graph or cache of another section.
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        command = [sys.executable, "-m", module, *map(str, arguments), "--out", out]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        finished = subprocess.run(command, cwd=root, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


# ------------------------------------------------------------------------ memory
def peak_rss_mb():
    """Peak resident memory of this process (MB): since :func:`reset_peak_rss` where Linux lets
    us reset it (``/proc/self/clear_refs``), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024.0
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    """Resident memory of this process now (MB), or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024.0
    except (OSError, AttributeError):
        return None


def reset_peak_rss():
    """Start a new peak-memory window (Linux >= 4.0); returns False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------ growth
def growth_exponent(sizes, costs):
    """Slope of log(cost) against log(size): ``cost ~ size ** slope`` (1 = linear, 0 = flat)."""
    sizes, costs = np.asarray(sizes, float), np.asarray(costs, float)
    return float(np.polyfit(np.log(sizes), np.log(costs), 1)[0])


def describe_growth(slope, what):
    """One sentence for a fitted exponent, e.g. 'grows about linearly with the pixel count'."""
    if slope < 0.2:
        kind = "is about flat in"
    elif slope < 0.8:
        kind = "grows less than linearly with"
    elif slope <= 1.2:
        kind = "grows about linearly with"
    else:
        kind = "grows faster than linearly with"
    return f"{kind} {what} (exponent {slope:.2f})"


# ------------------------------------------------------------------------ tables
def format_table(rows, columns, title=None):
    """Rows (dicts) as an aligned text table; ``columns`` = [(key, header, format or None)]."""
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "n/a"
        return format(value, fmt) if fmt else str(value)

    body = [[cell(row, key, fmt) for key, _, fmt in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    # the first column (a name) left-aligned, numbers right-aligned
    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = ([title] if title else []) + [line(headers), line(["-" * w for w in widths])]
    return "\n".join(lines + [line(r) for r in body])
