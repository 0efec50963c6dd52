"""The reward-function registry: marking functions, checking items against them, and combining scores.

A reward function is a plain function ``(response, ground_truth, **params) -> float``, marked with
:func:`reward_function`. Its keyword parameters (each with a default) are what a caller may set per
item, in ``meta[<function name>]``; ``GET /v1/rewards`` lists them with their types and defaults,
read from the signature. A function that declares one of the item's context parameters
(:data:`CONTEXT_PARAMETERS`: ``meta``, ``prompt``, ``data_source``, ``metadata``) receives the item's
value of it instead (None where the item has none; ``meta`` as an object). The built-in functions are
in ``reward_server.rewards``, user ones in plugins (``reward_server.plugins``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

F = TypeVar("F", bound=Callable[..., float])

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")
"""What a reward function may be called: usable in ``name:weight`` lists and as a ``meta`` key."""

CONTEXT_PARAMETERS = ("meta", "prompt", "data_source", "metadata")
"""Parameters a reward function receives from the item itself, not from ``meta.<name>``."""


class ItemProblem(ValueError):
    """A request item the registry refuses. ``field`` is the path inside the item to blame
    (``reward``, ``ground_truth``, ``meta.iou.mode``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class RewardFunctionInfo(BaseModel):
    """One entry of ``GET /v1/rewards``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The name to use in a request's 'reward'.")
    summary: str = Field(description="The first line of its documentation.")
    description: str = Field(description="Its documentation: what it accepts and how it scores.")
    needs_ground_truth: bool = Field(description="Whether an item must carry a non-empty ground truth.")
    parameters: dict[str, dict[str, Any]] = Field(
        description="Its parameters, as JSON Schema (type, default, bounds); set them per item in "
        "meta.<name>, e.g. {'iou': {'mode': 'continuous'}}."
    )
    context: list[str] = Field(
        description="The item fields it receives besides the response and ground truth: any of 'meta', "
        "'prompt', 'data_source', 'metadata'."
    )
    fast: bool = Field(
        description="Whether its items must be scored within the server's fast lane (--fast-lane-s) or "
        "time out; otherwise an item past it gets a second try in the slow lane, up to --item-timeout-s."
    )
    source: str = Field(description="'builtin', or the plugin module that registered it.")


class RewardCatalog(BaseModel):
    """``GET /v1/rewards``: the registered reward functions."""

    model_config = ConfigDict(extra="forbid")

    functions: list[RewardFunctionInfo] = Field(description="Every registered reward function, by name.")
    openrlhf_reward: dict[str, float] = Field(description="The weights POST /get_reward applies.")


@dataclass(frozen=True, eq=False)
class RewardFunction:
    """A registered reward function and what the registry knows of it."""

    name: str
    fn: Callable[..., float]
    needs_ground_truth: bool
    check_ground_truth: Callable[[str], object] | None
    context: tuple[str, ...]
    params: type[BaseModel]
    source: str
    fast: bool = False

    def info(self) -> RewardFunctionInfo:
        doc = inspect.getdoc(self.fn) or ""
        schema = self.params.model_json_schema()
        properties = {
            name: {key: value for key, value in spec.items() if key != "title"}
            for name, spec in schema.get("properties", {}).items()
        }
        return RewardFunctionInfo(
            name=self.name,
            summary=doc.split("\n\n")[0].replace("\n", " "),
            description=doc,
            needs_ground_truth=self.needs_ground_truth,
            parameters=properties,
            context=list(self.context),
            fast=self.fast,
            source=self.source,
        )


def describe_function(
    fn: Callable[..., float],
    name: str,
    needs_ground_truth: bool,
    check_ground_truth: Callable[[str], object] | None,
    fast: bool = False,
) -> RewardFunction:
    """Read a reward function's parameters from its signature; refuse a signature the server cannot call."""
    if not NAME_PATTERN.fullmatch(name):
        raise TypeError(
            f"{name!r} is not a usable reward function name: a letter, then letters, digits, '_' or '-'"
        )
    signature = inspect.signature(fn)
    parameters = list(signature.parameters.values())
    if [p.name for p in parameters[:2]] != ["response", "ground_truth"] or any(
        p.kind not in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY) for p in parameters[:2]
    ):
        raise TypeError(f"reward function {name!r} must take (response, ground_truth, ...) first")
    hints = typing.get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    context = []
    for parameter in parameters[2:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(
                f"reward function {name!r}: *args and **kwargs cannot be listed; name each parameter"
            )
        if parameter.name in CONTEXT_PARAMETERS:
            context.append(parameter.name)
            continue
        if parameter.default is parameter.empty:
            raise TypeError(f"reward function {name!r}: parameter {parameter.name!r} needs a default")
        fields[parameter.name] = (hints.get(parameter.name, Any), parameter.default)
    params = create_model(f"{name}_parameters", __config__=ConfigDict(extra="forbid"), **fields)
    return RewardFunction(
        name=name,
        fn=fn,
        needs_ground_truth=needs_ground_truth,
        check_ground_truth=check_ground_truth,
        context=tuple(context),
        params=params,
        source=fn.__module__,
        fast=fast,
    )


_defined: dict[str, dict[tuple[str, str], RewardFunction]] = {}
"""Every marked function: by the module that defines it, then by its qualified name and reward name."""


def reward_function(
    name: str | None = None,
    *,
    needs_ground_truth: bool = True,
    check_ground_truth: Callable[[str], object] | None = None,
    fast: bool = False,
) -> Callable[[F], F]:
    """Mark ``fn(response, ground_truth, **params) -> float`` as a reward function called ``name``
    (default: the function's own name). The function itself is returned unchanged; :func:`defined_in`
    lists it with the others its module marks.

    * ``needs_ground_truth``: items scored with it must carry a non-empty ground truth (else 422);
    * ``check_ground_truth``: a cheap check, run in the server before any work is queued, that raises
      ``ValueError`` for a ground truth the function cannot use (the 422 names ``ground_truth``);
    * ``fast``: its items are scored within the fast lane's time or time out, with no second try in the
      slow lane (the built-in functions, which answer in milliseconds, unless the answer is hostile).

    Parameters after ``ground_truth`` must have defaults; callers set them per item in
    ``meta[name]``. A parameter named as one of :data:`CONTEXT_PARAMETERS` receives the item's value instead.
    """

    def mark(fn: F) -> F:
        function = describe_function(fn, name or fn.__name__, needs_ground_truth, check_ground_truth, fast)
        # Keyed so that a module run again (a plugin retried after failing) replaces its functions
        # instead of listing them twice.
        _defined.setdefault(fn.__module__, {})[(fn.__qualname__, function.name)] = function
        return fn

    return mark


def defined_in(module: str) -> list[RewardFunction]:
    """The reward functions marked in the module named ``module``, in the order they were marked (not
    those it imports from elsewhere)."""
    return list(_defined.get(module, {}).values())


@dataclass(frozen=True)
class Task:
    """What a worker process scores for one item."""

    names: tuple[str, ...]
    response: str
    ground_truth: str
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    """The item's context parameters that its functions take."""
    fast: bool = False
    """Every function of it is fast: scored within the fast lane or not at all."""


class ScoringError(Exception):
    """A reward function failed, or returned something that is not a finite number."""


class Registry:
    """The reward functions a server offers, by name."""

    def __init__(self, functions: Iterable[RewardFunction]) -> None:
        self._functions: dict[str, RewardFunction] = {}
        for function in functions:
            if function.name in self._functions:
                other = self._functions[function.name]
                raise ValueError(
                    f"two reward functions are called {function.name!r} (from {other.source} "
                    f"and {function.source})"
                )
            self._functions[function.name] = function

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __getitem__(self, name: str) -> RewardFunction:
        return self._functions[name]

    def names(self) -> list[str]:
        return sorted(self._functions)

    def info(self) -> list[RewardFunctionInfo]:
        return [self._functions[name].info() for name in self.names()]

    def check_weights(self, weights: Mapping[str, float]) -> dict[str, float]:
        """The weights, if every name is registered."""
        for name in weights:
            if name not in self:
                raise ValueError(f"unknown reward function {name!r}; registered: {', '.join(self.names())}")
        return dict(weights)

    def plan(
        self,
        reward: str | Mapping[str, float],
        response: str,
        ground_truth: str,
        meta: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, float], Task]:
        """Check one item against the registry and make its task; raise :class:`ItemProblem` naming the
        field at fault. ``context`` holds the item's other context parameters (prompt, data_source,
        metadata). Nothing slow happens here: this runs in the server, before any work is queued."""
        weights = {reward: 1.0} if isinstance(reward, str) else dict(reward)
        for name in weights:
            if name not in self:
                raise ItemProblem(
                    "reward", f"unknown reward function {name!r}; registered: {', '.join(self.names())}"
                )
        needing = [name for name in weights if self[name].needs_ground_truth]
        if needing and not ground_truth.strip():
            raise ItemProblem("ground_truth", f"{', '.join(needing)} needs a ground truth, and it is empty")
        for name in needing:
            check = self[name].check_ground_truth
            if check is not None:
                try:
                    check(ground_truth)
                except ValueError as error:
                    raise ItemProblem("ground_truth", f"{name}: {error}") from None
        params: dict[str, dict[str, Any]] = {}
        meta = meta or {}
        for name in weights:
            given = meta.get(name)
            if given is None:
                continue
            if not isinstance(given, dict):
                raise ItemProblem(f"meta.{name}", f"the parameters of {name} must be an object")
            try:
                params[name] = self[name].params.model_validate(given).model_dump(exclude_unset=True)
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ItemProblem(f"meta.{name}.{where}" if where else f"meta.{name}", first["msg"]) from None
        given = {**(context or {}), "meta": dict(meta)}
        wanted = {key for name in weights for key in self[name].context}
        fast = all(self[name].fast for name in weights)
        task = Task(
            tuple(weights), response, ground_truth, params, {key: given.get(key) for key in wanted}, fast
        )
        return weights, task


def evaluate(registry: Registry, task: Task) -> dict[str, float]:
    """Every component of a task: ``{name: score}``. Runs in a worker process."""
    components: dict[str, float] = {}
    for name in task.names:
        function = registry[name]
        kwargs = dict(task.params.get(name, {}))
        kwargs |= {key: task.context[key] for key in function.context}
        try:
            value = function.fn(task.response, task.ground_truth, **kwargs)
        except Exception as error:
            raise ScoringError(f"{name} failed: {type(error).__name__}: {error}") from error
        components[name] = _as_score(name, value)
    return components


def _as_score(name: str, value: object) -> float:
    if isinstance(value, numbers.Real):
        score = float(value)
        if math.isfinite(score):
            return score
    raise ScoringError(f"{name} returned {value!r:.100}, not a finite number")


def combine(weights: Mapping[str, float], components: Mapping[str, float]) -> float:
    """The weighted sum of the components; not finite when it overflows (the service refuses that)."""
    try:
        return math.fsum(weight * components[name] for name, weight in weights.items())
    except (OverflowError, ValueError):  # fsum's "intermediate overflow", and inf − inf
        return math.nan
