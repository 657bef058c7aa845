"""What every benchmark shares: a description of the machine and writing the JSON results."""
import json
import os
import platform


def machine():
    """Versions and processor of this machine, with its load (shared machines are noisy)."""
    import numpy as np
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
