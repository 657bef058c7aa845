"""The configuration of a Mask R-CNN: one frozen dataclass, one comment per field, and presets.

Every number that shapes the model or its training lives here, so that a run is
described completely by its config (saved as ``config.json`` in every run directory)
and two runs differ only where their configs differ.  Layers never receive the
config object itself: :mod:`minimask.model` reads the fields and passes them as
explicit keyword arguments.

Presets:
    ``mnist``         the CPU course model for 128x128 MNIST scenes (trains in minutes).
    ``coco_r50_fpn``  the Mask R-CNN paper / Detectron2 R50-FPN 1x recipe (see its docstring).
"""
import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    name: str = "mnist"  # preset name, for logs and run directories

    # --- data -------------------------------------------------------------------
    image_size: int = 128  # images are resized/padded to image_size x image_size (a multiple of 32)
    num_classes: int = 10  # K object classes (class ids 1..K; 0 is background)
    class_names: tuple = ("background",) + tuple(str(d) for d in range(10))
    max_instances: int = 8  # ground-truth rows per image in a padded batch
    max_ignore: int = 4  # crowd ("ignore") boxes per image in a padded batch
    horizontal_flip: bool = False  # random left-right flip in training (digits must not be flipped)

    # --- backbone and FPN -------------------------------------------------------
    backbone: str = "mini_resnet"  # a name known to minimask.backbone.build_backbone
    backbone_weights: str = ""  # "" random init, "imagenet" (keras.applications), or a .weights.h5 path
    freeze_stages: int = 0  # 0 trains everything; k freezes the stem and stages 2..k
    freeze_batchnorm: bool = False  # BN in inference mode (use with small per-device batches)
    fpn_width: int = 64  # channels of P2..P6

    # --- anchors and RPN (Faster R-CNN, Ren et al. 2015, Sec. 3.1; FPN, Lin et al. 2017, Sec. 4.1)
    anchor_strides: tuple = (4, 8, 16, 32, 64)  # P2..P6
    anchor_scales: tuple = ((16,), (32,), (64,), (128,), (256,))  # anchor sizes (sqrt area, px) per level
    anchor_ratios: tuple = (0.5, 1.0, 2.0)  # height / width
    rpn_positive_iou: float = 0.7  # anchor is an object at IoU >= this (or as some box's best match)
    rpn_negative_iou: float = 0.3  # anchor is "no object" below this
    rpn_samples_per_image: int = 256  # anchors sampled for the RPN loss
    rpn_positive_fraction: float = 0.5  # at most this share of them positive
    rpn_pre_nms_train: int = 1000  # top-scoring anchors kept before NMS (training)
    rpn_post_nms_train: int = 200  # proposals kept after NMS (training)
    rpn_pre_nms_test: int = 500
    rpn_post_nms_test: int = 100
    rpn_nms_iou: float = 0.7
    rpn_min_size: float = 0.0  # proposals smaller than this (px) are dropped

    # --- RoI heads (Mask R-CNN, He et al. 2017, Sec. 3) -------------------------
    rois_per_image: int = 128  # RoIs sampled per image for the box head in training
    roi_positive_fraction: float = 0.25
    roi_positive_iou: float = 0.5
    mask_rois_per_image: int = 16  # positive RoIs per image that train the mask head (its cost)
    roi_canonical_size: float = 64.0  # s0 of FPN Eqn. 1: a RoI of this size pools from roi_canonical_level
    roi_canonical_level: int = 4  # k0 of FPN Eqn. 1
    box_pool_size: int = 7
    mask_pool_size: int = 14
    mask_size: int = 28  # mask head output (and target) resolution
    box_head_width: int = 256  # width of the two fully connected layers
    mask_head_convs: int = 2  # 3x3 convolutions before the upsampling
    mask_head_width: int = 64
    box_weights: tuple = (10.0, 10.0, 5.0, 5.0)  # delta weights of the box head (Detectron)
    sampling_ratio: int = 2  # bilinear samples per bin side in RoIAlign
    roi_align_implementation: str = "crop_and_resize"  # or "gather" (same numbers; see roi_align.py)

    # --- detection (inference) --------------------------------------------------
    score_threshold: float = 0.05
    detection_nms_iou: float = 0.5
    max_detections: int = 25  # per image (scenes hold at most 6 digits; COCO uses 100)
    detection_pre_nms: int = 200  # best (RoI, class) candidates per image that enter the per-class NMS

    # --- training -----------------------------------------------------------------
    batch_size: int = 8  # global batch (split across replicas by tf.distribute)
    optimizer: str = "adamw"  # "sgd" (momentum 0.9) or "adamw"
    learning_rate: float = 2e-3  # peak learning rate for the global batch
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # "cosine" or "steps" (x0.1 at 2/3 and 8/9 of training)
    clipnorm: float = 5.0  # gradient clipping by global norm (0 disables)
    train_minutes: float = 12.0  # default budget of `python -m minimask train`
    steps_per_epoch: int = 250  # steps between Keras epoch ends (progress bar lines, epoch logs)
    checkpoint_every: int = 200  # steps between checkpoints (each replaces the last atomically)
    mixed_precision: str = ""  # "", "mixed_float16" or "mixed_bfloat16"
    seed: int = 0

    # --- helpers --------------------------------------------------------------------
    def replace(self, **changes):
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """Plain JSON-ready values (tuples become lists)."""
        return json.loads(self.to_json())

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}: was it written by another version of minimask?")
        # JSON turns tuples into lists; turn them back so configs compare equal.
        return cls(**{k: _tuplify(v) for k, v in raw.items()})

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    def save(self, path):
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_json(f.read())


def _tuplify(value):
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


MNIST = Config()

PRESETS = {"mnist": MNIST}


def get_config(name, **overrides):
    """The preset called ``name`` with ``overrides`` applied: ``get_config("mnist", seed=3)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
