"""The ``umi`` command: run services, the embedded system, the simulator, and submit tasks.

::

    umi up [--port 8000]                       everything in one process (no GPU, no broker)
    umi worker planner|caller|summarizer|tools [--concurrency N] [--metrics-port P] [-- celery worker options]
    umi worker ingress [--metrics-port P]     JSON tasks from any AMQP client (umi.ingress)
    umi gateway [--host H] [--port P]
    umi submit "<query>" --tools FILE [--wait] [--api-key KEY]
    umi sim serve --data FILE [--data FILE ...] --port P [--role planner]
    umi db upgrade | umi broker declare | umi dlq list
    umi keys create --tenant NAME [--rate-per-s X --burst N --max-in-flight N] | umi keys revoke KEY-OR-ID | umi keys list
    umi schema ingress                         the ingress envelope's JSON Schema
    umi bench [--tasks N --concurrency C --latency none|realistic] [--load] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from kombu.utils.url import maybe_sanitize_url
from pydantic import ValidationError

from evaluation.metrics import PAPER_TABLE1 as PAPER_ROWS
from services.simulator.__main__ import add_simulator_arguments, config_from_args
from shared.db import SchemaOutOfDate
from shared.lifecycle import TaskStatus
from shared.roles import StepRole
from shared.settings import ConfigurationError, get_settings, load_settings
from umi_client import StepEvent, UmiClient, UmiError, UmiHTTPError

__all__ = ["main"]

WORKER_ROLES = [role.value for role in (StepRole.PLANNER, StepRole.CALLER, StepRole.SUMMARIZER, StepRole.TOOLS)]
#: `umi worker ingress`: the AMQP ingress consumer (not a Celery worker; services/ingress/).
INGRESS = "ingress"


class UsageError(Exception):
    """Bad command-line input; the message says what to fix."""


def _log_level(value: str) -> str:
    """A ``--loglevel`` value in any case (``warning``, ``WARNING``), as logging's upper-case name."""
    name = value.upper()
    if name not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(f"unknown log level {value!r} (use debug, info, warning, error or critical)")
    return name


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``umi``; returns the process exit code."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `umi worker` passes what it does not know on to `celery worker`
        if getattr(args, "func", None) is not _cmd_worker:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if "--" in unknown:  # argparse keeps the separator when a subcommand parsed options before it
            unknown.remove("--")
        args.celery_args = unknown
    logging.basicConfig(level=getattr(args, "loglevel", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request is noise
    try:
        return int(args.func(args) or 0)
    except (ConfigurationError, UsageError, SchemaOutOfDate) as exc:
        print(f"umi: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umi", description="α-UMi on queues")
    parser.add_argument("--version", action="version", version=f"umi {version('alpha-umi-queues')}")
    sub = parser.add_subparsers(required=True, metavar="command")

    up = sub.add_parser(
        "up",
        help="run the whole system in one process (SQLite, in-process broker, simulator)",
        description="Runs the gateway, the role workers, the AMQP ingress consumer and SGLang simulators in one "
        "process. With the in-process broker (no UMI_BROKER_URL) the ingress takes only messages published inside "
        "this process; set UMI_BROKER_URL to consume the real umi.ingress queue.",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--concurrency", type=int, default=8, help="threads per role worker")
    up.add_argument("--data", type=Path, action="append", help="trajectories the simulator replays")
    up.add_argument("--loglevel", type=_log_level, default="WARNING")
    up.set_defaults(func=_cmd_up)

    worker = sub.add_parser(
        "worker",
        help="run one role's worker service",
        description="Runs `celery worker` on the role's app (services/<role>/worker.py); options it does not "
        "know, or all after `--`, are passed on to `celery worker` (e.g. -- --max-tasks-per-child 100 -E). "
        "`umi worker ingress` consumes umi.ingress (JSON tasks from any AMQP client, docs/ingress.md); "
        "it is not a Celery worker and takes no Celery options.",
    )
    worker.add_argument("role", choices=[*WORKER_ROLES, INGRESS])
    worker.add_argument("--concurrency", type=int, default=None, help="threads (default UMI_WORKER_CONCURRENCY)")
    worker.add_argument("--loglevel", type=_log_level, default="INFO")
    worker.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here (default UMI_METRICS_PORT; 0 = off)")
    worker.set_defaults(func=_cmd_worker)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument("--loglevel", type=_log_level, default="INFO")
    gateway.set_defaults(func=_cmd_gateway)

    openapi = sub.add_parser("openapi", help="print the gateway's OpenAPI document (checked in as docs/openapi.json)")
    openapi.add_argument("--out", type=Path, default=None, help="write it to this file instead of stdout")
    openapi.set_defaults(func=_cmd_openapi, loglevel="WARNING")

    submit = sub.add_parser("submit", help="submit a task to the gateway")
    submit.add_argument("query")
    submit.add_argument("--tools", type=Path, required=True, help="JSON list of compact tool docs (or a record with 'tools')")
    submit.add_argument("--wait", action="store_true", help="print the trajectory as it happens until the task ends")
    submit.add_argument("--gateway", default=None, help="gateway URL (default UMI_GATEWAY_URL)")
    submit.add_argument("--api-key", default=None, help="API key (default UMI_API_KEY; `umi keys create` prints one)")
    submit.add_argument("--max-steps", type=int, default=None)
    submit.add_argument("--timeout", type=float, default=None, help="task deadline in seconds")
    submit.add_argument("--unconstrained", action="store_true", help="turn constrained decoding off for this task")
    submit.set_defaults(func=_cmd_submit, loglevel="WARNING")

    sim = sub.add_parser("sim", help="the SGLang simulator (stands in for GPU servers; not inference)")
    sim_sub = sim.add_subparsers(required=True, metavar="action")
    serve = sim_sub.add_parser("serve", help="serve SGLang's HTTP API, replaying recorded trajectories")
    add_simulator_arguments(serve)
    serve.add_argument("--loglevel", type=_log_level, default="INFO")
    serve.set_defaults(func=_cmd_sim_serve)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(required=True, metavar="action")
    db_sub.add_parser("upgrade", help="apply all migrations").set_defaults(func=_cmd_db_upgrade)

    broker = sub.add_parser("broker", help="message broker")
    broker_sub = broker.add_subparsers(required=True, metavar="action")
    broker_sub.add_parser("declare", help="declare exchanges and queues").set_defaults(func=_cmd_broker_declare)

    evaluation = sub.add_parser("eval", help="α-UMi static evaluation")
    eval_sub = evaluation.add_subparsers(required=True, metavar="action")
    static = eval_sub.add_parser("static", help="run every planner decision point of a test file through the system")
    static.add_argument("--data", type=Path, required=True, help="α-UMi test file ({tools, instruction, conversations})")
    static.add_argument("--out", type=Path, required=True, help="folder for predictions.json and metrics.json")
    static.add_argument("--limit", type=int, default=None, help="only the first N decision points")
    static.add_argument("--concurrency", type=int, default=16, help="decision points in flight at once")
    static.add_argument("--temperature", type=float, default=0.5)
    static.add_argument("--max-new-tokens", type=int, default=512)
    static.add_argument("--greedy", action="store_true", help="temperature 0: reproducible runs")
    static.add_argument("--constrained", action="store_true", help="constrained decoding (off: as the paper's runs)")
    static.add_argument("--compare", choices=sorted(PAPER_ROWS), default=None, help="add the paper's numbers to the table")
    static.add_argument("--loglevel", type=_log_level, default="WARNING")
    static.set_defaults(func=_cmd_eval_static)
    score = eval_sub.add_parser("score", help="the static metrics of an α-UMi predictions file")
    score.add_argument("--predictions", type=Path, required=True)
    score.add_argument("--out", type=Path, default=None, help="write metrics.json here")
    score.add_argument("--compare", choices=sorted(PAPER_ROWS), default=None, help="add the paper's numbers to the table")
    score.set_defaults(func=_cmd_eval_score, loglevel="WARNING")

    export = sub.add_parser("export", help="export trajectories")
    export_sub = export.add_subparsers(required=True, metavar="format")
    glpft = export_sub.add_parser("glpft", help="GLPFT training files (backbone, planner, caller, summarizer)")
    glpft.add_argument("--out", type=Path, required=True)
    source = glpft.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-db", action="store_true", help="trajectories stored by the system (UMI_DATABASE_URL)")
    source.add_argument("--data", type=Path, help="an α-UMi trajectory file")
    glpft.set_defaults(func=_cmd_export_glpft, loglevel="WARNING")

    keys = sub.add_parser("keys", help="tenants' API keys (stored hashed)")
    keys_sub = keys.add_subparsers(required=True, metavar="action")
    keys_create = keys_sub.add_parser(
        "create", help="a new key for a tenant (created if missing); prints the key once, on stdout, alone"
    )
    keys_create.add_argument("--tenant", required=True, help="tenant name: 1-64 of a-z 0-9 . _ -")
    keys_create.add_argument("--rate-per-s", type=_positive(float), default=None, help="set the tenant's request rate")
    keys_create.add_argument("--burst", type=_positive(int), default=None, help="set the tenant's burst of requests")
    keys_create.add_argument("--max-in-flight", type=_positive(int), default=None, help="set the tenant's tasks-in-flight limit")
    keys_create.set_defaults(func=_cmd_keys_create, loglevel="WARNING")
    keys_revoke = keys_sub.add_parser("revoke", help="revoke a key (given as the key or its id); refused at once")
    keys_revoke.add_argument("key_or_id", metavar="KEY-OR-ID")
    keys_revoke.set_defaults(func=_cmd_keys_revoke, loglevel="WARNING")
    keys_list = keys_sub.add_parser("list", help="keys: id, prefix, tenant, created, revoked (never the key)")
    keys_list.add_argument("--tenant", default=None, help="only this tenant's keys")
    keys_list.set_defaults(func=_cmd_keys_list, loglevel="WARNING")
    schema = sub.add_parser("schema", help="print a message schema")
    schema.add_argument("name", choices=[INGRESS], help="ingress: the JSON Schema of a umi.ingress message body")
    schema.set_defaults(func=_cmd_schema, loglevel="WARNING")

    dlq = sub.add_parser("dlq", help="dead-letter queue")
    dlq_sub = dlq.add_subparsers(required=True, metavar="action")
    dlq_list = dlq_sub.add_parser("list", help="show dead letters and why (they stay queued)")
    dlq_list.add_argument("--limit", type=int, default=20)
    dlq_list.set_defaults(func=_cmd_dlq_list)
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub: Any) -> None:
    """``umi bench``: the benchmark harness and load test (logic in umi/bench.py)."""
    bench = sub.add_parser("bench", help="benchmark on the local RabbitMQ/PostgreSQL with simulators: ratios against a bare Celery hop and an in-process loop")
    bench.add_argument("--tasks", type=int, default=None, help="tasks of the throughput run (default 100; --load: 2000)")
    bench.add_argument("--concurrency", type=int, default=16, help="tasks in flight")
    bench.add_argument("--latency", choices=["none", "realistic"], default=None, help="simulator latency profile (default none; --load: realistic)")
    bench.add_argument("--worker-threads", type=int, default=None, help="threads per role worker (default max(8, concurrency))")
    bench.add_argument("--one-tasks", type=int, default=10, help="tasks run one at a time for the per-hop latency")
    bench.add_argument("--replicas", type=int, default=1, help="simulator replicas per LLM role (tasks keep to their replica)")
    bench.add_argument("--load", action="store_true", help="the load test: 2000 realistic tasks, percentiles, errors, memory; no references")
    bench.add_argument("--no-compare", action="store_true", help="skip the references (bare Celery hop, ideal loop, zero-latency ceiling)")
    bench.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    bench.add_argument("--plot", type=Path, default=None, help="also draw the report (PNG; needs matplotlib)")
    bench.set_defaults(func=_cmd_bench, loglevel="WARNING")


def _cmd_bench(args: argparse.Namespace) -> int:
    from umi.bench import BenchOptions, format_report, plot_report, run_bench, write_json

    options = BenchOptions(
        tasks=args.tasks or (2000 if args.load else 100),
        concurrency=args.concurrency,
        latency=args.latency or ("realistic" if args.load else "none"),
        worker_threads=args.worker_threads,
        one_tasks=args.one_tasks,
        replicas=args.replicas,
        compare=not (args.load or args.no_compare),
    )
    report = run_bench(options, log=lambda line: print(f"umi bench: {line}", file=sys.stderr, flush=True))
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot_report(report, args.plot)
    return 1 if report.not_succeeded or report.dead_letters else 0


def _cmd_up(args: argparse.Namespace) -> int:
    from umi.embedded import EmbeddedSystem

    system = EmbeddedSystem.start(host=args.host, port=args.port, concurrency=args.concurrency, simulator_data=args.data)
    print("α-UMi on queues is up (embedded mode):")
    for line in system.describe():
        print("  " + line)
    print(f'Try: .venv/bin/umi submit "<query>" --tools examples/email_validator.tools.json --wait --gateway {system.gateway.url if system.gateway else ""}')
    _wait_for_signal()
    system.stop()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(0.5)


def _cmd_worker(args: argparse.Namespace) -> int:
    from shared.worker import run_worker

    settings = get_settings() if args.metrics_port is None else load_settings(metrics_port=args.metrics_port)
    if args.role == INGRESS:
        return _run_ingress(args, settings)
    role = StepRole(args.role)
    # The app `celery -A services.<role>.worker` runs, built from these settings (--metrics-port).
    app = importlib.import_module(f"services.{role.value}.worker").create_app(settings)
    return run_worker(
        app,
        role,
        settings,
        concurrency=args.concurrency or settings.worker_concurrency,
        loglevel=args.loglevel,
        celery_args=getattr(args, "celery_args", ()),
    )


def _run_ingress(args: argparse.Namespace, settings: Any) -> int:
    from services.ingress.consumer import run_ingress

    if args.concurrency is not None or getattr(args, "celery_args", ()):
        raise UsageError("umi worker ingress takes no --concurrency or Celery options; run more ingress processes to scale")
    return run_ingress(settings)


def _cmd_schema(args: argparse.Namespace) -> int:
    from services.ingress.schema import envelope_json_schema_text

    sys.stdout.write(envelope_json_schema_text())
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from services.gateway.app import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.loglevel.lower(),
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # open event streams never end
    )
    return 0


def _cmd_openapi(args: argparse.Namespace) -> int:
    from services.gateway.app import create_app
    from services.gateway.openapi import openapi_document

    document = openapi_document(create_app(get_settings()))
    if args.out is None:
        sys.stdout.write(document)
    else:
        args.out.write_text(document, encoding="utf-8")
    return 0


def _read_json(path: Path, what: str) -> Any:
    """The JSON in ``path``; a missing or malformed file is a usage error naming the option."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what}: file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what}: {path} is not JSON: {exc}") from None


def _load_tools(path: Path) -> list[Any]:
    data = _read_json(path, "--tools")
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list):
        raise UsageError(f"--tools: {path} must hold a JSON list of tool docs or an object with a 'tools' list")
    return data


def _cmd_submit(args: argparse.Namespace) -> int:
    settings = get_settings()
    api_key = args.api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
    body: dict[str, Any] = {"query": args.query, "tools": _load_tools(args.tools)}
    if args.max_steps is not None:
        body["max_steps"] = args.max_steps
    if args.timeout is not None:
        body["timeout_s"] = args.timeout
    if args.unconstrained:
        body["constrained"] = False
    with UmiClient(args.gateway or settings.gateway_url, api_key=api_key) as client:
        try:
            accepted = client.submit(body)
        except ValidationError as exc:
            raise UsageError(f"the task is not valid: {exc}") from None
        except UmiHTTPError as exc:
            raise UsageError(f"the gateway refused the task ({exc.status}): {exc.detail}") from None
        except UmiError as exc:
            raise UsageError(f"cannot reach the gateway at {client.config.base_url}: {exc}") from None
        print(f"task {accepted.id} queued", flush=True)
        if not args.wait:
            return 0
        return _follow_task(client, accepted.id)


def _follow_task(client: UmiClient, task_id: uuid.UUID) -> int:
    """Print each step as its event arrives, then the outcome; exit code 0 only if the task succeeded."""
    try:
        for event in client.events(task_id):
            if isinstance(event, StepEvent):
                if event.index > 0:  # step 0 is the query just submitted
                    print(f"[{event.index}] {event.role}: {event.output}", flush=True)
            else:
                task = event
    except UmiError as exc:
        raise UsageError(f"lost track of task {task_id}: {exc}") from None
    print(f"status: {task.status}" + (f" ({task.end_reason})" if task.end_reason else ""))
    if task.answer:
        print(f"answer: {task.answer}")
    if task.error:
        print(f"error: {task.error}")
    return 0 if task.status == TaskStatus.SUCCEEDED else 1


def _cmd_sim_serve(args: argparse.Namespace) -> int:
    from services.simulator import run_simulator

    try:
        config = config_from_args(args)
    except (ValidationError, ValueError) as exc:
        raise UsageError(f"simulator configuration: {exc}") from None
    print(f"SGLang SIMULATOR (replays recorded data; not inference) on http://{config.host}:{config.port}", flush=True)
    run_simulator(config, log_level=args.loglevel.lower())
    return 0


def _cmd_db_upgrade(_args: argparse.Namespace) -> int:
    from shared.db import upgrade_schema

    upgrade_schema(get_settings().database_url)
    print("database schema is up to date")
    return 0


def _cmd_broker_declare(_args: argparse.Namespace) -> int:
    from kombu import Connection

    from shared.topology import Topology

    settings = get_settings()
    topology = Topology(settings)
    with Connection(settings.broker_url) as connection:
        topology.declare(connection)
    print("declared: " + ", ".join(queue.name for queue in topology.all_queues()))
    return 0


def _cmd_dlq_list(args: argparse.Namespace) -> int:
    from shared.dead_letters import drain_dead_letters
    from shared.topology import Topology

    settings = get_settings()
    if settings.broker_url.startswith("memory"):
        raise UsageError("the embedded in-process broker has no dead-letter queue to list; set UMI_BROKER_URL")
    letters = drain_dead_letters(settings.broker_url, Topology(settings), limit=args.limit)
    for letter in letters:
        print(f"{letter.source_queue}: {letter.reason}\n    {letter.body[:200]}")
    print(f"{len(letters)} dead letter(s) shown")
    return 0


def _positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of ``kind`` greater than 0."""

    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a {kind.__name__}") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
        return number

    return parse


@contextlib.contextmanager
def _database_session() -> Iterator[Any]:
    """A committing session on ``UMI_DATABASE_URL`` (whose schema must be current)."""
    from shared.db import ensure_schema_current, get_engine, session_scope

    database_url = get_settings().database_url
    ensure_schema_current(database_url)
    with session_scope(get_engine(database_url)) as session:
        yield session


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from shared import tenants

    limits = tenants.TenantLimits(rate_per_s=args.rate_per_s, burst=args.burst, max_in_flight=args.max_in_flight)
    try:
        with _database_session() as session:
            issued = tenants.create_api_key(session=session, tenant_name=args.tenant, limits=limits)
    except ValueError as exc:
        raise UsageError(f"--tenant: {exc}") from None
    # stdout: the key alone, so a script can capture it; it is shown this once and never stored.
    print(issued.key, flush=True)
    print(
        f"key {issued.record.id} ({issued.record.prefix}...) for tenant {issued.tenant.name}; store it now, it is not shown again",
        file=sys.stderr,
    )
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from shared import tenants

    with _database_session() as session:
        record = tenants.revoke_api_key(session=session, key_or_id=args.key_or_id)
    if record is None:
        raise UsageError("no such key (give the key itself or its id from `umi keys list`)")
    print(f"key {record.id} ({record.prefix}...) revoked at {record.revoked_at:%Y-%m-%d %H:%M:%S}")
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from shared import tenants

    with _database_session() as session:
        rows = tenants.list_api_keys(session=session, tenant_name=args.tenant)
    print(f"{'id':36}  {'prefix':10}  {'tenant':20}  {'created':19}  revoked")
    for key, tenant in rows:
        revoked = "-" if key.revoked_at is None else f"{key.revoked_at:%Y-%m-%d %H:%M:%S}"
        print(f"{key.id!s:36}  {key.prefix:10}  {tenant.name:20}  {key.created_at:%Y-%m-%d %H:%M:%S}  {revoked}")
    return 0


def _read_json_list(path: Path, what: str) -> list[Any]:
    data = _read_json(path, what)
    if not isinstance(data, list):
        raise UsageError(f"{what}: {path} must hold a JSON list of records")
    return data


def _cmd_eval_static(args: argparse.Namespace) -> int:
    from evaluation.metrics import metrics_table, score_predictions
    from evaluation.static import StaticEvalOptions, decision_points, run_static_eval, write_results
    from shared.context_window import PromptDoesNotFit

    records = _read_json_list(args.data, "--data")
    found = decision_points(records, limit=args.limit)
    points = found.points
    for skipped in found.skipped:
        where = f"record {skipped.record_index}" + (f", turn {skipped.turn_index}" if skipped.turn_index is not None else "")
        print(f"  skipped {where}: {skipped.reason}", file=sys.stderr)
    if not points:
        raise UsageError(
            f"--data: {args.data} is not an α-UMi test file: no decision point this evaluation can use "
            f"({len(found.skipped)} records or points skipped)"
        )
    options = StaticEvalOptions(
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        constrained=args.constrained,
        concurrency=args.concurrency,
    )
    print(f"{len(points)} decision points from {args.data} ({len(found.skipped)} skipped)", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(f"  {done}/{total} decision points", file=sys.stderr, flush=True)

    with _evaluation_system(args, concurrency=args.concurrency) as (engine, dispatcher, settings):
        try:
            predictions = run_static_eval(
                points, engine=engine, dispatcher=dispatcher, settings=settings, options=options, progress=progress
            )
        except PromptDoesNotFit as exc:
            raise UsageError(f"--max-new-tokens: {exc}") from None
    metrics = score_predictions(predictions)
    write_results(args.out, predictions, metrics, found.skipped)
    print(metrics_table(metrics, compare=PAPER_ROWS.get(args.compare)))
    print(f"wrote {args.out / 'predictions.json'} and {args.out / 'metrics.json'}")
    return 0


@contextlib.contextmanager
def _evaluation_system(args: argparse.Namespace, *, concurrency: int) -> Iterator[tuple[Any, Any, Any]]:
    """The configured system: the broker and role services if UMI_BROKER_URL is set, else embedded."""
    import os

    from shared.db import ensure_schema_current, get_engine
    from umi.embedded import EmbeddedSystem

    if "UMI_BROKER_URL" in os.environ:
        from shared.celery_app import create_celery_app
        from shared.dispatch import CeleryDispatcher
        from shared.topology import Topology

        settings = get_settings()
        ensure_schema_current(settings.database_url)
        app = create_celery_app(settings, name="umi.eval")
        with app.connection_for_write() as connection:
            Topology(settings).declare(connection)
        print(f"running through the role services on {maybe_sanitize_url(settings.broker_url)}", file=sys.stderr)
        yield get_engine(settings.database_url), CeleryDispatcher(app), settings
        return
    overrides: dict[str, object] = {}
    if "UMI_DATABASE_URL" not in os.environ:
        overrides["database_url"] = f"sqlite:///{(args.out / 'eval.db').resolve()}"
    system = EmbeddedSystem.start(
        concurrency=max(8, concurrency), simulator_data=[args.data], with_gateway=False, **overrides
    )
    try:
        for line in system.describe()[1:]:
            print("  " + line, file=sys.stderr)
        from shared.celery_app import create_celery_app
        from shared.dispatch import CeleryDispatcher

        dispatcher = CeleryDispatcher(create_celery_app(system.settings, name="umi.eval"))
        yield get_engine(system.settings.database_url), dispatcher, system.settings
    finally:
        system.stop()


def _cmd_eval_score(args: argparse.Namespace) -> int:
    from evaluation.metrics import metrics_table, score_predictions

    records = _read_json_list(args.predictions, "--predictions")
    try:
        metrics = score_predictions(records)
    except (KeyError, ValidationError) as exc:
        raise UsageError(f"--predictions: {args.predictions} is not an α-UMi predictions file: {exc}") from None
    print(metrics_table(metrics, compare=PAPER_ROWS.get(args.compare)))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics.model_dump(), indent=2))
        print(f"wrote {args.out}")
    return 0


def _cmd_export_glpft(args: argparse.Namespace) -> int:
    from evaluation.glpft import build_glpft, write_glpft

    if args.from_db:
        from evaluation.trajectories import stored_trajectories
        from shared.db import ensure_schema_current, get_engine

        settings = get_settings()
        ensure_schema_current(settings.database_url)
        trajectories = stored_trajectories(get_engine(settings.database_url))
    else:
        trajectories = _read_json_list(args.data, "--data")
    dataset = build_glpft(trajectories)
    write_glpft(dataset, args.out)
    counts = ", ".join(f"{name} {len(getattr(dataset, name))}" for name in ("backbone", "planner", "caller", "summarizer"))
    print(f"wrote {args.out}: {counts} records (from {len(trajectories)} trajectories)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
