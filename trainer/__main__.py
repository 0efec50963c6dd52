"""``python -m trainer --config FILE [KEY=VALUE ...]``: ``cppo train``, for launchers that take a module."""

import sys

from shared.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
