"""Container healthcheck: GET http://127.0.0.1:PORT/ready of the service this image runs.

Usage: ``cppo-healthcheck rollout|reward [PATH]``. The port is read from the same environment variable the
server reads (``CPPO_ROLLOUT_PORT`` / ``CPPO_REWARD_PORT``), falling back to the server's default, so the
check follows a port changed through the environment. Exit 0 when the server answers 200, else 1.
Standard library only: it runs in every image, slim ones included.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULTS = {"rollout": ("CPPO_ROLLOUT_PORT", 8000), "reward": ("CPPO_REWARD_PORT", 5000)}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in DEFAULTS:
        print(f"usage: cppo-healthcheck {'|'.join(DEFAULTS)} [PATH]", file=sys.stderr)
        return 2
    variable, default = DEFAULTS[argv[0]]
    path = argv[1] if len(argv) > 1 else "/ready"
    url = f"http://127.0.0.1:{os.environ.get(variable, default)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
