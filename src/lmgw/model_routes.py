"""Model routes: one model name for clients, several models behind it, and models to fall back
to (``[[model_routes]]``, ``/admin/model_routes``).

Why: rolling out a new model version (or LoRA adapter) is done by moving a share of the
traffic to it and watching its errors and latency before moving the rest (a canary); comparing
two models on live traffic is the same split held still (an A/B test). Clients keep sending
one name; the operator moves the weights at run time. And when the model a request was given
cannot serve it (no routable worker, every worker failed, a worker overloaded), the request
may go to another model instead of failing (LiteLLM's fallbacks, Gateway API Inference
Extension's model rewrites; ANCHORS.md §1.4, §1.7).

Sans-IO: a route decides, the API (``lmgw.api.openai``) acts.

* **Split** ``"request"``: smooth weighted round robin (nginx's), so the shares are exact over
  any window of ``sum(weights)`` requests, not only on average, and a canary at weight 1 of 100
  gets its first request at once rather than by luck. ``"session"``: the session key (the
  routing session header, else the request's ``user``, else the API key) hashes to a point of
  ``[0, total weight)`` laid out target by target, so a user stays on one model while the
  weights hold (an A/B test needs that), and moving weight from one target to the next moves
  only the users in the share that moved. Stable across processes and gateway replicas
  (blake2b, not ``hash()``). Requests without any key fall back to the round robin.
* **Order**: the chosen target, then ``fallbacks`` in order (the chosen one left out). A route
  never names another route: targets are served models, their aliases or LoRA adapters.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Split = Literal["request", "session"]
SPLITS = ("request", "session")

__all__ = ["SPLITS", "ModelRoute", "ModelRoutes", "Split", "Target", "route_body"]


@dataclass(frozen=True, slots=True)
class Target:
    """A model behind a route and its share of the route's traffic (weight / total)."""

    model: str
    weight: float


def route_body(
    targets: Mapping[str, float] | Sequence[tuple[str, float]],
    fallbacks: Sequence[str] = (),
    split: str = "request",
    mirror: str | None = None,
    mirror_share: float = 1.0,
) -> dict[str, object]:
    """A route's definition as the admin API takes it (``PUT /admin/model_routes/{name}``),
    from ``{model: weight}`` or (model, weight) pairs: one shape for the SDK and the CLI."""
    pairs = targets.items() if isinstance(targets, Mapping) else targets
    body: dict[str, object] = {
        "targets": [{"model": m, "weight": w} for m, w in pairs],
        "fallbacks": list(fallbacks),
        "split": split,
    }
    if mirror is not None:
        body["mirror"] = mirror
        body["mirror_share"] = mirror_share
    return body


def check_route(
    name: str,
    targets: Sequence[Target],
    fallbacks: Sequence[str],
    split: str,
    mirror: str | None = None,
    mirror_share: float = 1.0,
) -> str | None:
    """What is wrong with a route's definition, in words (None: nothing). One rule for the
    config file and the admin API."""
    if not name or name != name.strip():
        return "a route's model name must not be empty or start or end with whitespace"
    if not targets:
        return "a route needs at least one target"
    seen: set[str] = set()
    for t in targets:
        if not t.model or t.model != t.model.strip():
            return "a target's model must not be empty or start or end with whitespace"
        if t.model in seen:
            return f"target {t.model!r} is listed twice"
        seen.add(t.model)
        if not (t.weight >= 0.0 and t.weight <= 1e9):  # also rejects NaN
            return f"target {t.model!r}: weight must be between 0 and 1e9, got {t.weight!r}"
    if sum(t.weight for t in targets) <= 0.0:
        return "at least one target needs a weight above 0"
    if len(set(fallbacks)) != len(fallbacks):
        return "a fallback is listed twice"
    if any(not f or f != f.strip() for f in fallbacks):
        return "a fallback must not be empty or start or end with whitespace"
    if split not in SPLITS:
        return f"split must be one of {', '.join(SPLITS)}, got {split!r}"
    if mirror is not None and (not mirror or mirror != mirror.strip()):
        return "the mirror must not be empty or start or end with whitespace"
    if not (0.0 < mirror_share <= 1.0):
        return f"mirror_share must be in (0, 1], got {mirror_share!r}"
    return None


class ModelRoute:
    """One route: its targets, fallbacks and split, the round robin's state, and how many
    requests each target was given."""

    __slots__ = ("_bounds", "_current", "_mirror_credit", "_total", "fallbacks", "given",
                 "mirror", "mirror_share", "mirrored", "name", "split", "targets")  # fmt: skip

    def __init__(
        self,
        name: str,
        targets: Sequence[Target],
        fallbacks: Sequence[str] = (),
        split: str = "request",
        mirror: str | None = None,
        mirror_share: float = 1.0,
    ) -> None:
        problem = check_route(name, targets, fallbacks, split, mirror, mirror_share)
        if problem is not None:
            raise ValueError(problem)
        self.name = name
        self.targets = tuple(targets)
        self.fallbacks = tuple(fallbacks)
        self.split = split
        self._total = sum(t.weight for t in self.targets)
        bounds, acc = [], 0.0
        for t in self.targets:
            acc += t.weight
            bounds.append(acc)
        self._bounds = bounds  # cumulative weights: target i owns [bounds[i-1], bounds[i])
        self._current = [0.0] * len(self.targets)
        #: target model -> requests given to it first (fallbacks not counted)
        self.given: dict[str, int] = dict.fromkeys((t.model for t in self.targets), 0)
        #: the model a copy of ``mirror_share`` of the requests also goes to (lmgw.mirrors)
        self.mirror = mirror
        self.mirror_share = mirror_share
        self._mirror_credit = 0.0
        #: requests a copy was due for
        self.mirrored = 0

    def choose(self, key: str | None = None) -> str:
        """The target a request goes to first (``key``: its session key, for ``"session"``)."""
        if self.split == "session" and key is not None:
            model = self.targets[self._point(key)].model
        else:
            model = self._next()
        self.given[model] += 1
        return model

    def order(self, key: str | None = None) -> tuple[str, ...]:
        """The models a request tries, in order: the chosen target, then the fallbacks."""
        first = self.choose(key)
        return (first, *(f for f in self.fallbacks if f != first))

    def mirror_due(self) -> bool:
        """Whether this request's copy goes to the mirror: exactly ``mirror_share`` of the
        requests, evenly spread (a credit that each request adds the share to)."""
        if self.mirror is None:
            return False
        self._mirror_credit += self.mirror_share
        if self._mirror_credit < 1.0 - 1e-9:
            return False
        self._mirror_credit -= 1.0
        self.mirrored += 1
        return True

    def _next(self) -> str:
        """Smooth weighted round robin: every target gains its weight, the richest is chosen
        and pays the total. Over ``total`` picks each is chosen ``weight`` times (integral
        weights), evenly spread."""
        current = self._current
        best = 0
        for i, t in enumerate(self.targets):
            current[i] += t.weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return self.targets[best].model

    def _point(self, key: str) -> int:
        """The target whose share holds ``key``'s point (zero-weight targets own nothing)."""
        digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"lmgw-route").digest()
        x = int.from_bytes(digest, "little") / 2.0**64 * self._total
        i = bisect_right(self._bounds, x)
        return min(i, len(self.targets) - 1)

    def models(self) -> tuple[str, ...]:
        """Every model the route may send a request to: targets, fallbacks, the mirror."""
        mirror = () if self.mirror is None else (self.mirror,)
        return (*(t.model for t in self.targets), *self.fallbacks, *mirror)

    def describe(self) -> dict[str, object]:
        """The route as the admin API lists it."""
        return {
            "model": self.name,
            "targets": [
                {"model": t.model, "weight": t.weight, "share": t.weight / self._total}
                for t in self.targets
            ],
            "fallbacks": list(self.fallbacks),
            "split": self.split,
            "requests": dict(self.given),
            "mirror": self.mirror,
            "mirror_share": self.mirror_share,
            "mirrored": self.mirrored,
        }


class ModelRoutes:
    """The gateway's routes by name: read on every request (a dict), changed by the admin API."""

    def __init__(self, routes: Iterable[ModelRoute] = ()) -> None:
        #: name -> route; the API reads it on every request (``by_name.get(model) if by_name``:
        #: nothing but a dict's truth when there are no routes)
        self.by_name: dict[str, ModelRoute] = {}
        for route in routes:
            if route.name in self.by_name:
                raise ValueError(f"duplicate model route {route.name!r}")
            self.by_name[route.name] = route
        #: changes with every set/remove (caches of model names clear on it)
        self.generation = 0
        # monotonic across route changes (Prometheus counters): (route, target) -> requests
        # given to it first; (route, from, to) -> fallbacks
        self.chosen: dict[tuple[str, str], int] = {}
        self.fallen: dict[tuple[str, str, str], int] = {}

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)

    def __iter__(self) -> Iterator[ModelRoute]:
        return iter(list(self.by_name.values()))

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def get(self, name: str | None) -> ModelRoute | None:
        return self.by_name.get(name) if name is not None else None

    def order(self, route: ModelRoute, key: str | None = None) -> tuple[str, ...]:
        """:meth:`ModelRoute.order`, counted."""
        models = route.order(key)
        k = (route.name, models[0])
        self.chosen[k] = self.chosen.get(k, 0) + 1
        return models

    def choose(self, route: ModelRoute, key: str | None = None) -> str:
        """:meth:`ModelRoute.choose`, counted (for endpoints without fallbacks)."""
        model = route.choose(key)
        k = (route.name, model)
        self.chosen[k] = self.chosen.get(k, 0) + 1
        return model

    def fell_back(self, route: ModelRoute, failed: str, to: str) -> None:
        """A request of ``route`` left ``failed`` for ``to``."""
        k = (route.name, failed, to)
        self.fallen[k] = self.fallen.get(k, 0) + 1

    def set(self, route: ModelRoute) -> bool:
        """Add or replace a route (its counts start again); True when it replaced one.
        ValueError when it would chain routes: its targets and fallbacks must be models, and
        no other route may send requests to its name."""
        name = route.name
        for model in route.models():
            if model != name and model in self.by_name:
                raise ValueError(
                    f"`{model}` is a model route: a route's targets, fallbacks and mirror are"
                    " models"
                )
        for other in self.by_name.values():
            if other.name != name and name in other.models():
                raise ValueError(
                    f"route `{other.name}` sends requests to `{name}`: it cannot be a route"
                )
        replaced = name in self.by_name
        self.by_name[route.name] = route
        self.generation += 1
        return replaced

    def remove(self, name: str) -> bool:
        """Forget a route; False when there was none by that name."""
        if self.by_name.pop(name, None) is None:
            return False
        self.generation += 1
        return True
