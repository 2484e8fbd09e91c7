"""Tag: a text column in, a `label` column out (a list with multi), chosen from given labels.

The reply is constrained by a grammar to the labels (with multi: labels joined by ", ", each
at most once), and a `confidence` column holds the model's probability of the chosen reply
among what the grammar allowed: the product over its sampled tokens of each token's softmax
probability renormalized over the allowed tokens (jump-forward's forced tokens count as 1).
For a single label whose first token tells it apart, that is the probability of that label
among the labels.

Labels come from `--labels a,b,c`, or a file (YAML/JSON): a list of names, a list of
{name, description}, a mapping name -> description, or a job spec whose `labels` key holds one
of these. Descriptions go in the prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import yaml

from tokenmill.errors import InputError
from tokenmill.tasks.runner import Job, JobConfig, TaskSpec

MAX_LABELS = 200


def load_labels(option: str) -> list[dict[str, str]]:
    """[{name, description}] from `--labels`: comma-separated names, or a file that lists them."""
    path = Path(option).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise InputError(f"labels file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read labels {path}: {str(exc).strip().splitlines()[0]}") from None
        if isinstance(data, dict) and "labels" in data:
            data = data["labels"]
        where = f"labels {path}"
    else:
        data = [name for name in option.split(",")]
        where = f"--labels {option!r}"
    labels = _labels(data, where)
    if len(labels) < 2:
        raise InputError(f"{where}: give at least two labels")
    if len(labels) > MAX_LABELS:
        raise InputError(f"{where}: {len(labels)} labels, more than {MAX_LABELS}")
    names = [label["name"] for label in labels]
    if len(set(names)) != len(names):
        raise InputError(f"{where}: label {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return labels


def _labels(data, where: str) -> list[dict[str, str]]:
    if isinstance(data, dict):
        data = [{"name": k, "description": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list of labels or a mapping of label to description")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "description"}:
            raise InputError(f"{where}, label {i + 1}: give a name, or a mapping with name and description")
        name = item["name"].strip()
        if not name or "," in name or "\n" in name:
            raise InputError(f"{where}, label {i + 1}: a label must be non-empty, without commas or newlines")
        out.append({"name": name, "description": str(item.get("description") or "").strip()})
    return out


def label_grammar(names: list[str], multi: bool) -> str:
    """GBNF: one of the labels; with multi, labels joined by ", " (repeats are dropped when parsing)."""
    choice = " | ".join(json.dumps(n, ensure_ascii=False) for n in names)
    if not multi:
        return f"root ::= {choice}\n"
    rest = "".join("(\", \" label " for _ in names[1:]) + ")?" * (len(names) - 1)
    return f"root ::= label {rest}\nlabel ::= {choice}\n"


class LabelParser:
    def __init__(self, names: list[str], multi: bool):
        self.names, self.multi = set(names), multi

    def __call__(self, text: str):
        parts = [p.strip() for p in text.split(",")] if self.multi else [text.strip()]
        unknown = [p for p in parts if p not in self.names]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not one of the labels")
        return list(dict.fromkeys(parts)) if self.multi else parts[0]


def tag_task(labels: list[dict[str, str]], multi: bool) -> TaskSpec:
    names = [label["name"] for label in labels]
    return TaskSpec(
        name="tag", output_column="label", parse=LabelParser(names, multi),
        output_dtype=pl.List(pl.String) if multi else pl.String, grammar=label_grammar(names, multi),
        variables={"labels": labels, "multi": multi}, confidence=True,
        key={"labels_sha256": hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest(), "multi": multi},
    )


def prepare_tag(config: JobConfig, create_out: bool = True) -> Job:
    """Check the labels, then open input and model; nothing is generated yet."""
    if not config.labels:
        raise InputError("tagging needs --labels: comma-separated names, or a file or job spec that lists them")
    return Job(config, tag_task(load_labels(config.labels), config.multi), create_out=create_out)
