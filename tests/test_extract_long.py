"""--split-long for extract: a document too long for one prompt, fields in different parts."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tests.conftest import REPO, run_echo
from tokenmill.tasks.merge import FieldMerger, merge_rules, merge_values

SPEC = REPO / "jobs" / "restaurants.yaml"

# Paragraphs about the place without any field but its name, around three short passages, each stating
# other fields. (Measured with SmolLM2-135M on paragraphs that never named the place: parts without the
# name made one up, "The Town Council Meeting", and a majority of such parts outvoted the real one.)
FILLER = ("The Wrestlers opened many years ago in an old stone building. Its owners restored the beams and the "
          "floor, and they keep a small garden behind the house where herbs grow in summer. Visitors often stop "
          "to read the notes on the history of the building that hang by the door.")
PASSAGES = [
    "Section 1. The Wrestlers is a pub that serves Japanese food.",
    "Section 2. The Wrestlers has a customer rating of 5 out of 5 and is family-friendly.",
    "Section 3. The Wrestlers is in the riverside area near Raja Indian Cuisine.",
]


N_CTX = 512  # leaves about 90 tokens of text a part: SmolLM2-135M reads a short part, and answers its
# prior (restaurant, Chinese, cheap, low, city centre) for a passage buried in 350 tokens of filler
MAX_TOKENS = 160
FILLERS_BETWEEN = 3  # ~170 tokens: more text than a part holds (~100 tokens), so each passage has its own part


def long_document(fillers_between: int = FILLERS_BETWEEN) -> str:
    """The passages with fillers between them (none after the last: parts of filler alone add calls,
    not proof); about 420 tokens, in six parts."""
    blocks = []
    for passage in PASSAGES:
        if blocks:
            blocks += [FILLER] * fillers_between
        blocks.append(passage)
    return "\n\n".join(blocks)


def test_merge_rules_first_majority_union():
    assert merge_values([None, "a", "b", "b"], "first") == "a"
    assert merge_values(["a", "b", None, "b"], "majority") == "b"
    assert merge_values(["a", "b"], "majority") == "a"  # a tie: the earliest
    assert merge_values([["x", "y"], None, ["y", "z"]], "union") == ["x", "y", "z"]
    assert merge_values([None, None], "first") is None
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string", "x-merge": "majority"},
                                               "tags": {"type": "array", "items": {"type": "string"}}}}
    assert merge_rules(schema, None) == {"a": "evidence", "b": "majority", "tags": "union"}
    assert merge_rules(schema, "a=majority")["a"] == "majority"
    assert merge_rules(schema, {"a": "majority"})["a"] == "majority"
    merged = FieldMerger(merge_rules(schema, None))(['{"a": null, "b": "x", "tags": ["t"]}', '{"a": "A", "b": "y"',
                                                     '{"a": "B", "b": "y", "tags": ["u", "t"]}'])
    assert json.loads(merged) == {"a": "B", "b": "x", "tags": ["t", "u"]}  # the unfinished second part is left out


def test_evidence_prefers_values_the_part_itself_says():
    pieces = ["The Wrestlers is a pub.", "The Wrestlers has a garden.", "The Wrestlers is kid friendly, by the river."]
    # parts 2 and 3 made up "restaurant"; only part 1's text says "pub"
    assert merge_values(["pub", "restaurant", "restaurant"], "evidence", "eatType", pieces) == "pub"
    assert merge_values(["pub", "restaurant", "restaurant"], "majority") == "restaurant"
    # a boolean is backed where the part names the field (familyFriendly -> "family", "friendly")
    pieces[1] = "It is a family-friendly place."
    assert merge_values([False, True, False], "evidence", "familyFriendly", pieces) is True
    # nothing backed: the majority of what the parts gave
    assert merge_values(["x", "y", "y"], "evidence", "near", pieces) == "y"
    assert merge_values([None, None], "evidence", "near", pieces) is None


@pytest.mark.parametrize("option, needle", [("name=union", "needs an array"), ("nope=first", "'nope'"),
                                            ("name=best", "unknown"), ("name", "FIELD=RULE")])
def test_bad_merge_option_is_refused_before_any_row(tmp_path, option, needle):
    from tokenmill.errors import InputError
    from tokenmill.schema import load_schema

    schema, _ = load_schema(str(SPEC))
    with pytest.raises(InputError, match=needle):
        merge_rules(schema, option)


@pytest.fixture(scope="module")
def long_run(run_flow, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("longextract")
    text = long_document()
    pl.DataFrame({"id": ["doc"], "text": [text]}).write_parquet(tmp / "long.parquet")
    out = tmp / "out"
    args = [str(tmp / "long.parquet"), "--schema", str(SPEC), "--n-ctx", str(N_CTX), "--max-tokens", str(MAX_TOKENS),
            "--id-column", "id", "--out", str(out), "--no-cache"]
    result = run_flow("extract", *args, "--split-long")  # the default merge rule: evidence
    return text, result, out, tmp


def test_without_split_long_the_long_document_fails_alone_with_a_hint(long_run):
    """Refused before any generation, so on the zero-cost backend in this process."""
    _text, _result, _out, tmp = long_run
    stats = run_echo("extract", tmp / "long.parquet", tmp / "refused", schema=str(SPEC), n_ctx=N_CTX, max_tokens=MAX_TOKENS,
                     id_column="id", split_long=False)
    df = pl.read_parquet(tmp / "refused" / "results.parquet")
    assert stats.rows_error == 1 and stats.calls == 0 and df["status"].to_list() == ["error"]
    assert "--split-long" in df["error"][0]


def test_split_long_extracts_each_part_and_merges_fields_from_different_parts(long_run):
    text, result, out, tmp = long_run
    from tokenmill.models.gguf_info import ModelInfo
    from tokenmill.models.resolve import default_model_path
    from tokenmill.tasks.extract import prepare_extract
    from tokenmill.tasks.longdoc import split_parts
    from tokenmill.tasks.runner import JobConfig

    info = ModelInfo(default_model_path())
    # the premise: the split the run makes (the same function, template and limits) puts each passage
    # in a part of its own, among parts of filler
    job = prepare_extract(JobConfig(input=str(tmp / "long.parquet"), schema=str(SPEC), n_ctx=N_CTX,
                                    max_tokens=MAX_TOKENS, id_column="id", split_long=True, backend="echo"),
                          create_out=False)
    pairs = split_parts(text, lambda piece: job.render({"id": "doc", "text": piece}), info.count_tokens,
                        info.count_text_tokens, N_CTX - MAX_TOKENS, 64, N_CTX)
    where = [[i for i, (piece, _prompt) in enumerate(pairs) if passage in piece] for passage in PASSAGES]
    assert all(len(w) == 1 for w in where) and len({w[0] for w in where}) == 3 and len(pairs) > 3, where
    assert result.returncode == 0, result.stderr
    row = pl.read_parquet(out / "results.parquet").row(0, named=True)
    assert row["status"] == "ok" and row["chunks"] == len(pairs) and row["calls"] == row["chunks"], row
    got = row["extracted"]
    assert got["name"] == "The Wrestlers", got  # every part names it
    # Fields that only one later section's part states reach the merged object. Under `first` part 1's
    # made-up values won (the model rarely writes null: customerRating "low"); under `majority` the parts
    # of filler outvoted the part that says it. (Measured 2026-12-05: SmolLM2-135M read section 2's part
    # right, customerRating and familyFriendly, but answered its prior for sections 1 and 3, so fields
    # from two sections together are not asserted.)
    said = [{"eatType": "pub", "food": "Japanese"}, {"customerRating": "5 out of 5", "familyFriendly": True},
            {"area": "riverside", "near": "Raja Indian Cuisine"}]
    found = [[f for f, v in section.items() if got[f] == v] for section in said]
    assert sum(bool(f) for f in found[1:]) >= 1, (found, got)
    usage = pl.read_parquet(out / "usage.parquet").row(-1, named=True)
    assert usage["calls"] == row["calls"] and json.loads(usage["params"])["merge"]["area"] == "evidence"
