"""``ocd fit``: your model (class by import path + weights), a layer and your data -> a trained,
reported and published OCD bundle, in one command.

ocd fit --arch mypkg.nets:LeNet --weights lenet.pth --layer fc1 --data digits/ --name digits
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ocd_core.nets.user import ArchImportError, env_allow_modules, module_allowed, parse_allow

from . import inputs
from .inputs import InputError


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or a ``torch.save`` file read with ``weights_only=True`` (no
    code runs), mapped to the CPU; a checkpoint dict's "state_dict" / "model" entry is used."""
    if not path.is_file():
        raise InputError("weights", f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  pickle with code in it, or not a torch file at all
        raise InputError(
            "weights", f"{path} is not a state dict torch can read safely ({str(e).splitlines()[0]})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError("weights", f"{path} does not hold a state dict (names -> tensors)")
    return obj


def _output(value: str | None):
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    return value  # a key; "package.module:fn" is resolved below


def fit(args: argparse.Namespace) -> int:
    from ocd_core.bundle import ArchSpec
    from ocd_core.denoisers import CompactConfig
    from ocd_core.fit import FitConfig
    from ocd_core.nets.user import OutputSelector, SelectOutput, import_object
    from ocd_core.targets import TargetConfig
    from training.api import ocd_pipeline
    from training.recipes import EvalConfig
    from training.train_base import train_base
    from training.user_data import load

    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
        if not isinstance(kwargs, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise InputError("kwargs", f"expected a JSON object of constructor arguments ({e})") from None
    allow = parse_allow(args.allow_module or []) + env_allow_modules()
    output = _output(args.output)
    named = [p.partition(":")[0] for p in (args.arch, output) if isinstance(p, str) and ":" in p]
    allow += [m for m in named if not module_allowed(m, allow)]  # named on this command line: allowed here
    spec = ArchSpec(arch=args.arch, kwargs=kwargs)
    try:
        if isinstance(output, str) and ":" in output:
            output = import_object(output, allow, "output function")
    except ValueError as e:
        raise InputError("output", str(e)) from None
    try:
        base = spec.build(allow)
    except ArchImportError as e:
        raise InputError("arch", str(e)) from None
    except Exception as e:  # noqa: BLE001  the user's constructor: a wrong keyword, a bad value
        raise InputError("kwargs", f"{args.arch}(**{kwargs}) failed: {type(e).__name__}: {e}") from None
    if args.weights:
        try:
            base.load_state_dict(load_weights(Path(args.weights)))
        except RuntimeError as e:
            detail = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip()) or str(e)
            raise InputError("weights", f"do not fit {args.arch} with kwargs {kwargs}: {detail}") from None
    try:
        shape = [int(v) for v in args.input_shape.split(",")] if args.input_shape else None
    except ValueError:
        raise InputError("input_shape", f"expected C,H,W as integers, got {args.input_shape!r}") from None
    data = load(Path(args.data), args.modality, args.target, args.task, shape, args.val, args.test, args.seed)
    if args.task == "regression" and data.modality in ("image", "audio"):
        raise InputError(
            "task", "regression needs real-valued targets; a folder per class gives class labels (use a CSV with "
            "--target or an .npz)"
        )  # fmt: skip
    x_tr, y_tr = data.part("train")
    net = base if output is None else SelectOutput(base, OutputSelector.of(output).resolve(allow))
    inputs.check_layer(net, args.layer)  # before any training: the checks ocd_pipeline repeats
    out = inputs.dry_forward(net.eval(), x_tr, list(x_tr.shape[1:]), output is not None)
    inputs.check_labels(data.labels, out, args.task)
    y_tr = inputs.check_targets("data", y_tr, out, args.task)
    loss = "cross_entropy" if args.task == "classification" else "mse"
    if not args.weights:  # no trained weights: train the base model on the train split first
        torch.manual_seed(args.seed)
        train_base(
            net,
            x_tr,
            y_tr,
            epochs=args.epochs,
            loss=loss,
            seed=args.seed,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    fit_cfg = FitConfig(
        train_steps=args.steps, denoiser=CompactConfig(hidden=args.hidden), targets=TargetConfig(loss=loss)
    )
    res = ocd_pipeline(
        base,
        args.layer,
        (x_tr, y_tr),
        data.part("test"),
        val=data.part("val"),
        name=args.name,
        arch=spec,
        output=output,
        input_shape=list(x_tr.shape[1:]),
        task=args.task,
        modality=data.modality,
        normalization=data.normalization,
        tabular=data.tabular,
        labels=data.labels,
        fit=fit_cfg,
        eval=EvalConfig(
            ddim_steps=sorted({1, 5, args.ddim_steps}), default_steps=args.ddim_steps, ensemble=args.ensemble
        ),
        models_dir=args.models,
        reports_dir=args.reports,
        seed=args.seed,
        progress=None if not args.quiet else False,
        allow_modules=allow,
    )
    rows = res.metrics["rows"]
    metric = next(iter(rows["base"]))
    print(f"bundle: {res.bundle}\nreport: {Path(args.reports) / args.name / 'report.md'}")
    print(f"test {metric}: base {rows['base'][metric]:.4f}, ocd {rows['ocd'][metric]:.4f}, "
          f"nearest neighbour {rows['nearest_neighbour'][metric]:.4f}; default: {res.metrics['served']}")  # fmt: skip
    tops = sorted({m.split(".")[0] for m in allow if m})
    serve = f"ocd serve --models {args.models}" + "".join(f" --allow-module {t}" for t in tops)
    print(f"serve it: {serve}")
    return 0


FLAGS = {"arch", "kwargs", "weights", "output", "layer", "data", "modality", "target", "task", "input-shape", "name"}


def run(args: argparse.Namespace) -> int:
    try:
        return fit(args)
    except InputError as e:
        flag = f"--{e.arg.replace('_', '-')}"
        print(f"ocd fit: {flag if flag.lstrip('-') in FLAGS else e.arg}: {e.reason}", file=sys.stderr)
        return 2


def add_command(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "fit",
        help="your model + a layer + your data -> a trained, reported and published OCD bundle",
        description="Data layouts: an image folder (one sub-folder per class), a folder of WAV files per "
        "class, a CSV with a --target column, or an .npz with arrays x and y.",
    )
    f.add_argument("--arch", required=True, help="the model's class: 'package.module:Class' or a built-in name")
    f.add_argument("--kwargs", help="its constructor's arguments as JSON, e.g. '{\"num_classes\": 10}'")
    f.add_argument("--weights", help="trained weights: .safetensors or a torch.save state dict (.pt/.pth); "
                   "without them the base model is trained here first")  # fmt: skip
    f.add_argument("--output", help="for a forward returning a tuple / dict: an index, a key, or 'package.module:fn'")
    f.add_argument("--layer", required=True, help="the Linear / Conv2d layer to adapt, e.g. fc1")
    f.add_argument("--data", required=True, help="image / WAV folder, .csv or .npz")
    f.add_argument("--modality", choices=["image", "audio", "tabular", "tensor"], help="default: from the data")
    f.add_argument("--target", help="CSV: the target column")
    f.add_argument("--task", choices=["classification", "regression"], default="classification")
    f.add_argument("--input-shape", help="images: C,H,W to convert and resize to (default: the first image's)")
    f.add_argument("--name", required=True, help="the model's name in the repository")
    f.add_argument("--models", default="models")
    f.add_argument("--reports", default="reports")
    f.add_argument("--val", type=float, default=0.15, help="fraction of the data for val (chooses the served mode)")
    f.add_argument("--test", type=float, default=0.15, help="fraction of the data for test (the report)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--epochs", type=int, default=10, help="base training epochs, when no --weights")
    f.add_argument("--steps", type=int, default=2000, help="diffusion training steps")
    f.add_argument("--hidden", type=int, default=64, help="the compact denoiser's width")
    f.add_argument("--ddim-steps", type=int, default=10, help="DDIM steps of the ocd mode")
    f.add_argument("--ensemble", type=int, default=5, help="members of the ocd_ensemble mode")
    f.add_argument("--allow-module", action="append", metavar="PACKAGE", help="also import from this package")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(fn=run)
