"""Model families and prompt templates: detection from GGUF metadata, template selection, chat fallback."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tokenmill.errors import TemplateError
from tokenmill.models.family import FAMILIES, detect_family
from tokenmill.prompts import (
    PROMPTS_DIR,
    STANDARD_VARIABLES,
    TASK_VARIABLES,
    ChatTemplate,
    chat_template_for,
    load_task_template,
)

# Chat templates as found in real GGUF files (trimmed of tool-call branches where noted).

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3 (tool branches trimmed): namespace(), reversed slices, string methods.
QWEN3 = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Llama 3.1 (custom tool-call branches trimmed).
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

MISTRAL_V03 = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

GRANITE = (
    "{%- for message in messages %}{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content']"
    " + '<|end_of_text|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}"
    "{%- endif %}"
)

# (GGUF metadata, expected family): real-world names, architectures and templates.
MODELS = {
    "smollm2": ({"general.architecture": "llama", "general.name": "SmolLM2 360M Instruct",
                 "general.basename": "SmolLM2", "tokenizer.chat_template": SMOLLM2}, "smollm"),
    "smollm2-renamed": ({"general.architecture": "llama", "general.name": "my finetune",
                         "tokenizer.chat_template": SMOLLM2}, "smollm"),
    "qwen2.5": ({"general.architecture": "qwen2", "general.name": "Qwen2.5 7B Instruct",
                 "general.basename": "Qwen2.5", "tokenizer.chat_template": QWEN25}, "chatml"),
    "qwen3": ({"general.architecture": "qwen3", "general.name": "Qwen3 4B", "tokenizer.chat_template": QWEN3},
              "chatml"),
    "llama3.1": ({"general.architecture": "llama", "general.name": "Meta Llama 3.1 8B Instruct",
                  "general.basename": "Meta-Llama-3.1", "tokenizer.chat_template": LLAMA31}, "llama3"),
    "gemma2": ({"general.architecture": "gemma2", "general.name": "Gemma 2 2b It",
                "tokenizer.chat_template": GEMMA2}, "gemma"),
    "phi3.5": ({"general.architecture": "phi3", "general.name": "Phi 3.5 Mini Instruct",
                "tokenizer.chat_template": PHI35}, "phi3"),
    "mistral": ({"general.architecture": "llama", "general.name": "Mistral 7B Instruct v0.3",
                 "tokenizer.chat_template": MISTRAL_V03}, "mistral"),
    "granite": ({"general.architecture": "granite", "general.name": "Granite 3.1 2b Instruct",
                 "tokenizer.chat_template": GRANITE}, "default"),
    "gpt2": ({"general.architecture": "gpt2", "general.name": "GPT2"}, "default"),
}

TEMPLATES = {"smollm2": SMOLLM2, "qwen2.5": QWEN25, "qwen3": QWEN3, "llama3.1": LLAMA31, "gemma2": GEMMA2,
             "phi3.5": PHI35, "mistral": MISTRAL_V03, "granite": GRANITE}


def write_metadata_gguf(path: Path, metadata: dict[str, str]) -> Path:
    """A GGUF file holding only metadata (no tensors, no tokenizer)."""
    writer = gguf.GGUFWriter(str(path), arch=metadata["general.architecture"])
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if key == "tokenizer.chat_template":
            writer.add_chat_template(value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """Metadata as ModelInfo has it: every key, values as strings."""
    reader = gguf.GGUFReader(str(path))
    return {f.name: str(f.contents()) for f in reader.fields.values() if not f.name.startswith("GGUF.")}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    return {name: write_metadata_gguf(folder / f"{name}.gguf", meta) for name, (meta, _) in MODELS.items()}


# --- family detection ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS))
def test_family_is_detected_from_the_gguf_metadata(gguf_files, model):
    written, family = MODELS[model]
    metadata = read_metadata(gguf_files[model])
    assert {key: metadata[key] for key in written} == written
    assert detect_family(metadata) == family


def test_every_family_is_reachable_and_known():
    assert {family for _, family in MODELS.values()} == set(FAMILIES)


@pytest.mark.parametrize("metadata, family", [
    ({"general.architecture": "llama", "general.name": "SmolLM2 135M Instruct"}, "smollm"),
    ({"general.architecture": "smollm3", "general.name": "SmolLM3 3B"}, "smollm"),
    ({"general.architecture": "qwen2", "general.name": "Qwen2.5 0.5B Instruct"}, "chatml"),
    ({"general.architecture": "llama", "general.name": "Llama 3.2 1B Instruct"}, "llama3"),
    ({"general.architecture": "llama", "general.basename": "Meta-Llama-3"}, "llama3"),
    ({"general.architecture": "llama", "general.name": "LLaMA 30B"}, "default"),
    ({"general.architecture": "llama", "general.name": "Llama 2 7b Chat"}, "default"),
    ({"general.architecture": "gemma3", "general.name": "Gemma 3 1b It"}, "gemma"),
    ({"general.architecture": "phi3", "general.name": "Phi 3 Mini 4k Instruct"}, "phi3"),
    ({"general.architecture": "phi3", "general.name": "Phi 4 Mini Instruct"}, "phi3"),
    ({"general.architecture": "phi3", "general.name": "Phi 4"}, "chatml"),
    ({"general.architecture": "llama", "general.name": "Mistral 7B Instruct v0.2"}, "mistral"),
    ({"general.architecture": "llama", "general.name": "Mixtral 8x7B Instruct v0.1"}, "mistral"),
    ({"general.architecture": "falcon", "general.name": "Falcon 7B"}, "default"),
    ({}, "default"),
    # The template's markers win over the names: it is the format the model was trained on.
    ({"general.architecture": "llama", "general.name": "SmolLM2 Llama3-format finetune",
      "tokenizer.chat_template": LLAMA31}, "llama3"),
    ({"general.architecture": "qwen2", "general.name": "Qwen2.5", "tokenizer.chat_template": SMOLLM2}, "smollm"),
    ({"general.architecture": "llama", "general.name": "Zephyr 7B Beta",
      "tokenizer.chat_template": "{% for m in messages %}<|user|>\n{{ m.content }}</s>{% endfor %}"}, "default"),
    # A template without known markers falls back on the names.
    ({"general.architecture": "qwen2", "general.name": "Qwen2.5", "tokenizer.chat_template": GRANITE}, "chatml"),
])
def test_family_rules(metadata, family):
    assert detect_family(metadata) == family


def test_the_embedded_default_model_is_smollm():
    from tokenmill.models.gguf_info import ModelInfo
    from tokenmill.models.resolve import default_model_path

    info = ModelInfo(default_model_path())
    assert info.architecture == "llama"
    assert detect_family(info.metadata) == "smollm"


# --- task templates --------------------------------------------------------------------------------


def _variables(**extra):
    fields = [{"name": "title", "type": "string", "description": "the title"},
              {"name": "year", "type": "integer", "description": ""}]
    return {"text": "The quick brown fox.", "row": {}, "max_words": 25, "summaries": ["One.", "Two."],
            "schema": json.dumps({"type": "object"}), "fields": fields, "agent": "Ada, a baker",
            "memory": ["sold bread"], "observation": "A customer walks in.", **extra}


def _shipped(task: str) -> set[str]:
    return {p.stem for p in (PROMPTS_DIR / task).glob("*.j2")}


@pytest.mark.parametrize("task", ["summarize", "extract", "simulate", "reduce"])
@pytest.mark.parametrize("family", FAMILIES)
def test_task_template_is_the_family_file_or_default(task, family):
    template = load_task_template(task, family=family)
    expected = family if family in _shipped(task) else "default"
    assert template.name == f"prompts/{task}/{expected}.j2"
    assert template.source == (PROMPTS_DIR / task / f"{expected}.j2").read_text()
    assert template.variables() <= STANDARD_VARIABLES | TASK_VARIABLES[task]
    template.check_variables(set(STANDARD_VARIABLES), TASK_VARIABLES[task])
    rendered = template.render(_variables())
    assert rendered.strip() and "{{" not in rendered and "{%" not in rendered


def test_family_variants_are_shipped_and_differ_from_default():
    for task in ["summarize", "extract", "simulate", "reduce"]:
        shipped = _shipped(task)
        assert "default" in shipped and shipped <= set(FAMILIES)
        default = (PROMPTS_DIR / task / "default.j2").read_text()
        for family in shipped - {"default"}:
            assert (PROMPTS_DIR / task / f"{family}.j2").read_text() != default
    assert {"smollm", "llama3", "gemma", "phi3"} <= _shipped("summarize")
    assert "smollm" in _shipped("extract") & _shipped("simulate") & _shipped("reduce")


def test_task_template_for_each_detected_family(gguf_files):
    for model, (_, family) in MODELS.items():
        detected = detect_family(read_metadata(gguf_files[model]))
        template = load_task_template("summarize", family=detected)
        assert template.name == f"prompts/summarize/{family if family in _shipped('summarize') else 'default'}.j2"


def test_unknown_family_falls_back_to_default():
    assert load_task_template("summarize", family="nonesuch").name == "prompts/summarize/default.j2"
    assert load_task_template("summarize", family="../chat/llama3").name == "prompts/summarize/default.j2"
    assert load_task_template("summarize", family=None).name == "prompts/summarize/default.j2"


def test_a_name_or_path_wins_over_the_family(tmp_path):
    assert load_task_template("summarize", "default", family="smollm").name == "prompts/summarize/default.j2"
    assert load_task_template("summarize", "llama3", family="smollm").name == "prompts/summarize/llama3.j2"
    mine = tmp_path / "mine.j2"
    mine.write_text("Shorten: {{ text }}")
    template = load_task_template("summarize", str(mine), family="smollm")
    assert template.name == str(mine)
    assert template.render({"text": "abc"}) == "Shorten: abc"


def test_unknown_template_name_lists_the_shipped_ones():
    with pytest.raises(TemplateError) as info:
        load_task_template("summarize", "nonesuch", family="smollm")
    message = str(info.value)
    assert "prompts/summarize/nonesuch.j2 not found" in message
    for name in _shipped("summarize"):
        assert name in message


def test_missing_variable_names_template_variable_and_columns(tmp_path):
    mine = tmp_path / "mine.j2"
    mine.write_text("Summarize {{ text }} for {{ audience }}.")
    template = load_task_template("summarize", str(mine))
    with pytest.raises(TemplateError) as info:
        template.check_variables({"paper_id", "body"} | STANDARD_VARIABLES)
    message = str(info.value)
    assert str(mine) in message and "'audience'" in message and "paper_id" in message and "body" in message
    with pytest.raises(TemplateError, match="'fields'"):
        load_task_template("extract").check_variables({"body"} | STANDARD_VARIABLES)
    load_task_template("extract").check_variables({"body"} | STANDARD_VARIABLES, TASK_VARIABLES["extract"])


def test_smollm_summarize_variant_renders_like_plain_jinja():
    """tests/test_summarize.py rebuilds the prompt with plain jinja2.Template: no block tags there."""
    import jinja2

    for family in _shipped("summarize"):
        source = (PROMPTS_DIR / "summarize" / f"{family}.j2").read_text()
        plain = jinja2.Template(source).render(text="Body.", max_words=40)
        ours = load_task_template("summarize", family=family).render({"text": "Body.", "max_words": 40})
        assert plain.strip() == ours.strip()


def test_reduce_and_extract_templates_use_their_variables():
    reduce = load_task_template("reduce").render(_variables())
    assert "One." in reduce and "Two." in reduce and "25 words" in reduce
    extract = load_task_template("extract").render(_variables())
    assert "title (string): the title" in extract and "year (integer)" in extract and '{"type": "object"}' in extract
    simulate = load_task_template("simulate").render(_variables(memory="a text memory"))
    assert "Ada, a baker" in simulate and "a text memory" in simulate and "A customer walks in." in simulate


# --- chat templates ----------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def _llama_cpp(source: str, messages, bos="<s>", eos="</s>") -> str:
    return Jinja2ChatFormatter(source, eos_token=eos, bos_token=bos)(messages=messages).prompt


@pytest.mark.parametrize("model", sorted(TEMPLATES))
def test_real_chat_templates_render_like_llama_cpp_python(model):
    source = TEMPLATES[model]
    chat = ChatTemplate(source, "<s>", "</s>", name=model)
    one_turn = [{"role": "user", "content": "Summarize: the fox."}]
    assert chat.render(one_turn) == _llama_cpp(source, one_turn)
    if model != "gemma2":  # Gemma 2 refuses a system message, in both
        assert chat.render(CONVERSATION) == _llama_cpp(source, CONVERSATION)


def test_gemma2_refusal_is_a_template_error():
    with pytest.raises(TemplateError, match="System role not supported"):
        ChatTemplate(GEMMA2, name="gemma2").render(CONVERSATION)


def test_chat_template_of_the_gguf_wins(gguf_files):
    metadata = read_metadata(gguf_files["qwen2.5"])
    source, name = chat_template_for(metadata, "llama3", model_label="qwen.gguf")
    assert source == QWEN25 and name == "the chat template inside qwen.gguf"


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_fallback_when_the_gguf_has_no_chat_template(tmp_path, family):
    path = write_metadata_gguf(tmp_path / "bare.gguf", {"general.architecture": "llama", "general.name": "bare"})
    metadata = read_metadata(path)
    assert "tokenizer.chat_template" not in metadata
    source, name = chat_template_for(metadata, family)
    assert name == f"prompts/chat/{family}.j2"
    assert source == (PROMPTS_DIR / "chat" / f"{family}.j2").read_text()
    chat = ChatTemplate(source, "<s>", "</s>", name=name)
    prompt = chat.wrap("Summarize: the fox.")
    assert "Summarize: the fox." in prompt
    assert chat.render(CONVERSATION).count("What is 2+2?") == 1


def test_chat_fallback_detects_the_family_itself(gguf_files):
    metadata = {k: v for k, v in read_metadata(gguf_files["gemma2"]).items() if k != "tokenizer.chat_template"}
    assert chat_template_for(metadata)[1] == "prompts/chat/gemma.j2"
    assert chat_template_for(read_metadata(gguf_files["gpt2"]))[1] == "prompts/chat/default.j2"
    assert chat_template_for({}, "nonesuch")[1] == "prompts/chat/default.j2"


FALLBACK_ONE_TURN = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "smollm": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "mistral": "<s>[INST] Hi [/INST]",
    "default": "User: Hi\nAssistant:",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fallback_chat_templates_produce_the_family_format(family):
    source, name = chat_template_for({}, family)
    assert ChatTemplate(source, "<s>", "</s>", name=name).wrap("Hi") == FALLBACK_ONE_TURN[family]


@pytest.mark.parametrize("family, real", [("smollm", SMOLLM2), ("chatml", QWEN25), ("phi3", PHI35),
                                          ("gemma", GEMMA2)])
def test_fallback_chat_templates_match_the_real_ones(family, real):
    """Where the family's real template adds nothing model-specific, the fallback renders the same."""
    fallback = ChatTemplate(chat_template_for({}, family)[0], "<s>", "</s>")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    if family == "chatml":  # Qwen adds its own default system prompt; ChatML does not
        messages = [{"role": "system", "content": "Be brief."}, *messages]
    assert fallback.render(messages) == _llama_cpp(real, messages)


def test_chat_template_for_model_uses_the_embedded_model():
    from tokenmill.models.gguf_info import ModelInfo
    from tokenmill.models.resolve import default_model_path

    info = ModelInfo(default_model_path())
    chat = ChatTemplate.for_model(info)
    assert chat.name == f"the chat template inside {default_model_path().name}"
    assert chat.source == info.chat_template
    assert chat.wrap("Hi") == _llama_cpp(info.chat_template, [{"role": "user", "content": "Hi"}],
                                         bos=info.bos_token, eos=info.eos_token)


# --- SlotRenderer: a template that only prints its per-row variables renders without Jinja per row

_ROWS = [{"text": "Plain text.", "title": "T"}, {"text": "  {{ braces }} and \x00tokenmill-slot-0\x00 markers \n", "title": None},
         {"text": "é中😀\n\nsecond paragraph", "title": 3.5}, {"text": "x" * 5000, "title": ["a", 1]}]


@pytest.mark.parametrize("task,family", [(t, f) for t in ("summarize", "extract") for f in ("default", "smollm", "gemma")])
def test_shipped_templates_render_the_same_with_slots(task, family):
    template = load_task_template(task, family=family)
    constants = {"max_words": 25, "fields": [{"name": "food", "type": "string", "enum": ["Thai", "Pub"]}],
                 "examples": [{"text": "A pub.", "json": '{"eatType": "pub"}'}], "schema": {"type": "object"}}
    for row in _ROWS:
        variables = {**row, **constants, "row": row}
        fast = template.slots(variables, {"text", "title", "row"})
        assert fast is not None, f"{template.name} should print its row variables only"
        assert fast.render(variables) == template.render(variables)


@pytest.mark.parametrize("source", [
    "{{ text | upper }}",  # a filter
    "{% if text %}{{ text }}{% endif %}",  # a condition
    "{{ text[:10] }}",  # a slice
    "{{ row.title }}: {{ text }}",  # an attribute of a per-row value
    "{% set t = text %}{{ t }}",  # an assignment
    "{% for text in ['a'] %}{{ text }}{% endfor %}",  # a loop that shadows it
    "{% macro m(x) %}{{ x }}{% endmacro %}{{ m(text) }}",  # a macro
    "{{ 'Title: ' ~ title }}",  # a concatenation
])
def test_templates_that_do_more_than_print_a_row_variable_get_no_slots(tmp_path, source):
    path = tmp_path / "t.j2"
    path.write_text(source)
    template = load_task_template("summarize", str(path))
    assert template.slots({"text": "abc", "title": "T", "row": {"title": "T"}, "max_words": 5},
                          {"text", "title", "row"}) is None


def test_constant_expressions_and_loops_over_constants_keep_slots(tmp_path):
    path = tmp_path / "t.j2"
    path.write_text("{% for f in fields %}{{ f.name | upper }}: {{ text }}\n{% endfor %}{% if max_words > 3 %}"
                    "at most {{ max_words }} words{% endif %} ({{ title }})")
    template = load_task_template("summarize", str(path))
    variables = {"text": "the text", "title": None, "row": {}, "max_words": 9, "fields": [{"name": "a"}, {"name": "b"}]}
    fast = template.slots(variables, {"text", "title", "row"})
    assert fast is not None
    assert fast.render(variables) == template.render(variables) == (
        "A: the text\nB: the text\nat most 9 words (None)")


def test_a_chunk_renders_column_by_column_exactly_as_row_by_row(tmp_path, monkeypatch):
    """Planner._render_chunk (the scale path: one template render, then each row's values joined
    between its pieces) gives every row the prompt `render` gives it: the shipped template and a
    two-slot one, odd texts, a non-string column, and a chat template whose head starts with the
    BOS that the tokenizer adds (cut, as `render` cuts it)."""
    import polars as pl

    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    data = tmp_path / "in.parquet"
    pl.DataFrame({"text": [r["text"] for r in _ROWS] + ["", "last"],
                  "title": ["T", None, "3.5", "x", "y", "z"], "n": [1, 2, 3, None, 5, 6]}).write_parquet(data)
    two = tmp_path / "two.j2"
    two.write_text("Title: {{ title }} ({{ n }})\n{{ text }}\nEnd {{ max_words }}.")
    for prompt in (None, str(two)):
        job = prepare_summarize(JobConfig(input=str(data), out=str(tmp_path / "out"), backend="echo", prompt=prompt))
        chunk = next(job.table.chunks(100))
        rows = list(chunk.iter_rows(named=True))
        expected = [job.render(row) for row in rows]
        assert job._render_chunk(chunk) == expected and len(set(expected)) == len(rows)
        head = job.chat.frame()[0]
        info = type(job.model_info)
        monkeypatch.setattr(info, "bos_token", property(lambda self: head[:5]))
        monkeypatch.setattr(info, "adds_bos", property(lambda self: True))
        expected = [job.render(row) for row in rows]
        assert all(not p.startswith(head[:5]) for p in expected) and job._render_chunk(chunk) == expected
        monkeypatch.undo()
