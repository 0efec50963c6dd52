"""Example reward-function plugins: ``cppo reward-server --plugin reward_server.examples.NAME``."""
