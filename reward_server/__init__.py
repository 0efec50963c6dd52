"""The reward server: scoring responses (see issue 4)."""
