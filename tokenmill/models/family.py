"""Which prompt family a model belongs to, from its GGUF metadata alone.

The family picks the task template (`prompts/<task>/<family>.j2`, else `default.j2`) and, for a
GGUF without `tokenizer.chat_template`, the chat template (`prompts/chat/<family>.j2`).
"""

from __future__ import annotations

import re
from typing import Mapping

SMOLLM = "smollm"
CHATML = "chatml"
LLAMA3 = "llama3"
GEMMA = "gemma"
PHI3 = "phi3"
MISTRAL = "mistral"
DEFAULT = "default"

FAMILIES = (SMOLLM, CHATML, LLAMA3, GEMMA, PHI3, MISTRAL, DEFAULT)

# Marker tokens of each chat format, checked in this order (first match wins).
_TEMPLATE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (LLAMA3, ("<|start_header_id|>",)),
    (GEMMA, ("<start_of_turn>",)),
    (CHATML, ("<|im_start|>",)),
    (PHI3, ("<|user|>", "<|end|>")),
    (MISTRAL, ("[INST]",)),
)

_LLAMA3_NAME = re.compile(r"llama[\s_-]?3(?!\d)")  # "Llama-3.1", "llama3", "Llama 3" but not "llama 30B"


def _names(metadata: Mapping[str, str]) -> str:
    parts = (metadata.get(key) or "" for key in ("general.name", "general.basename", "general.architecture"))
    return " ".join(str(p) for p in parts).lower()


def _compact(text: str) -> str:
    return re.sub(r"[\s_.\-]", "", text)


def _is_smollm(names: str, template: str) -> bool:
    return "smollm" in _compact(names) or "smollm" in template.lower()


def detect_family(metadata: Mapping[str, str]) -> str:
    """The prompt family of a model: one of `FAMILIES`.

    Rules, in order (names are `general.name`, `general.basename` and `general.architecture`,
    compared case-insensitively):

    1. The chat template's shape decides when `tokenizer.chat_template` is present, because
       that is the format the model was trained on. Its marker tokens, first match wins:
       - `<|start_header_id|>`                   -> "llama3"  (Llama 3.x)
       - `<start_of_turn>`                        -> "gemma"   (Gemma 1-3)
       - `<|im_start|>`                           -> "smollm" when a name or the template itself
                                                     mentions SmolLM (SmolLM2's template introduces
                                                     itself as "named SmolLM"), else "chatml"
                                                     (Qwen, Hermes, Phi-4, ...)
       - `<|user|>` together with `<|end|>`      -> "phi3"    (Phi-3, Phi-3.5, Phi-4-mini; Zephyr's
                                                     `<|user|>` ... `</s>` does not match)
       - `[INST]`                                 -> "mistral" (Mistral, Mixtral, Llama 2)
    2. Without a chat template, or one with none of those markers, the names decide:
       - "smollm" in a name (ignoring spaces, dots, dashes) -> "smollm"
       - architecture starting with "qwen", or "qwen" in a name -> "chatml"
       - architecture starting with "gemma", or "gemma" in a name -> "gemma"
       - "phi-4"/"phi4" in a name (not "mini") -> "chatml"; architecture "phi3" or
         "phi-3"/"phi3"/"phi4mini" in a name -> "phi3"
       - "mistral", "mixtral" or "ministral" in a name -> "mistral"
       - "llama 3"/"llama-3"/"llama3" in a name (not "llama 30b") -> "llama3"
    3. Anything else -> "default".
    """
    template = metadata.get("tokenizer.chat_template") or ""
    names = _names(metadata)
    if template:
        for family, markers in _TEMPLATE_MARKERS:
            if all(marker in template for marker in markers):
                if family == CHATML and _is_smollm(names, template):
                    return SMOLLM
                return family
    compact = _compact(names)
    arch = str(metadata.get("general.architecture") or "").lower()
    if "smollm" in compact:
        return SMOLLM
    if arch.startswith("qwen") or "qwen" in compact:
        return CHATML
    if arch.startswith("gemma") or "gemma" in compact:
        return GEMMA
    if "phi4" in compact and "mini" not in compact:
        return CHATML
    if arch == "phi3" or "phi3" in compact or "phi4mini" in compact:
        return PHI3
    if any(name in compact for name in ("mistral", "mixtral", "ministral")):
        return MISTRAL
    if _LLAMA3_NAME.search(names):
        return LLAMA3
    return DEFAULT
