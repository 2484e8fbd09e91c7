"""Turning an agent's state into its prompt: the stable part first, what changes last, as a chat that
grows by one turn per call (context.py)."""

from __future__ import annotations

import json

from tokenmill.errors import TemplateError
from tokenmill.models.family import detect_family
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.prompts import STANDARD_VARIABLES, TASK_VARIABLES, ChatTemplate, load_task_template
from tokenmill.sim.context import AgentContext, Turn
from tokenmill.sim.memory import MemoryStream
from tokenmill.sim.spec import Spec
from tokenmill.sim.world import World, describe


class AgentPrompts:
    """The act and reflect prompts of every agent, from prompts/simulate/<family>.j2 in the sandbox."""

    def __init__(self, spec: Spec, info: ModelInfo, prompt: str | None = None, family: str | None = None,
                 max_tokens: dict[str, int] | None = None):
        self.spec = spec
        self.max_tokens = max_tokens or {"act": 0, "reflect": 0}  # per purpose: the reply's room in the context
        self._heads: dict[str, str] = {}
        self.last_messages: list[dict] = []
        self.info = info
        self.family = family or detect_family(info.metadata)
        self.template = load_task_template("simulate", prompt, family=self.family)
        self.template.check_variables(set(STANDARD_VARIABLES), TASK_VARIABLES["simulate"])
        self.chat = ChatTemplate.for_model(info, self.family)
        # a template that cannot render its head and a turn apart gives every call one whole prompt
        self.chats = "part" in self.template.variables()
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
                  memory: list[str] | None, observation: str, part: str | None = None,
                  recall: list[str] | None = None) -> str:
        """The template rendered for `agent`: the whole single prompt (part None), its stable
        `head` or one `turn` of its chat (context.py)."""
        a = self.spec.agent(agent)
        variables = {
            "text": observation, "row": {}, "max_words": 40, "world": self.world_vars, "agent": a.name,
            "persona": a.persona, "goals": list(a.goals), "now": now, "location": location, "present": present,
            "memory": memory, "observation": observation, "purpose": purpose, "recall": recall or []}
        if part is None:
            return self.template.render(variables).strip()
        text = self.template.render({**variables, "part": part})
        return text.lstrip() if part == "head" else text.strip()

    def head(self, agent: str) -> str:
        """The stable start of `agent`'s chat (rules, scenario, places, people, persona, goals)."""
        if agent not in self._heads:
            text = self.user_text(agent, "act", "", "", [], None, "", part="head")
            self._heads[agent] = text if not text or text.endswith("\n") else text + "\n"
        return self._heads[agent]

    def wrap(self, text: str) -> str:
        return self.render([{"role": "user", "content": text}])

    def render(self, messages: list[dict[str, str]]) -> str:
        prompt = self.chat.render(messages)
        bos = self.info.bos_token  # the tokenizer adds BOS itself; a template that writes it would double it
        if bos and self.info.adds_bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        return prompt

    def _perceived(self, stream: MemoryStream, step: int, purpose: str, skip) -> tuple[str, list[int]]:
        """What the agent perceives now (the events of the step it saw, most important first, at
        most max_observations, leaving out `skip`), as lines, and the memories shown."""
        m = self.spec.memory
        seen = step - 1 if purpose == "act" else step
        observed = [x for x in stream.observations_of(seen) if not skip(x)]
        top = sorted(sorted(observed, key=lambda x: (-x.importance, x.index))[:m.max_observations], key=lambda x: x.index)
        lines = [f"- {x.text[:m.max_chars]}" for x in top]
        if not lines:
            lines = ["- The day begins." if step == 1 and purpose == "act" else "- Nothing new happened here."]
        return "\n".join(lines), [x.index for x in top]

    def next_prompt(self, world: World, stream: MemoryStream, step: int, purpose: str,
                    context: AgentContext | None = None, own: str | None = None,
                    budget: int | None = None) -> tuple[str, Turn]:
        """The prompt of `stream.agent` at `step` (act perceives step-1, reflect the step's own
        events) and the turn it adds: the next turn of `context` when that fits `budget` tokens
        (prompt and reply), else a fresh chat. `own`: the text of the agent's own event of the
        step it perceives (its reply already shows it)."""
        m = self.spec.memory
        name = stream.agent
        a = self.spec.agent(name)
        when = world.time_of(step).strftime("%A %H:%M")
        here, present = world.where[name], world.present(name)
        head = self.head(name) if self.chats else ""
        if self.chats and context is not None and context.turns:
            shown = context.shown
            observation, seen_idx = self._perceived(stream, step, purpose, lambda x: x.index in shown or x.text == own)
            query = " ".join([observation, here, *a.goals, *present])
            recalled = [x for x in stream.recall(step, query, m.retrieve, m.recency_decay,
                                                 lambda x: x.step < context.start) if x.index not in shown]
            text = self.user_text(name, purpose, when, here, present, None, observation, part="turn",
                                  recall=[x.text[:m.max_chars] for x in recalled])
            turn = Turn(step, purpose, text, False, [x.index for x in recalled] + seen_idx)
            prompt = self.render(context.messages(head, turn))
            if budget is None or self.info.count_tokens(prompt) + self.max_tokens[purpose] <= budget:
                return self._remember(prompt, turn, context.messages(head, turn))
        observation, seen_idx = self._perceived(stream, step, purpose, lambda x: False)
        query = " ".join([observation, here, *a.goals, *present])
        seen = step - 1 if purpose == "act" else step
        memories = stream.retrieve(step, query, m.recent, m.retrieve, m.recency_decay, exclude_step=seen)
        text = self.user_text(name, purpose, when, here, present, [x.text[:m.max_chars] for x in memories],
                              observation, part="turn" if self.chats else None)
        turn = Turn(step, purpose, text, True, [x.index for x in memories] + seen_idx)
        messages = AgentContext().messages(head if self.chats else "", turn)
        return self._remember(self.render(messages), turn, messages)

    def _remember(self, prompt: str, turn: Turn, messages: list[dict]) -> tuple[str, Turn]:
        self.last_messages = messages  # the chat before the model's template (flows.bench_simulate replays it)
        return prompt, turn

    def for_agent(self, world: World, stream: MemoryStream, step: int, purpose: str) -> str:
        """A fresh chat's prompt of `stream.agent` at `step` (see next_prompt)."""
        return self.next_prompt(world, stream, step, purpose)[0]


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
