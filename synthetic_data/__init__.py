"""synthetic_data: MNIST-detection scenes with boxes, classes and instance masks, in COCO format.

- :func:`load_mnist`, :func:`split_pools` (``mnist.py``): the digits and their disjoint
  train / val / test pools;
- :class:`MnistDetection` (``scenes.py``): index-addressable scenes, ``dataset[i]`` -> sample;
- :func:`export_coco` (``export.py``, also ``python -m synthetic_data export``): COCO files.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from synthetic_data.export import export_coco  # noqa: E402
from synthetic_data.mnist import load_mnist, split_pools  # noqa: E402
from synthetic_data.scenes import CATEGORY_NAMES, MnistDetection  # noqa: E402

__all__ = ["CATEGORY_NAMES", "MnistDetection", "export_coco", "load_mnist", "split_pools"]
