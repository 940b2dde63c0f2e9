"""``ocd serve``: every bundle of the model repository over HTTP (uvicorn, ``OCD_*`` settings)."""

from __future__ import annotations

import argparse


def serve(args: argparse.Namespace) -> int:
    import copy
    import os
    import tempfile

    import uvicorn
    import uvicorn.config

    from .settings import Settings

    overrides = {
        "models_dir": args.models,
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "models": args.model,
        "allow_modules": ",".join(args.allow_module) if args.allow_module else None,
    }
    for key, value in overrides.items():  # workers read their settings from the environment
        if value is not None:
            os.environ[f"OCD_{key.upper()}"] = str(value)
    s = Settings.from_env()
    if s.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ocd-prom-")
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # and the service's own INFO lines (models, costs)
    log_config["loggers"]["ocd"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=s.host,
        port=s.port,
        workers=s.workers,
        timeout_graceful_shutdown=int(s.timeout_s) + 5,
        log_level="info",
        access_log=s.access_log,
        log_config=log_config,
        http="service.protocol:TimedHttpToolsProtocol",  # 408 for headers that do not come
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the ``ocd`` parser (ocd_cli)."""
    v = sub.add_parser("serve", help="serve every bundle in the model repository over HTTP")
    v.add_argument("--host")
    v.add_argument("--port", type=int)
    v.add_argument("--workers", type=int)
    v.add_argument("--models", help="model repository directory (OCD_MODELS_DIR, default models)")
    v.add_argument("--model", help="serve only these: name or name:version, comma-separated (OCD_MODELS)")
    v.add_argument(
        "--allow-module",
        action="append",
        metavar="PACKAGE",
        help="a package whose classes bundles may name as architecture ('package.module:Class'); "
        "repeatable (OCD_ALLOW_MODULES)",
    )
    v.set_defaults(fn=serve)
