"""``python -m trainer --config FILE [KEY=VALUE ...]``: ``cppo train``, for launchers that take a module.

Only the trainer's commands are built, so a training process never imports the servers' modules.
"""

import sys

from shared.cli import main
from trainer.main import add_commands

sys.exit(main(["train", *sys.argv[1:]], commands=[add_commands]))
