"""The reward server: scores responses against ground truths with registered reward functions, run in
isolated worker processes with a per-item timeout; OpenRLHF's remote reward protocol included."""
