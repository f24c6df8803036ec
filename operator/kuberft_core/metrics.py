"""Every Prometheus metric kuberft exports, in one place. Metric names are an API: the Grafana
dashboards and alerts query them, so a name changes only on purpose, here.

A component builds its metrics with `component_metrics("reward")` and reaches each one by its
short name (`metrics.evaluations.labels(...).inc()`); each call gets a registry of its own,
served at that process's `/metrics` with `metrics.exposition()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MetricType = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


@dataclass(frozen=True)
class MetricSpec:
    short: str
    """Attribute name on the component's metrics object."""
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ComponentCatalog:
    prefix: str
    metrics: tuple[MetricSpec, ...] = field(default_factory=tuple)

    def name(self, spec: MetricSpec) -> str:
        return f"{self.prefix}_{spec.short}"


CATALOG: dict[str, ComponentCatalog] = {
    # The trainer labels its series `rftjob`, not `job`: Prometheus sets `job` on every target
    # (the scrape job) and would rename ours to `exported_job`.
    "trainer": ComponentCatalog(
        "kuberft_trainer",
        (
            MetricSpec("step", "gauge", "Last completed optimizer step", ("rftjob",)),
            MetricSpec("total_steps", "gauge", "Optimizer steps the job runs in total", ("rftjob",)),
            MetricSpec("reward_mean", "gauge", "Mean score per reward function in the last step", ("rftjob", "reward")),
            MetricSpec("reward_std", "gauge", "Std of the score per reward function in the last step", ("rftjob", "reward")),
            MetricSpec("reward_total_mean", "gauge", "Mean weighted total reward in the last step", ("rftjob",)),
            MetricSpec("loss", "gauge", "Policy loss of the last step", ("rftjob",)),
            MetricSpec("kl", "gauge", "Mean per-token KL to the base model (k3) in the last step", ("rftjob",)),
            MetricSpec("clip_ratio", "gauge", "Fraction of tokens whose importance ratio was clipped", ("rftjob",)),
            MetricSpec("rollout_is_weight_mean", "gauge",
                       "Mean rollout-correction weight min(p_trainer / p_rollout, cap) when vLLM sampled the last step", ("rftjob",)),
            MetricSpec("rollout_logprob_diff_max", "gauge",
                       "Largest |log p_trainer - log p_rollout| of a token in the last step (vLLM rollouts)", ("rftjob",)),
            MetricSpec("completion_length_mean", "gauge", "Mean completion length in tokens", ("rftjob",)),
            MetricSpec("completion_length_max", "gauge", "Longest completion in tokens", ("rftjob",)),
            MetricSpec("truncated_fraction", "gauge", "Fraction of completions that hit maxCompletionLength", ("rftjob",)),
            MetricSpec("generated_tokens_per_second", "gauge", "Generation throughput of the last step", ("rftjob",)),
            MetricSpec("generated_tokens", "counter", "Completion tokens generated", ("rftjob",)),
            MetricSpec("step_phase_seconds", "gauge", "Time of the last step per phase (generate, reward, train)", ("rftjob", "phase")),
            MetricSpec("learning_rate", "gauge", "Current learning rate", ("rftjob",)),
            MetricSpec("eval_pass_at_1", "gauge", "Greedy pass@1 on held-out rows at the last evaluation", ("rftjob",)),
            MetricSpec("reward_failures", "counter", "Evaluations the reward pool failed to score (not model errors)", ("rftjob",)),
            MetricSpec("checkpoints", "counter", "Checkpoints written", ("rftjob",)),
        ),
    ),
    "reward": ComponentCatalog(
        "kuberft_reward",
        (
            MetricSpec("evaluations", "counter", "Reward evaluations by reward and outcome", ("reward", "outcome")),
            MetricSpec("evaluation_seconds", "histogram", "Wall time to evaluate one completion", (), LATENCY_BUCKETS),
            MetricSpec("timeouts", "counter", "Evaluations stopped at the sandbox time limit"),
            MetricSpec("crashes", "counter", "Sandboxed children that died (signal, memory, exit)"),
            MetricSpec("hacks_detected", "counter", "Completions flagged by an anti-reward-hacking check", ("reward",)),
            MetricSpec("queue_depth", "gauge", "Evaluations waiting for a worker"),
            MetricSpec("busy_workers", "gauge", "Workers evaluating now"),
            MetricSpec("workers", "gauge", "Workers in the pool"),
            MetricSpec("requests", "counter", "HTTP requests to /v1/evaluate by status code", ("code",)),
        ),
    ),
    "serve": ComponentCatalog(
        "kuberft_serve",
        (
            MetricSpec("requests", "counter", "Completed API requests by model and status", ("model", "status")),
            MetricSpec("prompt_tokens", "counter", "Prompt tokens processed", ("model",)),
            MetricSpec("generated_tokens", "counter", "Tokens generated", ("model",)),
            MetricSpec("time_to_first_token_seconds", "histogram", "Time from request to first token", ("model",), LATENCY_BUCKETS),
            MetricSpec("time_per_output_token_seconds", "histogram", "Mean time per generated token after the first", ("model",), TOKEN_LATENCY_BUCKETS),
            MetricSpec("tokens_per_second", "gauge", "Generated tokens per second over the last batch"),
            MetricSpec("running_requests", "gauge", "Requests being decoded"),
            MetricSpec("waiting_requests", "gauge", "Requests waiting for a batch slot"),
            MetricSpec("prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache"),
            MetricSpec("prefix_cache_hits", "counter", "Prompt tokens whose KV came from the prefix cache"),
            MetricSpec("spec_proposed_tokens", "counter", "Tokens proposed by the speculator", ("speculator",)),
            MetricSpec("spec_accepted_tokens", "counter", "Proposed tokens accepted by the model", ("speculator",)),
            MetricSpec("spec_steps", "counter", "Speculative verification steps", ("speculator",)),
            MetricSpec("spec_acceptance_rate", "gauge", "Accepted / proposed tokens, recent", ("speculator",)),
            MetricSpec("spec_mean_accepted_length", "gauge", "Tokens emitted per verification step, recent", ("speculator",)),
        ),
    ),
    "operator": ComponentCatalog(
        "kuberft_operator",
        (
            MetricSpec("reconciles", "counter", "Reconciliations by kind and result", ("kind", "result")),
            MetricSpec("reconcile_seconds", "histogram", "Reconciliation duration", ("kind",), LATENCY_BUCKETS),
            MetricSpec("rftjobs", "gauge", "RFTJobs by phase", ("phase",)),
            MetricSpec("turbodeployments", "gauge", "TurboDeployments by phase", ("phase",)),
            MetricSpec("drift_corrections", "counter", "Children applied again because someone changed them", ("kind",)),
        ),
    ),
}


class ComponentMetrics:
    """The metrics of one component, registered in a registry of their own."""

    def __init__(self, component: str):
        catalog = CATALOG[component]
        self.registry = CollectorRegistry()
        for spec in catalog.metrics:
            name = catalog.name(spec)
            if spec.type == "counter":
                metric = Counter(name, spec.help, spec.labels, registry=self.registry)
            elif spec.type == "gauge":
                metric = Gauge(name, spec.help, spec.labels, registry=self.registry)
            else:
                metric = Histogram(name, spec.help, spec.labels, buckets=spec.buckets, registry=self.registry)
            setattr(self, spec.short, metric)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) for a /metrics response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def component_metrics(component: str) -> ComponentMetrics:
    return ComponentMetrics(component)


def exported_series_names() -> set[str]:
    """Every series name Prometheus scrapes from kuberft (what a dashboard may query)."""
    names = set()
    for catalog in CATALOG.values():
        for spec in catalog.metrics:
            base = catalog.name(spec)
            if spec.type == "counter":
                names |= {f"{base}_total", f"{base}_created"}
            elif spec.type == "histogram":
                names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
            else:
                names.add(base)
    return names
