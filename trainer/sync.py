"""Publishing the policy to the rollout replicas as a new version, and catching up replicas that lag.

By reference, a Hugging Face folder in ``sync.dir`` (shared storage; the last ``sync.keep`` versions are
kept) is loaded by path; by value, the same safetensors file travels in the request body; by broadcast, the
tensors go from rank 0 to every replica over a process group of their own (``shared.weight_broadcast``), and
HTTP carries only their names, shapes and dtypes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from shared.weight_broadcast import Root, checkpoint_tensors
from trainer.clients import Broadcast, RolloutReplicas
from trainer.config import TrainConfig
from trainer.distributed import barrier, rank
from trainer.policy import Policy

log = logging.getLogger(__name__)

BUCKET_BYTES = 8 << 20
"""Broadcast buckets: large enough that per-bucket costs vanish, small enough that several are in flight
at once (``shared.weight_broadcast.send``). Measured with gloo between two processes here, 92 MB: 32 MiB
buckets took twice as long as 4 to 16 MiB ones; 1 MiB ones were slower again."""


class Publisher:
    def __init__(self, policy: Policy, replicas: RolloutReplicas, config: TrainConfig) -> None:
        self.policy = policy
        self.replicas = replicas
        self.config = config
        self.version = 0
        # What the last publication sent, for replicas that missed it: a folder, the file's bytes, or the
        # tensors to broadcast again.
        self.last_path: str | None = None
        self.last_tensors: bytes | None = None
        self.last_broadcast: Broadcast | None = None
        self.root: Root | None = None

    def publish(self, version: int) -> int:
        """Send the current weights as ``version``; returns once every live replica reports it.

        Every rank calls it (under ZeRO-3 gathering the weights is collective); rank 0 sends them. A
        broadcast sends the model's own tensors (below ZeRO-3), so ``catch_up`` must come before the next
        update changes them, as in the loop."""
        broadcast = self.config.sync.mode == "broadcast"
        with self.policy.full_weights(copy=not broadcast) as weights:
            if weights is not None:
                if self.config.sync.mode == "reference":
                    folder = self.config.sync_dir() / f"v{version:06d}"
                    self.policy.save_pretrained(folder, weights)
                    self.last_path = str(folder.resolve())
                elif self.config.sync.mode == "value":
                    with tempfile.TemporaryDirectory(prefix="cppo-publish-") as scratch:
                        self.policy.save_pretrained(Path(scratch), weights)
                        self.last_tensors = (Path(scratch) / "model.safetensors").read_bytes()
                else:  # broadcast
                    named = checkpoint_tensors(self.policy.model, weights)
                    self.last_broadcast = Broadcast(self._root(), named)
                self._send(version)
                self._prune()
        barrier()
        self.version = version
        return version

    def catch_up(self) -> None:
        """Give set-aside replicas another chance, and the current version to any that lag behind."""
        self.replicas.refresh()
        if rank() != 0 or self.version == 0:
            return
        behind = [url for url, held in self.replicas.versions().items() if held < self.version]
        if behind:
            log.warning("replicas %s lag behind version %d; sending it", behind, self.version)
            self._send(self.version, only=behind)

    def _send(self, version: int, only: list[str] | None = None) -> None:
        self.replicas.publish(
            version, path=self.last_path, tensors=self.last_tensors, broadcast=self.last_broadcast, only=only
        )

    def _root(self) -> Root:
        """The trainer's end of the broadcast group, made at the first broadcast (on rank 0 only)."""
        if self.root is None:
            sync = self.config.sync
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            self.root = Root(sync.broadcast_port, backend, BUCKET_BYTES, sync.timeout_s)
        return self.root

    def _prune(self) -> None:
        if self.config.sync.mode == "reference":
            for old in sorted(self.config.sync_dir().glob("v*"))[: -self.config.sync.keep]:
                shutil.rmtree(old, ignore_errors=True)
