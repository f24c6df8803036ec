"""The chart's Grafana dashboards as the tests read them: every PromQL expression of every
panel and variable, and the series and labels the metric catalogue says exist."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kuberft_core.metrics import CATALOG

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "helm" / "kuberft" / "dashboards"

# Labels Prometheus (`job`, `instance`) and prometheus-operator's ServiceMonitor/PodMonitor
# (`namespace`, `pod`, `container`, `service`, `endpoint`) put on every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    expr: str

    def where(self) -> str:
        return f"{self.dashboard} / {self.panel!r}: {self.expr}"


def load_dashboards() -> dict[str, dict]:
    """File name -> parsed Grafana JSON model."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # panels inside a collapsed row


def panel_queries() -> list[PanelQuery]:
    """Every PromQL expression of every panel of every dashboard."""
    queries = []
    for name, dashboard in load_dashboards().items():
        for panel in _panels(dashboard.get("panels") or []):
            for target in panel.get("targets") or []:
                queries.append(PanelQuery(name, panel.get("title", ""), target["expr"]))
    return queries


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, variable name, query) of every query variable."""
    found = []
    for name, dashboard in load_dashboards().items():
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                query = variable["query"]
                found.append((name, variable["name"], query["query"] if isinstance(query, dict) else query))
    return found


def series_labels() -> dict[str, set[str]]:
    """Every series name Prometheus scrapes from kuberft -> the labels it carries."""
    out: dict[str, set[str]] = {}
    for catalog in CATALOG.values():
        for spec in catalog.metrics:
            base = catalog.name(spec)
            labels = set(spec.labels)
            if spec.type == "counter":
                out[f"{base}_total"] = labels
                out[f"{base}_created"] = labels
            elif spec.type == "histogram":
                out[f"{base}_bucket"] = labels | {"le"}
                out[f"{base}_sum"] = labels
                out[f"{base}_count"] = labels
                out[f"{base}_created"] = labels
            else:
                out[base] = labels
    return out
