"""The rollout server: VLM generation on clean and perturbed views of a prompt's images, with versioned
policy weights; OpenAI-compatible chat completions."""
