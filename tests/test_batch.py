"""flows.batch: an OpenAI Batch API request file answered by the real default model, in OpenAI's
batch output format (checked with the official `openai` package's own types), resumable after
kill -9; bad request files refused on one line naming the line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jsonschema
import polars as pl
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.conftest import REPO

REQUESTS = REPO / "data" / "batch_requests.jsonl"
BAD = {"bad-tools": "tools", "bad-image": "messages[0].content[1]"}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def requests() -> list[dict]:
    return _lines(REQUESTS)


@pytest.fixture(scope="module")
def batch_run(run_flow, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "out"
    started = time.monotonic()
    result = run_flow("batch", str(REQUESTS), "--out", str(out), "--no-cache")
    wall = time.monotonic() - started
    usage = pl.read_parquet(out / "usage.parquet") if (out / "usage.parquet").exists() else None
    if usage is not None:
        rows = usage["rows_total"][-1]
        print(f"\nflows.batch on {REQUESTS.name}: {rows} requests in {wall:.1f} s as a command "
              f"({rows / wall:.2f} rows/s), {usage['wall_s'][-1]:.1f} s generating "
              f"({rows / usage['wall_s'][-1]:.2f} rows/s)")
    return result, out


def test_every_answer_parses_with_openais_own_types_in_input_order(batch_run, requests):
    result, out = batch_run
    assert result.returncode == 3, result.stderr  # finished, with the two bad requests failed
    answered = _lines(out / "output.jsonl")
    by_id = {r["custom_id"]: r for r in requests}
    local_model = pl.read_parquet(out / "results.parquet")["model"].drop_nulls().unique().to_list()
    assert len(local_model) == 1
    assert [a["custom_id"] for a in answered] == [r["custom_id"] for r in requests if r["custom_id"] not in BAD]
    kinds = set()
    for line in answered:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        chat = by_id[line["custom_id"]]["url"] == "/v1/chat/completions"
        body = (ChatCompletion if chat else Completion).model_validate(response["body"])
        kinds.add(body.object)
        choice = body.choices[0]
        text = choice.message.content if chat else choice.text
        assert isinstance(text, str) and text, line
        assert choice.finish_reason in ("stop", "length")
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
        limit = by_id[line["custom_id"]]["body"].get("max_tokens") or by_id[line["custom_id"]]["body"].get(
            "max_completion_tokens")
        assert 0 < body.usage.completion_tokens <= limit
        assert body.model == local_model[0] != by_id[line["custom_id"]]["body"]["model"]  # what ran, not the body's
    assert kinds == {"chat.completion", "text_completion"}


def test_json_schema_replies_validate_against_their_schemas(batch_run, requests):
    _, out = batch_run
    answered = {a["custom_id"]: a["response"]["body"] for a in _lines(out / "output.jsonl")}
    strict = [r for r in requests if r["body"].get("response_format", {}).get("type") == "json_schema"]
    assert len(strict) == 2
    for request in strict:
        body = answered[request["custom_id"]]
        assert body["choices"][0]["finish_reason"] == "stop", body
        value = json.loads(body["choices"][0]["message"]["content"])
        jsonschema.validate(value, request["body"]["response_format"]["json_schema"]["schema"])
    obj = answered["json-object"]["choices"][0]
    if obj["finish_reason"] == "stop":  # json_object: any object; only a reply cut at max_tokens may be partial
        assert isinstance(json.loads(obj["message"]["content"]), dict)


def test_unsupported_fields_fail_alone_naming_the_field(batch_run):
    result, out = batch_run
    failed = _lines(out / "errors.jsonl")
    assert [f["custom_id"] for f in failed] == list(BAD)
    for line in failed:
        response = line["response"]
        assert response["status_code"] == 400
        error = response["body"]["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_parameter"
        assert error["param"] == BAD[line["custom_id"]] and BAD[line["custom_id"]] in error["message"]
    assert "errors.jsonl: 2 failed" in result.stderr.strip().splitlines()[-1]


def test_stop_sequences_cut_the_reply(batch_run):
    _, out = batch_run
    answered = {a["custom_id"]: a["response"]["body"]["choices"][0] for a in _lines(out / "output.jsonl")}
    count = answered["stop-count"]
    assert count["finish_reason"] == "stop" and " 9" not in count["text"] and "\n" not in count["text"], count
    assert count["text"].startswith("7")  # the model counts on, and stops before " 9"
    days = answered["stop-chat"]
    assert days["finish_reason"] == "stop" and "Wednesday" not in days["message"]["content"], days
    assert "Tuesday" in days["message"]["content"]  # it was listing the days when the stop string came


def test_results_usage_and_requests_tables(batch_run, requests):
    _, out = batch_run
    results = pl.read_parquet(out / "results.parquet")
    assert results["id"].to_list() == [r["custom_id"] for r in requests]
    assert results.filter(pl.col("status") == "error")["id"].to_list() == list(BAD)
    assert set(results.filter(pl.col("status") == "ok")["produced"]) == {"generated"}
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage["task"][-1] == "batch" and usage["rows_total"][-1] == 20 and usage["rows_error"][-1] == 2
    assert usage["completion_tokens"][-1] == results["completion_tokens"].sum()
    recorded = pl.read_parquet(out / "requests.parquet")
    assert recorded["model"][0] == "gpt-4o-mini" and recorded["line"].to_list() == list(range(1, 21))


def test_a_rerun_generates_nothing_and_writes_the_same_answers(batch_run, run_flow):
    first, out = batch_run
    before = _lines(out / "output.jsonl")
    again = run_flow("batch", str(REQUESTS), "--out", str(out), "--no-cache")
    assert again.returncode == 3, again.stderr
    assert "nothing to generate" in again.stderr
    after = _lines(out / "output.jsonl")
    strip = lambda lines: [(x["custom_id"], x["id"], x["response"]["body"]["choices"]) for x in lines]  # noqa: E731
    assert strip(after) == strip(before)
    assert pl.read_parquet(out / "usage.parquet")["rows_generated"][-1] == 0


# --- kill -9 mid-run, then the same command -----------------------------------------------------

TOPICS = ["rivers", "mountains", "bicycles", "libraries", "volcanoes", "bees", "trains", "forests", "bridges",
          "deserts", "owls", "lighthouses"]


def test_kill_9_mid_run_then_the_same_command_answers_every_request_once(prefect_server, batch_run, requests,
                                                                        tmp_path):
    path = tmp_path / "long.jsonl"
    lines = [{"custom_id": f"topic-{i:02d}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "max_tokens": 40,
                       "messages": [{"role": "user", "content": f"Write two sentences about {topic}."}]}}
             for i, topic in enumerate(TOPICS)]
    seeded = next(r for r in requests if r["custom_id"] == "seed-1")
    lines.append(seeded)  # the same seeded request as in the 20-request run: the same reply
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": prefect_server["home"]}
    cmd = [sys.executable, "-m", "flows.batch", str(path), "--out", str(out), "--no-cache", "--no-progress",
           "--n-seq", "4", "--chunk-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    parts = lambda: sorted((out / "parts").glob("*.parquet")) if (out / "parts").is_dir() else []  # noqa: E731
    deadline = time.monotonic() + 300
    while len(parts()) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no rows were written"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its model worker, mid-generation
    proc.wait(30)
    kept = pl.concat([pl.read_parquet(p) for p in parts()])["row"].n_unique()
    assert 3 <= kept < len(lines) and not (out / "output.jsonl").exists()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    answered = _lines(out / "output.jsonl")
    assert [a["custom_id"] for a in answered] == [line["custom_id"] for line in lines]  # each once, in order
    assert _lines(out / "errors.jsonl") == []
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage["rows_generated"][-1] <= len(lines) - kept and usage["rows_resumed"][-1] >= kept
    # a seed makes a sampled reply reproducible, whatever else is decoded with it
    first = {a["custom_id"]: a for a in _lines(batch_run[1] / "output.jsonl")}["seed-1"]
    assert answered[-1]["response"]["body"]["choices"] == first["response"]["body"]["choices"]


# --- request files refused before any row, in this process ---------------------------------------

GOOD = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}}


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("lines, needles", [
    ([json.dumps(GOOD), json.dumps({**GOOD, "custom_id": "b"}), '{"custom_id": "c", "body": {'],
     ["line 3", "not valid JSON"]),
    ([json.dumps(GOOD), json.dumps({k: v for k, v in GOOD.items() if k != "custom_id"})],
     ["line 2", "missing custom_id"]),
    ([json.dumps(GOOD), json.dumps({**GOOD, "custom_id": "b"}), "", json.dumps(GOOD)],
     ["line 4", "custom_id 'a' is already used on line 1"]),
    ([json.dumps({**GOOD, "body": None})], ["line 1", "missing body"]),
    (["[1, 2]"], ["line 1", "must be a JSON object"]),
])
def test_a_bad_request_file_is_refused_on_one_line_naming_the_line(run_cli_here, tmp_path, lines, needles):
    path = _write(tmp_path, lines)
    out = tmp_path / "out"
    result = run_cli_here("batch", str(path), "--out", str(out))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("python -m flows.batch: error: ") and str(path) in line
    for needle in needles:
        assert needle in line, line
    assert not out.exists()  # refused before any row: no output folder


def test_check_lists_every_problem_with_its_line_without_a_model(run_cli_here, tmp_path):
    path = _write(tmp_path, [
        json.dumps(GOOD),
        "not json",
        json.dumps({**GOOD, "custom_id": "b", "body": {**GOOD["body"], "logprobs": True}}),
        json.dumps(GOOD),
        json.dumps({**GOOD, "custom_id": "c", "url": "/v1/embeddings"}),
        json.dumps({**GOOD, "custom_id": "d", "body": {**GOOD["body"], "n": 2, "temperature": 0.5}}),
        json.dumps({**GOOD, "custom_id": "e", "body": {**GOOD["body"], "frobnicate": 1}}),
    ])
    result = run_cli_here("batch", str(path), "--check", "--model", str(tmp_path / "no-such-model.gguf"))
    assert result.returncode == 1  # line 2 and line 4 refuse the file
    found = result.stdout.strip().splitlines()
    assert [line.split(":")[1] for line in found] == ["2", "3", "4", "5", "6", "7"], found
    assert "not valid JSON" in found[0] and "refuses the file" in found[0]
    assert "logprobs=true" in found[1] and "fails alone" in found[1]
    assert "already used on line 1" in found[2]
    assert "/v1/embeddings" in found[3] and "'n=2" not in found[4] and "n=2" in found[4]
    assert "unrecognized request argument supplied: frobnicate" in found[5]
    clean = _write(tmp_path, [json.dumps(GOOD)])
    assert run_cli_here("batch", str(clean), "--check").returncode == 0


@pytest.mark.parametrize("body, param", [
    ({"n": 3}, "n"), ({"logprobs": True}, "logprobs"), ({"stream": True}, "stream"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}}}},
     "response_format.json_schema.schema"),
    ({"temperature": 3}, "temperature"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_each_unsupported_or_invalid_field_is_named(body, param):
    from tokenmill.tasks.batch_requests import _Refused, normalize_body

    with pytest.raises(_Refused) as refused:
        normalize_body("/v1/chat/completions", {**GOOD["body"], **body})
    assert refused.value.param == param


def test_a_request_too_long_for_the_context_fails_alone(tmp_path):
    """On the zero-cost echo backend, in this process (orchestration only): the request that cannot
    fit --n-ctx gets OpenAI's context_length_exceeded 400; the other is answered."""
    from tokenmill.tasks.batch import prepare_batch
    from tokenmill.tasks.runner import JobConfig

    path = _write(tmp_path, [json.dumps(GOOD), json.dumps({**GOOD, "custom_id": "long", "body": {
        **GOOD["body"], "max_tokens": 500, "messages": [{"role": "user", "content": "word " * 400}]}})])
    config = dict(input=str(path), out=str(tmp_path / "out"), backend="echo", cache=False, n_ctx=512, max_tokens=8,
                  column="request", id_column="custom_id")
    stats = prepare_batch(JobConfig(**config)).run(progress=False)
    assert stats.rows_error == 1
    first = _lines(tmp_path / "out" / "errors.jsonl")
    again = prepare_batch(JobConfig(**config))
    assert not again.has_pending_rows()
    again.run(progress=False)  # a rerun of a finished job reads no row: the refusal is found again
    assert _lines(tmp_path / "out" / "errors.jsonl") == first
    assert [a["custom_id"] for a in _lines(tmp_path / "out" / "output.jsonl")] == ["a"]
    (failed,) = _lines(tmp_path / "out" / "errors.jsonl")
    error = failed["response"]["body"]["error"]
    assert failed["custom_id"] == "long" and error["code"] == "context_length_exceeded"
    assert "--n-ctx" in error["message"]


def test_a_job_spec_runs_a_request_file(tmp_path):
    """`task: batch` in a job spec stands for the flows.batch command line, checked like it."""
    from flows._specs import check
    from tokenmill.jobspec import load_job_spec

    spec_path = tmp_path / "batch.yaml"
    spec_path.write_text(f"task: batch\ninput: {REQUESTS}\nmax_tokens: 8\nout: runs/b\n")
    spec = load_job_spec(spec_path)
    assert spec.command_line().startswith(f"python -m flows.batch {REQUESTS}") and "--max-tokens 8" in spec.command_line()
    check(spec)  # options, request file, model and chat template, without writing anything
    assert not (tmp_path / "runs").exists()
    broken = _write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD)])
    spec_path.write_text(f"task: batch\ninput: {broken}\n")
    with pytest.raises(Exception, match="line 2: custom_id 'a' is already used on line 1"):
        check(load_job_spec(spec_path))
