"""OpenAI Batch API request files: read, check every line, normalize what tokenmill can run.

A line is `{"custom_id", "method", "url", "body"}`. Problems come in two kinds, as with OpenAI:
- the file's own (a line that is not JSON or not an object, a missing or repeated `custom_id`,
  a missing `body`, an unknown top-level key): the whole file is refused before any row;
- a request's (an unsupported field, a bad value, an unsupported `url`): that request alone
  fails, answered with an OpenAI-style 400 error naming the field, and the rest runs.

Nothing in a request file is executed: bodies are plain JSON, and `json_schema` schemas are
checked against the subset tokenmill turns into grammars (tokenmill.schema).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.errors import InputError, SchemaError
from tokenmill.schema import check_schema

CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"
URLS = (CHAT, COMPLETION)
TOP_LEVEL = {"custom_id", "method", "url", "body"}
ROLES = {"system", "developer", "user", "assistant"}

# body fields accepted and not used: they change nothing about the reply
IGNORED = {"model", "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "parallel_tool_calls"}
# accepted at their neutral value only (None counts as neutral)
NEUTRAL = {"n": 1, "stream": False, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0,
           "echo": False, "best_of": 1, "stream_options": None, "suffix": None,
           "top_logprobs": None, "logit_bias": None}
# OpenAI fields tokenmill does not support at any value other than absent
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction",
               "reasoning_effort", "web_search_options", "verbosity", "response_modalities"}
SAMPLING = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "response_format"}
CHAT_ONLY, COMPLETION_ONLY = {"messages"}, {"prompt"}


@dataclass
class Problem:
    """One thing wrong with one line. `fatal`: the file is refused; else the request fails alone."""

    line: int
    message: str
    custom_id: str | None = None
    param: str | None = None
    code: str | None = None
    fatal: bool = False

    def error(self) -> dict:
        """The OpenAI error object a 400 response carries."""
        return {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}


@dataclass
class Request:
    """One line of the file: its position, id, and either what to run or why it cannot run."""

    line: int
    custom_id: str
    url: str | None
    model: str | None  # as the body names it: recorded, not used (--model decides)
    spec: dict | None = None  # normalized: kind, messages or prompt, params, response_format
    problem: Problem | None = None


@dataclass
class RequestFile:
    path: Path
    requests: list[Request] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # every problem, file-level and per request

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    def refuse_if_unusable(self) -> None:
        """Raise one line naming the first file-level problem (and how many more --check lists)."""
        fatal = self.fatal
        if fatal:
            more = f" (and {len(fatal) - 1} more problem{'s' if len(fatal) > 2 else ''}: list them with --check)" \
                if len(fatal) > 1 else ""
            raise InputError(f"{self.path} line {fatal[0].line}: {fatal[0].message}{more}")
        if not self.requests:
            raise InputError(f"{self.path} holds no requests")


def read_requests(path: Path) -> RequestFile:
    """Every line checked; nothing raised for a bad line (see RequestFile.refuse_if_unusable)."""
    if not path.exists():
        raise InputError(f"request file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass a .jsonl request file")
    result = RequestFile(path)
    seen: dict[str, int] = {}
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                result.problems.append(Problem(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", fatal=True))
                continue
            if not text.strip():
                continue
            request = _read_line(number, text, seen, result.problems)
            if request is not None:
                result.requests.append(request)
    return result


def _read_line(number: int, text: str, seen: dict[str, int], problems: list[Problem]) -> Request | None:
    def fatal(message: str, custom_id: str | None = None) -> None:
        problems.append(Problem(number, message, custom_id, fatal=True))

    try:
        line = json.loads(text)
    except ValueError as exc:
        fatal(f"not valid JSON ({exc})")
        return None
    if not isinstance(line, dict):
        fatal(f"a request must be a JSON object, got {type(line).__name__}")
        return None
    custom_id = line.get("custom_id")
    if custom_id is None:
        fatal("missing custom_id")
        return None
    if not isinstance(custom_id, str) or not custom_id:
        fatal(f"custom_id must be a non-empty string, got {json.dumps(custom_id)}")
        return None
    if custom_id in seen:
        fatal(f"custom_id {custom_id!r} is already used on line {seen[custom_id]}; each custom_id must be unique",
              custom_id)
        return None
    seen[custom_id] = number
    unknown = sorted(set(line) - TOP_LEVEL)
    if unknown:
        fatal(f"unknown key {unknown[0]!r} (a request line holds custom_id, method, url and body)", custom_id)
    body = line.get("body")
    if not isinstance(body, dict):
        fatal("missing body" if body is None else f"body must be a JSON object, got {type(body).__name__}", custom_id)
        return None
    url = line.get("url")
    request = Request(number, custom_id, url if isinstance(url, str) else None,
                      body.get("model") if isinstance(body.get("model"), str) else None)
    try:
        if line.get("method", "POST") != "POST":
            raise _Refused(f"method {line.get('method')!r} is not supported; batch requests use POST", "method")
        if url not in URLS:
            raise _Refused(f"url {url!r} is not supported; use {CHAT} or {COMPLETION}", "url", "unsupported_url")
        request.spec = normalize_body(url, body)
    except _Refused as exc:
        request.problem = Problem(number, exc.message, custom_id, exc.param, exc.code)
        problems.append(request.problem)
    return request


class _Refused(Exception):
    def __init__(self, message: str, param: str | None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def _unsupported(param: str, message: str = "") -> _Refused:
    return _Refused(message or f"{param} is not supported by tokenmill's local batch runner", param,
                    "unsupported_parameter")


def normalize_body(url: str, body: dict) -> dict:
    """The request as tokenmill runs it, or _Refused naming the first field it cannot honour."""
    chat = url == CHAT
    allowed = IGNORED | SAMPLING | (CHAT_ONLY if chat else COMPLETION_ONLY)
    for key, value in body.items():
        if key in NEUTRAL:
            if value is not None and value != NEUTRAL[key]:
                raise _unsupported(key, f"{key}={json.dumps(value)} is not supported by tokenmill's local batch "
                                        f"runner (only {json.dumps(NEUTRAL[key])} or leaving it out)")
        elif key in UNSUPPORTED:
            raise _unsupported(key)
        elif key in CHAT_ONLY | COMPLETION_ONLY and key not in allowed:
            raise _Refused(f"{key} does not belong in a {url} request", key, "unknown_parameter")
        elif key not in allowed:
            raise _Refused(f"unrecognized request argument supplied: {key}", key, "unknown_parameter")
    spec: dict[str, Any] = {"kind": "chat" if chat else "completion", "params": _params(body),
                            "response_format": _response_format(body.get("response_format"))}
    if chat:
        spec["messages"] = _messages(body.get("messages"))
    else:
        spec["prompt"] = _prompt(body.get("prompt"))
    return spec


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _Refused("messages must be a non-empty array of messages", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _Refused(f"{where} must be an object with role and content", where)
        for key, value in message.items():
            if key in ("role", "content", "name") or (key == "refusal" and value is None):
                continue
            if key in ("tool_calls", "function_call", "audio", "tool_call_id"):
                raise _unsupported(f"{where}.{key}")
            raise _Refused(f"unrecognized field {where}.{key}", f"{where}.{key}", "unknown_parameter")
        role = message.get("role")
        if role in ("tool", "function"):
            raise _unsupported(f"{where}.role", f"{where}.role {role!r} is not supported by tokenmill's local "
                               "batch runner (no tool calls)")
        if role not in ROLES:
            raise _Refused(f"{where}.role must be one of system, developer, user, assistant; got {json.dumps(role)}",
                           f"{where}.role")
        clean = {"role": "system" if role == "developer" else role, "content": _content(message.get("content"), where)}
        if isinstance(message.get("name"), str):
            clean["name"] = message["name"]
        out.append(clean)
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _Refused(f"{where}.content must be a string or an array of text parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise _unsupported(f"{where}.content[{j}]", f"{where}.content[{j}] is a content part of type "
                               f"{json.dumps(kind)}; tokenmill's local batch runner supports text parts only")
        if not isinstance(part.get("text"), str):
            raise _Refused(f"{where}.content[{j}].text must be a string", f"{where}.content[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        raise _unsupported("prompt", "prompt as an array of several prompts or of token ids is not supported by "
                                     "tokenmill's local batch runner; send one string per request")
    raise _Refused("prompt must be a string", "prompt")


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise _Refused(f"{key} must be a number from {low:g} to {high:g}, got {json.dumps(value)}", key)
    return float(value)


def _params(body: dict) -> dict:
    """Sampling fields the request sets; the rest take the command's options at run time."""
    params: dict[str, Any] = {}
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are given
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _Refused(f"{key} must be a positive integer, got {json.dumps(value)}", key)
        params.setdefault("max_tokens", value)
    if (t := _number(body, "temperature", 0, 2)) is not None:
        params["temperature"] = t
    if (p := _number(body, "top_p", 0, 1)) is not None:
        params["top_p"] = p
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _Refused(f"seed must be an integer, got {json.dumps(seed)}", "seed")
        params["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
            raise _Refused("stop must be a non-empty string or an array of 1 to 4 non-empty strings", "stop")
        params["stop"] = stops
    return params


def _response_format(fmt: Any) -> dict | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _Refused(f"response_format.type must be text, json_object or json_schema, got {json.dumps(kind)}",
                       "response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise _Refused("response_format.json_schema.schema must be a JSON Schema object",
                       "response_format.json_schema.schema")
    try:
        schema = check_schema(spec["schema"], "response_format.json_schema.schema")
    except SchemaError as exc:
        raise _Refused(str(exc), "response_format.json_schema.schema", "unsupported_schema") from None
    return {"type": "json_schema", "name": spec.get("name"), "strict": bool(spec.get("strict")), "schema": schema}


def describe(problems: list[Problem], path: Path) -> list[str]:
    """`--check`'s lines: one per problem, in line order, with what running would do about it."""
    lines = []
    for p in sorted(problems, key=lambda p: p.line):
        who = f" custom_id {p.custom_id!r}:" if p.custom_id and not p.fatal else ""
        effect = "refuses the file" if p.fatal else "this request fails alone"
        lines.append(f"{path}:{p.line}:{who} {p.message} ({effect})")
    return lines
