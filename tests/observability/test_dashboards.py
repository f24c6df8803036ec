"""The Grafana dashboards query only what kuberft exports: metric names are an API."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from kuberft_core.metrics import exported_series_names

from .dashboards import REPO, TARGET_LABELS, load_dashboards, panel_queries, series_labels, variable_queries
from .promql import PromQLError, label_values_query, metric_names, selectors, substitute_grafana_variables

# What Grafana puts in place of the variables when "All" jobs are selected.
GRAFANA_DEFAULTS = {"job": ".*", "__rate_interval": "1m", "datasource": "prometheus"}


# ------------------------------------------------------------------ the PromQL reader itself


def test_reader_finds_the_series_of_an_aggregated_histogram_quantile():
    expr = 'histogram_quantile(0.95, sum by (le, model) (rate(kuberft_serve_time_to_first_token_seconds_bucket{model="m"}[$__rate_interval])))'
    [selector] = selectors(expr)
    assert selector.metric == "kuberft_serve_time_to_first_token_seconds_bucket"
    assert selector.labels == {"model"}


def test_reader_tells_label_names_and_strings_from_metric_names():
    expr = 'sum without (instance) (a_total{reward="kuberft_reward_fake"}) / on (job) group_left (pod) b offset 5m and c'
    assert metric_names(expr) == {"a_total", "b", "c"}


def test_reader_reads_name_matchers_subqueries_and_keywords():
    assert metric_names('{__name__="x_total", code="500"}') == {"x_total"}
    assert metric_names("max_over_time(rate(y_total[5m])[1h:1m]) > bool 0") == {"y_total"}
    assert metric_names("topk(3, z) or vector(0)") == {"z"}
    assert metric_names("1 - sum(w) / 2e3") == {"w"}


def test_reader_rejects_what_it_cannot_read():
    with pytest.raises(PromQLError, match="unknown function 'rat'"):
        selectors("rat(x_total[5m])")
    with pytest.raises(PromQLError, match="unclosed"):
        selectors('sum(rate(x_total{a="b"}[5m])')
    with pytest.raises(PromQLError, match="unexpected character"):
        selectors("x ! y")


def test_reader_reads_grafana_label_values_queries():
    assert label_values_query("label_values(kuberft_trainer_step, rftjob)") == ("kuberft_trainer_step", "rftjob")
    with pytest.raises(PromQLError, match="not a label_values"):
        label_values_query("query_result(up)")


# ------------------------------------------------------------------ the dashboards


def test_the_four_dashboards_ship_and_are_generated_from_helm_dashboards_py():
    assert sorted(load_dashboards()) == ["operator.json", "reward-pool.json", "serving.json", "training.json"]
    result = subprocess.run([sys.executable, str(REPO / "helm" / "dashboards.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_series_labels_cover_exactly_the_exported_series():
    assert set(series_labels()) == exported_series_names()


def test_every_panel_queries_only_series_a_component_exports():
    exported = exported_series_names()
    unknown = [f"{metric} in {q.where()}" for q in panel_queries() for metric in sorted(metric_names(q.expr)) if metric not in exported]
    assert not unknown, "dashboards query series no component exports:\n" + "\n".join(unknown)


def test_every_panel_matches_only_labels_its_series_carry():
    labels_of = series_labels()
    wrong = [
        f"label {label!r} of {s.metric} in {q.where()}"
        for q in panel_queries()
        for s in selectors(q.expr)
        for label in sorted(s.labels - labels_of.get(s.metric, set()) - TARGET_LABELS)
    ]
    assert not wrong, "\n".join(wrong)


def test_every_variable_lists_label_values_of_an_exported_series():
    labels_of = series_labels()
    for dashboard, name, query in variable_queries():
        series, label = label_values_query(query)
        for metric in metric_names(series):
            assert metric in labels_of, f"{dashboard} variable ${name} queries unknown series {metric}"
            assert label in labels_of[metric], f"{dashboard} variable ${name}: {metric} has no label {label!r}"


def test_training_dashboard_selects_jobs_through_its_job_variable():
    training = load_dashboards()["training.json"]
    variables = {v["name"]: v for v in training["templating"]["list"]}
    assert variables["job"]["definition"] == "label_values(kuberft_trainer_step, rftjob)"
    assert variables["job"]["includeAll"] and variables["job"]["multi"]
    for q in panel_queries():
        if q.dashboard == "training.json":
            for s in selectors(q.expr):
                assert "rftjob" in s.labels, f"not filtered by $job: {q.where()}"


def _titles(name: str) -> set[str]:
    return {p["title"] for p in load_dashboards()[name]["panels"] if p["type"] != "row"}


def test_each_dashboard_has_the_panels_the_issue_asks_for():
    assert {
        "Reward per function", "Total reward", "Loss", "KL to the base model", "Clip ratio", "Completion length",
        "Truncated completions", "Generated tokens/s", "Step time by phase",
    } <= _titles("training.json")
    assert {
        "Evaluations/s by outcome", "Evaluation latency", "Timeouts/s", "Crashes/s", "Reward hacks detected",
        "Queue depth", "Busy workers",
    } <= _titles("reward-pool.json")
    assert {
        "Generated tokens/s", "Time to first token", "Time per output token", "Acceptance rate", "Mean accepted length",
        "Requests/s by status",
    } <= _titles("serving.json")
    assert {"RFTJobs by phase", "Reconciles/s by result", "Reconcile errors"} <= _titles("operator.json")


def test_latency_panels_show_p50_p95_and_p99():
    for name, title in [
        ("reward-pool.json", "Evaluation latency"),
        ("serving.json", "Time to first token"),
        ("serving.json", "Time per output token"),
    ]:
        [panel] = [p for p in load_dashboards()[name]["panels"] if p["title"] == title]
        assert [t["legendFormat"].split()[0] for t in panel["targets"]] == ["p50", "p95", "p99"]
        assert [t["expr"].split(",")[0] for t in panel["targets"]] == [
            "histogram_quantile(0.5", "histogram_quantile(0.95", "histogram_quantile(0.99",
        ]


def test_panels_do_not_overlap_and_fit_the_grid():
    for name, dashboard in load_dashboards().items():
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']} is wider than the grid"
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{name}: {panel['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = panel["title"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"


def test_prometheus_parses_every_panel_expression(tmp_path):
    """promtool (Prometheus's own parser) accepts every expression once Grafana has filled in its variables."""
    promtool = shutil.which("promtool") or str(REPO / ".tools" / "bin" / "promtool")
    rules = [
        {"record": f"kuberft:dashboard_query:{i}", "expr": substitute_grafana_variables(q.expr, GRAFANA_DEFAULTS)}
        for i, q in enumerate(panel_queries())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
