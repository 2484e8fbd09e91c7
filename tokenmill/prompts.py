"""Prompt templates: found under prompts/, checked against the columns, rendered in a sandbox.

Every template, ours, the user's and the chat template inside a GGUF file, is rendered by
`jinja2.sandbox.ImmutableSandboxedEnvironment` with `StrictUndefined`, so a template can
neither reach Python internals nor silently render a missing variable as "".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from tokenmill.errors import TemplateError, TemplateSecurityError

PROMPTS_DIR = Path(os.environ.get("TOKENMILL_PROMPTS_DIR") or Path(__file__).resolve().parents[1] / "prompts")

# Variables every task template may use besides the row's columns.
STANDARD_VARIABLES = {"text", "row", "max_words"}


def _raise_exception(message: str) -> None:
    # Chat templates call raise_exception() to reject malformed conversations.
    raise TemplateError(f"chat template refused the conversation: {message}")


def sandbox() -> ImmutableSandboxedEnvironment:
    """A fresh sandboxed environment: no attribute walks, no mutation, strict undefined."""
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.globals["raise_exception"] = _raise_exception
    return env


@dataclass
class TaskTemplate:
    """A task prompt template (e.g. prompts/summarize/default.j2), compiled once."""

    name: str  # what the user asked for, or the file's path
    source: str
    template: jinja2.Template

    def variables(self) -> set[str]:
        """The top-level names the template reads."""
        return jinja2.meta.find_undeclared_variables(sandbox().parse(self.source))

    def check_variables(self, available: set[str]) -> None:
        """Fail before any row is generated when the template reads a name nobody provides."""
        missing = sorted(self.variables() - available - set(sandbox().globals))
        if missing:
            columns = ", ".join(sorted(available - STANDARD_VARIABLES)) or "(none)"
            raise TemplateError(
                f"template {self.name} uses undefined variable {', '.join(repr(m) for m in missing)}; "
                f"available: the row's columns ({columns}) and {', '.join(sorted(STANDARD_VARIABLES))}"
            )

    def render(self, variables: Mapping[str, Any]) -> str:
        return render_safely(self.template, variables, self.name)


def render_safely(template: jinja2.Template, variables: Mapping[str, Any], name: str) -> str:
    """Render, turning sandbox and undefined-variable failures into tokenmill errors."""
    try:
        return template.render(**variables)
    except SecurityError as exc:
        raise TemplateSecurityError(f"template {name} tried an unsafe operation and was stopped: {exc}") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"template {name}: {exc.message}") from None
    except TemplateError:
        raise
    except Exception as exc:  # a template bug such as a bad filter argument
        raise TemplateError(f"template {name} failed to render: {type(exc).__name__}: {exc}") from None


def compile_template(source: str, name: str) -> jinja2.Template:
    try:
        return sandbox().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template {name} has a syntax error on line {exc.lineno}: {exc.message}") from None


def load_task_template(task: str, name_or_path: str | None = None) -> TaskTemplate:
    """Load `prompts/<task>/<name>.j2` (default: default.j2) or a template file by path."""
    if name_or_path and (os.sep in name_or_path or name_or_path.endswith((".j2", ".jinja", ".txt"))):
        path = Path(name_or_path).expanduser()
        label = str(path)
    else:
        path = PROMPTS_DIR / task / f"{name_or_path or 'default'}.j2"
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


class ChatTemplate:
    """The model's own chat template (GGUF `tokenizer.chat_template`), sandboxed."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "chat template"):
        self.name = name
        self.template = compile_template(source, name)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, str]]) -> str:
        return render_safely(
            self.template,
            {
                "messages": messages,
                "add_generation_prompt": True,
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
            },
            self.name,
        )

    def wrap(self, user_prompt: str) -> str:
        """The task prompt as a one-turn conversation, ready for the assistant's reply."""
        return self.render([{"role": "user", "content": user_prompt}])
