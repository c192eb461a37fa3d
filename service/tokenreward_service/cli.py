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
    if annotation is bool:  # a bare --flag means true
        return {"type": str, "metavar": "{true,false}", "nargs": "?", "const": "true"}
    if annotation in (int, float):
        return {"type": annotation}
    return {"type": str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenreward", description="Token-level rewards for RLHF."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    _add_bench(commands)
    _add_explain(commands)
    return parser


def _add_serve(commands: Any) -> None:
    try:
        from tokenreward_service.config import Settings
    except ImportError:  # a client-only install: explain works, serve needs the server extra
        commands.add_parser("serve", help="serve a reward model (needs tokenreward[server])")
        return
    serve = commands.add_parser(
        "serve",
        help="serve a reward model over HTTP",
        description="Serve per-token rewards. Every flag is also an environment variable "
        "TOKENREWARD_<FLAG> (upper case, '-' as '_'); flags win.",
    )
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = "--" + str(extra.get("flag", name.replace("_", "-")))
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} [env TOKENREWARD_{name.upper()}; default {default!r}]"
        kind = _flag_type(field.annotation)
        if extra.get("repeatable"):
            kind = {"action": "append", "type": str, "metavar": "VALUE"}
        serve.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text, **kind)


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure throughput and latency (prints a JSON report)",
        description="Run seeded workloads (mixed, group, long) against a server and against the "
        "in-process ceiling. Without --url it builds the benchmark model, starts its own "
        "servers on 127.0.0.1 and runs every comparison. The opt-in mixed-policy workload "
        "(not part of all) sends the same real texts as Llama 3.2 token IDs with "
        "policy_tokenizer and as the RM's own IDs, and reports policy/ID throughput.",
    )
    bench.add_argument(
        "--workload",
        default="all",
        help="mixed, group, long, mixed-policy, a comma list, or all (mixed, group and long)",
    )
    bench.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    bench.add_argument("--scale", type=float, default=1.0, help="fraction of each workload's items")
    bench.add_argument("--url", default=None, help="measure this running server only")
    bench.add_argument("--api-key", default=None, help="bearer key for --url")
    bench.add_argument("--model", default=None, help="RM folder (default: the benchmark model)")
    bench.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget")
    bench.add_argument("--out", default=None, help="also write the JSON report to this file")
    bench.add_argument(
        "--simulated-device",
        default=None,
        metavar="RATE[,RATE...]",
        help="instead of a model, an engine that waits as a device of RATE tokens/s would "
        "(e.g. 1e5,3e5,1e6,3e6): measures the host path alone; labelled as a simulation",
    )
    bench.add_argument(
        "--encoding",
        choices=["json", "binary"],
        default="json",
        help="the wire encoding of requests and answers, with --url or --simulated-device",
    )
    bench.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="closed-loop clients instead of each workload's own (16), with --url or "
        "--simulated-device",
    )
    bench.add_argument(
        "--request-items",
        type=int,
        default=None,
        help="items per request instead of each workload's own (mixed 8, group 8, long 4), "
        "with --url or --simulated-device",
    )
    bench.add_argument(
        "--engine-process",
        choices=["on", "off"],
        default="on",
        help="with --simulated-device: the engine in a process of its own (on, as `serve` runs "
        "a model on an accelerator) or in the server's (off)",
    )


def _add_explain(commands: Any) -> None:
    explain = commands.add_parser(
        "explain",
        help="show which tokens of a response raised or lowered its score",
        description="Score PROMPT + RESPONSE on a running server and print the response with "
        "every token coloured by its reward.",
    )
    explain.add_argument("prompt")
    explain.add_argument("response")
    explain.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    explain.add_argument("--api-key", default=None, help="bearer key, if the server needs one")
    explain.add_argument("--baseline", choices=["prompt", "zero"], default="prompt")
    explain.add_argument("--beta-c", type=float, default=1.0)
    explain.add_argument("--html", default=None, metavar="FILE", help="also write an HTML page")
    explain.add_argument("--no-colour", action="store_true", help="plain text with values")


def _explain(args: argparse.Namespace) -> int:
    from tokenreward import RewardClient, RewardClientError
    from tokenreward.explain import render_html, render_terminal

    try:
        with RewardClient(args.url, api_key=args.api_key, timeout=60.0) as client:
            (result,) = client.rewards(
                [{"prompt": args.prompt, "response": args.response}],
                baseline=args.baseline,
                beta_c=args.beta_c,
            )
    except RewardClientError as exc:
        print(f"tokenreward: {exc}", file=sys.stderr)
        return 1
    colour = not args.no_colour and sys.stdout.isatty()
    print(render_terminal(result, colour=colour))
    if args.html:
        with open(args.html, "w", encoding="utf-8") as handle:
            handle.write(render_html(result, prompt=args.prompt))
        print(f"wrote {args.html}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from tokenreward_service.bench import BenchUnavailable, known_workloads, main_bench

    try:
        workloads = known_workloads(args.workload)
    except ValueError as exc:
        print(f"tokenreward: {exc}", file=sys.stderr)
        return 2
    rates = None
    if args.simulated_device is not None:
        try:
            rates = [float(r) for r in args.simulated_device.split(",")]
        except ValueError:
            print(
                "tokenreward: --simulated-device takes rates in tokens/s, e.g. 1e6", file=sys.stderr
            )
            return 2
        if not rates or min(rates) <= 0 or args.url is not None:
            print(
                "tokenreward: --simulated-device takes positive rates and starts its own "
                "server (leave out --url)",
                file=sys.stderr,
            )
            return 2
    shaped = args.encoding != "json" or args.concurrency is not None
    if (shaped or args.request_items is not None) and (args.url is None and rates is None):
        print(
            "tokenreward: --encoding, --concurrency and --request-items apply to --url and "
            "--simulated-device runs",
            file=sys.stderr,
        )
        return 2
    if args.concurrency is not None and args.concurrency < 1:
        print("tokenreward: --concurrency takes a positive number of clients", file=sys.stderr)
        return 2
    if args.request_items is not None and args.request_items < 1:
        print("tokenreward: --request-items takes a positive number of items", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    try:
        main_bench(
            workloads=workloads,
            runs=args.runs,
            scale=args.scale,
            url=args.url,
            api_key=args.api_key,
            model=args.model,
            max_batch_tokens=args.max_batch_tokens,
            out=args.out,
            simulated_device=rates,
            encoding=args.encoding,
            concurrency=args.concurrency,
            request_items=args.request_items,
            engine_process=args.engine_process,
        )
    except BenchUnavailable as exc:
        print(f"tokenreward: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(overrides: dict[str, Any]) -> int:
    from pydantic import ValidationError

    from tokenreward_service.app import create_app
    from tokenreward_service.config import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        # Never the input values: they may hold API keys.
        lines = [
            f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        print("tokenreward: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # The listener opens first and the model loads behind it, so probes get answers (503 from
    # /readyz) while a large model loads; a model that cannot be served is a one-line error
    # and exit 1, not a traceback.
    from tokenreward_service.server import build_server

    failures: list[BaseException] = []

    def failed(error: BaseException) -> None:
        failures.append(error)
        print(f"tokenreward: cannot serve the model: {error}", file=sys.stderr)
        server.should_exit = True

    # The forward pass runs on its own thread; its many small torch calls each take the GIL
    # back. With the default 5 ms switch interval a busy event loop (a storm of refusals)
    # makes it wait up to 5 ms each time; 1 ms keeps the model fed.
    sys.setswitchinterval(0.001)
    server = build_server(settings, create_app(settings, on_load_failure=failed))
    server.run()
    return 1 if failures or not server.started else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "serve" and not _server_installed():
        print("tokenreward: serve needs the server extra: pip install 'tokenreward[server]'")
        return 2
    if args.command == "serve":
        return _serve(options)
    if args.command == "bench":
        return _bench(args)
    if args.command == "explain":
        return _explain(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse refuses unknown ones


def _server_installed() -> bool:
    try:
        import pydantic_settings  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
