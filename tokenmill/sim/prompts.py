"""Turning an agent's state into its prompt: the stable part first, what changes last."""

from __future__ import annotations

import json

from tokenmill.errors import TemplateError
from tokenmill.models.family import detect_family
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.prompts import STANDARD_VARIABLES, TASK_VARIABLES, ChatTemplate, load_task_template
from tokenmill.sim.memory import MemoryStream
from tokenmill.sim.spec import Spec
from tokenmill.sim.world import World, describe


class AgentPrompts:
    """The act and reflect prompts of every agent, from prompts/simulate/<family>.j2 in the sandbox."""

    def __init__(self, spec: Spec, info: ModelInfo, prompt: str | None = None, family: str | None = None):
        self.spec = spec
        self.info = info
        self.family = family or detect_family(info.metadata)
        self.template = load_task_template("simulate", prompt, family=self.family)
        self.template.check_variables(set(STANDARD_VARIABLES), TASK_VARIABLES["simulate"])
        self.chat = ChatTemplate.for_model(info, self.family)
        self.world_vars = {
            "scenario": spec.scenario.strip(),
            "locations": [{"name": loc.name, "description": loc.description} for loc in spec.locations],
            "agents": [a.name for a in spec.agents],
            "max_chars": spec.memory.max_chars,
            "example": example_action(spec),
        }
        # What changes must come after the persona, or the engine could not reuse the stable part.
        first = spec.agents[0]
        a, b = (self.user_text(first.name, purpose, f"now {i}", f"place {i}", [f"p{i}"], [f"m{i}"], f"o{i}")
                for i, purpose in ((1, "act"), (2, "reflect")))
        marker = first.persona or first.name
        stable = a.find(marker) + len(marker) if marker in a else len(a)
        if a[:stable] != b[:stable]:
            raise TemplateError(f"template {self.template.name}: the text before the persona changes from step "
                                "to step; put the time, place, memories and observation after it")

    def user_text(self, agent: str, purpose: str, now: str, location: str, present: list[str],
                  memory: list[str], observation: str) -> str:
        a = self.spec.agent(agent)
        return self.template.render({
            "text": observation, "row": {}, "max_words": 40, "world": self.world_vars, "agent": a.name,
            "persona": a.persona, "goals": list(a.goals), "now": now, "location": location, "present": present,
            "memory": memory, "observation": observation, "purpose": purpose,
        }).strip()

    def wrap(self, text: str) -> str:
        prompt = self.chat.render([{"role": "user", "content": text}])
        bos = self.info.bos_token  # the tokenizer adds BOS itself; a template that writes it would double it
        if bos and self.info.adds_bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        return prompt

    def for_agent(self, world: World, stream: MemoryStream, step: int, purpose: str) -> str:
        """The prompt of `agent` at `step`: act (perceives step-1) or reflect (after step's events)."""
        m = self.spec.memory
        name = stream.agent
        seen = step - 1 if purpose == "act" else step
        observed = stream.observations_of(seen)
        top = sorted(observed, key=lambda x: (-x.importance, x.index))[:m.max_observations]
        lines = [x.text[:m.max_chars] for x in sorted(top, key=lambda x: x.index)]
        observation = "\n".join(f"- {line}" for line in lines) if lines else (
            "- The day begins." if step == 1 and purpose == "act" else "- Nothing new happened here.")
        a = self.spec.agent(name)
        query = " ".join([observation, world.where[name], *a.goals, *world.present(name)])
        memories = stream.retrieve(step, query, m.recent, m.retrieve, m.recency_decay, exclude_step=seen)
        when = world.time_of(step).strftime("%A %H:%M")
        text = self.user_text(name, purpose, when, world.where[name], world.present(name),
                              [x.text[:m.max_chars] for x in memories], observation)
        self.last_text = text  # the user message, before the chat template (flows.bench_simulate replays it)
        return self.wrap(text)


def example_action(spec: Spec) -> str:
    """A complete, short action for the prompt's stable part (the same for every agent): a small
    model copies the shape, and the end, of what it is shown."""
    to = spec.agents[1].name if len(spec.agents) > 1 else spec.agents[0].name
    return json.dumps({"action": "say", "target": to, "content": "Good morning! Any news today?", "importance": 3})


def transcript(spec: Spec, events: list[dict], reflections: list[dict]) -> str:
    """OUT/transcript.md: the story step by step, for a person to read."""
    lines = [f"# {spec.name}", "", spec.scenario.strip(), ""]
    by_step: dict[int, list[dict]] = {}
    for e in events:
        by_step.setdefault(e["step"], []).append(e)
    insights: dict[int, list[dict]] = {}
    for r in reflections:
        insights.setdefault(r["step"], []).append(r)
    for step in sorted(by_step):
        rows = by_step[step]
        lines += [f"## Step {step}: {rows[0]['sim_time'].strftime('%A %H:%M')}", ""]
        for e in rows:
            note = f" *({e['note']})*" if e.get("note") else ""
            lines.append(f"- {describe(e)}{note}")
        if step in insights:
            lines += ["", "Reflections:"]
            lines += [f"- **{r['agent']}** thinks: {r['text']}" for r in insights[step]]
        lines.append("")
    return "\n".join(lines)
