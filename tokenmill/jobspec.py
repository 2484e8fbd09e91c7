"""Job specs: `jobs/<name>.yaml` declares one job; YAML checked by pydantic, never executed.

A spec holds `task` (summarize, extract, batch, simulate), `input` (the command's positional argument:
a file, folder or glob for the row jobs, the simulation spec for simulate), any option of that
command, and an optional `schedule`. The command's own argparse parser is the one source of the
keys, their types and their defaults: a key is the option's destination (`max_tokens` for
`--max-tokens`, `strip: false` for `--no-strip`, `no_cache: true` for `--no-cache`), and a key
the spec leaves out takes the command line's default, because a spec becomes that very command
line (`JobSpec.argv`).

Relative paths in the file are relative to the file's folder; paths given with `--set` are
relative to the current folder, like the command line's. Every error names the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import shlex
import textwrap
import zoneinfo
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, create_model
from pydantic import field_validator, model_validator

from tokenmill.errors import TokenmillError

# task -> the module whose parser() defines the task's options (and whose main() runs it)
COMMANDS = {"summarize": "flows.summarize", "extract": "flows.extract", "tag": "flows.tag", "batch": "flows.batch",
            "simulate": "flows.simulate"}
TASKS = tuple(COMMANDS)
# options that shape the console only: flows.run takes them on its own command line
CONSOLE_ONLY = {"help", "show_prompt", "no_progress", "verbose", "debug", "check"}
SPEC_KEYS = ("name", "task", "description", "schedule")  # the keys that are not command options
PATH_KEYS = {"input", "out", "cache", "fork_source", "schema", "examples"}  # always paths
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_OPTION = re.compile(r"--[a-z][a-z-]*")


class JobSpecError(TokenmillError):
    """A job spec that cannot be used; the message names the file and the key."""


class Schedule(BaseModel):
    """When a deployment runs: a cron expression or an interval, in a timezone."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cron: Optional[StrictStr] = Field(default=None, description="five-field cron expression, e.g. '0 2 * * *'")
    interval: Optional[timedelta] = Field(default=None, description="seconds, or an ISO 8601 duration such as P1D")
    timezone: StrictStr = Field(default="UTC", description="IANA timezone the cron is read in, e.g. Europe/Berlin")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            check_cron(value)
        return value

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value.total_seconds() < 1:
            raise ValueError("the interval must be at least one second")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as UTC or Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "Schedule":
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of cron or interval")
        return self

    def describe(self) -> str:
        what = f"cron {self.cron!r}" if self.cron else f"every {self.interval}"
        return f"{what} ({self.timezone})"


_CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_CRON_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}


def check_cron(text: str) -> None:
    """Refuse what is not a five-field cron expression (numbers, *, ranges, steps, lists, names)."""
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"cron {text!r} needs five fields (minute hour day month weekday), got {len(parts)}")
    for i, (part, (low, high)) in enumerate(zip(parts, _CRON_FIELDS)):
        for item in part.split(","):
            base, _, step = item.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                raise ValueError(f"cron {text!r}: bad step in {item!r}")
            if base == "*":
                continue
            for bound in base.split("-", 1):
                value = _cron_value(i, bound)
                if value is None or not low <= value <= high:
                    raise ValueError(f"cron {text!r}: {bound!r} is not a valid value for field {i + 1} ({low}-{high})")


def _cron_value(index: int, text: str) -> int | None:
    names = _CRON_NAMES.get(index, [])
    if text.lower() in names:
        return names.index(text.lower()) + (1 if index == 3 else 0)  # months count from 1
    return int(text) if text.isdigit() else None


@cache
def command_parser(task: str) -> argparse.ArgumentParser:
    return importlib.import_module(COMMANDS[task]).parser()


def _actions(task: str) -> dict[str, argparse.Action]:
    """The command's options by spec key; its positional argument is `input`."""
    out = {}
    for action in command_parser(task)._actions:
        if action.dest in CONSOLE_ONLY:
            continue
        out["input" if not action.option_strings else action.dest] = action
    return out


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0


def _field(key: str, action: argparse.Action) -> tuple[Any, Any]:
    if _is_switch(action):
        kind: Any = StrictBool
    elif action.choices:
        kind = Literal[tuple(action.choices)]
    elif action.type is int:
        kind = StrictInt
    elif action.type is float:
        kind = Union[StrictInt, float]
    else:
        kind = StrictStr
    if key == "schema":
        kind = Union[StrictStr, dict]  # a file, or the schema inline (then the spec file is the --schema)
    if key == "merge":
        kind = Union[StrictStr, dict]  # FIELD=RULE,... or a mapping of field to rule
    if key == "labels":
        kind = Union[StrictStr, list, dict]  # a,b,c or a file, or the labels inline (then the spec is --labels)
    if key == "examples":
        kind = Union[StrictStr, list]  # a file, or the examples inline (then the spec file is --examples)
    alias = key if hasattr(BaseModel, key) else None
    if action.required or key == "input":
        return kind, Field(description=action.help, alias=alias)
    return Optional[kind], Field(default=None, description=action.help, alias=alias)


@cache
def spec_model(task: str) -> type[BaseModel]:
    """The pydantic model of a `task` job spec, made from the command's parser."""
    fields = {}
    for key, action in _actions(task).items():
        # a key BaseModel itself uses (`schema`) is a field of another name, read and written as the key
        fields[f"{key}_" if hasattr(BaseModel, key) else key] = _field(key, action)
    return create_model(
        f"{task.title()}JobSpec", __config__=ConfigDict(extra="forbid"),
        name=(Optional[str], Field(default=None, pattern=NAME_PATTERN)),
        task=(Literal[task], ...), description=(str, ""), schedule=(Optional[Schedule], None), **fields)


@dataclass(frozen=True)
class JobSpec:
    """A validated spec: the command it stands for, with every path absolute."""

    path: Path
    name: str
    task: str
    description: str
    schedule: Schedule | None
    options: dict[str, Any] = field(default_factory=dict)  # spec key -> value; absent keys: the CLI default
    overrides: tuple[str, ...] = ()  # the --set KEY=VALUE it was loaded with

    @property
    def module(self) -> str:
        return COMMANDS[self.task]

    def argv(self, *console: str) -> list[str]:
        """The command-line arguments of `python -m flows.<task>` for this spec (plus console flags)."""
        actions = _actions(self.task)
        args = [str(self.options["input"])]
        for key, value in self.options.items():
            action = actions[key]
            if key == "input" or value is None:
                continue
            longest = max(action.option_strings, key=len)
            if isinstance(action, argparse.BooleanOptionalAction):
                args.append(next(o for o in action.option_strings if o.startswith("--no-")) if not value
                            else next(o for o in action.option_strings if not o.startswith("--no-")))
            elif _is_switch(action):
                if value == bool(action.const):  # store_true given true, store_false given false
                    args.append(longest)
            elif ((key == "schema" and isinstance(value, dict)) or (key == "examples" and isinstance(value, list))
                  or (key == "labels" and isinstance(value, (list, dict)))):
                args += [longest, str(self.path)]  # load_schema / load_examples read the spec's own key
            elif key == "merge" and isinstance(value, dict):
                args += [longest, ",".join(f"{k}={v}" for k, v in value.items())]
            else:
                args += [longest, str(value)]
        return args + list(console)

    def namespace(self, *console: str) -> argparse.Namespace:
        """The command's parsed arguments, exactly as its command line would give them."""
        try:
            return command_parser(self.task).parse_args(self.argv(*console))
        except SystemExit:  # argparse refused what pydantic let through: report, do not exit
            raise JobSpecError(f"job spec {self.path}: the options do not parse as `{self.command_line()}`") from None

    def command_line(self) -> str:
        return shlex.join(["python", "-m", self.module, *self.argv()])

    def fail(self, message: str) -> JobSpecError:
        """A JobSpecError for a problem found after validation (a message naming `--option`)."""
        actions = _actions(self.task)
        by_option = {o: k for k, a in actions.items() for o in a.option_strings}
        match = next((m.group(0) for m in _OPTION.finditer(message) if m.group(0) in by_option), None)
        where = f"key '{by_option[match]}': " if match else ""
        return JobSpecError(f"job spec {self.path}{self._with_sets()}: {where}{message}")

    def _with_sets(self) -> str:
        return f" (with --set {' '.join(self.overrides)})" if self.overrides else ""


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _is_path(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if key in PATH_KEYS:
        return True
    if key == "model":  # a file, unless a store reference (ollama:NAME, gpt4all:FILE, http://) or a bare name
        return not re.match(r"^[a-z0-9]+:", value) and ("/" in value or value.split("#")[0].endswith((".gguf", ".llamafile")))
    if key == "prompt":  # a template file, unless a name under prompts/<task>/
        return "/" in value or value.endswith(".j2")
    return False


def _absolute(key: str, value: Any, base: Path) -> Any:
    if not _is_path(key, value):
        return value
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)  # jobs/../data -> data


def _parse_set(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise JobSpecError(f"--set {item!r}: write KEY=VALUE, e.g. --set limit=2")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise JobSpecError(f"job spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load: no tags, no objects, no code
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobSpecError(f"cannot read job spec {path}: {first}") from None
    if not isinstance(data, dict):
        raise JobSpecError(f"job spec {path}: the top level must be a mapping of keys (task, input, ...)")
    return data


def is_job_spec(path: Path) -> bool:
    """Whether a YAML file declares a job (has a `task` key); a simulation spec does not."""
    try:
        return "task" in read_yaml(path)
    except JobSpecError:
        return True  # unreadable: let load_job_spec say why


def load_job_spec(path_text: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override (`--set KEY=VALUE`, VALUE read as YAML), validate; nothing runs."""
    path = Path(path_text).expanduser().absolute()
    data = {k: _absolute(k, v, path.parent) for k, v in read_yaml(path).items()}
    overrides = tuple(overrides)
    for item in overrides:
        keys, value = _parse_set(item)
        if keys[0] == "schema" and len(keys) > 1:
            raise JobSpecError(f"--set {item}: an inline schema cannot be changed with --set; point schema at a file")
        target = data
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[keys[-1]] = _absolute(keys[0], value, Path.cwd()) if len(keys) == 1 else value
    sets = f" (with --set {' '.join(overrides)})" if overrides else ""
    task = data.get("task")
    if task is None:
        raise JobSpecError(f"job spec {path}{sets}: key 'task' is required (one of {', '.join(TASKS)})")
    if task not in COMMANDS:
        raise JobSpecError(f"job spec {path}{sets}: key 'task': {task!r} is not a task; choose one of {', '.join(TASKS)}")
    try:
        model = spec_model(task).model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            raise JobSpecError(f"job spec {path}{sets}: unknown key '{where}'{_suggest(task, err['loc'])}") from None
        if err["type"] == "missing":
            raise JobSpecError(f"job spec {path}{sets}: key '{where}' is required") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise JobSpecError(f"job spec {path}{sets}: key '{where}': {msg}") from None
    options = {k: v for k, v in model.model_dump(exclude_none=True, by_alias=True).items() if k not in SPEC_KEYS}
    return JobSpec(path=path, name=model.name or path.stem, task=task, description=model.description,
                   schedule=model.schedule, options=options, overrides=overrides)


def _suggest(task: str, loc: tuple) -> str:
    """`; did you mean 'max_tokens'?` and the keys that are allowed where the unknown key stands."""
    known = list(Schedule.model_fields) if loc[0] == "schedule" and len(loc) == 2 else [*SPEC_KEYS, *_actions(task)]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    where = "a schedule" if known[0] == "cron" else f"a {task} spec"
    return f"{hint} ({where} takes: {', '.join(known)})"


def spec_keys_help(width: int = 100) -> str:
    """The keys each task's spec takes, for --help."""
    rows = [("every task", "name (default: the file's stem), task, description, input, "
                           "schedule {cron | interval, timezone}")]
    rows += [(task, ", ".join(k for k in _actions(task) if k != "input")) for task in TASKS]
    lines = ["job spec keys (YAML; a key is the command's option name with underscores):"]
    for label, keys in rows:
        lines += textwrap.wrap(keys, width, initial_indent=f"  {label}: ", subsequent_indent="    ")
    return "\n".join(lines)
