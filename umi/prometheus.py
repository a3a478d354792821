"""A real Prometheus server running the product's own scrape configuration and alert rules
against local processes, and the Grafana dashboard's queries run through it.

Used by the tests (``tests/test_prometheus.py``) and by ``scripts/render_dashboard.py``.
The product files are ``deploy/prometheus/prometheus.yml`` (+ ``alerts.yml``) and
``deploy/grafana/dashboards/umi.json``; :func:`local_scrape_config` keeps everything in
the scrape configuration except each job's service discovery, which it swaps for the
local targets.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import yaml
from pydantic import BaseModel, ConfigDict

from shared.asgi import free_port
from shared.topology import QUEUE_ROLES
from umi.deployment import Deployment

__all__ = [
    "DASHBOARD",
    "PROMETHEUS_CONFIG",
    "Dashboard",
    "Panel",
    "PrometheusServer",
    "Sample",
    "Series",
    "grafana_expr",
    "load_dashboard",
    "local_scrape_config",
    "start_observed",
]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "umi.json"
#: RabbitMQ's rabbitmq_prometheus plugin on the local broker.
RABBITMQ_METRICS = "127.0.0.1:15692"
#: Every way a scrape job can name its targets; all are replaced by ``static_configs``.
_DISCOVERY_KEYS = re.compile(r"^(static_configs|\w+_sd_configs)$")


def local_scrape_config(
    targets: Mapping[str, Sequence[str]],
    *,
    interval_s: float = 1.0,
    rabbitmq_vhost: str | None = None,
    config_path: Path = PROMETHEUS_CONFIG,
) -> dict[str, Any]:
    """The product's scrape configuration with each job's discovery replaced by ``targets[job]``
    (``host:port`` strings) and its intervals shortened to ``interval_s``.

    Jobs, metrics paths, params and relabelings stay as written. ``targets`` must name
    exactly the product's jobs, so a renamed or missing job fails here. ``rabbitmq_vhost``
    restricts the RabbitMQ job's per-queue metrics to one vhost (the test's).
    """
    config = yaml.safe_load(config_path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    if set(jobs) != set(targets):
        raise ValueError(f"targets name jobs {sorted(targets)}, {config_path} has {sorted(jobs)}")
    interval = f"{max(1, round(interval_s * 1000))}ms"
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    for name, job in jobs.items():
        for key in [key for key in job if _DISCOVERY_KEYS.match(key)]:
            del job[key]
        job["static_configs"] = [{"targets": list(targets[name])}]
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
    if rabbitmq_vhost is not None:
        jobs["rabbitmq"].setdefault("params", {})["vhost"] = [rabbitmq_vhost]
    return dict(config)


class Sample(BaseModel):
    """One instant-vector element of a PromQL answer."""

    metric: dict[str, str]
    value: tuple[float, str]

    @property
    def number(self) -> float:
        return float(self.value[1])


class Series(BaseModel):
    """One range-vector series of a PromQL answer."""

    metric: dict[str, str]
    values: list[tuple[float, str]]


class _Data(BaseModel):
    resultType: Literal["vector", "matrix", "scalar", "string"]
    result: Any


class _Answer(BaseModel):
    status: Literal["success", "error"]
    data: _Data | None = None
    error: str | None = None
    errorType: str | None = None


class PrometheusServer:
    """``prometheus`` (the binary on PATH) on a free 127.0.0.1 port with a throwaway TSDB.

    The configuration is written next to a copy of the product's rule files, so
    ``rule_files`` resolve as in production.
    """

    def __init__(self, config: Mapping[str, Any], *, binary: str = "prometheus") -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="umi-prometheus-"))
        for rule_file in config.get("rule_files", []):
            shutil.copy(PROMETHEUS_CONFIG.parent / rule_file, self._dir / rule_file)
        (self._dir / "prometheus.yml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    @property
    def log(self) -> Path:
        return self._dir / "prometheus.log"

    def start(self, timeout_s: float = 60) -> PrometheusServer:
        """Start the server and wait until it is ready."""
        if shutil.which(self._binary) is None:
            raise RuntimeError(f"{self._binary} is not installed (Debian: apt-get install prometheus; .ci/run does it)")
        self._process = subprocess.Popen(
            [
                self._binary,
                f"--config.file={self._dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self._until(lambda: self.http.get("/-/ready").status_code == 200, timeout_s, "ready")
        return self

    def _until(self, condition: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if condition():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not {what} within {timeout_s}s; log {self.log}")

    def _get(self, path: str, **params: Any) -> _Data:
        answer = _Answer.model_validate(self.http.get(path, params=params).json())
        if answer.status != "success" or answer.data is None:
            raise ValueError(f"PromQL {params.get('query')!r}: {answer.errorType}: {answer.error}")
        return answer.data

    def query(self, expr: str) -> list[Sample]:
        """Evaluate an instant query now."""
        data = self._get("/api/v1/query", query=expr)
        if data.resultType != "vector":
            raise ValueError(f"{expr!r} is a {data.resultType}, not an instant vector")
        return [Sample.model_validate(item) for item in data.result]

    def query_range(self, expr: str, *, start: float, end: float, step_s: float) -> list[Series]:
        """Evaluate a range query (Unix seconds) as Grafana's time-series panels do."""
        data = self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step_s)
        return [Series.model_validate(item) for item in data.result]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their job, health and last error."""
        return list(self.http.get("/api/v1/targets", params={"state": "active"}).json()["data"]["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its health and last evaluation error."""
        groups = self.http.get("/api/v1/rules").json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def wait_for_targets_up(self, timeout_s: float = 60) -> None:
        """Wait until every scrape target has been scraped successfully."""

        def all_up() -> bool:
            targets = self.targets()
            return bool(targets) and all(target["health"] == "up" for target in targets)

        try:
            self._until(all_up, timeout_s, "scraping every target")
        except TimeoutError as exc:
            down = [(t["labels"]["job"], t["scrapeUrl"], t["lastError"]) for t in self.targets() if t["health"] != "up"]
            raise TimeoutError(f"{exc}; down: {down}") from None

    def wait_for_scrape(self, timeout_s: float = 60) -> None:
        """Wait until every target has been scraped again after this call (fresh samples everywhere)."""
        since = time.time()

        def all_scraped() -> bool:
            oldest = self.query("min(timestamp(up))")
            return bool(oldest) and oldest[0].number > since

        self._until(all_scraped, timeout_s, "done with a fresh scrape")

    def stop(self) -> None:
        """Stop the server and delete its storage."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self.http.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    if parts.path not in ("", "/", "/metrics"):  # the product configuration scrapes the default /metrics
        raise ValueError(f"{url}: metrics are expected at /metrics")
    return str(parts.netloc)


def deployment_targets(system: Deployment) -> dict[str, list[str]]:
    """Every job of the product's scrape configuration, pointed at ``system``'s running processes."""
    urls = system.metrics_urls()
    targets = {f"umi-{role.value}": [_host_port(url) for url in urls.get(role.value, [])] for role in QUEUE_ROLES}
    targets["umi-gateway"] = [_host_port(url) for url in urls["gateway"]]
    targets["umi-ingress"] = [_host_port(url) for url in urls.get("ingress", [])]
    targets["rabbitmq"] = [RABBITMQ_METRICS]
    targets |= {f"sglang-{role.value}": [_host_port(server.url)] for role, server in system.simulators.items()}
    return targets


def start_observed(system: Deployment, *, vhost: str, concurrency: int = 4) -> PrometheusServer:
    """Start one worker per role, an ingress worker and a Prometheus scraping every process of ``system``
    each second (RabbitMQ's per-queue metrics restricted to ``vhost``); return once all consume and are scraped.

    Workers and Prometheus start side by side: each worker's metrics port is known at once.
    """
    workers = {role: system.start_worker(role, concurrency=concurrency, wait=False) for role in QUEUE_ROLES}
    ingress = system.start_ingress(wait=False)
    prometheus = PrometheusServer(local_scrape_config(deployment_targets(system), interval_s=1, rabbitmq_vhost=vhost))
    try:
        prometheus.start()
        for role, process in workers.items():
            system.wait_for_consumers(role, at_least=1, process=process)
        system.wait_for_ingress(ingress)
        prometheus.wait_for_targets_up()
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


# --- the Grafana dashboard -------------------------------------------------------------
class PanelTarget(BaseModel):
    """One query of a panel (Prometheus datasource)."""

    model_config = ConfigDict(extra="allow")
    refId: str
    expr: str
    legendFormat: str = ""
    datasource: dict[str, str]


class Panel(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    title: str
    type: str
    datasource: dict[str, str]
    targets: list[PanelTarget]
    gridPos: dict[str, int]
    fieldConfig: dict[str, Any] = {}


class Dashboard(BaseModel):
    model_config = ConfigDict(extra="allow")
    uid: str
    title: str
    panels: list[Panel]


def load_dashboard(path: Path = DASHBOARD) -> Dashboard:
    """The dashboard JSON, validated."""
    return Dashboard.model_validate_json(path.read_text())


#: Grafana's built-in interval variables, which a panel query may use.
_GRAFANA_VARIABLE = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")


def grafana_expr(expr: str, *, rate_interval: str, interval: str = "1s", range_: str = "5m") -> str:
    """``expr`` with Grafana's ``$__rate_interval``, ``$__interval`` and ``$__range`` substituted,
    as Grafana does before it sends a query; any other variable is an error."""
    values = {"__rate_interval": rate_interval, "__interval": interval, "__range": range_}
    result = _GRAFANA_VARIABLE.sub(lambda match: values[match.group(1) or match.group(2)], expr)
    if "$" in result:
        raise ValueError(f"unsupported Grafana variable in {expr!r}")
    return result
