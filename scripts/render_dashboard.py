"""Draw the Grafana dashboard from a real run into ``docs/dashboard.png`` (not a test).

Starts what ``tests/test_prometheus.py`` starts — a throwaway RabbitMQ vhost and PostgreSQL
database on the local servers, the four role workers as processes, the gateway, the SGLang
simulators (realistic 7B latency by default) and a Prometheus running the product's scrape
configuration — submits recorded trajectories, then runs every panel's query of
``deploy/grafana/dashboards/umi.json`` over the run as Grafana would (a range query per
target) and draws the panels with matplotlib in the dashboard's layout.

    .venv/bin/python scripts/render_dashboard.py [--tasks 24] [--every 0.5] [--latency realistic]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.example_data import load_trajectories, single_chain_indices  # noqa: E402
from umi.deployment import Deployment, scratch_backends  # noqa: E402
from umi.prometheus import Dashboard, Panel, PrometheusServer, Series, grafana_expr, load_dashboard, start_observed  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
#: Grafana's $__rate_interval for a 1 s scrape interval would be 4 s; 15 s draws smoother lines.
RATE_INTERVAL = "15s"


def run(args: argparse.Namespace) -> tuple[Dashboard, dict[tuple[int, str], list[Series]], float, float]:
    """Run the load under Prometheus; every panel target's range-query answer over it."""
    with scratch_backends("umi-dash") as (rabbitmq_url, postgres_url):
        vhost = rabbitmq_url.rsplit("/", 1)[1]
        system = Deployment(
            rabbitmq_url=rabbitmq_url, postgres_url=postgres_url,
            log_dir=Path(tempfile.mkdtemp(prefix="umi-dash-")), simulator={"latency": args.latency},
            settings={"auth": False},  # a throwaway deployment; the load needs no tenants
        )
        prometheus: PrometheusServer | None = None
        try:
            prometheus = start_observed(system, vhost=vhost, concurrency=8)
            start = time.time()
            time.sleep(5)  # an idle lead-in, as a dashboard shows it
            records = [load_trajectories()[index] for index in single_chain_indices()]
            task_ids = []
            for n in range(args.tasks):
                record = records[n % len(records)]
                task_ids.append(system.submit(record["conversations"][0]["value"], record["tools"]))
                time.sleep(args.every)
            statuses = [system.wait(task_id, timeout_s=300)["status"] for task_id in task_ids]
            time.sleep(5)
            prometheus.wait_for_scrape()
            end = time.time()
            print(f"{len(statuses)} tasks: {', '.join(sorted(set(statuses)))} in {end - start:.0f} s")
            dashboard = load_dashboard()
            answers = {
                (panel.id, target.refId): prometheus.query_range(
                    grafana_expr(target.expr, rate_interval=RATE_INTERVAL), start=start, end=end, step_s=1
                )
                for panel in dashboard.panels
                for target in panel.targets
            }
            return dashboard, answers, start, end
        finally:
            if prometheus is not None:
                prometheus.stop()
            system.close()


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format."""
    for name, value in labels.items():
        template = template.replace("{{" + name + "}}", value)
    return template


UNIT_LABELS = {"s": "seconds", "reqps": "per second", "percentunit": "ratio", "short": ""}


def _right_axis_units(panel: Panel) -> dict[str, str]:
    """refId -> unit of the targets a field override puts on the right axis."""
    right = {}
    for override in panel.fieldConfig.get("overrides", []):
        properties = {item["id"]: item["value"] for item in override["properties"]}
        if override["matcher"]["id"] == "byFrameRefID" and properties.get("custom.axisPlacement") == "right":
            right[override["matcher"]["options"]] = properties.get("unit", "")
    return right


def draw(dashboard: Dashboard, answers: dict[tuple[int, str], list[Series]], start: float, out: Path) -> None:
    """The panels in the dashboard's grid (24 columns), each target's series as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(panel.gridPos["y"] + panel.gridPos["h"] for panel in dashboard.panels) // 8
    figure, axes = plt.subplots(rows, 2, figsize=(16, 3.6 * rows), squeeze=False)
    for panel in dashboard.panels:
        axis = axes[panel.gridPos["y"] // 8][panel.gridPos["x"] // 12]
        right = _right_axis_units(panel)
        twin = axis.twinx() if right else None
        colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
        for target in panel.targets:
            on = twin if target.refId in right else axis
            for series in answers[(panel.id, target.refId)]:
                points = [(t - start, float(v)) for t, v in series.values if math.isfinite(float(v))]
                if points:
                    times, values = zip(*points, strict=True)
                    on.plot(times, values, linewidth=1.2, color=next(colours), label=legend(target.legendFormat, series.metric))
        axis.set_title(panel.title, fontsize=10, loc="left")
        axis.set_ylabel(UNIT_LABELS.get(panel.fieldConfig.get("defaults", {}).get("unit", ""), ""), fontsize=8)
        axis.set_xlabel("seconds into the run", fontsize=8)
        axis.grid(alpha=0.3)
        handles, labels = axis.get_legend_handles_labels()
        for on in (axis, twin):
            if on is not None:
                on.tick_params(labelsize=7)
        if twin is not None:
            twin.set_ylabel(UNIT_LABELS.get(next(iter(right.values())), ""), fontsize=8)
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            axis.legend(handles, labels, fontsize=6, ncol=2, loc="upper left")
    figure.suptitle(f"{dashboard.title} — Grafana dashboard {dashboard.uid}, drawn from Prometheus", fontsize=13)
    figure.tight_layout(rect=(0, 0, 1, 0.985))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=72)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between submissions")
    parser.add_argument("--latency", default="realistic", help="simulator latency preset")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    dashboard, answers, start, _ = run(args)
    draw(dashboard, answers, start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
