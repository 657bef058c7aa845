"""The command line: ``python -m minimask train | evaluate | predict | export``.

    python -m minimask train [--data synthetic | --train-json J --train-images D]
                             [--val-json J --val-images D] [--config mnist | coco_r50_fpn | ...]
                             [--epochs E | --minutes M | --steps N] [--seed S] [--out RUN_DIR] [--resume]
                             [--batch-size B] [--image-size S] [--mixed-precision P] [--backbone-weights W]
    python -m minimask evaluate --run RUN_DIR [--json J --images D]
    python -m minimask predict --run RUN_DIR IMAGE_OR_DIR... --out DIR [--score-threshold T]
    python -m minimask export --run RUN_DIR --out DIR
    python -m minimask fetch-weights --backbone resnet50 --out FILE.weights.h5   (needs internet)

``train`` runs on every GPU it sees (``tf.distribute.MirroredStrategy``), and across machines when
``TF_CONFIG`` is set (``MultiWorkerMirroredStrategy``): see :func:`minimask.train.make_strategy`.

Errors in what the user gave (a missing run directory, a bad COCO file, a config that
does not match) are printed as one line, not a traceback, and the exit status is 2.
"""
import argparse
import json
import os
import sys

from minimask.data import CocoFormatError


class UsageError(ValueError):
    """A problem with the command's arguments or files, reported as one line."""


def _parser():
    parser = argparse.ArgumentParser(prog="python -m minimask", description="minimask: Mask R-CNN, built to learn from")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a Mask R-CNN (default: on synthetic MNIST scenes)")
    train.add_argument("--data", default="synthetic", choices=["synthetic"],
                       help="synthetic MNIST scenes generated on the fly (default), unless --train-json is given")
    train.add_argument("--train-json", help="COCO instances JSON of the training set")
    train.add_argument("--train-images", help="folder of the training images")
    train.add_argument("--val-json", help="COCO instances JSON of the validation set")
    train.add_argument("--val-images", help="folder of the validation images")
    train.add_argument("--config", default="mnist", help="config preset (default: mnist)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="passes over the training data (synthetic: of steps_per_epoch)")
    budget.add_argument("--minutes", type=float, help="wall-clock budget; the LR schedule is fitted to it")
    budget.add_argument("--steps", type=int, help="number of optimizer steps")
    train.add_argument("--seed", type=int, default=None, help="seed of data, initialization and sampling")
    train.add_argument("--out", default="runs/mnist", help="run directory (default: runs/mnist)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--schedule", default="joint", choices=["joint", "alternating"],
                       help="joint training (default) or the 4-step alternating schedule")
    train.add_argument("--batch-size", type=int, help="global batch size (default: the config's)")
    train.add_argument("--backbone-weights", help="'imagenet' or a .weights.h5 file for the backbone")
    train.add_argument("--image-size", type=int,
                       help="square input size, a multiple of 32 (default: the config's; e.g. 128 to try "
                            "the COCO recipe on a CPU)")
    train.add_argument("--mixed-precision", choices=["mixed_float16", "mixed_bfloat16"],
                       help="mixed precision: float16 with loss scaling (GPUs), or bfloat16 (TPUs, A100/H100, recent CPUs)")

    ev = sub.add_parser("evaluate", help="COCO AP of a trained run")
    ev.add_argument("--run", required=True, help="run directory")
    ev.add_argument("--json", help="COCO instances JSON (default: the synthetic test split)")
    ev.add_argument("--images", help="folder of its images")
    ev.add_argument("--num-scenes", type=int, default=500, help="synthetic test scenes (default 500)")
    ev.add_argument("--out", help="where to write metrics.json and results.json (default: the run directory)")

    pr = sub.add_parser("predict", help="detect objects in images; write overlays and a COCO results file")
    pr.add_argument("--run", required=True, help="run directory")
    pr.add_argument("inputs", nargs="+", help="image files or folders of images")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--score-threshold", type=float, default=0.5)

    ex = sub.add_parser("export", help="export a SavedModel that plain TensorFlow can serve")
    ex.add_argument("--run", required=True, help="run directory")
    ex.add_argument("--out", required=True, help="output folder of the SavedModel")

    fw = sub.add_parser("fetch-weights", help="save keras.applications' ImageNet weights of a backbone "
                                              "to a file, for --backbone-weights (needs internet)")
    fw.add_argument("--backbone", default="resnet50", help="resnet50 (default) or resnet101")
    fw.add_argument("--out", required=True, help="the file to write, ending in .weights.h5")
    return parser


def _coco_pair(json_path, images, what):
    if (json_path is None) != (images is None):
        raise UsageError(f"--{what}-json and --{what}-images go together")
    return json_path, images


def cmd_train(args):
    from minimask import config as config_lib
    from minimask import train as train_lib
    from minimask.data import CocoDataset

    overrides = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.backbone_weights:
        overrides["backbone_weights"] = args.backbone_weights
    if args.image_size is not None:
        if args.image_size <= 0 or args.image_size % 32:
            raise UsageError(f"--image-size must be a positive multiple of 32, got {args.image_size}")
        overrides["image_size"] = args.image_size
    if args.mixed_precision:
        overrides["mixed_precision"] = args.mixed_precision
    try:
        config = config_lib.get_config(args.config, **overrides)
    except ValueError as err:
        raise UsageError(str(err)) from err
    train_json, train_images = _coco_pair(args.train_json, args.train_images, "train")
    val_json, val_images = _coco_pair(args.val_json, args.val_images, "val")
    train_source = val_source = val_coco = None
    if train_json:
        train_source = CocoDataset(train_json, train_images)
        config = _fit_classes(config, train_source, overrides)
    if val_json:
        from pycocotools.coco import COCO
        import contextlib
        import io

        val_source = CocoDataset(val_json, val_images)
        with contextlib.redirect_stdout(io.StringIO()):
            val_coco = COCO(val_json)
    steps = args.steps
    if args.epochs is not None:
        per_epoch = config.steps_per_epoch if train_source is None else max(1, len(train_source) // config.batch_size)
        steps = args.epochs * per_epoch
    _, summary = train_lib.run(config, args.out, train_source=train_source, val_source=val_source,
                               val_coco=val_coco, steps=steps, minutes=args.minutes,
                               schedule=args.schedule, resume=args.resume, strategy=train_lib.make_strategy())
    print(json.dumps({"run": args.out, "metrics": summary}, indent=2))


def _fit_classes(config, dataset, overrides):
    """Own data: the number and names of classes come from the dataset."""
    names = tuple(dataset.category_names)
    if config.num_classes != dataset.num_classes or config.class_names != names:
        config = config.replace(num_classes=dataset.num_classes, class_names=names)
    return config


def cmd_evaluate(args):
    from minimask import evaluate as evaluate_lib
    from minimask import train as train_lib

    config, model = train_lib.load_run(args.run)
    if (args.json is None) != (args.images is None):
        raise UsageError("--json and --images go together")
    coco_gt = None
    if args.json:
        from pycocotools.coco import COCO
        import contextlib
        import io
        from minimask.data import CocoDataset

        source = CocoDataset(args.json, args.images)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(args.json)
    else:
        source = train_lib.synthetic_source(config, "test", args.num_scenes, config.seed + 2)
    metrics, results = train_lib.evaluate_source(model, source, coco_gt=coco_gt, verbose=True)
    out = args.out or args.run
    os.makedirs(out, exist_ok=True)
    summary = evaluate_lib.summary(metrics)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    print(json.dumps(summary, indent=2))


def cmd_predict(args):
    from minimask import predict as predict_lib
    from minimask import train as train_lib

    config, model = train_lib.load_run(args.run)
    paths = predict_lib.collect_images(args.inputs)
    written = predict_lib.predict_files(model, config, paths, args.out, score_threshold=args.score_threshold)
    print(f"wrote {len(written)} overlays and results.json to {args.out}")


def cmd_export(args):
    from minimask import export as export_lib
    from minimask import train as train_lib

    _, model = train_lib.load_run(args.run)
    export_lib.export_saved_model(model, args.out)
    print(f"SavedModel written to {args.out}")


def cmd_fetch_weights(args):
    from minimask import backbone as backbone_lib

    if not args.out.endswith(".weights.h5"):
        raise UsageError(f"--out must end in .weights.h5, got {args.out!r}")
    try:
        backbone = backbone_lib.build_backbone(args.backbone, weights="imagenet")
    except (ValueError, RuntimeError) as err:
        raise UsageError(str(err)) from err
    backbone.save_weights(args.out)
    print(f"ImageNet weights of {args.backbone} written to {args.out}; train with --backbone-weights {args.out}")


def main(argv=None):
    args = _parser().parse_args(argv)
    from minimask.train import TrainingError

    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export,
                "fetch-weights": cmd_fetch_weights}
    try:
        commands[args.command](args)
    except (UsageError, TrainingError, CocoFormatError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    return 0
