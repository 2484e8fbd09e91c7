"""Hostile templates, as a --prompt file and as the chat template inside a GGUF: refused, nothing runs."""

from __future__ import annotations

import gc
import os
import struct
import subprocess
import time
from pathlib import Path

import gguf
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tokenmill.errors import TemplateError, TemplateSecurityError
from tokenmill.models.gguf_info import write_gguf_copy
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.models.resolve import default_model_path
from tokenmill.prompts import ChatTemplate, load_task_template
from tokenmill.sandbox import MAX_RENDER_SECONDS, sandbox
from tokenmill.models.resolve import file_sha256 as _sha256

# MARKER is replaced by a file path; a template that manages to run a command would create it.
HOSTILE = {
    "mro_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler_os_system": "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "joiner_globals": "{{ joiner.__init__.__globals__ }}",
    "lipsum_popen": "{{ lipsum.__globals__['os'].popen('touch MARKER; id').read() }}",
    "self_globals": "{{ self.__init__.__globals__ }}",
    "namespace_globals": "{{ namespace.__init__.__globals__ }}",
    "raise_exception_globals": "{{ raise_exception.__globals__['os'].system('touch MARKER') }}",
    "for_subclasses": "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "subclasses_popen": "{% for c in ().__class__.__bases__[0].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
                        "{{ c(['touch', 'MARKER']) }}{% endif %}{% endfor %}",
    "mangled_private": "{{ self._TemplateReference__context }}",
    "type_mro": "{{ dict.mro() }}",
    "list_append": "{{ messages.append(1) }}",
    "list_pop": "{{ messages.pop() }}",
    "dict_update": "{{ messages[0].update({'role': 'system'}) }}",
    "range_huge": "{{ range(10**9)|list }}",
    "str_format_attribute": "{{ '{0.__class__}'.format(messages) }}",
    "percent_format_filter": "{{ '%s'|format(messages.__class__.__mro__) }}",
    "format_map_attribute": "{{ '{m.__class__}'.format_map({'m': messages}) }}",
    "format_built_at_render": "{% set f = '{0.' ~ '_' ~ '_class__}' %}{{ f.format(messages) }}",
    "format_map_built_at_render": "{% set f = '{m.' ~ '_' * 2 ~ 'init__.' ~ '_' * 2 ~ 'globals__}' %}"
                                  "{{ f.format_map({'m': namespace}) }}",
    "attr_filter": "{{ messages|attr('__class__') }}",
    "attr_filter_built_at_render": "{{ (messages|attr('_' ~ '_class__')).__name__ }}",
    "getitem_built_at_render": "{% set k = '_' * 2 ~ 'class' ~ '_' * 2 %}{{ messages[k] }}",
    "map_attribute": "{{ messages|map(attribute='__class__')|list }}",
    "include_file": "{% include '/etc/passwd' %}",
    "import_module": "{% import 'os' as os %}",
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string_doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "replace_doubling": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}"
                        "{% set ns.s = ns.s|replace('x', ns.s) %}{% endfor %}",
    "huge_repeat": "{{ 'x' * 10**10 }}",
    "huge_power": "{{ 10**9999999 }}",
    "huge_width": "{{ '{:>999999999}'.format(1) }}",
    "huge_percent_width": "{{ '%999999999d' % 1 }}",
    "huge_center": "{{ 'x'|center(10**9) }}",
    "huge_join": "{{ range(100000)|join('x' * 1000000) }}",
    "recursive_macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "recursive_loop": "{% for x in [1] recursive %}{{ loop([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) }}{% endfor %}",
}

# Refused while loading, before any of it could run.
REFUSED_AT_LOAD = {
    "mro_subclasses", "cycler_os_system", "joiner_globals", "lipsum_popen", "self_globals", "namespace_globals",
    "raise_exception_globals", "for_subclasses", "subclasses_popen", "mangled_private", "type_mro",
    "str_format_attribute", "percent_format_filter", "format_map_attribute", "attr_filter", "map_attribute",
    "include_file", "import_module",
}

# Names nobody passes: an error (a plain TemplateError is enough), nothing rendered.
UNDEFINED = {"config": "{{ config }}", "request": "{{ request.environ }}", "cycler": "{{ cycler }}"}

TASK_VARIABLES = {"text": "some text", "row": {}, "max_words": 40,
                  "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture
def no_escape(monkeypatch):
    """Record (and refuse) any attempt to start a process while a template loads or renders."""
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append((name, args))
            raise AssertionError(f"a template reached {name}")
        return call

    for name in ("system", "popen", "execv", "execve", "spawnv", "posix_spawn"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse(f"os.{name}"))
    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
    yield calls
    assert calls == []


def _source(name: str, marker: Path) -> str:
    return HOSTILE[name].replace("MARKER", str(marker))


# --- (a) as a task template given by path ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_prompt_file_is_refused(name, tmp_path, marker, no_escape):
    path = tmp_path / f"{name}.j2"
    path.write_text(_source(name, marker))
    started = time.monotonic()
    with pytest.raises(TemplateSecurityError) as info:
        load_task_template("summarize", str(path)).render(TASK_VARIABLES)
    assert time.monotonic() - started < MAX_RENDER_SECONDS + 5
    assert str(path) in str(info.value)
    assert not marker.exists()
    if name in REFUSED_AT_LOAD:
        with pytest.raises(TemplateSecurityError, match="is refused"):
            load_task_template("summarize", str(path))


@pytest.mark.parametrize("name", sorted(UNDEFINED))
def test_prompt_file_reading_unknown_names_fails(name, tmp_path, no_escape):
    path = tmp_path / f"{name}.j2"
    path.write_text(UNDEFINED[name])
    template = load_task_template("summarize", str(path))
    with pytest.raises(TemplateError, match=repr(name)):
        template.check_variables({"text", "row", "max_words"})
    with pytest.raises(TemplateError, match=rf"{path}.*'{name}' is undefined"):
        template.render(TASK_VARIABLES)


# --- (b) as the chat template inside a GGUF -------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_reader():
    return gguf.GGUFReader(str(default_model_path()))


def write_gguf(reader: gguf.GGUFReader, dst: Path, chat_template: str, tensors: bool = True) -> Path:
    """A copy of the GGUF behind `reader` with another tokenizer.chat_template (tokenmill's own
    GGUF copier, which the gpt4all backend uses too); without tensors for vocab-only loads."""
    return write_gguf_copy(default_model_path(), dst, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: chat_template},
                           tensors=tensors, reader=reader)


@pytest.fixture(scope="module")
def vocab_only(smollm_reader, tmp_path_factory) -> bytes:
    """The bytes of a vocab-only copy (tokenmill's copier, above) holding a placeholder template."""
    return write_gguf(smollm_reader, tmp_path_factory.mktemp("vocab") / "base.gguf", "{{ placeholder }}",
                      tensors=False).read_bytes()


def with_template(base: bytes, dst: Path, chat_template: str) -> Path:
    """`base` with its tokenizer.chat_template value replaced in place: a GGUF string is its
    length (u64) and its bytes, after the key (itself a GGUF string) and the value's type (u32).
    Dozens of hostile templates then cost one copy, not one each; llama.cpp reads each back (the
    tests check it got exactly the template)."""
    key = gguf.Keys.Tokenizer.CHAT_TEMPLATE.encode()
    at = base.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack("<I", base[at:at + 4])[0] == gguf.GGUFValueType.STRING
    (length,) = struct.unpack("<Q", base[at + 4:at + 12])
    value = chat_template.encode()
    dst.write_bytes(base[:at + 4] + struct.pack("<Q", len(value)) + value + base[at + 12 + length:])
    return dst


def load_info(path: Path) -> ModelInfo:
    """ModelInfo as tokenmill builds it: load_llama keeps llama-cpp-python from compiling the GGUF's
    template (it would fold `'x' * 10**10` and the like while loading, outside tokenmill's sandbox)."""
    return ModelInfo(path)


def test_the_gguf_copy_is_faithful(smollm_reader, tmp_path):
    """With its own template the full copy is byte for byte the default model: the helper changes only that."""
    original = default_model_path()
    template = smollm_reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE).contents()
    copy = write_gguf(smollm_reader, tmp_path / "copy.gguf", template)
    assert _sha256(copy) == _sha256(original)
    copy.unlink()


def test_hostile_template_in_a_full_model_copy_is_refused(smollm_reader, tmp_path, marker, no_escape):
    path = write_gguf(smollm_reader, tmp_path / "evil.gguf", _source("cycler_os_system", marker))
    assert path.stat().st_size > 90_000_000  # weights included
    info = load_info(path)
    assert info.chat_template == _source("cycler_os_system", marker)
    with pytest.raises(TemplateSecurityError, match="the chat template inside evil.gguf is refused"):
        ChatTemplate.for_model(info).wrap("Summarize this.")
    assert not marker.exists()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_chat_template_in_a_gguf_is_refused(name, vocab_only, tmp_path, marker, no_escape):
    path = with_template(vocab_only, tmp_path / f"{name}.gguf", _source(name, marker))
    started = time.monotonic()
    info = load_info(path)  # llama.cpp loads it; the template is what it reads back
    assert time.monotonic() - started < 5
    assert info.chat_template == _source(name, marker)
    if name.startswith("recursive"):
        # Earlier tests' llama.cpp objects, left to the cycle collector, are finalized wherever it
        # next runs: at the recursion limit their __del__ fails (an unraisable error pytest reports).
        gc.collect()
    started = time.monotonic()
    with pytest.raises(TemplateSecurityError) as raised:
        ChatTemplate.for_model(info).wrap("Summarize this.")
    assert time.monotonic() - started < MAX_RENDER_SECONDS + 5
    assert f"the chat template inside {name}.gguf" in str(raised.value)
    assert not marker.exists()
    if name in REFUSED_AT_LOAD:
        with pytest.raises(TemplateSecurityError, match="is refused"):
            ChatTemplate.for_model(info)


@pytest.mark.parametrize("name", sorted(UNDEFINED))
def test_chat_template_printing_unknown_names_fails(name, vocab_only, tmp_path, no_escape):
    path = with_template(vocab_only, tmp_path / f"{name}.gguf", UNDEFINED[name])
    with pytest.raises(TemplateError, match=f"'{name}' is undefined"):
        ChatTemplate.for_model(load_info(path)).wrap("hi")


# --- what stays allowed ----------------------------------------------------------------------------------


def test_the_smollm2_template_renders_exactly_like_llama_cpp_python():
    info = ModelInfo(default_model_path())
    chat = ChatTemplate.for_model(info)
    formatter = Jinja2ChatFormatter(info.chat_template, eos_token=info.eos_token, bos_token=info.bos_token)
    conversations = [
        [{"role": "user", "content": "Summarize: the fox jumps."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye {{ not a tag }}"}],
    ]
    for messages in conversations:
        assert chat.render(messages) == formatter(messages=messages).prompt
    assert chat.wrap("x") == formatter(messages=[{"role": "user", "content": "x"}]).prompt


def test_a_gguf_copy_with_the_normal_template_renders_the_same(smollm_reader, tmp_path):
    template = smollm_reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE).contents()
    copy = load_info(write_gguf(smollm_reader, tmp_path / "same.gguf", template, tensors=False))
    original = ModelInfo(default_model_path())
    assert ChatTemplate.for_model(copy).wrap("Hi") == ChatTemplate.for_model(original).wrap("Hi")


def test_only_harmless_globals_are_left():
    names = set(sandbox().globals)
    assert not names & {"cycler", "joiner", "lipsum"}
    assert {"range", "dict", "namespace", "raise_exception"} <= names
    assert set(sandbox(chat=True).globals) == names


@pytest.mark.parametrize("source, expected", [
    ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", "2"),
    ("{{ messages|map(attribute='role')|join(',') }}", "user,assistant"),
    ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}", "user"),
    ("{{ messages[0]|tojson }}", '{"role": "user", "content": "héllo", "_meta": 1}'),
    ("{{ messages[0]._meta }}|{{ messages[0]['_meta'] }}", "1|1"),
    ("{{ 'ab' * 3 }}|{{ 2 ** 10 }}|{{ '%05d'|format(42) }}|{{ '{:>4}'.format(7) }}|{{ 'a_b'.replace('_', '-') }}",
     "ababab|1024|00042|   7|a-b"),
    ("{{ range(3)|list }}|{{ messages|length }}|{{ (messages|last).content|upper }}", "[0, 1, 2]|2|HI"),
    ("{{ messages[1].tool_calls is defined }}|{{ '__init__ is a method' }}", "False|__init__ is a method"),
    ("{% macro f(n) %}{{ n }}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(3) }}", "3210"),
])
def test_ordinary_templates_still_work(source, expected):
    messages = [{"role": "user", "content": "héllo", "_meta": 1}, {"role": "assistant", "content": "hi"}]
    assert ChatTemplate(source).render(messages) == expected


def test_render_limits_stop_quickly():
    for source in (HOSTILE["range_huge"], HOSTILE["nested_loops"], HOSTILE["string_doubling"]):
        started = time.monotonic()
        with pytest.raises(TemplateSecurityError, match="was stopped"):
            ChatTemplate(source, name="limits").wrap("hi")
        assert time.monotonic() - started < 5


# --- llama-cpp-python compiling the GGUF's template while loading -------------------------------------------


class _RecordingFormatter:
    compiled: list[str] = []

    def __init__(self, template, *args, **kwargs):
        self.compiled.append(template)

    def to_chat_handler(self):
        return None


def test_loading_inside_the_guard_compiles_no_template(vocab_only, tmp_path, monkeypatch):
    import llama_cpp.llama_chat_format as chat_format

    bomb = "{{ 'x' * 10**12 }}{{ 2 ** 10**10 }}"  # folded by a Jinja that optimizes while compiling
    path = with_template(vocab_only, tmp_path / "bomb.gguf", bomb)
    monkeypatch.setattr(chat_format, "Jinja2ChatFormatter", _RecordingFormatter)
    _RecordingFormatter.compiled = []
    started = time.monotonic()
    info = load_info(path)
    assert time.monotonic() - started < 5
    assert _RecordingFormatter.compiled == []
    assert chat_format.Jinja2ChatFormatter is _RecordingFormatter  # restored after the load
    assert info.chat_template == bomb
    with pytest.raises(TemplateSecurityError, match="was stopped"):
        ChatTemplate.for_model(info).wrap("hi")


def test_model_info_does_not_let_llama_cpp_compile_the_chat_template(monkeypatch):
    import llama_cpp.llama_chat_format as chat_format

    monkeypatch.setattr(chat_format, "Jinja2ChatFormatter", _RecordingFormatter)
    _RecordingFormatter.compiled = []
    ModelInfo(default_model_path())
    assert _RecordingFormatter.compiled == []
