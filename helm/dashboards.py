"""Generates the Grafana dashboards the chart ships (`helm/kuberft/dashboards/*.json`).

The dashboards are written here as a few lines per panel, so that every panel has the same
data source, layout and legend conventions, and rendered to the JSON Grafana imports. Every
query uses only series listed in `kuberft_core.metrics.CATALOG` (a test checks it), and
the end-to-end test runs each one against a real Prometheus scraping real components.

    .venv/bin/python helm/dashboards.py           # rewrite the JSON files
    .venv/bin/python helm/dashboards.py --check   # exit 1 if a file is out of date

Edit a dashboard here, not in the JSON (a test fails if the two differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

DASHBOARD_DIR = Path(__file__).resolve().parent / "kuberft" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
RATE = "$__rate_interval"
PANEL_WIDTH = 12
PANEL_HEIGHT = 8


@dataclass
class Query:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    description: str
    queries: list[Query]
    unit: str = "short"
    kind: str = "timeseries"
    stacked: bool = False
    width: int = PANEL_WIDTH
    height: int = PANEL_HEIGHT
    min: Optional[float] = None
    max: Optional[float] = None
    axis_label: str = ""


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


@dataclass
class Variable:
    """A query variable (`label_values(series, label)`), multi-valued with an All option."""

    name: str
    label: str
    series: str
    label_name: str


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    rows: list[Row]
    variables: list[Variable] = field(default_factory=list)


def quantiles(histogram: str, by: str, legend_prefix: str, matchers: str = "") -> list[Query]:
    """p50/p95/p99 of a Prometheus histogram over the rate interval."""
    group = f"le, {by}" if by else "le"
    return [
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{matchers}[{RATE}])))",
            f"p{round(q * 100)} {legend_prefix}".strip(),
        )
        for q in (0.5, 0.95, 0.99)
    ]


JOB = '{rftjob=~"$job"}'


def _training() -> Dashboard:
    def gauge(series: str) -> str:
        return f"kuberft_trainer_{series}{JOB}"

    return Dashboard(
        uid="kuberft-training",
        title="kuberft / Training",
        description="GRPO training of RFTJobs: rewards, loss, KL, clipping, completions and step time, per job.",
        variables=[Variable("job", "RFTJob", "kuberft_trainer_step", "rftjob")],
        rows=[
            Row(
                "Progress and rewards",
                [
                    Panel(
                        "Progress",
                        "Completed optimizer steps out of the steps the job runs.",
                        [Query(f"{gauge('step')} / {gauge('total_steps')}", "{{rftjob}}")],
                        unit="percentunit", kind="bargauge", min=0, max=1, width=6,
                    ),
                    Panel(
                        "Step",
                        "Last completed optimizer step.",
                        [Query(gauge("step"), "{{rftjob}}")],
                        kind="stat", width=6,
                    ),
                    Panel(
                        "Total reward",
                        "Mean weighted total reward of the completions sampled in the last step.",
                        [Query(gauge("reward_total_mean"), "{{rftjob}}")],
                    ),
                    Panel(
                        "Reward per function",
                        "Mean score (0-1) of each reward function over the completions of the last step.",
                        [Query(gauge("reward_mean"), "{{rftjob}} {{reward}}")],
                        min=0, max=1,
                    ),
                    Panel(
                        "Reward spread per function",
                        "Standard deviation of each reward function's score within the last step; GRPO learns nothing from groups whose rewards are all equal.",
                        [Query(gauge("reward_std"), "{{rftjob}} {{reward}}")],
                        min=0,
                    ),
                ],
            ),
            Row(
                "Optimization",
                [
                    Panel("Loss", "Policy loss of the last step.", [Query(gauge("loss"), "{{rftjob}}")]),
                    Panel(
                        "KL to the base model",
                        "Mean per-token KL divergence (k3 estimator) between the policy and the base model.",
                        [Query(gauge("kl"), "{{rftjob}}")],
                        min=0,
                    ),
                    Panel(
                        "Clip ratio",
                        "Fraction of tokens whose importance ratio fell outside the clipping range.",
                        [Query(gauge("clip_ratio"), "{{rftjob}}")],
                        unit="percentunit", min=0,
                    ),
                    Panel(
                        "Rollout mismatch (vLLM)",
                        "When vLLM samples the completions: the largest per-token gap between its log-probabilities and the "
                        "trainer's, and the mean correction weight min(p_trainer / p_rollout, cap) (1: no mismatch). 0 and 1 when the trainer samples itself.",
                        [Query(gauge("rollout_logprob_diff_max"), "max |log-prob gap| {{rftjob}}"),
                         Query(gauge("rollout_is_weight_mean"), "mean weight {{rftjob}}")],
                        min=0,
                    ),
                    Panel(
                        "Learning rate",
                        "Learning rate of the last step (after warm-up and schedule).",
                        [Query(gauge("learning_rate"), "{{rftjob}}")],
                        unit="sci",
                    ),
                ],
            ),
            Row(
                "Completions",
                [
                    Panel(
                        "Completion length",
                        "Mean and longest completion of the last step, in tokens.",
                        [
                            Query(gauge("completion_length_mean"), "mean {{rftjob}}"),
                            Query(gauge("completion_length_max"), "max {{rftjob}}"),
                        ],
                        min=0, axis_label="tokens",
                    ),
                    Panel(
                        "Truncated completions",
                        "Fraction of completions cut off at maxCompletionLength; a high value means the limit is too short.",
                        [Query(gauge("truncated_fraction"), "{{rftjob}}")],
                        unit="percentunit", min=0, max=1,
                    ),
                ],
            ),
            Row(
                "Throughput",
                [
                    Panel(
                        "Generated tokens/s",
                        "Generation throughput: measured in the last step, and averaged over the rate interval.",
                        [
                            Query(gauge("generated_tokens_per_second"), "last step {{rftjob}}"),
                            Query(f"rate(kuberft_trainer_generated_tokens_total{JOB}[{RATE}])", "average {{rftjob}}"),
                        ],
                        min=0, axis_label="tokens/s",
                    ),
                    Panel(
                        "Step time by phase",
                        "Seconds of the last step spent generating completions, waiting for the reward pool, and updating the LoRA weights.",
                        [Query(gauge("step_phase_seconds"), "{{rftjob}} {{phase}}")],
                        unit="s", stacked=True, min=0,
                    ),
                ],
            ),
        ],
    )


def _reward_pool() -> Dashboard:
    return Dashboard(
        uid="kuberft-reward-pool",
        title="kuberft / Reward pool",
        description="The sandboxed reward evaluators: throughput by outcome, latency, timeouts, crashes, reward hacking, queue and workers.",
        rows=[
            Row(
                "Evaluations",
                [
                    Panel(
                        "Evaluations/s by outcome",
                        "Completions scored per second, by how each evaluation ended (ok, wrong, invalid, timeout, crash, hacked, unverifiable, error).",
                        [Query(f"sum by (outcome) (rate(kuberft_reward_evaluations_total[{RATE}]))", "{{outcome}}")],
                        unit="ops", stacked=True, min=0,
                    ),
                    Panel(
                        "Evaluations/s by reward function",
                        "Completions scored per second by each reward function.",
                        [Query(f"sum by (reward) (rate(kuberft_reward_evaluations_total[{RATE}]))", "{{reward}}")],
                        unit="ops", min=0,
                    ),
                    Panel(
                        "Evaluation latency",
                        "Wall time to evaluate one completion: 50th, 95th and 99th percentiles.",
                        quantiles("kuberft_reward_evaluation_seconds", "", ""),
                        unit="s", min=0,
                    ),
                    Panel(
                        "HTTP requests/s by status",
                        "Batches posted to /v1/evaluate per second, by HTTP status code (4xx: a malformed request from the trainer).",
                        [Query(f"sum by (code) (rate(kuberft_reward_requests_total[{RATE}]))", "{{code}}")],
                        unit="reqps", min=0,
                    ),
                ],
            ),
            Row(
                "Sandbox",
                [
                    Panel(
                        "Timeouts/s",
                        "Evaluations stopped at the sandbox's time limit.",
                        [Query(f"sum(rate(kuberft_reward_timeouts_total[{RATE}]))", "timeouts")],
                        unit="ops", min=0,
                    ),
                    Panel(
                        "Crashes/s",
                        "Sandboxed children that died (signal, out of memory, exit) while evaluating.",
                        [Query(f"sum(rate(kuberft_reward_crashes_total[{RATE}]))", "crashes")],
                        unit="ops", min=0,
                    ),
                    Panel(
                        "Reward hacks detected",
                        "Completions flagged by an anti-reward-hacking check, per reward function, over the last hour.",
                        [Query("sum by (reward) (increase(kuberft_reward_hacks_detected_total[1h]))", "{{reward}}")],
                        min=0,
                    ),
                ],
            ),
            Row(
                "Capacity",
                [
                    Panel(
                        "Queue depth",
                        "Evaluations waiting for a free worker, summed over the pool's pods.",
                        [Query("sum(kuberft_reward_queue_depth)", "waiting")],
                        min=0,
                    ),
                    Panel(
                        "Busy workers",
                        "Workers evaluating now, out of the workers in the pool.",
                        [
                            Query("sum(kuberft_reward_busy_workers)", "busy"),
                            Query("sum(kuberft_reward_workers)", "workers"),
                        ],
                        min=0,
                    ),
                ],
            ),
        ],
    )


def _serving() -> Dashboard:
    return Dashboard(
        uid="kuberft-serving",
        title="kuberft / Serving",
        description="TurboDeployments: throughput, time to first token, time per output token, speculative decoding acceptance and requests.",
        rows=[
            Row(
                "Throughput",
                [
                    Panel(
                        "Generated tokens/s",
                        "Tokens generated per second, by model, averaged over the rate interval.",
                        [Query(f"sum by (model) (rate(kuberft_serve_generated_tokens_total[{RATE}]))", "{{model}}")],
                        min=0, axis_label="tokens/s",
                    ),
                    Panel(
                        "Prompt tokens/s",
                        "Prompt tokens processed (prefill) per second, by model.",
                        [Query(f"sum by (model) (rate(kuberft_serve_prompt_tokens_total[{RATE}]))", "{{model}}")],
                        min=0, axis_label="tokens/s",
                    ),
                    Panel(
                        "Decode tokens/s (last batch)",
                        "Generated tokens per second of each server's most recent batch.",
                        [Query("kuberft_serve_tokens_per_second", "{{instance}}")],
                        min=0, axis_label="tokens/s",
                    ),
                ],
            ),
            Row(
                "Latency",
                [
                    Panel(
                        "Time to first token",
                        "Time from a request's arrival to its first token: 50th, 95th and 99th percentiles, by model.",
                        quantiles("kuberft_serve_time_to_first_token_seconds", "model", "{{model}}"),
                        unit="s", min=0,
                    ),
                    Panel(
                        "Time per output token",
                        "Mean time per generated token after the first: 50th, 95th and 99th percentiles, by model.",
                        quantiles("kuberft_serve_time_per_output_token_seconds", "model", "{{model}}"),
                        unit="s", min=0,
                    ),
                ],
            ),
            Row(
                "Speculative decoding",
                [
                    Panel(
                        "Acceptance rate",
                        "Fraction of the tokens proposed by the speculator that the model accepted, by speculator type.",
                        [
                            Query(
                                f"sum by (speculator) (rate(kuberft_serve_spec_accepted_tokens_total[{RATE}]))"
                                f" / sum by (speculator) (rate(kuberft_serve_spec_proposed_tokens_total[{RATE}]))",
                                "{{speculator}}",
                            )
                        ],
                        unit="percentunit", min=0, max=1,
                    ),
                    Panel(
                        "Mean accepted length",
                        "Tokens emitted per speculative verification step, recent average per server (1 means no proposal was accepted).",
                        [Query("kuberft_serve_spec_mean_accepted_length", "{{speculator}} {{instance}}")],
                        min=0, axis_label="tokens/step",
                    ),
                    Panel(
                        "Verification steps/s",
                        "Speculative verification steps (one forward pass of the model each) per second.",
                        [Query(f"sum by (speculator) (rate(kuberft_serve_spec_steps_total[{RATE}]))", "{{speculator}}")],
                        unit="ops", min=0,
                    ),
                ],
            ),
            Row(
                "Requests",
                [
                    Panel(
                        "Requests/s by status",
                        "Completed API requests per second, by model and status.",
                        [Query(f"sum by (model, status) (rate(kuberft_serve_requests_total[{RATE}]))", "{{model}} {{status}}")],
                        unit="reqps", min=0,
                    ),
                    Panel(
                        "Running and waiting requests",
                        "Requests being decoded and requests waiting for a batch slot.",
                        [
                            Query("sum(kuberft_serve_running_requests)", "running"),
                            Query("sum(kuberft_serve_waiting_requests)", "waiting"),
                        ],
                        min=0,
                    ),
                    Panel(
                        "Prefix cache hit rate",
                        "Fraction of prompt tokens whose KV came from the prefix cache (prefilled before, by a "
                        "prompt that started the same way), by server.",
                        [
                            Query(
                                f"sum by (instance) (rate(kuberft_serve_prefix_cache_hits_total[{RATE}]))"
                                f" / sum by (instance) (rate(kuberft_serve_prefix_cache_queries_total[{RATE}]))",
                                "{{instance}}",
                            )
                        ],
                        unit="percentunit", min=0, max=1,
                    ),
                ],
            ),
        ],
    )


def _operator() -> Dashboard:
    return Dashboard(
        uid="kuberft-operator",
        title="kuberft / Operator",
        description="The kuberft operator: RFTJobs and TurboDeployments by phase, reconcile rate, failures and duration.",
        rows=[
            Row(
                "Resources",
                [
                    Panel(
                        "RFTJobs by phase",
                        "RFTJobs the operator watches, by status.phase.",
                        [Query("sum by (phase) (kuberft_operator_rftjobs)", "{{phase}}")],
                        stacked=True, min=0,
                    ),
                    Panel(
                        "TurboDeployments by phase",
                        "TurboDeployments the operator watches, by status.phase.",
                        [Query("sum by (phase) (kuberft_operator_turbodeployments)", "{{phase}}")],
                        stacked=True, min=0,
                    ),
                ],
            ),
            Row(
                "Reconciliation",
                [
                    Panel(
                        "Reconciles/s by result",
                        "Reconciliations per second by kind and result (conflict: the object changed meanwhile and is retried at once).",
                        [Query(f"sum by (kind, result) (rate(kuberft_operator_reconciles_total[{RATE}]))", "{{kind}} {{result}}")],
                        unit="ops", min=0,
                    ),
                    Panel(
                        "Reconcile errors",
                        "Fraction of reconciliations that did not succeed (errors and conflicts), by kind.",
                        [
                            Query(
                                f'1 - sum by (kind) (rate(kuberft_operator_reconciles_total{{result="success"}}[{RATE}]))'
                                f" / sum by (kind) (rate(kuberft_operator_reconciles_total[{RATE}]))",
                                "{{kind}}",
                            )
                        ],
                        unit="percentunit", min=0, max=1,
                    ),
                    Panel(
                        "Reconcile duration",
                        "Time of one reconciliation: 50th, 95th and 99th percentiles, by kind.",
                        quantiles("kuberft_operator_reconcile_seconds", "kind", "{{kind}}"),
                        unit="s", min=0,
                    ),
                ],
            ),
        ],
    )


DASHBOARDS = {"training": _training, "reward-pool": _reward_pool, "serving": _serving, "operator": _operator}


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stacked else 0,
            "showPoints": "never",
            "spanNulls": True,
            "axisLabel": panel.axis_label,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
        }
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "orientation": "horizontal"}
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend, "range": True}
            for i, q in enumerate(panel.queries)
        ],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }


def _variables_json(dashboard: Dashboard) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
        }
    ]
    for v in dashboard.variables:
        query = f"label_values({v.series}, {v.label_name})"
        variables.append(
            {
                "name": v.name,
                "label": v.label,
                "type": "query",
                "datasource": DATASOURCE,
                "definition": query,
                "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                "refresh": 2,
                "multi": True,
                "includeAll": True,
                "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "sort": 1,
                "hide": 0,
                "regex": "",
            }
        )
    return variables


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana JSON model: rows of panels laid out two (or four) per line."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in dashboard.rows:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + line_height
                line_height = 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["kuberft"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [{"title": "kuberft", "type": "dashboards", "tags": ["kuberft"], "asDropdown": True}],
        "templating": {"list": _variables_json(dashboard)},
        "panels": panels,
    }


def rendered_files() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{name}.json": json.dumps(render(build()), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the chart's Grafana dashboards.")
    parser.add_argument("--check", action="store_true", help="exit 1 when a JSON file differs from what this script generates")
    args = parser.parse_args(argv)
    stale = []
    for name, text in rendered_files().items():
        path = DASHBOARD_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run `python helm/dashboards.py`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
