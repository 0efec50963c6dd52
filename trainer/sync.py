"""Publishing the policy to the rollout replicas as a new version, and catching up replicas that lag.

By reference, a Hugging Face folder in ``sync.dir`` (shared storage; the last ``sync.keep`` versions are
kept) is loaded by path; by value, the same safetensors file travels in the request body.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from trainer.clients import RolloutReplicas
from trainer.config import TrainConfig
from trainer.distributed import barrier, rank
from trainer.policy import Policy

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, policy: Policy, replicas: RolloutReplicas, config: TrainConfig) -> None:
        self.policy = policy
        self.replicas = replicas
        self.config = config
        self.version = 0
        # What the last publication sent, for replicas that missed it: a folder, or the file's bytes.
        self.last_path: str | None = None
        self.last_tensors: bytes | None = None

    def publish(self, version: int) -> int:
        """Send the current weights as ``version``; returns once every live replica reports it.

        Every rank calls it (under ZeRO-3 gathering the weights is collective); rank 0 sends them."""
        with self.policy.full_weights() as weights:
            if weights is not None:
                if self.config.sync.mode == "reference":
                    folder = self.config.sync_dir() / f"v{version:06d}"
                    self.policy.save_pretrained(folder, weights)
                    self.last_path = str(folder.resolve())
                else:
                    with tempfile.TemporaryDirectory(prefix="cppo-publish-") as scratch:
                        self.policy.save_pretrained(Path(scratch), weights)
                        self.last_tensors = (Path(scratch) / "model.safetensors").read_bytes()
                self.replicas.publish(version, path=self.last_path, tensors=self.last_tensors)
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
            self.replicas.publish(self.version, path=self.last_path, tensors=self.last_tensors, only=behind)

    def _prune(self) -> None:
        if self.config.sync.mode == "reference":
            for old in sorted(self.config.sync_dir().glob("v*"))[: -self.config.sync.keep]:
                shutil.rmtree(old, ignore_errors=True)
