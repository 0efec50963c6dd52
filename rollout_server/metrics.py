"""Prometheus metrics of the rollout server, in a registry of its own (so several apps share a process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.server import RequestMetrics


class RolloutMetrics(RequestMetrics):
    def __init__(self) -> None:
        super().__init__(
            "rollout", latency_buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        )
        self.generated_tokens = Counter(
            "cppo_rollout_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.samples = Counter(
            "cppo_rollout_samples",
            "Samples generated, by finish reason (abort: its client went away, or another prompt of its "
            "request failed)",
            ["finish_reason"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cppo_rollout_batch_size",
            "Sequences per decoding step (transformers backend)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cppo_rollout_queue_depth", "Generation requests waiting or running", registry=self.registry
        )
        self.queued_sequences = Gauge(
            "cppo_rollout_queued_sequences",
            "Sequences admitted and not yet answered (what max_queued_sequences bounds)",
            registry=self.registry,
        )
        self.shed = Counter(
            "cppo_rollout_shed_requests",
            "Requests refused with 429 because the queue was full",
            registry=self.registry,
        )
        self.policy_version = Gauge(
            "cppo_rollout_policy_version", "Version of the weights being served", registry=self.registry
        )
        self.weight_updates = Counter(
            "cppo_rollout_weight_updates", "Weight updates, by outcome", ["outcome"], registry=self.registry
        )

    def observe_aborted_tokens(self, tokens: int) -> None:
        """Tokens generated for a sample that was then aborted (the service counts the sample itself)."""
        self.generated_tokens.inc(tokens)
