"""The world: where agents are, the action schema, applying actions in a seeded order, perception."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from tokenmill.sim.spec import Spec

ACTIONS = ("say", "move", "do", "wait")
NONE = "none"
IMPORTANCE = list(range(1, 11))


def step_seed(seed: int, *parts) -> int:
    """A seed for one agent's call at one step (and purpose): the same inputs, the same seed."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def action_schema(spec: Spec, here: str, present: list[str]) -> dict:
    """JSON Schema of one agent's action at one step: one alternative per action, each allowing only
    targets that make sense now (a person here to speak to, another place to go), so every reply
    the grammar lets through is an action the world can apply.

    `content` is bounded by `memory.max_chars` (maxLength), so the grammar itself ends every reply:
    after that many characters only the closing quote is allowed, and `reply_tokens` bounds the
    whole reply. The converter spells maxLength as nested optionals; that made each reply take
    minutes while the grammar was applied to the whole vocabulary at every token, but the engine
    now samples first and asks the grammar about the chosen token only, so it costs little."""
    importance = {"type": "integer", "enum": IMPORTANCE, "description": "how much it matters, 1-10"}
    text = {"type": "string", "maxLength": spec.memory.max_chars}

    def option(action: str, targets: list[str], content: dict) -> dict:
        return {"type": "object", "properties": {"action": {"type": "string", "enum": [action]},
                                                 "target": {"type": "string", "enum": targets},
                                                 "content": content, "importance": importance},
                "required": ["action", "target", "content", "importance"]}

    others = [loc.name for loc in spec.locations if loc.name != here]
    options = ([option("say", list(present), text)] if present else []) + (
        [option("move", others, text)] if others else []) + [
        option("do", [NONE], text), option("wait", [NONE], {"type": "string", "enum": [""]})]
    return {"type": "object",
            "properties": {"action": {"type": "string", "enum": list(ACTIONS)}, "target": {"type": "string"},
                           "content": {"type": "string"}, "importance": importance},
            "required": ["action", "target", "content", "importance"], "anyOf": options}


def reflection_schema(spec: Spec) -> dict:
    return {
        "type": "object",
        "properties": {
            "insights": {"type": "array", "items": {"type": "string", "minLength": 12,
                                                    "maxLength": spec.memory.max_chars},
                         "minItems": 1, "maxItems": spec.memory.insights},
            "importance": {"type": "integer", "enum": IMPORTANCE},
        },
        "required": ["insights", "importance"],
    }


def reply_tokens(spec: Spec, count_tokens, purpose: str) -> int:
    """The most tokens a reply the grammar allows can take, counting a token per character of free
    text (digits are; no ordinary text takes more) and per optional space the grammar lets in
    after each piece of JSON syntax: the default max_tokens, so no reply is cut."""
    n = spec.memory.max_chars
    if purpose == "act":
        longest = max([loc.name for loc in spec.locations] + [a.name for a in spec.agents], key=len)
        shell, texts = json.dumps({"action": "move", "target": longest, "content": "", "importance": 10},
                                  separators=(",", ":")), 1
    else:
        shell, texts = json.dumps({"insights": [""] * spec.memory.insights, "importance": 10},
                                  separators=(",", ":")), spec.memory.insights
    spaces = sum(shell.count(c) for c in '{}[],:"')  # `space ::= " "?` follows each of these
    return count_tokens(shell) + spaces + texts * n + 2


@dataclass
class Action:
    agent: str
    action: str
    target: str | None
    content: str
    importance: int
    note: str | None = None  # why the world changed or refused it; an error for a failed call

    @classmethod
    def waiting(cls, agent: str, reason: str) -> "Action":
        return cls(agent, "wait", None, "", 1, reason)


def parse_action(agent: str, value: dict, max_chars: int = 1000) -> Action:
    target = value.get("target")
    return Action(agent, value["action"], None if target in (None, NONE) else target,
                  " ".join(str(value.get("content") or "").split())[:max_chars], int(value.get("importance") or 1))


class World:
    """Places and who is where; `apply` turns one step's actions into events."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.places = {loc.name for loc in spec.locations}
        self.names = [a.name for a in spec.agents]
        self.where = {a.name: a.location for a in spec.agents}

    def time_of(self, step: int) -> datetime:
        return self.spec.clock.start + timedelta(minutes=self.spec.clock.minutes_per_step * (step - 1))

    def present(self, agent: str) -> list[str]:
        return [n for n in self.names if n != agent and self.where[n] == self.where[agent]]

    def order(self, step: int) -> list[str]:
        """The order actions are applied in at `step`: seeded, so the same for the same spec."""
        names = list(self.names)
        random.Random(step_seed(self.spec.seed, "order", step)).shuffle(names)
        return names

    def apply(self, step: int, actions: dict[str, Action]) -> list[dict]:
        """Apply every agent's action in the step's seeded order; returns one event per agent."""
        events = []
        when = self.time_of(step)
        for name in self.order(step):
            a = actions[name]
            here = self.where[name]
            action, target, note = a.action, a.target, a.note
            if action == "move":
                if target not in self.places:
                    action, note = "wait", f"cannot move to {target or 'nowhere'}: not a place"
                elif target == here:
                    action, note = "wait", f"is already at {here}"
                else:
                    self.where[name] = target
            elif action == "say":
                if target not in self.where or target == name:
                    target = None  # to everyone here
                elif self.where[target] != here:
                    note = f"{target} is not here"
            elif action in ("do", "wait"):
                target = None
            events.append({"step": step, "sim_time": when, "agent": name, "action": action,
                           "target": target if action in ("say", "move") else None,
                           "content": a.content if action in ("say", "do") else "",
                           "location": here, "importance": a.importance, "note": note})
        return events

    def perceivers(self, event: dict) -> list[str]:
        """Who saw an event: the actor and everyone at its place after the step (for a move, both places)."""
        places = {event["location"]} | ({event["target"]} if event["action"] == "move" else set())
        return [n for n in self.names if n == event["agent"] or self.where[n] in places]


def describe(event: dict) -> str:
    """One event as the sentence agents remember and the transcript shows."""
    t = event["sim_time"].strftime("%H:%M")
    who, where = event["agent"], event["location"]
    if event["action"] == "say":
        to = f" to {event['target']}" if event["target"] else ""
        return f"{t} at the {where}: {who} said{to}: \"{event['content']}\""
    if event["action"] == "move":
        return f"{t}: {who} went from the {where} to the {event['target']}"
    if event["action"] == "do":
        return f"{t} at the {where}: {who} did: {event['content']}"
    return f"{t} at the {where}: {who} waited"
