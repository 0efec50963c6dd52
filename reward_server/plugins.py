"""User reward functions, loaded from a module or a ``.py`` file named at start-up.

A plugin is ordinary Python. Mark each reward function with :func:`reward_function`::

    from reward_server.plugins import reward_function

    @reward_function("length_penalty", needs_ground_truth=False)
    def length_penalty(response: str, ground_truth: str, max_chars: int = 2000) -> float:
        \"\"\"1.0 for a response of at most max_chars characters, falling linearly to 0.0 at twice that.\"\"\"
        ...

and start the server with ``--plugin my_rewards`` (an importable module) or ``--plugin path/to/file.py``;
repeat ``--plugin`` for several. The functions join the built-ins under their names (a clash with a
registered name refuses to start), are listed by ``GET /v1/rewards`` with their parameters, and can be
used and weighted like any other. ``reward_server/examples/length_penalty.py`` is a complete example.

Plugins are loaded in the server process (to list and check them) and again in every worker process
(to run them): keep their import cheap and free of side effects. They are trusted code; the model's
output is only ever their argument.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from reward_server.registry import Registry, defined_in, reward_function
from reward_server.rewards import BUILTINS

__all__ = [
    "PluginError",
    "load_plugin",
    "load_registry",
    "resolve_plugins",
    "reward_function",
]


class PluginError(ValueError):
    """A plugin that cannot be loaded, or that registers nothing usable."""


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def resolve_plugins(specs: Sequence[str]) -> list[str]:
    """The plugins with file paths made absolute, so that worker processes find the same files."""
    return [str(Path(spec).expanduser().resolve()) if _is_file(spec) else spec for spec in specs]


def load_plugin(spec: str) -> ModuleType:
    """Import a plugin: a ``.py`` file (any path containing a slash or ending in ``.py``) or a module name."""
    if _is_file(spec):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plugin file {spec} does not exist")
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        name = f"cppo_reward_plugin_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise PluginError(f"plugin file {spec} cannot be imported")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:
            del sys.modules[name]
            raise PluginError(f"plugin {spec} failed to load: {type(error).__name__}: {error}") from error
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name and spec.startswith(error.name):
            raise PluginError(f"plugin module {spec!r} is not importable (nor a .py file)") from error
        raise PluginError(f"plugin {spec} failed to load: {type(error).__name__}: {error}") from error
    except (Exception, SystemExit) as error:
        raise PluginError(f"plugin {spec} failed to load: {type(error).__name__}: {error}") from error


def load_registry(plugins: Sequence[str] = ()) -> Registry:
    """The built-in reward functions and those of each plugin, in one registry."""
    functions = list(BUILTINS)
    for spec in plugins:
        found = defined_in(load_plugin(spec).__name__)
        if not found:
            raise PluginError(f"plugin {spec} defines no function marked with @reward_function")
        functions.extend(found)
    try:
        return Registry(functions)
    except ValueError as error:
        raise PluginError(str(error)) from None
