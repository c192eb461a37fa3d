"""``tokenreward`` command line: the only module that reads argv.

``serve`` flags are generated from :class:`~tokenreward_service.config.Settings`, so each
setting is a flag and an environment variable with one doc line. A flag given on the command
line wins over the environment; a flag left out leaves the environment (or default) in force.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]


def _flag_type(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a Settings field's annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _flag_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return {"type": str, "metavar": "A,B,..."}
    if annotation is bool:
        return {"type": str, "metavar": "{true,false}"}
    if annotation in (int, float):
        return {"type": annotation}
    return {"type": str}


def build_parser() -> argparse.ArgumentParser:
    from tokenreward_service.config import Settings

    parser = argparse.ArgumentParser(
        prog="tokenreward", description="Token-level rewards for RLHF."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a reward model over HTTP",
        description="Serve per-token rewards. Every flag is also an environment variable "
        "TOKENREWARD_<FLAG> (upper case, '-' as '_'); flags win.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} [env TOKENREWARD_{name.upper()}; default {default!r}]"
        serve.add_argument(
            flag,
            dest=name,
            default=argparse.SUPPRESS,
            help=help_text,
            **_flag_type(field.annotation),
        )
    bench = commands.add_parser(
        "bench",
        help="measure throughput and latency (prints a JSON report)",
        description="Run seeded workloads (mixed, group, long) against a server and against the "
        "in-process ceiling. Without --url it builds the benchmark model, starts its own "
        "servers on 127.0.0.1 and runs every comparison.",
    )
    bench.add_argument("--workload", default="all", help="mixed, group, long, a comma list, or all")
    bench.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    bench.add_argument("--scale", type=float, default=1.0, help="fraction of each workload's items")
    bench.add_argument("--url", default=None, help="measure this running server only")
    bench.add_argument("--api-key", default=None, help="bearer key for --url")
    bench.add_argument("--model", default=None, help="RM folder (default: the benchmark model)")
    bench.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget")
    bench.add_argument("--out", default=None, help="also write the JSON report to this file")
    return parser


def _bench(args: argparse.Namespace) -> int:
    from tokenreward_service.bench import known_workloads, main_bench

    try:
        workloads = known_workloads(args.workload)
    except ValueError as exc:
        print(f"tokenreward: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    main_bench(
        workloads=workloads,
        runs=args.runs,
        scale=args.scale,
        url=args.url,
        api_key=args.api_key,
        model=args.model,
        max_batch_tokens=args.max_batch_tokens,
        out=args.out,
    )
    return 0


def _serve(overrides: dict[str, Any]) -> int:
    import uvicorn
    from pydantic import ValidationError

    from tokenreward_service.app import create_app, load_model
    from tokenreward_service.config import Settings
    from tokenreward_service.errors import ModelLoadError

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"tokenreward: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # Load before uvicorn starts: a model that cannot be served is a one-line error and exit 1,
    # not a traceback from inside the ASGI lifespan.
    try:
        model = load_model(settings)
    except ModelLoadError as exc:
        print(f"tokenreward: cannot serve the model: {exc}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        create_app(settings, model=model),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "serve":
        return _serve(options)
    if args.command == "bench":
        return _bench(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse refuses unknown ones


if __name__ == "__main__":
    sys.exit(main())
