"""One simulation run: restore committed steps, run the rest through one model worker, commit each step."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from tokenmill.errors import InputError
from tokenmill.io.parts import append_row
from tokenmill.ledger import OutputLock
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.models.resolve import model_sha256, resolve_model
from tokenmill.models import registry
from tokenmill.pool import ModelWorker
from tokenmill.progress import progress_bar
from tokenmill.schema import Validator, grammar
from tokenmill.sim.context import AgentContext, Turn, restore_contexts
from tokenmill.sim.checkpoint import StepStore, frame, read_run_info, write_run_info
from tokenmill.sim.memory import INITIAL, OBSERVATION, REFLECTION, MemoryStream
from tokenmill.sim.prompts import AgentPrompts, transcript
from tokenmill.sim.spec import Spec, SpecError, load_spec
from tokenmill.sim.world import (Action, World, action_schema, describe, parse_action, reflection_schema,
                                 reply_tokens, step_seed)
from tokenmill.usage import Prices, RunStats

INITIAL_IMPORTANCE = 5


@dataclass
class SimConfig:
    """The command line's choices; None keeps the spec's value."""

    spec: str
    out: str | None = None
    steps: int | None = None
    fork_from: int | None = None
    fork_source: str | None = None  # the run to fork; default the spec's default output folder
    model: str | None = None
    n_ctx: int | None = None
    n_seq: int = 0  # 0: one slot per agent (at most 16), so a step decodes in one batch
    n_gpu_layers: int = -1
    backend: str = "llama"
    temperature: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    prompt: str | None = None
    prompt_family: str | None = None
    hang_timeout_s: float = 300.0
    price_input_per_mtok: float = 0.15
    price_output_per_mtok: float = 0.60


def effective_spec(config: SimConfig) -> Spec:
    """The spec with the command line's overrides applied (and validated like the file)."""
    spec = load_spec(config.spec)
    data = spec.model_dump()
    if config.model is not None:
        data["model"]["path"] = config.model
    if config.n_ctx is not None:
        data["model"]["n_ctx"] = config.n_ctx
    if config.temperature is not None:
        data["sampling"]["temperature"] = config.temperature
    if config.max_tokens is not None:
        data["sampling"]["max_tokens"] = config.max_tokens
    if config.seed is not None:
        data["seed"] = config.seed
    if config.steps is not None:
        data["steps"] = config.steps
    try:
        return Spec.model_validate(data)
    except Exception as exc:
        raise SpecError(f"spec {config.spec} with the command line's options: {str(exc).splitlines()[0]}") from None


def default_out(spec_path: str) -> Path:
    path = Path(spec_path)
    return path.parent / f"{path.stem}.simulate"


class Simulation:
    """Prepared: spec checked, model identified, templates checked. `open` takes the folder; `step` runs one."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.spec = effective_spec(config)
        if registry.get(config.backend).schema != "grammar":
            raise InputError(f"--backend {config.backend} cannot constrain actions with a grammar; use llama or llama-simple")
        self.out = Path(config.out) if config.out else default_out(config.spec)
        self.model_path = resolve_model(self.spec.model.path)
        self.info = ModelInfo(self.model_path)
        self.reflect_schema = reflection_schema(self.spec)
        self.reflect_grammar, self.validate_reflect = grammar(self.reflect_schema), Validator(self.reflect_schema)
        self._act_rules: dict[tuple, tuple[str, Validator]] = {}
        s = self.spec.sampling
        self.max_tokens = {"act": s.max_tokens or reply_tokens(self.spec, self.info.count_text_tokens, "act"),
                           "reflect": s.reflect_max_tokens or reply_tokens(self.spec, self.info.count_text_tokens, "reflect")}
        self.prompts = AgentPrompts(self.spec, self.info, config.prompt, config.prompt_family, self.max_tokens)
        self.store = StepStore(self.out)
        self.world = World(self.spec)
        self.streams = {a.name: MemoryStream(a.name) for a in self.spec.agents}
        self.contexts = {a.name: AgentContext() for a in self.spec.agents}  # each agent's running chat
        self.own: dict[str, tuple[int, str]] = {}  # agent -> (step, its own event of that step, as remembered)
        self._turns: dict[tuple[str, str], Turn] = {}  # (agent, purpose) -> the turn of the call in flight
        self.model_sha = ""
        self.worker: ModelWorker | None = None
        self.lock: OutputLock | None = None
        self.stats: RunStats | None = None
        self._next_index = 0
        self.steps_run = 0
        self.on_prompt: Callable[[int, str, str, GenerationRequest], None] | None = None  # (step, agent, purpose, request)

    # -- the folder --

    def identity(self) -> dict:
        return {"spec_hash": self.spec.identity(), "model_sha256": self.model_sha}

    def check(self) -> Path | None:
        """Refuse, before anything is written or loaded, a fork without a usable source or new folder
        and a folder holding a run of another spec; returns the fork's source (None: no fork)."""
        c = self.config
        source = None
        if c.fork_from is not None:
            source = Path(c.fork_source) if c.fork_source else default_out(c.spec)
            if source.resolve() == self.out.resolve():
                raise InputError(f"--fork-from {c.fork_from} needs a new --out (it is the run being forked, {source})")
            if not (source / "steps").is_dir():
                raise InputError(f"--fork-from {c.fork_from}: {source} holds no simulation run; name it with --from")
            have = StepStore(source).committed()
            if c.fork_from not in have:
                raise InputError(f"--fork-from {c.fork_from}: {source} has no committed step {c.fork_from} "
                                 f"(its last committed step is {have[-1] if have else None})")
            mine = read_run_info(self.out)
            if StepStore(self.out).committed() and not (mine and mine.get("fork_step") == c.fork_from):
                raise InputError(f"--fork-from {c.fork_from}: {self.out} already holds another run; choose a new --out")
            self._check_fork_compatible(source)
        info = read_run_info(self.out)
        if info is not None and info.get("spec_hash") != self.spec.identity():
            raise InputError(f"{self.out} holds a run of another spec or options ({info.get('spec')}); rerun it "
                             "with the same spec, model, seed and temperature, or start a what-if with "
                             "--fork-from K --out NEW")
        self.model_sha = self.model_sha or model_sha256(self.model_path)  # cached after the first time
        if info is not None and info.get("model_sha256") != self.model_sha:
            raise InputError(f"{self.out} was run with another model (sha256 {info.get('model_sha256', '?')[:12]}); "
                             "use the same --model or another --out")
        return source

    def open(self) -> int:
        """Take the output folder, copy a fork's steps, restore committed state; returns the last committed step."""
        self.model_sha = model_sha256(self.model_path)
        c = self.config
        source = self.check()
        self.store.prepare()
        self.lock = OutputLock(self.out)
        self.lock.acquire()
        try:
            source = self.check()  # again, now that no other run can write here
        except BaseException:
            self.close()
            raise
        if read_run_info(self.out) is None:
            write_run_info(self.out, {**self.identity(), "spec": str(c.spec), "name": self.spec.name,
                                      "forked_from": str(source) if c.fork_from is not None else None,
                                      "fork_step": c.fork_from})
        if c.fork_from is not None:  # copies only the steps a killed fork had not copied yet
            self.store.fork_from(StepStore(source), c.fork_from)
        last = self.store.last()
        if last < 0:
            self._commit_initial()
            last = 0
        self.restore(last)
        return last

    def _check_fork_compatible(self, source: Path) -> None:
        agents = StepStore(source).load("agents", upto=0)
        names = sorted(set(agents["agent"].to_list()))
        if names != sorted(self.world.names):
            raise SpecError(f"spec {self.config.spec}: key 'agents': a fork keeps the agents of {source} "
                            f"({', '.join(names)}); change their personas or goals, not who they are")
        places = set(StepStore(source).load("agents")["location"].to_list())
        if not places <= self.world.places:
            raise SpecError(f"spec {self.config.spec}: key 'locations': a fork keeps every place {source} used "
                            f"(missing: {', '.join(sorted(places - self.world.places))})")

    def restore(self, upto: int) -> None:
        """Rebuild places and memories from the committed steps 0..upto (nothing else is kept)."""
        agents = self.store.load("agents", upto=upto).filter(pl.col("step") == upto)
        for row in agents.iter_rows(named=True):
            self.world.where[row["agent"]] = row["location"]
        memories = self.store.load("memories", upto=upto).sort("agent", "index")
        self.streams = {name: MemoryStream(name) for name in self.world.names}
        for m in memories.iter_rows(named=True):
            self.streams[m["agent"]].add(m["step"], m["kind"], m["text"], m["importance"])
        self.contexts = restore_contexts(self.world.names, self.store.load("llm_calls", upto=upto).to_dicts())
        events = self.store.load("events", upto=upto).filter(pl.col("step") == upto)
        self.own = {e["agent"]: (upto, describe(e)) for e in events.iter_rows(named=True)}

    def _commit_initial(self) -> None:
        for a in self.spec.agents:
            for text in a.memories:
                self.streams[a.name].add(0, INITIAL, text, INITIAL_IMPORTANCE)
        memories = [m.row() for s in self.streams.values() for m in s.items]
        self.store.commit(0, {"events": frame("events", []), "llm_calls": frame("llm_calls", []),
                              "memories": frame("memories", memories), "agents": self._agent_frame(0, {})})

    def _agent_frame(self, step: int, events: dict[str, dict]) -> pl.DataFrame:
        return frame("agents", [{"step": step, "agent": a.name, "location": self.world.where[a.name],
                                 "memories": len(self.streams[a.name].items),
                                 "last_action": events[a.name]["action"] if a.name in events else None,
                                 "persona": a.persona, "goals": list(a.goals)} for a in self.spec.agents])

    # -- the model --

    def settings(self) -> ModelSettings:
        slots = self.config.n_seq or min(len(self.spec.agents), 16)
        n_ctx = self.spec.model.n_ctx
        total = registry.get(self.config.backend).context_tokens(n_ctx, slots)
        # Streams as large as a chat may grow from the start: growing them later drops what slots hold.
        # No jump-forward: it decodes a row's forced tokens in parts laid out by whatever else runs in
        # that call, so a resumed run (whose first step evaluates whole chats and starts generating at
        # other moments) drifted from an uninterrupted one; one token per row per call does not.
        return ModelSettings(model_path=str(self.model_path), n_ctx=total, n_seq=slots, stream_cells=n_ctx,
                             n_gpu_layers=self.config.n_gpu_layers, backend=self.config.backend, jump_forward=False,
                             adapt_threads=True)

    def start(self) -> str:
        self.stats = RunStats(model=self.info.name, model_sha256=self.model_sha, backend=self.config.backend)
        self.worker = ModelWorker(self.settings(), hang_timeout_s=self.config.hang_timeout_s)
        self.stats.device = self.worker.start()
        return self.stats.device

    def act_rules(self, agent: str) -> tuple[str, Validator]:
        """The grammar and validator of `agent`'s action where it is now (who is here, where it can go)."""
        key = (self.world.where[agent], tuple(self.world.present(agent)))
        if key not in self._act_rules:
            schema = action_schema(self.spec, *key)
            self._act_rules[key] = (grammar(schema), Validator(schema))
        return self._act_rules[key]

    def _request(self, step: int, agent: str, purpose: str) -> GenerationRequest:
        s = self.spec.sampling
        seen = step - 1 if purpose == "act" else step
        own = self.own[agent][1] if self.own.get(agent, (None,))[0] == seen else None
        prompt, self._turns[agent, purpose] = self.prompts.next_prompt(
            self.world, self.streams[agent], step, purpose, self.contexts[agent], own, self.spec.model.n_ctx)
        self._next_index += 1
        req = GenerationRequest(
            index=self._next_index, prompt=prompt,
            max_tokens=self.max_tokens[purpose],
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
            seed=step_seed(self.spec.seed, agent, step, purpose), session=f"{self.spec.name}/{agent}",
            grammar=self.act_rules(agent)[0] if purpose == "act" else self.reflect_grammar)
        if self.on_prompt is not None:
            self.on_prompt(step, agent, purpose, req)
        return req

    def _batch(self, step: int, purpose: str) -> tuple[dict[str, GenerationRequest], dict[str, Completion]]:
        """Every agent's request of one step, submitted together: the engine decodes them in one batch."""
        requests = {name: self._request(step, name, purpose) for name in self.world.names}
        for req in requests.values():
            self.worker.submit(req)
        done: dict[int, Completion] = {}
        while len(done) < len(requests):
            for completion in self.worker.poll(0.2):
                done[completion.index] = completion
        return requests, {name: done[req.index] for name, req in requests.items()}

    def _call_row(self, step, agent, purpose, req, c: Completion, error: str | None) -> dict:
        self.stats.add_generation(c)
        turn = self._turns.pop((agent, purpose))
        self.contexts[agent].record(turn, c.text if error is None else None)
        return {"turn": turn.text, "fresh": turn.fresh, "shown": turn.shown, "step": step, "agent": agent, "purpose": purpose, "prompt_tokens": c.prompt_tokens,
                "cached_tokens": c.cached_tokens, "completion_tokens": c.completion_tokens,
                "latency_ms": c.queue_ms + c.prompt_ms + c.decode_ms, "seed": req.seed,
                "status": "error" if error else "ok", "error": error, "finish_reason": c.finish_reason,
                "raw_output": c.text}

    def _parsed(self, c: Completion, validate) -> tuple[dict | None, str | None]:
        if c.finish_reason == "error":
            return None, c.error or "the model call failed"
        try:
            return validate(c.text), None
        except ValueError as exc:
            cut = " (the reply was cut at max_tokens)" if c.finish_reason == "length" else ""
            return None, f"unparsable reply{cut}: {str(exc).splitlines()[0][:200]}"

    # -- one step --

    def step(self, step: int) -> dict:
        """Run and commit one step: act (batched), apply in seeded order, perceive, maybe reflect (batched)."""
        t0 = time.perf_counter()
        calls, actions = [], {}
        requests, completions = self._batch(step, "act")
        for name in self.world.names:
            value, error = self._parsed(completions[name], self.act_rules(name)[1])
            calls.append(self._call_row(step, name, "act", requests[name], completions[name], error))
            actions[name] = parse_action(name, value, self.spec.memory.max_chars) if value else Action.waiting(name, f"error: {error}")
        events = self.world.apply(step, actions)
        self.own = {e["agent"]: (step, describe(e)) for e in events}
        new_memories = []
        for event in events:
            text = describe(event)
            for who in self.world.perceivers(event):
                new_memories.append(self.streams[who].add(step, OBSERVATION, text, event["importance"]))
        every = self.spec.memory.reflect_every
        if every and step % every == 0:
            requests, completions = self._batch(step, "reflect")
            for name in self.world.names:
                value, error = self._parsed(completions[name], self.validate_reflect)
                calls.append(self._call_row(step, name, "reflect", requests[name], completions[name], error))
                for insight in (value or {}).get("insights", [])[: self.spec.memory.insights]:
                    insight = " ".join(str(insight).split())[: self.spec.memory.max_chars]
                    if insight:
                        new_memories.append(self.streams[name].add(step, REFLECTION, insight, value["importance"]))
        by_agent = {e["agent"]: e for e in events}
        self.store.commit(step, {"events": frame("events", events), "llm_calls": frame("llm_calls", calls),
                                 "memories": frame("memories", [m.row() for m in new_memories]),
                                 "agents": self._agent_frame(step, by_agent)})
        self.steps_run += 1
        self.publish()
        act = [r for r in calls if r["purpose"] == "act"]
        return {"step": step, "seconds": time.perf_counter() - t0, "calls": len(calls),
                "prompt_tokens": sum(r["prompt_tokens"] for r in calls),
                "evaluated_tokens": sum(r["prompt_tokens"] - r["cached_tokens"] for r in calls),
                "act_evaluated_tokens": sum(r["prompt_tokens"] - r["cached_tokens"] for r in act),
                "completion_tokens": sum(r["completion_tokens"] for r in calls),
                "errors": sum(r["status"] != "ok" for r in calls)}

    def publish(self) -> None:
        """Rewrite the merged tables and the transcript from every committed step."""
        self.store.merge(self.spec.checkpoint_every)
        events = pl.read_parquet(self.out / "events.parquet").to_dicts()
        reflections = (pl.read_parquet(self.out / "memories.parquet").filter(pl.col("kind") == REFLECTION)
                       .unique(["agent", "step", "text"], keep="first", maintain_order=True).to_dicts())
        path = self.out / "transcript.md"
        tmp = path.with_name(".transcript.md.tmp")
        tmp.write_text(transcript(self.spec, events, reflections), encoding="utf-8")
        tmp.replace(path)

    def run(self, progress: bool = True, on_step: Callable[[dict], None] | None = None) -> None:
        """Every step after the last committed one, up to spec.steps (used without Prefect, e.g. by the benchmark)."""
        last = self.open()
        try:
            self.start()
            bar = progress_bar(total=self.spec.steps, initial=min(last, self.spec.steps), unit="step",
                       disable=not progress, dynamic_ncols=True)
            for step in range(last + 1, self.spec.steps + 1):
                result = self.step(step)
                bar.update(1)
                bar.set_postfix_str(self.postfix())
                if on_step:
                    on_step(result)
            bar.close()
        finally:
            self.close()

    def postfix(self) -> str:
        s = self.stats
        return f"{len(self.world.names)} agents, {s.tokens / max(s.wall_s, 1e-9):.0f} tok/s"

    def close(self) -> dict | None:
        """Stop the worker, write this run's usage row, release the folder."""
        row = None
        if self.worker is not None:
            self.worker.end_input()
            self.worker.close()
            self.stats.engine = self.worker.engine_stats
            row = self.stats.row(
                task="simulate", input=str(self.config.spec), spec_hash=self.spec.identity(),
                steps_committed=self.store.last(), steps_run=self.steps_run, agents=len(self.world.names),
                worker_restarts=self.worker.restarts, params=json.dumps(self.spec.model_dump(mode="json")),
                **Prices(self.config.price_input_per_mtok, self.config.price_output_per_mtok).estimate(self.stats))
            append_row(self.out / "usage.parquet", row)
            self.worker = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        return row

    def summary_line(self) -> str:
        s = self.stats
        done = self.store.last()
        if s is None:
            return f"{done} steps committed, nothing to run; results in {self.out}"
        return (f"{done} steps committed ({self.steps_run} run now), {len(self.world.names)} agents, "
                f"{s.calls} calls, {s.prompt_tokens} prompt ({s.cached_tokens} cached) + {s.completion_tokens} "
                f"completion tokens, {s.tokens / max(s.wall_s, 1e-9):.1f} tokens/s, {s.wall_s:.1f} s; results in {self.out}")

    def show_prompt(self) -> str:
        """The first agent's next act prompt, from committed state when OUT holds a run (nothing written)."""
        last = self.store.last()
        if last >= 0:
            self.restore(last)
        else:
            for a in self.spec.agents:
                for text in a.memories:
                    self.streams[a.name].add(0, INITIAL, text, INITIAL_IMPORTANCE)
        step, name = max(last, 0) + 1, self.world.names[0]
        own = self.own[name][1] if self.own.get(name, (None,))[0] == step - 1 else None
        return self.prompts.next_prompt(self.world, self.streams[name], step, "act", self.contexts[name], own,
                                        self.spec.model.n_ctx)[0]
