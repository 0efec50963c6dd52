"""Imported by the worker pool's fork server, so that every worker it forks starts warm.

sympy and math-verify compile patterns and fill caches the first time they meet each kind of
expression: a first power costs about 0.3 s, a first symbol 0.2 s, where the same item scores in
milliseconds afterwards. Done once here, before the fork server forks, each worker (and each
replacement of a stopped one) inherits the warm caches, and the fast lane's budget is spent on the
item, not on start-up.
"""

from reward_server.rewards import warm_up

warm_up()
