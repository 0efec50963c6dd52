"""The rollout server: VLM generation with perturbed views (see issue 3)."""
