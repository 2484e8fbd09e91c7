"""Token counts without the model's tokenizer: a model server that has no tokenize endpoint
(Ollama's `/v1`, vLLM, LM Studio; see server_info.py and README, "Servers without a tokenizer").

Two bounds, for two different questions:
- `most_tokens`: is a prompt small enough for --n-ctx? A generous estimate: UTF-8 bytes / 3, or
  one token per word and per punctuation mark when that is more. English prose averages 4-6 bytes
  a token (SmolLM2: 5.4 on SciTLDR abstracts), so fit planning leaves room to spare there; text
  whose characters are each a token or more (Chinese, Japanese with a small vocabulary; base64)
  can exceed it, and the server then refuses or cuts the prompt (see `least_tokens`).
- `least_tokens`: did the server read the whole prompt? One token per word: tokenizers cut text
  into words before merging (GPT-style pre-tokenizers, SentencePiece's split at whitespace), so no
  token spans two words, and a server that reports fewer prompt tokens than the prompt has words
  cut it (Ollama and LM Studio do so silently when a prompt exceeds their context).
"""

from __future__ import annotations

import re

BYTES_PER_TOKEN = 3
_WORD = re.compile(r"\w+")
_PIECE = re.compile(r"\w+|[^\w\s]")


def most_tokens(text: str) -> int:
    """A generous estimate of the tokens `text` takes (see the module's note)."""
    if not text:
        return 0
    by_bytes = -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)
    return max(by_bytes, sum(1 for _ in _PIECE.finditer(text)))


def least_tokens(text: str) -> int:
    """Tokens `text` takes at least, by any tokenizer that splits at word boundaries: its words."""
    return sum(1 for _ in _WORD.finditer(text or ""))
