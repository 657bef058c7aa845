"""synthetic_data: MNIST-detection scenes with boxes, classes and instance masks, in COCO format."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
