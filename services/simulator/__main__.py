"""Command line for the SGLang **simulator**: ``umi sim serve`` (or ``python -m services.simulator``).

The flags are defined once here; ``umi sim serve`` adds them to its own sub-command.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from services.simulator.config import DEFAULT_DATA_FILES, LATENCY_PROFILES, SimulatorConfig


def add_simulator_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The simulator's flags, named like SGLang's launch_server where they mean the same thing."""
    parser.add_argument("--role", choices=["planner", "caller", "summarizer"], default=None,
                        help="replay only this role's recordings (default: all roles)")
    parser.add_argument("--data", type=Path, action="append", default=None,
                        help="trajectory or {input,target} JSON file; repeatable (default: the shipped example data)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--latency", choices=sorted(LATENCY_PROFILES), default="instant")
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--max-queued-requests", type=int, default=None)
    parser.add_argument("--prefix-cache-tokens", type=int, default=None)
    parser.add_argument("--stream-interval", type=int, default=1)
    parser.add_argument("--grammar-backend", choices=["xgrammar", "llguidance", "outlines", "none"], default=None,
                        help="the SGLang grammar backend to behave as (default llguidance)")
    parser.add_argument("--checkpoint-shapes", action="store_true",
                        help="answer like real checkpoints on SGLang: leading space, trailing newline, "
                             "an occasional blank planner answer")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``python -m services.simulator``."""
    parser = add_simulator_arguments(argparse.ArgumentParser(prog="python -m services.simulator", description=__doc__))
    parser.add_argument("--log-level", default="info")
    return parser


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The :class:`SimulatorConfig` the parsed flags describe."""
    fields = {
        "role": args.role,
        "data_files": args.data or list(DEFAULT_DATA_FILES),
        "host": args.host,
        "port": args.port,
        "served_model_name": args.served_model_name,
        "context_length": args.context_length,
        "api_key": args.api_key,
        "latency": args.latency,
        "max_running_requests": args.max_running_requests,
        "max_queued_requests": args.max_queued_requests,
        "prefix_cache_tokens": args.prefix_cache_tokens,
        "stream_interval": args.stream_interval,
        "checkpoint_shapes": args.checkpoint_shapes,
        "grammar_backend": args.grammar_backend,
    }
    return SimulatorConfig.model_validate({key: value for key, value in fields.items() if value is not None})


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and serve until interrupted."""
    from services.simulator.server import run_simulator

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_simulator(config_from_args(args), log_level=args.log_level)


if __name__ == "__main__":
    main()
