"""Prompt templates: found under prompts/, checked against the columns, rendered in a sandbox.

Task templates live in `prompts/<task>/<family>.j2` with `default.j2` as fallback; the model's
own chat template (or a family default from `prompts/chat/`) wraps the rendered task prompt.
All of them render in `tokenmill.sandbox`: task templates with `StrictUndefined`, chat
templates with a mode where a missing message key is falsy (real templates depend on it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jinja2
import jinja2.meta
from jinja2 import nodes

from tokenmill.errors import TemplateError, TemplateSecurityError
from tokenmill.models.family import DEFAULT, FAMILIES, detect_family
from tokenmill.sandbox import MAX_OUTPUT_CHARS, compile_template, render_safely, sandbox

PROMPTS_DIR = Path(os.environ.get("TOKENMILL_PROMPTS_DIR") or Path(__file__).resolve().parents[1] / "prompts")

# Variables every task template may use besides the row's columns.
STANDARD_VARIABLES = {"text", "row", "max_words"}

# Variables a task supplies on top of STANDARD_VARIABLES (pass them to check_variables).
TASK_VARIABLES: dict[str, set[str]] = {
    "summarize": set(),
    "extract": {"schema", "fields", "examples"},
    # flows.simulate also passes the world and the agent's state; the shipped templates treat those as optional
    "simulate": {"agent", "memory", "observation", "world", "persona", "goals", "now", "location", "present",
                 "purpose", "recall", "part"},
    "reduce": {"summaries"},
    "tag": {"labels", "multi"},
    "repair": {"error", "output"},
}


# --- task templates -----------------------------------------------------------------------------


@dataclass
class TaskTemplate:
    """A task prompt template (e.g. prompts/summarize/default.j2), compiled once."""

    name: str  # what the user asked for, or the file's path
    source: str
    template: jinja2.Template

    def variables(self) -> set[str]:
        """The top-level names the template reads."""
        return jinja2.meta.find_undeclared_variables(sandbox().parse(self.source))

    def check_variables(self, available: set[str], task_variables: Iterable[str] = ()) -> None:
        """Fail before any row is generated when the template reads a name nobody provides.

        `available`: the row's columns and STANDARD_VARIABLES; `task_variables`: what the task adds
        (TASK_VARIABLES[task]), listed with the standard ones in the error message.
        """
        extra = set(task_variables)
        missing = sorted(self.variables() - available - extra - set(sandbox().globals))
        if missing:
            columns = ", ".join(sorted(available - STANDARD_VARIABLES - extra)) or "(none)"
            raise TemplateError(
                f"template {self.name} uses undefined variable {', '.join(repr(m) for m in missing)}; "
                f"available: the row's columns ({columns}) and {', '.join(sorted(STANDARD_VARIABLES | extra))}"
            )

    def render(self, variables: Mapping[str, Any]) -> str:
        return render_safely(self.template, variables, self.name)

    def slots(self, variables: Mapping[str, Any], per_row: set[str]) -> "SlotRenderer | None":
        """A faster `render` for templates that only print the per-row variables (see
        SlotRenderer), or None when the template does anything else with them."""
        return SlotRenderer.build(self, variables, per_row)


_SLOT = "\x00tokenmill-slot-{}\x00"
_SLOT_RE = re.compile("\x00tokenmill-slot-(\\d+)\x00")
# Nodes that bring in other templates or change how their body prints.
_OPAQUE = (nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.Include, nodes.Import, nodes.FromImport,
           nodes.Extends, nodes.Block, nodes.With, nodes.Scope, nodes.OverlayScope, nodes.ScopedEvalContextModifier)


class SlotRenderer:
    """`TaskTemplate.render` for a template whose per-row variables (a row's text and columns)
    appear only as bare `{{ name }}` outputs, where Jinja prints `str(value)` and nothing else
    depends on them. Such a template renders once, in the sandbox, with a marker in place of
    each per-row variable; a row's prompt is the text between the markers joined with its own
    values. Any other use (a filter, a test, a condition, an attribute, an assignment) and
    `build` returns None: the caller renders every row with Jinja."""

    def __init__(self, pieces: list[str], slots: list[str], name: str):
        self._pieces, self._slots, self.name = pieces, slots, name

    @classmethod
    def build(cls, template: TaskTemplate, variables: Mapping[str, Any], per_row: set[str]) -> "SlotRenderer | None":
        tree = sandbox().parse(template.source)
        if any(isinstance(node, _OPAQUE) for node in tree.find_all(nodes.Node)):
            return None
        used: set[str] = set()
        for parent in tree.find_all(nodes.Node):
            for child in parent.iter_child_nodes():
                if isinstance(child, nodes.Name) and child.name in per_row:
                    if child.ctx != "load" or not isinstance(parent, nodes.Output):
                        return None
                    used.add(child.name)
        names = sorted(used)
        skeleton = render_safely(template.template, {**variables, **{n: _SLOT.format(i) for i, n in enumerate(names)}},
                                 template.name)
        parts = _SLOT_RE.split(skeleton)
        return cls(parts[0::2], [names[int(i)] for i in parts[1::2]], template.name)

    @property
    def names(self) -> list[str]:
        """The per-row variables, in the order their values go between the pieces."""
        return list(self._slots)

    def render_columns(self, columns: list[Sequence], rows: int) -> list[str | None]:
        """`render` of `rows` rows at once: `columns` holds each of `names`' values, row by row.
        A row whose text would be over the output limit is None (`render` of it raises)."""
        pieces = self._pieces
        if not columns:
            return [pieces[0]] * rows
        if len(columns) == 1:
            first, last = pieces
            texts = [first + str(v) + last for v in columns[0]]
        else:
            texts = ["".join(_interleave(pieces, values)) for values in zip(*columns)]
        return [t if len(t) <= MAX_OUTPUT_CHARS else None for t in texts]

    def render(self, variables: Mapping[str, Any]) -> str:
        pieces = self._pieces
        out = [pieces[0]]
        for name, piece in zip(self._slots, pieces[1:]):
            out.append(str(variables[name]))
            out.append(piece)
        text = "".join(out)
        if len(text) > MAX_OUTPUT_CHARS:
            raise TemplateSecurityError(f"template {self.name} tried an unsafe operation and was stopped: its "
                                        f"output is over the limit of {MAX_OUTPUT_CHARS:,} characters")
        return text


def _interleave(pieces: list[str], values: tuple) -> Iterator[str]:
    yield pieces[0]
    for value, piece in zip(values, pieces[1:]):
        yield str(value)
        yield piece


def _family(family: str | None) -> str:
    return family if family in FAMILIES else DEFAULT


def task_template_path(task: str, family: str | None = DEFAULT) -> Path:
    """`prompts/<task>/<family>.j2` when shipped, else `prompts/<task>/default.j2`."""
    path = PROMPTS_DIR / task / f"{_family(family)}.j2"
    return path if path.is_file() else PROMPTS_DIR / task / "default.j2"


def load_task_template(task: str, name_or_path: str | None = None, family: str | None = DEFAULT) -> TaskTemplate:
    """Load a task template: a file by path, `prompts/<task>/<name>.j2` by name, or, with neither,
    the model family's `prompts/<task>/<family>.j2` falling back to `prompts/<task>/default.j2`."""
    if name_or_path and (os.sep in name_or_path or name_or_path.endswith((".j2", ".jinja", ".txt"))):
        path = Path(name_or_path).expanduser()
        label = str(path)
    elif name_or_path:
        path = PROMPTS_DIR / task / f"{name_or_path}.j2"
        label = f"prompts/{task}/{path.name}"
    else:
        path = task_template_path(task, family)
        label = f"prompts/{task}/{path.name}"
    if not path.is_file():
        shipped = sorted(p.stem for p in (PROMPTS_DIR / task).glob("*.j2"))
        raise TemplateError(
            f"prompt template {label} not found; use a file path or one of: {', '.join(shipped) or '(none)'}"
        )
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read prompt template {label}: {exc}") from None
    return TaskTemplate(label, source, compile_template(source, label))


# --- chat templates -----------------------------------------------------------------------------


def chat_template_for(metadata: Mapping[str, str], family: str | None = None,
                      model_label: str | None = None) -> tuple[str, str]:
    """(source, name) of the chat template to use: the GGUF's own `tokenizer.chat_template`, or
    for a GGUF without one `prompts/chat/<family>.j2` (else `prompts/chat/default.j2`, a plain
    "User: ...\\nAssistant:"). `family` defaults to detect_family(metadata)."""
    source = metadata.get("tokenizer.chat_template")
    if source:
        return source, f"the chat template inside {model_label or 'the model file'}"
    family = _family(family if family is not None else detect_family(metadata))
    path = PROMPTS_DIR / "chat" / f"{family}.j2"
    if not path.is_file():
        path = PROMPTS_DIR / "chat" / "default.j2"
    label = f"prompts/chat/{path.name}"
    try:
        return path.read_text(encoding="utf-8"), label
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read chat template {label}: {exc}") from None


# Texts that a template which transforms message content (trim, escape, case, first-message
# rules) would change or place differently; one_turn relies on a template that changes none.
_PROBES = ("tokenmill-probe-A", " \n  Tokenmill probe <b>&'\"{{ x }}</b>\n\n ", "\u00e9\u4e2d\n")


class ChatPrompt(str):
    """A conversation for a backend that applies the model's chat template itself (a server whose
    tokenizer tokenmill cannot use). As a string it is the conversation rendered by ChatTemplate
    here, which row keys hash and fit planning estimates; `messages` is what the backend is sent.
    Plans pass prompts through unchanged, so a row's parts, repairs and combining steps keep theirs."""

    messages: list[dict[str, str]]

    def __new__(cls, rendered: str, messages: list[dict[str, str]]) -> "ChatPrompt":
        prompt = super().__new__(cls, rendered)
        prompt.messages = [dict(m) for m in messages]
        return prompt


class ChatTemplate:
    """The model's own chat template (GGUF `tokenizer.chat_template`), sandboxed."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "chat template"):
        self.name = name
        self.source = source
        self.template = compile_template(source, name, chat=True)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._frame: tuple[str, str] | bool | None = None  # see one_turn

    @classmethod
    def for_model(cls, info: Any, family: str | None = None) -> "ChatTemplate":
        """The chat template of a `ModelInfo`: its own, or its family's from prompts/chat/."""
        source, name = chat_template_for(info.metadata, family, model_label=Path(info.path).name)
        return cls(source, info.bos_token, info.eos_token, name=name)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # The same variables llama-cpp-python's Jinja2ChatFormatter passes, except strftime_now:
        # a prompt that changes with the date would defeat the result cache.
        return render_safely(
            self.template,
            {
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "functions": None,
                "function_call": None,
                "tools": None,
                "tool_choice": None,
            },
            self.name,
        )

    def wrap(self, user_prompt: str) -> str:
        """The task prompt as a one-turn conversation, ready for the assistant's reply."""
        return self.render([{"role": "user", "content": user_prompt}])

    def frame(self) -> tuple[str, str] | None:
        """(head, tail) when one user message renders as head + content + tail, else None."""
        if self._frame is None:
            self._frame = self._find_frame()
        return self._frame or None

    def one_turn(self, content: str) -> str:
        """`render` of one user message, the same text faster: a template that writes the
        message's content unchanged (checked once with probe texts) is rendered once, and
        each row's text goes between the part before it and the part after it."""
        if self._frame is None:
            self._frame = self._find_frame()
        if self._frame is False:
            return self.render([{"role": "user", "content": content}])
        return self._frame[0] + content + self._frame[1]

    def _find_frame(self) -> tuple[str, str] | bool:
        frames = set()
        for probe in _PROBES:
            text = self.render([{"role": "user", "content": probe}])
            if text.count(probe) != 1:
                return False
            before, after = text.split(probe)
            frames.add((before, after))
        return frames.pop() if len(frames) == 1 else False
