"""MNIST digits: where the scenes' objects come from, and how they are split.

A detector is only honestly evaluated on objects it has never seen.  Our scenes are
collages of MNIST digits, so "never seen" means: the *digit images* placed in test
scenes must not appear in any training scene (otherwise the model could memorise
individual strokes).  This module

* loads the digits (:func:`load_mnist`): by default the 8,000 digits bundled with the
  package (no network needed, see ``MNIST_DIGITS_README.md`` for their provenance),
  or, when asked, the full 70,000 through ``keras.datasets.mnist``;
* splits their indices into disjoint train / val / test *pools*
  (:func:`split_pools`), from which :mod:`synthetic_data.scenes` draws.

Images are uint8 ``[N, 28, 28]`` (0 = paper, 255 = full ink), labels uint8 ``[N]``.
"""
import os
import socket
import threading
from pathlib import Path

import numpy as np

BUNDLED_FILE = Path(__file__).parent / "mnist_digits_8k.npz"
SPLITS = ("train", "val", "test")

# keras.datasets.mnist.load_data() downloads from this host (port 443, https).
KERAS_MNIST_HOST = "storage.googleapis.com"
# How long we wait for the host before declaring the machine offline, and the socket
# timeout during the download itself, so that no-network machines fail fast, never hang.
CONNECT_TIMEOUT_S = 3.0
DOWNLOAD_TIMEOUT_S = 30.0

_OFFLINE_HINT = "use source='bundled' for the 8,000 digits shipped with the package"


def load_mnist(source="bundled"):
    """MNIST digits: ``source`` "bundled" | "keras" -> (images uint8 [N, 28, 28], labels uint8 [N]).

    "bundled" (default) reads the 8,000 digits shipped in ``mnist_digits_8k.npz``.
    "keras" returns all 70,000 digits of ``keras.datasets.mnist.load_data()`` (train then
    test, concatenated); it needs the internet the first time and raises RuntimeError at
    once (after a few seconds at most) when the download host cannot be reached.
    """
    if source == "bundled":
        with np.load(BUNDLED_FILE) as data:
            images, labels = data["images"], data["labels"]
    elif source == "keras":
        images, labels = _load_keras_mnist()
    else:
        raise ValueError(f"unknown MNIST source {source!r}: expected 'bundled' or 'keras'")
    return np.asarray(images, np.uint8), np.asarray(labels, np.uint8)


def _keras_cache_files():
    """Where keras keeps ``mnist.npz`` once downloaded: ``$KERAS_HOME/datasets``, or
    ``/tmp/.keras/datasets`` when the former is not writable."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return [Path(keras_home) / "datasets" / "mnist.npz", Path("/tmp/.keras/datasets/mnist.npz")]


def host_reachable(host=KERAS_MNIST_HOST, port=443, timeout=CONNECT_TIMEOUT_S):
    """True if a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    The name lookup is not covered by socket timeouts, so the whole attempt runs in a
    background thread that we stop waiting for after ``timeout`` seconds.
    """
    result = []

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result) and result[0]


def _keras_load_data():
    """The keras call itself (kept separate so tests can replace it)."""
    import keras  # imported here: only this optional path needs it

    return keras.datasets.mnist.load_data()


def _load_keras_mnist():
    """All 70,000 MNIST digits via keras, failing fast and clearly when offline."""
    cached = any(path.exists() for path in _keras_cache_files())
    if not cached and not host_reachable():
        raise RuntimeError(
            f"could not download MNIST: {KERAS_MNIST_HOST} is unreachable (no internet?); "
            + _OFFLINE_HINT
        )
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a stalled download errors, not hangs
    try:
        (x_train, y_train), (x_test, y_test) = _keras_load_data()
    except Exception as error:  # any download / cache failure becomes one clear message
        raise RuntimeError(f"could not download MNIST ({error}); " + _OFFLINE_HINT) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])


def split_pools(num_digits, fractions=(0.8, 0.1, 0.1), seed=0):
    """Disjoint digit pools: ``num_digits`` -> {"train", "val", "test": int64 sorted indices}.

    The indices ``0..num_digits-1`` are shuffled with ``seed`` and cut in the given
    ``fractions`` (which must sum to 1).  Every index lands in exactly one pool, so a
    digit image used in a test scene is never used in a training scene.
    """
    fractions = np.asarray(fractions, np.float64)
    if fractions.shape != (len(SPLITS),) or np.any(fractions < 0):
        raise ValueError(f"fractions must be 3 non-negative numbers (train, val, test), got {fractions}")
    if not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must sum to 1, got {fractions.tolist()} (sum {fractions.sum()})")
    order = np.random.default_rng(seed).permutation(num_digits)
    # Cut points from cumulative fractions; rounding once keeps the three sizes summing to N.
    cuts = np.round(np.cumsum(fractions)[:-1] * num_digits).astype(int)
    pools = np.split(order, cuts)
    for name, pool in zip(SPLITS, pools):
        if len(pool) == 0 and fractions[SPLITS.index(name)] > 0:
            raise ValueError(f"the {name} pool is empty: {num_digits} digits are too few")
    return {name: np.sort(pool) for name, pool in zip(SPLITS, pools)}
