"""Each agent's running chat: a step's prompt is the agent's previous prompt, its reply and one new turn.

Why: the batched engine keeps what a finished request leaves in its slot, and a request whose
prompt begins with those tokens continues from them. A chat that only grows by appending is such
a prompt, so from step 2 on an agent's call evaluates only its new turn (and its own reply, where
the tokenizer splits the reply text differently from how it was generated), not its persona,
memories and earlier turns: the prompt tokens evaluated per step stay flat as the run goes on.

- The chat's first user message is the stable head (rules, scenario, places, people, persona,
  goals) followed by a full turn: time and place, the memories retrieved by recency, importance
  and relevance ("You remember"), what the agent perceives, and the request.
- Each later turn holds only what is new: time and place, the events of the last step the agent
  has not been shown yet (its own action is its reply, just above), memories retrieved for this
  turn that the chat does not show yet ("You recall": from before the chat began, with a word in
  common with what is happening now), and the request (act or reflect).
- When the next prompt plus the reply would not fit the context (`model.n_ctx`), the chat starts
  again from the head with a full turn. The engine still holds the head, so a restart evaluates
  the memories and the turn, not the persona.
- Everything a chat is made of is committed with each step (llm_calls: `turn`, `fresh`, `shown`),
  so a resumed or forked run rebuilds the same chats (under the fork's own head) and continues
  exactly as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Turn:
    """One call's part of an agent's chat."""

    step: int
    purpose: str  # act | reflect
    text: str  # the user message after the head (a fresh turn: memories included)
    fresh: bool  # the chat starts again with this turn
    shown: list[int]  # memory indices this turn shows (retrieved, recalled, perceived)
    reply: str | None = None  # the model's reply; None until it is in (and for a failed call)


@dataclass
class AgentContext:
    """One agent's chat as it stands: the turns since it last started, each with its reply."""

    turns: list[Turn] = field(default_factory=list)

    @property
    def start(self) -> int | None:
        """The step the chat began at (None: no chat yet)."""
        return self.turns[0].step if self.turns else None

    @property
    def shown(self) -> set[int]:
        return {i for t in self.turns for i in t.shown}

    def messages(self, head: str, turn: Turn | None = None) -> list[dict[str, str]]:
        """The chat's messages, with `turn` as the next user message when given (a fresh turn
        replaces the chat)."""
        turns = ([] if turn is not None and turn.fresh else self.turns) + ([turn] if turn is not None else [])
        out = []
        for i, t in enumerate(turns):
            out.append({"role": "user", "content": head + t.text if i == 0 else t.text})
            if t.reply is not None:
                out.append({"role": "assistant", "content": t.reply})
        return out

    def record(self, turn: Turn, reply: str | None) -> None:
        """Add a finished call: with its reply when it succeeded; a failed call leaves the chat as
        it was, except that a failed fresh turn empties it (the old one did not fit)."""
        if reply is None:
            if turn.fresh:
                self.turns = []
            return
        turn.reply = reply
        self.turns = ([] if turn.fresh else self.turns) + [turn]


def restore_contexts(names: list[str], calls: list[dict]) -> dict[str, AgentContext]:
    """The chats as committed: replays llm_calls rows (step, agent, purpose, status, raw_output,
    turn, fresh, shown) in the order they ran. Rows without a turn (a run of an older version)
    leave that agent without a chat, so its next call starts one."""
    contexts = {name: AgentContext() for name in names}
    for row in sorted(calls, key=lambda r: (r["step"], r["purpose"] != "act")):
        ctx = contexts.get(row["agent"])
        if ctx is None:
            continue
        if row.get("turn") is None:
            ctx.turns = []
            continue
        turn = Turn(row["step"], row["purpose"], row["turn"], bool(row["fresh"]), list(row["shown"] or []))
        ctx.record(turn, row["raw_output"] if row["status"] == "ok" else None)
    return contexts
