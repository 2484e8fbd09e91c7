"""flows.simulate on the real default model with a real Prefect server: 2 agents x 3 steps, a kill -9
mid-step and a rerun that also appends a step, reproducibility, a fork with a failing agent and replies
cut at max_tokens, bad specs; plus the prompt's stable prefix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.conftest import REPO, assert_one_line_error

SPEC = REPO / "jobs" / "harbor.yaml"
STEPS = 3  # reflections at step 2 (reflect_every), checkpoints at 0, 2 and 3 (the last), a kill in the last step
AGENTS = 2  # Mara and Tomas at the harbor: each step is one batch of 2 calls
MAX_CHARS = 20  # memory.max_chars: short replies (the grammar's bound on content) keep a step to a few seconds
LONG = 900  # seconds a model run may take on a busy 2-core machine


def _small_spec(path: Path, edit=None) -> Path:
    """The shipped spec cut to AGENTS agents and short replies, so a step takes a few seconds on 2 cores.
    max_tokens is left to its default: the longest reply the grammar allows, so none is cut."""
    data = yaml.safe_load(SPEC.read_text())
    data["agents"] = data["agents"][:AGENTS]
    data["steps"] = STEPS
    data["sampling"].update(temperature=0.8)  # sampled, not greedy
    data["memory"].update(max_chars=MAX_CHARS, reflect_every=2, insights=1)
    data["model"]["n_ctx"] = 1024
    if edit:
        edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# Runs of the real model (a few minutes in all on 2 cores): `-m "not sim_model"` leaves them out.
SIM_MODEL = pytest.mark.sim_model


@pytest.fixture(scope="module")
def spec4(tmp_path_factory) -> Path:
    return _small_spec(tmp_path_factory.mktemp("spec") / "harbor4.yaml")


@pytest.fixture(scope="module")
def run_a(run_flow, spec4, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "a"
    result = run_flow("simulate", str(spec4), "--out", str(out), timeout=LONG)
    assert result.returncode == 0, result.stderr  # every call succeeded
    return out


def _env(prefect_server, cache: Path) -> dict:
    return {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": prefect_server["home"],
            "TOKENMILL_CACHE_DIR": str(cache)}


@pytest.fixture(scope="module")
def run_b(prefect_server, spec4, tmp_path_factory):
    """The same spec and seed again, killed with SIGKILL during step 3 (the last), then the same command
    with --steps 4: it finishes the killed step and appends one more."""
    out = tmp_path_factory.mktemp("sim") / "b"
    cmd = [sys.executable, "-m", "flows.simulate", str(spec4), "--out", str(out), "--no-progress"]
    env = _env(prefect_server, tmp_path_factory.mktemp("cache"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + LONG
    while not (out / "steps" / f"{STEPS - 1:06d}").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"step {STEPS - 1} never committed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # step 3 has just started: its model calls are in flight
    proc.wait(30)
    killed_at = sorted(p.name for p in (out / "steps").iterdir())
    rerun = subprocess.run([*cmd, "--steps", str(STEPS + 1)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=LONG)
    assert rerun.returncode == 0, rerun.stderr
    return out, killed_at


@SIM_MODEL
def test_every_agent_acts_at_every_step_and_every_action_parses(run_a):
    events = pl.read_parquet(run_a / "events.parquet")
    agents = [a["name"] for a in yaml.safe_load(SPEC.read_text())["agents"][:AGENTS]]
    assert sorted(zip(events["step"], events["agent"])) == sorted((s, a) for s in range(1, STEPS + 1) for a in agents)
    assert set(events["action"]) <= {"say", "move", "do", "wait"}
    calls = pl.read_parquet(run_a / "llm_calls.parquet")
    act = calls.filter(pl.col("purpose") == "act")
    assert act.height == AGENTS * STEPS
    assert act["status"].to_list() == ["ok"] * act.height, act.filter(pl.col("status") != "ok")["error"].to_list()
    for raw in act["raw_output"]:
        value = json.loads(raw)
        assert set(value) == {"action", "target", "content", "importance"} and 1 <= value["importance"] <= 10
    # an event is the parsed action, applied: its importance is the reply's
    for e, raw in zip(events.sort("step", "agent").iter_rows(named=True),
                      act.sort("step", "agent")["raw_output"]):
        assert e["importance"] == json.loads(raw)["importance"]
    assert (act["finish_reason"] == "stop").all()  # every reply ended itself, none was cut at max_tokens
    assert (events["content"].str.len_chars() <= MAX_CHARS).all()  # memory.max_chars, kept by the grammar
    reflect = calls.filter(pl.col("purpose") == "reflect")
    assert sorted(set(reflect["step"])) == [2] and reflect.height == AGENTS  # every 2nd step only
    assert (reflect["status"] == "ok").all(), reflect["error"].to_list()
    memories = pl.read_parquet(run_a / "memories.parquet")
    assert set(memories["kind"]) == {"initial", "observation", "reflection"}
    assert memories.filter(pl.col("kind") == "observation").group_by("step").len().height == STEPS
    assert memories.select("agent", "index").is_unique().all()
    assert sorted(set(pl.read_parquet(run_a / "agents.parquet")["step"])) == [0, 2, 3]  # checkpoint_every: 2, and the last
    usage = pl.read_parquet(run_a / "usage.parquet")
    assert usage.height == 1 and usage["steps_committed"][0] == STEPS and usage["calls"][0] == calls.height
    text = (run_a / "transcript.md").read_text()
    assert "## Step 1:" in text and f"## Step {STEPS}:" in text and "Reflections:" in text


@SIM_MODEL
def test_the_stable_prefix_stays_in_the_engine_cache_across_steps(run_a):
    calls = pl.read_parquet(run_a / "llm_calls.parquet").filter(pl.col("purpose") == "act")
    later = calls.filter(pl.col("step") >= 2)
    # rules, scenario, places and people (~280 tokens) are shared by every call of the run
    assert (later["cached_tokens"] >= 200).all(), later.select("step", "agent", "cached_tokens")
    per_step = later.group_by("step").agg((pl.col("prompt_tokens") - pl.col("cached_tokens")).sum().alias("evaluated"))
    assert per_step["evaluated"].max() < later.group_by("step").agg(pl.col("prompt_tokens").sum())["prompt_tokens"].min()
    # each agent's prompt is its chat: a call that adds a turn continues from all its previous call held
    # (prompt and reply) and evaluates only the new turn
    every = pl.read_parquet(run_a / "llm_calls.parquet").sort("step", pl.col("purpose") != "act")
    for agent in every["agent"].unique():
        rows = every.filter(pl.col("agent") == agent).to_dicts()
        for before, row in zip(rows, rows[1:]):
            if not row["fresh"]:
                assert row["cached_tokens"] >= before["prompt_tokens"] - 1, (before, row)
                assert row["prompt_tokens"] - row["cached_tokens"] < 250, row


@SIM_MODEL
def test_prefect_recorded_a_task_run_per_step(run_a, prefect_server):
    request = urllib.request.Request(f"{prefect_server['url']}/task_runs/filter", method="POST",
                                     data=json.dumps({"limit": 200}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        names = {run["name"] for run in json.load(response)}
    assert {f"step-{s}" for s in range(1, STEPS + 1)} <= names


@SIM_MODEL
def test_kill_during_step_3_then_rerun_commits_each_step_exactly_once_and_more_steps_extend_it(run_b):
    out, killed_at = run_b
    assert killed_at == ["000000", "000001", "000002"]  # the kill landed in step 3
    events = pl.read_parquet(out / "events.parquet")
    assert events.group_by("step").len().sort("step")["len"].to_list() == [AGENTS] * (STEPS + 1)
    assert events.select("step", "agent").is_unique().all()
    calls = pl.read_parquet(out / "llm_calls.parquet")
    assert calls.select("step", "agent", "purpose").is_unique().all()
    # an act call per agent and step, and reflections at steps 2 and 4 (reflect_every: 2)
    assert sorted(set(calls["step"])) == list(range(1, STEPS + 2)) and calls.height == AGENTS * (STEPS + 1) + 2 * AGENTS
    assert sorted(set(calls.filter(pl.col("purpose") == "reflect")["step"])) == [2, 4]
    memories = pl.read_parquet(out / "memories.parquet")
    assert memories.select("agent", "index").is_unique().all()
    assert sorted(set(memories["step"])) == list(range(0, STEPS + 2))
    # only the rerun finished; it ran step 3 (from step 2's committed rows, its reflections among them) and step 4
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage.height == 1 and usage["steps_run"][0] == 2 and usage["steps_committed"][0] == STEPS + 1


@SIM_MODEL
def test_same_spec_and_seed_give_identical_events(run_a, run_b):
    """Sampled at temperature 0.8, with run B killed and resumed in a fresh model worker (and then
    run one step further, which changes nothing before it)."""
    upto = pl.col("step") <= STEPS
    a = pl.read_parquet(run_a / "events.parquet")
    b = pl.read_parquet(run_b[0] / "events.parquet")
    assert a.height == AGENTS * STEPS and a.equals(b.filter(upto))
    assert pl.read_parquet(run_a / "memories.parquet").equals(pl.read_parquet(run_b[0] / "memories.parquet").filter(upto))


@SIM_MODEL
def test_fork_from_2_keeps_steps_1_to_2_and_generates_the_rest_anew(run_a, run_flow, tmp_path):
    """The what-if spec edits Mara's persona and gives Tomas a persona too long for the context, and
    the fork runs with --max-tokens 8: from step 3 on Mara's prompts carry her new persona and her
    replies are cut at max_tokens, Tomas's calls fail on the context; both wait, with the reason."""
    def edit(data):
        data["agents"][0]["persona"] = "the harbor master, who secretly took the crates herself and now fears that Pim saw her on the dock at night"
        data["agents"][1]["persona"] = "a fisherman. " + "He talks about fish all day long. " * 200
    spec = _small_spec(tmp_path / "whatif.yaml", edit)
    out = tmp_path / "fork"
    result = run_flow("simulate", str(spec), "--fork-from", "2", "--from", str(run_a), "--out", str(out),
                      "--max-tokens", "8", timeout=LONG)
    assert result.returncode == 3, result.stderr  # finished, with failed calls
    assert "Traceback" not in result.stderr
    original, fork = pl.read_parquet(run_a / "events.parquet"), pl.read_parquet(out / "events.parquet")
    assert fork.filter(pl.col("step") <= 2).equals(original.filter(pl.col("step") <= 2))
    assert fork.group_by("step").len().sort("step")["len"].to_list() == [AGENTS] * STEPS
    new = fork.filter(pl.col("step") >= 3).sort("step")
    tomas, mara_events = (new.filter(pl.col("agent") == name) for name in ("Tomas", "Mara"))
    assert tomas["action"].to_list() == ["wait"] * (STEPS - 2) and all("--n-ctx" in n for n in tomas["note"])
    assert mara_events["action"].to_list() == ["wait"] * (STEPS - 2)
    assert all(n.startswith("error: ") and "cut at max_tokens" in n for n in mara_events["note"])
    calls = pl.read_parquet(out / "llm_calls.parquet")
    failed = calls.filter(pl.col("status") == "error")
    assert set(failed["agent"]) == {"Tomas", "Mara"} and sorted(set(failed["step"])) == list(range(3, STEPS + 1))
    mara = lambda df: df.filter((pl.col("agent") == "Mara") & (pl.col("step") >= 3) & (pl.col("purpose") == "act"))
    cut = mara(calls)
    assert (cut["finish_reason"] == "length").all() and (cut["completion_tokens"] == 8).all()
    assert all("cut at max_tokens" in e for e in cut["error"])
    assert cut["prompt_tokens"].to_list() != mara(pl.read_parquet(run_a / "llm_calls.parquet"))["prompt_tokens"].to_list()
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage["steps_run"].to_list() == [STEPS - 2]
    info = json.loads((out / "run.json").read_text())
    assert info["fork_step"] == 2 and info["forked_from"] == str(run_a)


@pytest.fixture
def simulate_here(run_cli_here, monkeypatch):
    """`python -m flows.simulate ARGS` in this process, for commands refused before any step (no
    interpreter of their own); one that gets as far as the simulation flow fails the test."""
    import flows.simulate
    from tests.conftest import _NotRefused

    def not_refused(*args, **kwargs):
        raise _NotRefused("the command was not refused: the simulation flow started")

    monkeypatch.setattr(flows.simulate, "simulate_flow", not_refused)
    return lambda *args: run_cli_here("simulate", *args)


def _bad(data, path):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("edit, needles", [
    (lambda d: d.update(weather="rain"), ["unknown key 'weather'"]),
    (lambda d: d["agents"][1].update(mood="grim"), ["unknown key 'agents[1].mood'"]),
    (lambda d: d["agents"][2].update(location="moon"), ["'agents[2].location'", "'moon'", "harbor"]),
    (lambda d: d.update(agents=[]), ["'agents'", "at least one agent"]),
    (lambda d: d["agents"][3].update(name="Mara"), ["'agents[3].name'", "'Mara'"]),
    (lambda d: d["memory"].update(recent="many"), ["'memory.recent'"]),
])
def test_a_bad_spec_fails_on_one_line_naming_file_and_key_before_any_model_loads(simulate_here, tmp_path, edit, needles):
    data = yaml.safe_load(SPEC.read_text())
    edit(data)
    path = _bad(data, tmp_path / "bad.yaml")
    out = tmp_path / "out"
    result = simulate_here(str(path), "--out", str(out), "--model", str(tmp_path / "absent.gguf"))
    line = assert_one_line_error(result, str(path), *needles)  # the spec is refused before the model is looked for
    assert line.startswith("python -m flows.simulate: error: spec ")
    assert not out.exists()


def test_the_shipped_spec_and_template_keep_the_stable_part_first():
    from tokenmill.models.resolve import resolve_model
    from tokenmill.sim.run import SimConfig, Simulation

    sim = Simulation(SimConfig(spec=str(SPEC), out="/nonexistent/never-written"))
    assert len(sim.spec.agents) >= 4 and len(sim.spec.locations) >= 3
    for a in sim.spec.agents:
        sim.streams[a.name].add(0, "initial", a.memories[0], 5)
    mara, tomas = sim.spec.agents[0].name, sim.spec.agents[1].name
    early = sim.prompts.for_agent(sim.world, sim.streams[mara], 1, "act")
    sim.world.where[mara] = "tavern"
    for i in range(30):
        sim.streams[mara].add(i + 1, "observation", f"event number {i} at the tavern", 3)
    late = sim.prompts.for_agent(sim.world, sim.streams[mara], 25, "act")
    reflect = sim.prompts.for_agent(sim.world, sim.streams[mara], 25, "reflect")
    other = sim.prompts.for_agent(sim.world, sim.streams[tomas], 1, "act")
    tok = sim.info.tokenize
    stable = len(os.path.commonprefix([tok(early), tok(late), tok(reflect)]))
    shared = len(os.path.commonprefix([tok(early), tok(other)]))
    persona_end = len(tok(early[: early.index(sim.spec.agents[0].persona) + len(sim.spec.agents[0].persona)]))
    assert stable >= persona_end - 1  # everything up to the persona is the same at step 1 and 25
    assert shared > 200  # rules, scenario, places and people are shared by all agents
    assert abs(len(tok(late)) - len(tok(early))) < 0.5 * len(tok(early))  # memories are bounded, not the whole log
    assert resolve_model(None) == sim.model_path
    assert not Path("/nonexistent/never-written").exists()


def test_each_agents_prompt_is_its_previous_prompt_and_reply_plus_one_turn_and_restarts_when_full():
    """No model run: the chats (tokenmill/sim/context.py) built step by step with stand-in replies."""
    from tokenmill.sim.context import restore_contexts
    from tokenmill.sim.run import SimConfig, Simulation
    from tokenmill.sim.world import Action, describe

    sim = Simulation(SimConfig(spec=str(SPEC), out="/nonexistent/never-written", n_ctx=1024))
    for a in sim.spec.agents:
        for text in a.memories:
            sim.streams[a.name].add(0, "initial", text, 5)
    names, rows, last, grew, fresh_later = sim.world.names, [], {}, [], []
    for step in range(1, 9):
        actions = {}
        for name in names:
            own = sim.own.get(name, (None, None))
            prompt, turn = sim.prompts.next_prompt(sim.world, sim.streams[name], step, "act", sim.contexts[name],
                                                   own[1] if own[0] == step - 1 else None, 1024)
            assert sim.info.count_tokens(prompt) + sim.max_tokens["act"] <= 1024
            reply = json.dumps({"action": "do", "target": "none", "content": f"{name} works hard at step {step}",
                                "importance": 4})
            if step > 1 and not turn.fresh:
                assert prompt.startswith(last[name])  # the chat only grows: the previous prompt and its reply come first
                assert f"{name} did:" not in turn.text  # its own action is its reply, not news
                grew.append(sim.info.count_tokens(prompt) - sim.info.count_tokens(last[name]))
            elif step > 1:
                fresh_later.append((step, name))
                assert prompt.startswith(sim.prompts.render([{"role": "user", "content": sim.prompts.head(name)}])[:200])
            rows.append({"step": step, "agent": name, "purpose": "act", "status": "ok", "raw_output": reply,
                         "turn": turn.text, "fresh": turn.fresh, "shown": turn.shown})
            sim.contexts[name].record(turn, reply)
            last[name] = prompt + reply
            actions[name] = Action(name, "do", None, f"{name} works hard at step {step}", 4)
        events = sim.world.apply(step, actions)
        sim.own = {e["agent"]: (step, describe(e)) for e in events}
        for event in events:
            for who in sim.world.perceivers(event):
                sim.streams[who].add(step, "observation", describe(event), event["importance"])
    # each later turn adds a bounded number of tokens (time, the others' actions, the request), not the persona
    assert max(grew) < 200, grew
    assert fresh_later, "at --n-ctx 1024 every chat fills within 8 steps and starts again"
    # a resumed run rebuilds the very same chats from the committed rows
    again = restore_contexts(names, rows)
    for name in names:
        assert again[name].messages(sim.prompts.head(name)) == sim.contexts[name].messages(sim.prompts.head(name))


@SIM_MODEL
def test_rerunning_a_finished_run_adds_nothing(run_a, run_flow, simulate_here, spec4):
    """(Appending steps to a run is the rerun of run B, with --steps 4.)"""
    before = pl.read_parquet(run_a / "events.parquet")
    usage = pl.read_parquet(run_a / "usage.parquet")
    again = run_flow("simulate", str(spec4), "--out", str(run_a))
    assert again.returncode == 0, again.stderr  # nothing ran, so nothing failed
    assert "nothing to run" in again.stderr
    assert pl.read_parquet(run_a / "events.parquet").equals(before)
    assert pl.read_parquet(run_a / "usage.parquet").equals(usage)
    other = simulate_here(str(spec4), "--out", str(run_a), "--seed", "99")
    assert_one_line_error(other, str(run_a), "--fork-from")
