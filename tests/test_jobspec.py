"""Job specs: validation errors name the file and the key; a spec maps to exactly its command line.

In-process and fast: no model runs, no Prefect server (flows.deploy --check stops before one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows import deploy as deploy_cli
from flows import extract as extract_cli
from flows import run as run_cli
from flows import summarize as summarize_cli
from flows._specs import check, job_config
from tests.conftest import REPO
from tokenmill.jobspec import JobSpecError, is_job_spec, load_job_spec
from tokenmill.schema import load_schema

ARTICLES = REPO / "data" / "articles.csv"


def write(folder: Path, name: str, data: dict | str) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(JobSpecError) as info:
        load_job_spec(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the mapping: a spec is its command line ------------------------------------------------------


def test_a_spec_gives_the_same_job_config_as_the_command_line(tmp_path):
    spec_file = write(tmp_path, "j.yaml", {
        "task": "summarize", "input": str(ARTICLES), "id_column": "id", "max_tokens": 8, "temperature": 0.5,
        "limit": 3, "strip": False, "no_cache": True, "retry_errors": False, "split_long": False, "threads": 1,
        "backend": "llama-simple", "max_words": 12, "out": "o"})
    from_spec = job_config(load_job_spec(spec_file))
    typed = summarize_cli.parser().parse_args([
        str(ARTICLES), "--id-column", "id", "--max-tokens", "8", "--temperature", "0.5", "--limit", "3", "--no-strip",
        "--no-cache", "--no-retry-errors", "--no-split-long", "--threads", "1", "--backend", "llama-simple",
        "--max-words", "12", "--out", str(tmp_path / "o")])
    assert from_spec == summarize_cli.job_config(typed)
    assert (from_spec.strip, from_spec.cache, from_spec.retry_errors, from_spec.split_long) == (False, False, False, False)


def test_keys_left_out_take_the_command_line_defaults(tmp_path):
    spec_file = write(tmp_path, "j.yaml", {"task": "extract", "input": str(ARTICLES), "schema": "s.json"})
    (tmp_path / "s.json").write_text('{"type": "object", "properties": {"a": {"type": "string"}}}')
    from_spec = job_config(load_job_spec(spec_file))
    typed = extract_cli.parser().parse_args([str(ARTICLES), "--schema", str(tmp_path / "s.json")])
    assert from_spec == extract_cli.job_config(typed)
    assert from_spec.max_tokens == 192  # extract's own default, not summarize's 256


def test_relative_paths_are_relative_to_the_spec_file_and_set_paths_to_the_current_folder(tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    folder.mkdir()
    spec_file = write(folder, "j.yaml", {"task": "summarize", "input": "../data/*.csv", "out": "../runs/x",
                                         "prompt": "default", "model": "ollama:llama3.2:1b"})
    spec = load_job_spec(spec_file)
    assert spec.options["input"] == str(tmp_path / "data" / "*.csv")
    assert spec.options["out"] == str(tmp_path / "runs" / "x")
    assert spec.options["prompt"] == "default" and spec.options["model"] == "ollama:llama3.2:1b"  # names, not paths
    monkeypatch.chdir(tmp_path)
    spec = load_job_spec(spec_file, ["out=elsewhere", "limit=2"])
    assert spec.options["out"] == str(tmp_path / "elsewhere")
    assert spec.argv()[spec.argv().index("--limit") + 1] == "2"


def test_an_inline_schema_makes_the_spec_file_the_schema(tmp_path):
    spec = load_job_spec(REPO / "jobs" / "restaurants.yaml")
    args = spec.namespace()
    assert args.schema == str(REPO / "jobs" / "restaurants.yaml")
    schema, _ = load_schema(args.schema)
    assert "eatType" in schema["properties"]
    assert args.column == "ref" and args.limit == 50


def test_print_command_shows_the_equivalent_command(capsys):
    assert run_cli.main(run_cli.parser().parse_args([str(REPO / "jobs" / "articles-nightly.yaml"),
                                                     "--print-command", "--set", "limit=2"])) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("python -m flows.summarize ") and "--limit 2" in line and "--max-tokens 64" in line
    assert "--id-column id" in line and str(REPO / "data" / "*.csv") in line


# --- the shipped specs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["articles-nightly", "articles-topics", "harbor-weekly", "restaurants"])
def test_shipped_job_specs_are_valid(name):
    spec = load_job_spec(REPO / "jobs" / f"{name}.yaml")
    assert spec.name == name
    job_config(spec)  # the command's own config and checks (simulate: the simulation spec too)


@pytest.mark.parametrize("name", ["articles-nightly", "articles-topics"])
def test_shipped_specs_on_the_repo_data_pass_every_check_before_generation(name):
    """Model file, templates, input and first row: what the command checks before any model work."""
    assert check(load_job_spec(REPO / "jobs" / f"{name}.yaml")) is None


def test_a_simulation_spec_is_not_a_job_spec():
    assert not is_job_spec(REPO / "jobs" / "harbor.yaml")
    assert is_job_spec(REPO / "jobs" / "harbor-weekly.yaml")


# --- errors name the file and the key -------------------------------------------------------------


def test_unknown_key_is_refused_naming_file_and_key(tmp_path):
    path = write(tmp_path, "j.yaml", {"task": "summarize", "input": "a.csv", "max_token": 8})
    message = error_of(path)
    assert str(path) in message and "unknown key 'max_token'; did you mean 'max_tokens'?" in message
    path = write(tmp_path, "k.yaml", {"task": "summarize", "input": "a.csv",
                                      "schedule": {"cron": "0 2 * * *", "timzone": "UTC"}})
    message = error_of(path)
    assert "unknown key 'schedule.timzone'; did you mean 'timezone'? (a schedule takes: cron, interval" in message


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, "j.yaml", {"task": "summarize", "input": "a.csv", "max_tokens": "lots"})
    message = error_of(path)
    assert str(path) in message and "key 'max_tokens'" in message


def test_a_choice_outside_the_options_names_the_key(tmp_path):
    path = write(tmp_path, "j.yaml", {"task": "summarize", "input": "a.csv", "backend": "vllm"})
    assert "key 'backend'" in error_of(path)


def test_missing_task_input_and_schema_are_named(tmp_path):
    assert "key 'task' is required" in error_of(write(tmp_path, "a.yaml", {"input": "a.csv"}))
    assert "key 'task': 'sumarize' is not a task" in error_of(write(tmp_path, "b.yaml", {"task": "sumarize"}))
    assert "key 'input' is required" in error_of(write(tmp_path, "c.yaml", {"task": "summarize"}))
    assert "key 'schema' is required" in error_of(write(tmp_path, "d.yaml", {"task": "extract", "input": "a.csv"}))


def test_an_option_of_another_task_is_unknown(tmp_path):
    path = write(tmp_path, "j.yaml", {"task": "summarize", "input": "a.csv", "schema": "s.json"})
    assert "unknown key 'schema'" in error_of(path)


@pytest.mark.parametrize("schedule, key", [
    ({"cron": "0 2 * *"}, "schedule.cron"),
    ({"cron": "0 25 * * *"}, "schedule.cron"),
    ({"cron": "0 2 * * *", "timezone": "Mars/Olympus"}, "schedule.timezone"),
    ({"cron": "0 2 * * *", "interval": 60}, "schedule"),
    ({}, "schedule"),
    ({"cron": "0 2 * * *", "every": "day"}, "schedule.every"),
    ({"interval": 0}, "schedule.interval"),
])
def test_bad_schedules_name_the_key(tmp_path, schedule, key):
    path = write(tmp_path, "j.yaml", {"task": "summarize", "input": "a.csv", "schedule": schedule})
    message = error_of(path)
    assert f"'{key}'" in message, message


def test_good_schedules(tmp_path):
    path = write(tmp_path, "j.yaml", {"task": "summarize", "input": "a.csv",
                                      "schedule": {"cron": "30 6 * * mon-fri", "timezone": "Europe/Berlin"}})
    assert load_job_spec(path).schedule.timezone == "Europe/Berlin"
    path = write(tmp_path, "k.yaml", {"task": "summarize", "input": "a.csv", "schedule": {"interval": "P1D"}})
    assert load_job_spec(path).schedule.interval.total_seconds() == 86400


def test_set_errors_name_the_override(tmp_path):
    path = write(tmp_path, "j.yaml", {"task": "summarize", "input": "a.csv"})
    message = error_of(path, "max_token=3")
    assert "--set max_token=3" in message and "unknown key 'max_token'" in message
    assert "KEY=VALUE" in error_of(path, "limit")
    assert "inline schema" in error_of(REPO / "jobs" / "restaurants.yaml", "schema.type=array")


def test_values_the_command_refuses_name_the_key(tmp_path):
    path = write(tmp_path, "j.yaml", {"task": "summarize", "input": str(ARTICLES), "max_tokens": 5000})
    with pytest.raises(JobSpecError) as info:
        check(load_job_spec(path))
    assert str(path) in str(info.value) and "key 'max_tokens'" in str(info.value) and "--n-ctx" in str(info.value)


def test_a_bad_simulation_spec_behind_a_job_spec_is_named(tmp_path):
    sim = write(tmp_path, "sim.yaml", {"scenario": "x", "locations": [{"name": "a"}],
                                       "agents": [{"name": "b", "location": "nowhere"}]})
    path = write(tmp_path, "j.yaml", {"task": "simulate", "input": sim.name})
    with pytest.raises(JobSpecError) as info:
        check(load_job_spec(path))
    assert str(path) in str(info.value) and "agents[0].location" in str(info.value)


def test_yaml_tags_are_not_executed(tmp_path):
    path = write(tmp_path, "j.yaml", "task: !!python/object/apply:os.system ['echo pwned']\ninput: a.csv\n")
    assert "cannot read job spec" in error_of(path)


def test_a_list_is_not_a_spec(tmp_path):
    assert "top level must be a mapping" in error_of(write(tmp_path, "j.yaml", "- task: summarize\n"))


# --- flows.deploy --check: every spec is checked before anything is served --------------------------


def test_deploy_check_lists_the_scheduled_jobs_and_skips_others(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert deploy_cli.main(deploy_cli.parser().parse_args(["--check"])) == 0
    err = capsys.readouterr().err
    assert "summarize/articles-nightly: cron '0 2 * * *' (Europe/Berlin)" in err
    assert "extract/articles-topics" in err and "simulate/harbor-weekly" in err
    assert "jobs/harbor.yaml: no `task` key" in err  # the simulation spec itself
    assert "jobs/restaurants.yaml: no schedule" in err


def test_deploy_refuses_two_jobs_with_one_name(tmp_path):
    a = write(tmp_path, "a.yaml", {"task": "summarize", "input": str(ARTICLES), "name": "same",
                                   "schedule": {"interval": 60}})
    b = write(tmp_path, "b.yaml", {"task": "summarize", "input": str(ARTICLES), "name": "same",
                                   "schedule": {"interval": 60}})
    with pytest.raises(JobSpecError, match="'same' is also the name"):
        deploy_cli.main(deploy_cli.parser().parse_args([str(a), str(b), "--check"]))


def test_deploy_accepts_a_nightly_glob_that_matches_nothing_yet(tmp_path, capsys):
    (tmp_path / "inbox").mkdir()
    path = write(tmp_path, "n.yaml", {"task": "summarize", "input": "inbox/*.csv", "schedule": {"cron": "0 2 * * *"}})
    assert deploy_cli.main(deploy_cli.parser().parse_args([str(path), "--check"])) == 0
    assert "matches no file yet" in capsys.readouterr().err


def test_prefect_yaml_points_at_the_shipped_specs_and_their_schedules():
    """The work-pool path (prefect.yaml) runs the same specs, on the same schedules, as flows.deploy."""
    from flows import deployed

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert config["deployments"]
    for entry in config["deployments"]:
        module, _, attribute = entry["entrypoint"].partition(":")
        assert Path(REPO / module).is_file() and hasattr(deployed, attribute)
        spec = load_job_spec(REPO / entry["parameters"]["spec"])
        assert getattr(deployed, attribute) is deployed.FLOWS[spec.task]
        assert entry["name"] == spec.name
        (schedule,) = entry["schedules"]
        assert schedule.get("cron") == spec.schedule.cron and schedule["timezone"] == spec.schedule.timezone
        assert entry["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
