"""Command line: ``python -m synthetic_data export --out DIR --train N --val N --test N``.

Writes MNIST-detection scenes as a COCO dataset (see :mod:`synthetic_data.export`), so
that the same scenes can be inspected with any COCO tool or read back by the course.
"""
import argparse
import sys

from synthetic_data.export import export_coco

LAYOUT = """\
output layout:
  DIR/train.json, DIR/val.json, DIR/test.json   COCO annotations (RLE masks)
  DIR/{split}/NNNNNN.png                        the images of each split
Each image's file_name in the JSON is relative to DIR/{split}/.
Train, val and test scenes use disjoint pools of MNIST digit images.
The same arguments always write byte-identical files.
"""


def build_parser():
    """The argument parser of ``python -m synthetic_data``."""
    parser = argparse.ArgumentParser(
        prog="python -m synthetic_data",
        description="MNIST-detection scenes (digits on a canvas, with boxes and masks).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="write scenes as a COCO dataset",
        description="Write MNIST-detection scenes as a COCO dataset.",
        epilog=LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--out", required=True, help="output folder DIR")
    export.add_argument("--train", type=int, default=200, help="number of train scenes (default 200)")
    export.add_argument("--val", type=int, default=50, help="number of val scenes (default 50)")
    export.add_argument("--test", type=int, default=50, help="number of test scenes (default 50)")
    export.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    export.add_argument("--image-size", type=int, default=128, help="canvas side in pixels (default 128)")
    export.add_argument("--min-digits", type=int, default=1, help="fewest digits in a non-empty scene")
    export.add_argument("--max-digits", type=int, default=6, help="most digits in a scene")
    export.add_argument("--empty-fraction", type=float, default=0.05,
                        help="probability that a scene has no digit (default 0.05)")
    export.add_argument("--digit-size", type=int, nargs=2, default=(14, 64), metavar=("MIN", "MAX"),
                        help="side range of the square digit patches in pixels (default 14 64)")
    export.add_argument("--max-overlap", type=float, default=0.3,
                        help="largest IoU between two digit patches (default 0.3)")
    export.add_argument("--min-visible", type=float, default=0.5,
                        help="fraction of a digit's ink that must stay visible to be annotated")
    export.add_argument("--source", choices=("bundled", "keras"), default="bundled",
                        help="MNIST digits: the bundled 8,000 or keras' 70,000 (needs internet)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    paths = export_coco(
        args.out,
        counts={"train": args.train, "val": args.val, "test": args.test},
        seed=args.seed,
        image_size=args.image_size,
        min_digits=args.min_digits,
        max_digits=args.max_digits,
        empty_fraction=args.empty_fraction,
        digit_size=tuple(args.digit_size),
        max_overlap=args.max_overlap,
        min_visible=args.min_visible,
        source=args.source,
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
