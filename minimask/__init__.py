"""minimask: learn Mask R-CNN by building it.

Every stage of the model lives in the file named after it (``boxes.py``,
``anchors.py``, ``rpn.py``, ...); the box, class and mask conventions that all of
them share are written once, in the docstring of :mod:`minimask.boxes`.
"""
import os

# Keep TensorFlow's C++ start-up chatter out of notebooks and terminals (set before
# TensorFlow is first imported; a user's own setting wins).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
