"""The benchmark suite: ``python -m bench [--quick] [--only SECTION ...] [--weights PATH]``.

Sections, run in this order (each prints its tables and writes ``bench/results/<section>.json``):

    end_to_end  training img/s (batch 8), inference img/s (batch 1 and 8), peak memory and
                time to first step of the mnist preset at 128x128 and 256x256, one process per size
    stages      the cost of each stage at inference and in training (table and
                ``bench/results/stages.png``), checked against the full graphs
    scaling     inference time and memory against image size (128..1024) and objects per image
                (1, 10, 50); anchor labelling and NMS against the number of boxes; growth exponents
    limits      peak matmul / 3x3 conv GFLOP/s of this machine, the model's FLOPs per image,
                and the share of the peak that training and inference reach
    builtins    from-scratch NMS vs TensorFlow's, RoIAlign vs crop_and_resize, data vs training step
    xla         (only when asked for: compiling takes minutes) XLA jit_compile, auto-clustering,
                reduce_retracing
    variants    (only when asked for) config changes against the preset, e.g.
                ``--only variants --variant max_detections=10 --variant mask_head_width=32``

About 6 minutes on 2 quiet cores; ``--quick`` (a smoke test, ~1-2 minutes) shrinks every
section.  The machine's load is saved with the results: timings taken while other processes
run are slower and noisier, compare runs made in the same conditions.
"""
import argparse
import os
import sys
import time

SECTIONS = ("end_to_end", "stages", "scaling", "limits", "builtins", "xla", "variants")
DEFAULT_SECTIONS = SECTIONS[:5]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Sizes of each section: the full run, and --quick (a smoke test of the same code).
SETTINGS = {
    False: {"e2e_sizes": (128, 256), "e2e_steps": (40, 12), "e2e_warmup": 3, "infer_seconds": 4.0,
            "repeats": 10, "pipeline_batches": 30, "scaling_sizes": (128, 256, 512, 1024), "objects": (1, 10, 50),
            "scaling_repeats": 5, "gt_counts": (1, 10, 50, 100), "box_counts": (500, 1000, 2000, 4000, 8000),
            "train_xla": True, "clustering_rounds": 2},
    True: {"e2e_sizes": (128,), "e2e_steps": (3,), "e2e_warmup": 1, "infer_seconds": 0.5,
           "repeats": 2, "pipeline_batches": 3, "scaling_sizes": (128, 256), "objects": (1, 10),
           "scaling_repeats": 1, "gt_counts": (1, 10), "box_counts": (500, 1000), "train_xla": False,
           "clustering_rounds": 0},
}


class Suite:
    """Runs the sections on one :class:`minimask.config.Config`, sharing one model, one batch,
    the model's full graphs and the measured images/s between them.  Sections that start
    processes of their own (end_to_end, scaling) need a preset: they pass ``config.name``."""

    def __init__(self, config, settings, weights=None, out_dir=RESULTS, variants=None):
        self.config = config
        self.s = settings
        self.weights = weights
        self.out_dir = out_dir
        self.variant_specs = variants  # --variant values
        self.train_images_per_s = None  # from end_to_end (else stages), for builtins
        self._model = self._batch = self._full = None

    def model_and_batch(self):
        if self._model is None:
            from bench import bench_model, stages

            self._model = bench_model.build_model(self.config, self.weights)
            self._batch = stages.real_batch(self.config)
        return self._model, self._batch

    def full_calls(self):
        """The model's full graphs (traced once, shared by stages and limits)."""
        if self._full is None:
            from bench import stages

            self._full = stages.full_calls(*self.model_and_batch())
        return self._full

    def end_to_end(self):
        from bench import end_to_end

        result = end_to_end.measure(self.config.name, self.s["e2e_sizes"], self.s["e2e_steps"],
                                    self.s["e2e_warmup"], self.s["infer_seconds"], self.weights)
        self.train_images_per_s = result["rows"][0]["train_images_per_s"]
        return result, end_to_end.table(result)

    def stages(self):
        from bench import stages

        model, batch = self.model_and_batch()
        result = stages.measure(model, batch, repeats=self.s["repeats"], pipeline_batches=self.s["pipeline_batches"],
                                full=self.full_calls())
        path = os.path.join(self.out_dir, "stages.png")
        stages.plot(result, path)
        if self.train_images_per_s is None:  # no end-to-end run: the full training step gives it
            self.train_images_per_s = 1000.0 * result["batch_size"] / result["training"]["measured_full_ms"]
        return result, stages.table(result) + f"\nwrote {path}"

    def scaling(self):
        from bench import scaling

        result = scaling.measure(self.config.name, self.s["scaling_sizes"], self.s["objects"],
                                 self.s["scaling_repeats"], self.weights, self.s["gt_counts"], self.s["box_counts"])
        return result, scaling.table(result)

    def limits(self):
        from bench import limits

        model, batch = self.model_and_batch()
        result = limits.measure(model, self.full_calls(), int(batch["image"].shape[0]), repeats=self.s["repeats"])
        return result, limits.table(result)

    def builtins(self):
        from bench import builtins

        result = builtins.measure(self.train_images_per_s, self.config, repeats=self.s["repeats"],
                                  pipeline_batches=self.s["pipeline_batches"])
        return result, builtins.table(result)

    def xla(self):
        from bench import xla

        _, batch = self.model_and_batch()
        result = xla.measure(self.config, batch, self.s["repeats"], self.s["train_xla"],
                             clustering_rounds=self.s["clustering_rounds"])
        return result, xla.table(result)

    def variants(self):
        from bench import variants

        _, batch = self.model_and_batch()
        result = variants.measure(self.config, batch, self.variant_specs or variants.DEFAULT_VARIANTS,
                                  repeats=max(2, self.s["repeats"] - 2))
        return result, variants.table(result)


def run_sections(suite, sections):
    """Run ``sections`` (in the suite's order), print their tables, write ``<section>.json`` and
    ``suite.json`` into ``suite.out_dir`` -> the summary dict."""
    from bench.common import machine, write_results

    os.makedirs(suite.out_dir, exist_ok=True)
    start = time.perf_counter()
    summary = {"sections": {}, "quick": suite.s is SETTINGS[True], "config": suite.config.name,
               "weights": suite.weights}
    for name in SECTIONS:
        if name not in sections:
            continue
        print(f"\n=== {name} ===", flush=True)
        began = time.perf_counter()
        result, text = getattr(suite, name)()
        result["seconds"] = round(time.perf_counter() - began, 1)
        result["machine"] = machine()
        print(text)
        write_results(os.path.join(suite.out_dir, f"{name}.json"), result)
        summary["sections"][name] = result["seconds"]
        sys.stdout.flush()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["machine"] = machine()
    write_results(os.path.join(suite.out_dir, "suite.json"), summary)
    print(f"\nsuite: {', '.join(f'{k} {v:.0f} s' for k, v in summary['sections'].items())}; "
          f"total {summary['seconds']:.0f} s (load average {summary['machine']['load_average_1min']:.1f} "
          f"on {summary['machine']['cpu_count']} cores)")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke test: every section, tiny sizes")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--config", default="mnist", help="config preset (default mnist)")
    parser.add_argument("--weights", default=None, help="a saved .keras model to take the weights from "
                                                        "(default: the random initialisation, seed 0)")
    parser.add_argument("--variant", action="append", metavar="FIELD=VALUE[,FIELD=VALUE]",
                        help="for --only variants: a config change to time against the preset (repeatable)")
    parser.add_argument("--out", default=RESULTS, help=f"folder for the JSON files and stages.png ({RESULTS})")
    args = parser.parse_args(argv)

    from minimask import config as config_lib

    suite = Suite(config_lib.get_config(args.config), SETTINGS[args.quick], args.weights, args.out, args.variant)
    return run_sections(suite, args.only or DEFAULT_SECTIONS)


if __name__ == "__main__":
    main()
