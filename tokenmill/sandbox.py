"""The Jinja sandbox every template renders in: tokenmill's limits on top of Jinja's own.

Every template, ours, the user's and the chat template inside a GGUF file, is rendered by
`jinja2.sandbox.ImmutableSandboxedEnvironment`, so a template can reach neither Python internals
nor anything outside the variables it is given. Task templates use `StrictUndefined`: a missing
variable is an error, never a silent "". Chat templates use `_ChatUndefined`: printing a name
nobody passed is an error too, but a missing key of a message is falsy and prints as "", as in
llama-cpp-python and Transformers; real templates depend on it (Qwen2.5 reads
`message.tool_calls` of every message).

On top of Jinja's sandbox:

* At load time the template's syntax tree is checked and refused with `TemplateSecurityError`
  (before anything runs) when it names a Python internal (`__class__`, `__globals__`,
  `mro`, `gi_frame`, ...), walks into one through a format string or an attribute-name
  argument, or uses `{% include %}`/`{% import %}`/`{% extends %}`.
* Jinja's constant folding is off, so nothing in a template is evaluated while compiling.
* `cycler`, `joiner` and `lipsum` are not available (no template needs them); `range`,
  `dict`, `namespace` (used by real Qwen and Llama chat templates) and `raise_exception` are.
* Rendering has limits: loop iterations, wall time, the size of each string or list the
  template builds (`+`, `*`, `~`, `**`, `%`, `replace`, `join`, `center`, ...) and of the
  output. Going over one is a `TemplateSecurityError`.
* Any `SecurityError` of the sandbox, including attribute walks attempted at render time,
  mutation (`messages.append(...)`) and format-string tricks, becomes a `TemplateSecurityError`
  naming the template; other failures become a `TemplateError`.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from typing import Any, Callable, Iterator, Mapping

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import (
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_FUNCTION_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
    UNSAFE_METHOD_ATTRIBUTES,
    MAX_RANGE,
    ImmutableSandboxedEnvironment,
    SecurityError,
    safe_range,
)
from jinja2.utils import missing
from jinja2.visitor import NodeTransformer

from tokenmill.errors import TemplateError, TemplateSecurityError

# Render limits (per render call).
MAX_LOOP_ITERATIONS = 1_000_000
MAX_RENDER_SECONDS = 10.0
MAX_VALUE_LENGTH = 8_000_000  # characters of one string, items of one list
MAX_OUTPUT_CHARS = 32_000_000
MAX_WIDTH = 100_000  # a padding / indent / format width
MAX_INT_BITS = 100_000

_UNSAFE_ATTRIBUTES = (
    UNSAFE_FUNCTION_ATTRIBUTES | UNSAFE_METHOD_ATTRIBUTES | UNSAFE_GENERATOR_ATTRIBUTES
    | UNSAFE_COROUTINE_ATTRIBUTES | UNSAFE_ASYNC_GENERATOR_ATTRIBUTES
    | {"mro", "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "tb_frame", "tb_next",
       "func_globals", "func_code", "gi_yieldfrom", "cr_await", "ag_await"}
)
_MANGLED = re.compile(r"^_[A-Za-z]\w*__\w")  # _TemplateReference__context
# A string that names an internal attribute ("__class__", "a.__class__") or walks into one as a
# format field ("{0.__class__}", "{0[__x]}"); prose such as "__init__ is a method" is fine.
_INTERNAL_IN_STRING = re.compile(r"^[\w.]*__\w+__[\w.]*$|\{[^{}]*[.\[]__")
_ATTRIBUTE_NAME_FILTERS = {"attr", "map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique",
                           "min", "max", "dictsort"}


def _unsafe_name(name: str) -> bool:
    return name.startswith("__") or name in _UNSAFE_ATTRIBUTES or bool(_MANGLED.match(name))


class _Refused(SecurityError):
    """A render limit was hit, or an unsafe operation was stopped by tokenmill's own checks."""


class _Budget:
    """The limits of one render: loop iterations and wall time."""

    def __init__(self) -> None:
        self.iterations = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def tick(self) -> None:
        self.iterations += 1
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise _Refused(f"more than {MAX_LOOP_ITERATIONS:,} loop iterations")
        if not self.iterations & 1023 and time.monotonic() > self.deadline:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Refused(f"rendering took more than {MAX_RENDER_SECONDS:g} s")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("tokenmill_template_budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.check_time()


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict, set, bytes)) and len(value) > MAX_VALUE_LENGTH:
        raise _Refused(f"a value of {len(value):,} items/characters is over the limit of {MAX_VALUE_LENGTH:,}")
    return value


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > MAX_WIDTH:
        raise _Refused(f"{what} width {width:,} is over the limit of {MAX_WIDTH:,}")


def _check_repeat(left: Any, right: Any) -> None:
    """`seq * n` and `n * n` must stay small."""
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
            if len(seq) * max(n, 0) > MAX_VALUE_LENGTH:
                raise _Refused(f"repeating a value of length {len(seq):,} {n:,} times is over the limit "
                               f"of {MAX_VALUE_LENGTH:,}")
            return
    if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise _Refused("an integer product over the size limit")


def _check_power(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if right > MAX_INT_BITS or left.bit_length() * right > MAX_INT_BITS:
            raise _Refused(f"{left} ** {right} is over the integer size limit")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def _check_percent_format(fmt: str, args: Any) -> None:
    values = args if isinstance(args, tuple) else (args,)
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*":
                for value in values:
                    _check_width(value, "format")
            elif number:
                _check_width(int(number), "format")


def _check_brace_format(fmt: str) -> None:
    for spec in _BRACE_SPEC.findall(fmt):
        if "{" in spec:
            raise _Refused("nested format specifications are not allowed")
        for number in re.findall(r"\d+", spec):
            _check_width(int(number), "format")


def _check_call(obj: Any, args: tuple, kwargs: dict) -> None:
    """Refuse str method calls whose result would be huge, before they allocate it."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format / format_map
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(target, "__name__", "")
    if name in ("center", "ljust", "rjust", "zfill", "expandtabs"):
        for value in (*args, *kwargs.values()):
            _check_width(value, name)
    elif name in ("format", "format_map"):
        _check_brace_format(owner)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(owner, args[0], args[1])
    elif name == "join" and args:
        _check_join(owner, args[0])


def _check_replace(s: str, old: str, new: str) -> None:
    count = s.count(old) if old else len(s) + 1
    if len(s) + count * max(len(new) - len(old), 0) > MAX_VALUE_LENGTH:
        raise _Refused(f"replace() would build a string over the limit of {MAX_VALUE_LENGTH:,} characters")


def _check_join(separator: str, items: Any) -> None:
    if isinstance(items, (list, tuple, str)) and len(separator) * max(len(items) - 1, 0) > MAX_VALUE_LENGTH:
        raise _Refused(f"join() would build a string over the limit of {MAX_VALUE_LENGTH:,} characters")


def _budgeted(iterable: Any) -> Any:
    """Wraps every {% for %} iterable (and recursive loop() call): counts iterations."""
    budget = _BUDGET.get()
    if budget is None:
        return iterable

    def iterate() -> Iterator[Any]:
        for item in iterable:
            budget.tick()
            yield item

    return iterate()


def _range(*args: Any) -> range:
    try:
        return safe_range(*args)
    except OverflowError:
        raise _Refused(f"range({', '.join(map(repr, args))}) has more than the sandbox's {MAX_RANGE:,} items") from None


def _raise_exception(message: str) -> None:
    # Chat templates call raise_exception() to reject malformed conversations.
    raise TemplateError(f"chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Like llama-cpp-python's and Transformers' chat-template `tojson` (plain json.dumps)."""
    _check_width(indent, "tojson indent")
    return _check_size(json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=tuple(separators) if separators else None, sort_keys=sort_keys))


def _guarded(original: Callable, check: Callable[..., None]) -> Callable:
    """A filter that runs `check` on its arguments first and checks its result's size."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _tick()
        check(*args, **kwargs)
        return _check_size(original(*args, **kwargs))

    return wrapper


def _join_filter(original: Callable) -> Callable:
    """`join`, refusing a separator that would make the result huge before joining."""

    @functools.wraps(original)
    def wrapper(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> Any:
        _tick()
        items = value if isinstance(value, (list, tuple, str)) else list(value)
        _check_size(items)
        _check_join(str(d), items)
        return _check_size(original(eval_ctx, items, d, attribute))

    return wrapper


def _no_check(*args: Any, **kwargs: Any) -> None:
    pass


def _filter_checks() -> dict[str, Callable[..., None]]:
    def center(value: Any, width: Any = 80, *_: Any) -> None:
        _check_width(width, "center")

    def indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
        size = len(width) if isinstance(width, str) else width
        _check_width(size, "indent")
        if isinstance(size, int) and len(str(s)) + str(s).count("\n") * size > MAX_VALUE_LENGTH:
            raise _Refused("indent() would build a string over the size limit")

    def format_(value: Any, *args: Any, **kwargs: Any) -> None:
        _check_percent_format(str(value), args or tuple(kwargs.values()))

    def replace(eval_ctx: Any, s: Any, old: Any, new: Any, *_: Any) -> None:
        _check_replace(str(s), str(old), str(new))

    def batch(value: Any, linecount: Any, *_: Any) -> None:
        _check_width(linecount, "batch")

    def slice_(value: Any, slices: Any, *_: Any) -> None:
        _check_width(slices, "slice")

    return {"center": center, "indent": indent, "format": format_, "replace": replace,
            "batch": batch, "slice": slice_, "wordwrap": _no_check, "string": _no_check, "list": _no_check}


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for Transformers' `{% generation %}` tag, as llama-cpp-python does."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _ChatUndefined(jinja2.Undefined):
    """Undefined for chat templates: lenient like llama-cpp-python's and Transformers' default
    `Undefined` where real templates rely on it (`message.tool_calls` of a message without tool
    calls is falsy and prints as ""; `{% if documents %}` is false), but printing a top-level
    name nobody passed (`{{ config }}`) fails as with StrictUndefined."""

    __slots__ = ()

    def __str__(self) -> str:
        if self._undefined_obj is missing:
            self._fail_with_undefined_error()
        return ""


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox plus size checks on the operators that can build huge values."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an Undefined that fails only when used (and never with a lenient
        # Undefined); stop at the access itself.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left, right)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        _check_call(__obj, args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def sandbox(*, chat: bool = False) -> ImmutableSandboxedEnvironment:
    """A fresh sandboxed environment: no attribute walks, no mutation, strict undefined, limits.

    `chat=True` gives the settings llama-cpp-python's `Jinja2ChatFormatter` uses for GGUF chat
    templates (no trailing newline kept, `{% generation %}` ignored, missing message keys are
    falsy: see _ChatUndefined), so prompts match it exactly.
    """
    env = _LimitedSandbox(
        undefined=_ChatUndefined if chat else jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=not chat,
        autoescape=False,
        optimized=False,  # no constant folding: nothing in a template runs while it is compiled
        extensions=[jinja2.ext.loopcontrols, *([_IgnoreGenerationTags] if chat else [])],
    )
    for name in ("cycler", "joiner", "lipsum"):
        env.globals.pop(name, None)
    env.globals["range"] = _range
    env.globals["raise_exception"] = _raise_exception
    for name, check in _filter_checks().items():
        env.filters[name] = _guarded(env.filters[name], check)
    env.filters["join"] = _join_filter(env.filters["join"])
    env.filters["tojson"] = _tojson
    env.filters["tokenmill_loop"] = _budgeted
    env.filters["tokenmill_size"] = _check_size
    return env


# --- load-time checks ---------------------------------------------------------------------------


class _UnsafeTemplate(Exception):
    def __init__(self, what: str, lineno: int | None):
        super().__init__(what)
        self.what = what
        self.lineno = lineno


def _check_tree(tree: nodes.Template) -> None:
    """Refuse a template that reaches for Python internals or other files, before it runs."""
    for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        raise _UnsafeTemplate(f"{{% {type(node).__name__.lower()} %}} of other template files", node.lineno)
    for node in tree.find_all(nodes.Getattr):
        if _unsafe_name(node.attr):
            raise _UnsafeTemplate(f"the Python internal attribute {node.attr!r}", node.lineno)
    for node in tree.find_all(nodes.Getitem):
        if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) and _unsafe_name(node.arg.value):
            raise _UnsafeTemplate(f"the Python internal attribute {node.arg.value!r}", node.lineno)
    for node in tree.find_all(nodes.Const):
        if isinstance(node.value, str) and _INTERNAL_IN_STRING.search(node.value):
            raise _UnsafeTemplate(f"a Python internal attribute through the string {node.value!r}", node.lineno)
    for node in tree.find_all(nodes.Getattr):
        if node.attr in ("format", "format_map") and isinstance(node.node, nodes.Const) \
                and isinstance(node.node.value, str) and re.search(r"\{[^{}]*[.\[]_", node.node.value):
            raise _UnsafeTemplate(f"a private attribute through the format string {node.node.value!r}", node.lineno)
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        if node.name in _ATTRIBUTE_NAME_FILTERS:
            for arg in [*node.args, *(kw.value for kw in node.kwargs)]:
                if isinstance(arg, nodes.Const) and isinstance(arg.value, str) \
                        and any(_unsafe_name(part) for part in arg.value.split(".")):
                    raise _UnsafeTemplate(f"the Python internal attribute {arg.value!r}", node.lineno)


class _Instrument(NodeTransformer):
    """Route loops through the iteration budget and `~` results through the size check."""

    @staticmethod
    def _wrap(node: nodes.Expr, filter_name: str) -> nodes.Filter:
        return nodes.Filter(node, filter_name, [], [], None, None, lineno=node.lineno)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._wrap(node, "tokenmill_size")

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, "tokenmill_loop")
        if node.recursive:
            for call in _loop_calls(node.body):
                if call.args:
                    call.args[0] = self._wrap(call.args[0], "tokenmill_loop")
        return node


def _loop_calls(body: list[nodes.Node]) -> Iterator[nodes.Call]:
    """`loop(...)` calls of a recursive loop, not looking into nested loops (they shadow `loop`)."""
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, nodes.For):
            stack.append(node.iter)
            continue
        if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name) and node.node.name == "loop":
            yield node
        stack.extend(node.iter_child_nodes())


def compile_template(source: str, name: str, *, chat: bool = False) -> jinja2.Template:
    """Parse, check and compile a template; nothing in it runs here."""
    env = sandbox(chat=chat)
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template {name} has a syntax error on line {exc.lineno}: {exc.message}") from None
    try:
        _check_tree(tree)
    except _UnsafeTemplate as exc:
        raise TemplateSecurityError(
            f"template {name} is refused: it reaches for {exc.what} on line {exc.lineno}; "
            "templates may only use their variables, filters and tests"
        ) from None
    tree = _Instrument().visit(tree)
    tree.set_environment(env)
    try:
        return env.from_string(tree)
    except jinja2.TemplateSyntaxError as exc:  # e.g. an unknown filter or test
        raise TemplateError(f"template {name} has a syntax error on line {exc.lineno}: {exc.message}") from None


def render_safely(template: jinja2.Template, variables: Mapping[str, Any], name: str) -> str:
    """Render with limits, turning sandbox and undefined-variable failures into tokenmill errors."""
    token = _BUDGET.set(_Budget())
    try:
        parts: list[str] = []
        size = 0
        for part in template.generate(**variables):
            size += len(part)
            if size > MAX_OUTPUT_CHARS:
                raise _Refused(f"its output is over the limit of {MAX_OUTPUT_CHARS:,} characters")
            parts.append(part)
        return "".join(parts)
    except SecurityError as exc:
        raise TemplateSecurityError(f"template {name} tried an unsafe operation and was stopped: {exc}") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"template {name}: {exc.message}") from None
    except TemplateError:
        raise
    except RecursionError:
        raise TemplateSecurityError(
            f"template {name} tried an unsafe operation and was stopped: it recursed too deep"
        ) from None
    except MemoryError:
        raise TemplateSecurityError(
            f"template {name} tried an unsafe operation and was stopped: it ran out of memory"
        ) from None
    except Exception as exc:  # a template bug such as a bad filter argument
        raise TemplateError(f"template {name} failed to render: {type(exc).__name__}: {exc}") from None
    finally:
        _BUDGET.reset(token)
