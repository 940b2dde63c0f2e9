"""``ocd``: one command over both layers, which never import each other.

  ocd train | select-layer | export-onnx | show   (training.cli: offline work on bundles)
  ocd serve                                       (service.cli: the HTTP service)

Each layer registers its own subcommands; a serving-only install (no ``train`` extra) still has
``ocd serve`` and ``ocd show``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from service.cli import add_commands as add_service
    from training.cli import add_commands as add_training

    p = argparse.ArgumentParser(prog="ocd", description="OCD Serve: train, evaluate and serve OCD models")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_training(sub)
    add_service(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "" not in sys.path and "." not in sys.path:  # your modules in the working directory import by path (only
        sys.path.append("")  # those on the allow-list; appended: nothing there shadows an installed module)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
