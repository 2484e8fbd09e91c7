"""The simulation spec: plain YAML, validated by pydantic; nothing in it is ever executed.

`load_spec(path)` refuses an unknown key, a missing or mistyped value, an agent at an unknown
location, no agents, or two agents (or places) with one name, with one line naming the file
and the key (`agents[2].location`), before any model loads.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenmill.errors import TokenmillError


class SpecError(TokenmillError):
    """A simulation spec that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(_Strict):
    name: str = Field(min_length=1, max_length=40)
    description: str = ""


class Agent(_Strict):
    name: str = Field(min_length=1, max_length=40)
    persona: str = ""
    goals: list[str] = []
    location: str
    memories: list[str] = []  # initial memories


class Clock(_Strict):
    start: datetime = datetime(2026, 6, 1, 8, 0)
    minutes_per_step: int = Field(default=10, ge=1, le=24 * 60)


class Model(_Strict):
    path: Optional[str] = None  # a GGUF file; None: the embedded default model
    n_ctx: int = Field(default=2048, ge=256)  # tokens one agent's chat may reach, reply included (sim/context.py)


class Sampling(_Strict):
    temperature: float = Field(default=0.7, ge=0)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    min_p: float = Field(default=0.05, ge=0, le=1)
    # None: the longest reply the grammar allows (world.reply_tokens), so no reply is cut; a lower
    # value saves KV cells, and a reply cut at it makes that agent wait that step, with the reason
    max_tokens: Optional[int] = Field(default=None, ge=8)  # one action
    reflect_max_tokens: Optional[int] = Field(default=None, ge=8)  # one reflection


class Memory(_Strict):
    recent: int = Field(default=3, ge=0, le=50)  # the newest memories, always shown
    retrieve: int = Field(default=3, ge=0, le=50)  # more, by recency + importance + relevance
    reflect_every: int = Field(default=3, ge=0)  # steps between reflections; 0: never
    insights: int = Field(default=2, ge=1, le=5)  # most insights one reflection stores
    # of what an agent says or does (the grammar's maxLength: it ends every reply), of an insight,
    # and of a memory in a prompt
    max_chars: int = Field(default=80, ge=20, le=1000)
    max_observations: int = Field(default=6, ge=1, le=50)  # events perceived per step, most important first
    recency_decay: float = Field(default=0.9, gt=0, le=1)  # per step


class Spec(_Strict):
    name: str = Field(default="simulation", min_length=1)
    scenario: str = Field(min_length=1)
    locations: list[Location]
    agents: list[Agent]
    clock: Clock = Clock()
    steps: int = Field(default=6, ge=1)
    model: Model = Model()
    sampling: Sampling = Sampling()
    seed: int = 0
    memory: Memory = Memory()
    checkpoint_every: int = Field(default=1, ge=1)  # agents.parquet holds every agent's state every N steps

    def identity(self) -> str:
        """Hash of what shapes the story (all but `steps` and the context size): a run continues only under the same one."""
        data = self.model_dump(mode="json", exclude={"steps": True, "model": {"n_ctx"}})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def agent(self, name: str) -> Agent:
        return next(a for a in self.agents if a.name == name)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_spec(path_text: str) -> Spec:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load: no tags, no objects, no code
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"cannot read spec {path}: {first}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec {path}: the top level must be a mapping of keys (scenario, locations, agents, ...)")
    if not data.get("agents"):
        raise SpecError(f"spec {path}: key 'agents': at least one agent is required")
    if not data.get("locations"):
        raise SpecError(f"spec {path}: key 'locations': at least one location is required")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            raise SpecError(f"spec {path}: unknown key '{where}'") from None
        if err["type"] == "missing":
            raise SpecError(f"spec {path}: key '{where}' is required") from None
        raise SpecError(f"spec {path}: key '{where}': {err['msg']}") from None
    _check_names(spec, path)
    return spec


def _check_names(spec: Spec, path: Path) -> None:
    places: dict[str, int] = {}
    for i, loc in enumerate(spec.locations):
        if loc.name in places:
            raise SpecError(f"spec {path}: key 'locations[{i}].name': {loc.name!r} is also locations[{places[loc.name]}]")
        places[loc.name] = i
    names: dict[str, int] = {}
    for i, agent in enumerate(spec.agents):
        if agent.name in names:
            raise SpecError(f"spec {path}: key 'agents[{i}].name': two agents are named {agent.name!r} "
                            f"(agents[{names[agent.name]}] and agents[{i}])")
        if agent.name in places or agent.name == "none":
            raise SpecError(f"spec {path}: key 'agents[{i}].name': {agent.name!r} is also a location's name "
                            "(or the reserved 'none'); action targets must be unambiguous")
        names[agent.name] = i
        if agent.location not in places:
            raise SpecError(f"spec {path}: key 'agents[{i}].location': {agent.location!r} is not a location; "
                            f"known: {', '.join(places)}")
