"""Prometheus metrics of the reward server, in a registry of its own (so several apps share a process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.server import RequestMetrics


class RewardMetrics(RequestMetrics):
    def __init__(self) -> None:
        super().__init__(
            "reward",
            latency_buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.items = Counter(
            "cppo_reward_items",
            "Items finished, by status (ok, timeout, error; cancelled: their request was)",
            ["status"],
            registry=self.registry,
        )
        self.item_seconds = Histogram(
            "cppo_reward_item_seconds",
            "Time from an item reaching a worker to its result, timeouts and restarts included",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.workers = Gauge(
            "cppo_reward_workers", "Scoring worker processes running", registry=self.registry
        )
        self.worker_restarts = Counter(
            "cppo_reward_worker_restarts",
            "Worker processes stopped and replaced, by reason (timeout, crash, moved_aside: its item ran "
            "past fast_lane_s; cancelled: its item's request was)",
            ["reason"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cppo_reward_queue_depth", "Items waiting for a worker", registry=self.registry
        )
        self.moved_aside = Counter(
            "cppo_reward_moved_aside_items",
            "Items that ran past fast_lane_s and were moved to the slow lane",
            registry=self.registry,
        )
        self.shed = Counter(
            "cppo_reward_shed_requests",
            "Requests refused with 503 because max_queued_items would be passed",
            registry=self.registry,
        )
        # Every label value from the start, so that dashboards see zeros rather than gaps.
        for status in ("ok", "timeout", "error", "cancelled"):
            self.items.labels(status)
        for reason in ("timeout", "crash", "moved_aside", "cancelled"):
            self.worker_restarts.labels(reason)
