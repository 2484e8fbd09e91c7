"""The batched llama.cpp engine against `Llama.create_completion`, on the real embedded model."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from llama_cpp.llama_grammar import json_schema_to_gbnf  # noqa: E402

from tokenmill.errors import ModelError  # noqa: E402
from tokenmill.models.base import GenerationRequest, ModelSettings  # noqa: E402
from tokenmill.models.llama_batched import LlamaBatchedBackend  # noqa: E402
from tokenmill.models.llama_load import FIRST_STREAM_CELLS  # noqa: E402
from tokenmill.models.resolve import default_model_path  # noqa: E402

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
N_ROWS = 10  # two waves of 8 slots: 8 rows, then 2 in the slots the first wave frees
WORDS = 60  # each abstract's first words (a prompt of ~110 tokens): the checks need rows, not long prompts
MAX_TOKENS = 16
# SmolLM2's ChatML template, rendered by hand: the part before the row text is shared by all rows.
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{instruction}\n\n{text}<|im_end|>\n<|im_start|>assistant\n"
)


def summarize_prompt(text: str) -> str:
    return CHATML.format(instruction="Summarize in one sentence:", text=text)


@pytest.fixture(scope="session")
def model_path() -> str:
    try:
        return str(default_model_path())
    except ModelError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """The first N_ROWS SciTLDR dev abstracts, cut to their first WORDS words, as summarization prompts."""
    path = DATASETS / "scitldr" / "dev.jsonl"
    if not DATASETS.is_dir():
        pytest.skip(f"shared datasets folder not found at {DATASETS}")
    with path.open() as fh:
        records = [json.loads(line) for line in itertools.islice(fh, N_ROWS)]
    return [summarize_prompt(" ".join(" ".join(r["source"]).split()[:WORDS])) for r in records]


@pytest.fixture(scope="session")
def reference(model_path, prompts) -> list[dict]:
    """create_completion's greedy output for each prompt, computed once per session."""
    llm = llama_cpp.Llama(model_path, n_ctx=2048, verbose=False)
    out = [llm.create_completion(p, max_tokens=MAX_TOKENS, temperature=0) for p in prompts]
    llm.close()
    return out


@pytest.fixture(scope="session")
def tokenizer(model_path):
    return llama_cpp.Llama(model_path, vocab_only=True, verbose=False)


def run(model_path, requests, kv_unified=None, **settings) -> dict:
    """Generate with a fresh engine; completions keyed by request index."""
    engine = LlamaBatchedBackend(ModelSettings(model_path=model_path, **settings), kv_unified=kv_unified)
    try:
        return {c.index: c for c in engine.generate(requests)}
    finally:
        engine.close()


def greedy(i: int, prompt: str, **kw) -> GenerationRequest:
    return GenerationRequest(index=i, prompt=prompt, max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


def first_token_difference(tokenizer, a: str, b: str) -> int:
    ta = tokenizer.tokenize(a.encode(), add_bos=False)
    tb = tokenizer.tokenize(b.encode(), add_bos=False)
    return next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))


def test_one_slot_matches_create_completion_text_and_usage(model_path, prompts, reference):
    got = run(model_path, [greedy(i, p) for i, p in enumerate(prompts[:3])], n_seq=1, n_ctx=2048)
    for i in range(3):
        ref = reference[i]
        assert got[i].text == ref["choices"][0]["text"], f"row {i}"
        assert got[i].finish_reason == ref["choices"][0]["finish_reason"]
        assert got[i].prompt_tokens == ref["usage"]["prompt_tokens"]
        assert got[i].completion_tokens == ref["usage"]["completion_tokens"]


def test_eight_slots_match_create_completion_on_two_waves_of_scitldr_rows(model_path, prompts, reference, tokenizer):
    got = run(model_path, [greedy(i, p) for i, p in enumerate(prompts)], n_seq=8, n_ctx=9 * 1024)
    assert sorted(got) == list(range(N_ROWS))
    differ = []
    for i, ref in enumerate(reference):
        want, have = ref["choices"][0]["text"], got[i].text
        assert got[i].finish_reason in ("stop", "length")
        if have != want:
            differ.append(i)
            pos = first_token_difference(tokenizer, want, have)
            print(f"row {i} differs from token {pos}:\n  ref: {want!r}\n  got: {have!r}")
    print(f"{N_ROWS - len(differ)}/{N_ROWS} rows identical to create_completion")
    assert len(differ) <= N_ROWS // 8  # one row in eight may differ (batched rounding): 1 of 10 (was 2 of 16)
    # Every row after the first shares the chat-template prefix with the row before it.
    assert sum(got[i].cached_tokens > 0 for i in range(N_ROWS)) >= N_ROWS - 1


def test_shared_prefix_is_reported_as_cached_and_keeps_text(model_path, prompts, reference, tokenizer):
    got = run(model_path, [greedy(i, p) for i, p in enumerate(prompts[:4])], n_seq=2, n_ctx=3 * 1024)
    prefix = len(tokenizer.tokenize(summarize_prompt("").split("\n\n<|im_end|>")[0].encode(), special=True))
    for i in range(4):
        assert got[i].text == reference[i]["choices"][0]["text"], f"row {i}"
        assert got[i].prompt_tokens == reference[i]["usage"]["prompt_tokens"]
    # the first row evaluates the prefix for the others; all then copy it
    assert all(got[i].cached_tokens >= prefix - 2 for i in range(1, 4)), [got[i].cached_tokens for i in range(4)]


def test_a_row_continues_from_what_a_finished_row_left_in_its_slot(model_path, prompts, reference):
    """A finished row's tokens stay in its slot; a later request that begins with them (the
    next turn of a conversation) decodes only what follows, with create_completion's text."""
    engine = LlamaBatchedBackend(ModelSettings(model_path=model_path, n_seq=2, n_ctx=3 * 2048))
    try:
        assert engine.stream_ctx == FIRST_STREAM_CELLS < engine.row_ctx  # streams start at the default size
        [first] = list(engine.generate([greedy(0, prompts[0])]))
        turn = (prompts[0] + first.text + "<|im_end|>\n<|im_start|>user\nNow say it in five words.<|im_end|>\n"
                "<|im_start|>assistant\n")
        got = {c.index: c for c in engine.generate([greedy(1, turn), greedy(2, prompts[1])])}
    finally:
        engine.close()
    llm = llama_cpp.Llama(model_path, n_ctx=2048, verbose=False)
    ref = llm.create_completion(turn, max_tokens=MAX_TOKENS, temperature=0)
    llm.close()
    second = got[1]
    assert second.text == ref["choices"][0]["text"]
    assert second.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert second.cached_tokens >= first.prompt_tokens, (second.cached_tokens, first.prompt_tokens)
    assert got[2].text == reference[1]["choices"][0]["text"]  # beside it, a row that keeps only the template


def test_grammar_constrains_only_its_row(model_path, prompts, reference):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    grammar = json_schema_to_gbnf(json.dumps(schema))
    ask = CHATML.format(instruction="Give the person's name and age as JSON.", text="Maria is 34 years old.")
    got = run(
        model_path,
        [greedy(0, ask, grammar=grammar, max_tokens=48), greedy(1, prompts[0])],
        n_seq=2,
        n_ctx=2048,
    )
    value = json.loads(got[0].text)
    assert got[0].finish_reason == "stop"
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and isinstance(value["name"], str)
    assert got[1].text == reference[0]["choices"][0]["text"]


def test_invalid_grammar_and_bad_max_tokens_fail_only_their_rows(model_path, prompts):
    got = run(
        model_path,
        [
            greedy(0, prompts[0], max_tokens=8),
            greedy(1, prompts[1], grammar="root ::= [unclosed", max_tokens=8),
            greedy(2, prompts[2], grammar="this is not gbnf", max_tokens=8),
            greedy(3, prompts[3], max_tokens=0),
        ],
        n_seq=4,
        n_ctx=2048,
    )
    assert got[0].finish_reason == "length" and got[0].completion_tokens == 8
    for i in (1, 2):
        assert got[i].finish_reason == "error" and "grammar" in got[i].error and got[i].text is None
    assert got[3].finish_reason == "error" and "max_tokens" in got[3].error


@pytest.mark.parametrize("kv_unified, n_seq, n_ctx, holds", [(True, 2, 512, 512), (False, 1, 1024, 512)])
def test_row_too_long_for_the_context_fails_alone(model_path, prompts, kv_unified, n_seq, n_ctx, holds):
    long_prompt = summarize_prompt(" ".join([prompts[0]] * 6))
    got = run(
        model_path,
        [greedy(0, prompts[0], max_tokens=16), greedy(1, long_prompt, max_tokens=16), greedy(2, prompts[1], max_tokens=16)],
        kv_unified=kv_unified,
        n_seq=n_seq,
        n_ctx=n_ctx,
    )
    assert got[1].finish_reason == "error" and got[1].text is None
    p = got[1].prompt_tokens
    assert got[1].error == (
        f"row needs {p + 16} tokens (prompt {p} + max_tokens 16) but the context holds only {holds}; "
        "raise --n-ctx or lower --max-tokens"
    )
    assert got[0].finish_reason != "error" and got[2].finish_reason != "error"


def test_streams_grow_for_a_long_row_and_keep_every_text(model_path, prompts, reference):
    """Streams start small (here 256 cells, set with stream_cells; by default FIRST_STREAM_CELLS,
    checked in test_a_row_continues_...); a row that needs more waits for the rows before it, the streams
    grow, and every row still has create_completion's text."""
    first = 256  # a quarter of the default, so that a row of three prompts (~330 tokens) outgrows it
    long_prompt = summarize_prompt(" ".join(prompts[0:3]))
    llm = llama_cpp.Llama(model_path, n_ctx=2048, verbose=False)
    long_ref = llm.create_completion(long_prompt, max_tokens=MAX_TOKENS, temperature=0)
    llm.close()
    assert long_ref["usage"]["prompt_tokens"] + MAX_TOKENS > first  # the test needs a long row
    engine = LlamaBatchedBackend(ModelSettings(model_path=model_path, n_seq=2, n_ctx=3 * 1024, stream_cells=first))
    try:
        assert engine.stream_ctx == first and engine.row_ctx == 1024
        requests = [greedy(0, prompts[0]), greedy(1, long_prompt), greedy(2, prompts[1])]
        got = {c.index: c for c in engine.generate(requests)}
        assert engine.stats["stream_resizes"] >= 1 and engine.stream_ctx > first
    finally:
        engine.close()
    assert got[1].text == long_ref["choices"][0]["text"]
    assert got[1].prompt_tokens == long_ref["usage"]["prompt_tokens"]
    assert got[0].text == reference[0]["choices"][0]["text"]
    assert got[2].text == reference[1]["choices"][0]["text"]


def test_unified_cache_makes_rows_wait_for_cells_and_keeps_them_apart(model_path, prompts, reference):
    # One pool of 512 cells holds about three of these rows (~110 + 32 tokens) at once: the others must wait.
    rows = [greedy(i, p, max_tokens=32) for i, p in enumerate(prompts[:6])]
    got = run(model_path, rows, kv_unified=True, n_seq=6, n_ctx=512)
    assert all(c.finish_reason in ("stop", "length") for c in got.values())
    # the row that waited for cells waited about as long as a whole row takes (on any hardware)
    assert max(c.queue_ms for c in got.values()) > 0.5 * min(c.prompt_ms + c.decode_ms for c in got.values())
    # Each summary speaks of its own abstract, not a neighbour's. (Exact text is not promised:
    # in a unified cache a row's cells lie elsewhere than in a lone run, which changes rounding.)
    # Its words: those of three letters or more that no other of the six prompts holds ("ehr", "imputation").
    words = [set(re.findall(r"[a-z]{3,}", p.lower())) for p in prompts[:6]]
    own = [w - set().union(*(v for v in words if v is not w)) for w in words]
    for i in range(6):
        said = set(re.findall(r"[a-z]{3,}", got[i].text.lower()))
        overlap = [len(said & w) for w in own]
        assert overlap[i] == max(overlap) > 0, (i, overlap, got[i].text, reference[i]["choices"][0]["text"])
    same = sum(got[i].text.startswith(reference[i]["choices"][0]["text"]) for i in range(6))
    print(f"unified cache: {same}/6 rows begin with create_completion's first {MAX_TOKENS} tokens")


def test_same_seed_gives_same_text_alone_and_in_a_batch(model_path, prompts):
    def sampled(i, p, seed):
        return GenerationRequest(index=i, prompt=p, max_tokens=MAX_TOKENS, temperature=0.8, seed=seed)

    alone = run(model_path, [sampled(0, prompts[5], 1234)], n_seq=4, n_ctx=2048)
    batch = run(
        model_path,
        [sampled(1, prompts[6], 1), sampled(0, prompts[5], 1234), sampled(2, prompts[7], 2)],
        n_seq=4,
        n_ctx=2048,
    )
    assert alone[0].text == batch[0].text
    llm = llama_cpp.Llama(model_path, n_ctx=2048, verbose=False)
    ref = llm.create_completion(prompts[5], max_tokens=MAX_TOKENS, temperature=0.8, seed=1234)
    llm.close()
    assert alone[0].text == ref["choices"][0]["text"]


def test_stop_string_cuts_text_before_it(model_path, prompts, reference):
    want = reference[0]["choices"][0]["text"]
    words = want.split()
    assert len(words) > 3, want
    got = run(model_path, [greedy(0, prompts[0], stop=[" " + words[2]])], n_seq=1, n_ctx=2048)
    assert got[0].finish_reason == "stop"
    assert got[0].text == want[: want.index(" " + words[2])]


def test_requests_are_pulled_lazily_from_an_endless_stream(model_path):
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield greedy(i, summarize_prompt(f"Request number {i} of an endless stream."), max_tokens=4)

    engine = LlamaBatchedBackend(ModelSettings(model_path=model_path, n_seq=3, n_ctx=2048))
    try:
        got = list(itertools.islice(engine.generate(endless()), 6))
    finally:
        engine.close()
    assert len(got) == 6 and all(c.completion_tokens == 4 for c in got)
    assert len(pulled) <= 6 + 3 + 1  # finished + running slots + one waiting


def test_unloadable_model_files_raise_model_error(model_path, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    truncated = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(1 << 20))
    for path in (bad, truncated, tmp_path / "missing.gguf"):
        with pytest.raises(ModelError, match=str(path.name)):
            LlamaBatchedBackend(ModelSettings(model_path=str(path)))


def test_measure_rates_reports_positive_rates(model_path):
    engine = LlamaBatchedBackend(ModelSettings(model_path=model_path, n_seq=4, n_ctx=2048))
    try:
        rates = engine.measure_rates(prompt_tokens=64, steps=4)
        assert engine.device().startswith(("cpu", "gpu"))
    finally:
        engine.close()
    assert rates["prefill_tok_s"] > 0 and rates["decode_tok_s"] > 0 and rates["n_seq"] == 4


@pytest.fixture(scope="session")
def restaurant_rows(tmp_path_factory):
    """Four E2E descriptions rendered as tokenmill renders extract prompts, with the restaurants schema."""
    from tokenmill.tasks.extract import prepare_extract
    from tokenmill.tasks.runner import JobConfig

    csv = DATASETS / "e2e" / "dev.csv"
    if not csv.is_file():
        pytest.skip(f"E2E dataset not found at {csv}")
    schema = Path(__file__).resolve().parents[1] / "jobs" / "restaurants.yaml"
    job = prepare_extract(JobConfig(input=str(csv), column="ref", schema=str(schema), limit=4), create_out=False)
    prompts = [job.render(row) for chunk in job.table.chunks(4) for row in chunk.iter_rows(named=True)]
    return job.task.grammar, job.task.parse, prompts


def test_jump_forward_appends_forced_tokens_and_saves_decode_steps(model_path, restaurant_rows, tokenizer):
    grammar, validate, prompts = restaurant_rows
    prompts = prompts[:2]  # two rows in a batch: what jump-forward does is per row
    requests = [greedy(i, p, grammar=grammar, max_tokens=160) for i, p in enumerate(prompts)]
    results = {}
    for jump in (True, False):
        engine = LlamaBatchedBackend(ModelSettings(model_path=model_path, n_seq=4, n_ctx=5 * 1024, jump_forward=jump))
        try:
            results[jump] = ({c.index: c for c in engine.generate(requests)}, dict(engine.stats))
        finally:
            engine.close()
    (on, on_stats), (off, off_stats) = results[True], results[False]
    for got in (on, off):
        assert sorted(got) == list(range(len(prompts)))
        for c in got.values():
            assert c.finish_reason == "stop", (c.index, c.finish_reason, c.text)
            validate(c.text)  # parses as JSON and matches the schema, else raises
    completion = sum(c.completion_tokens for c in on.values())
    assert on_stats["forced_tokens"] > 0 and off_stats["forced_tokens"] == 0
    assert on_stats["generate_calls"] < off_stats["generate_calls"]
    # rows end on EOG, so every completion token, forced or sampled, was decoded once
    assert on_stats["generated_tokens"] == completion
    assert off_stats["generated_tokens"] == sum(c.completion_tokens for c in off.values())
    same = sum(on[i].text == off[i].text for i in on)
    print(f"jump-forward: {on_stats['forced_tokens']}/{completion} completion tokens forced, "
          f"{on_stats['generate_calls']} vs {off_stats['generate_calls']} generation decode calls, "
          f"{on_stats['jump_forward_s'] * 1000:.0f} ms finding forced text; {same}/{len(on)} rows identical on vs off")
    for i in on:
        if on[i].text != off[i].text:
            print(f"row {i} on:  {on[i].text}\n      off: {off[i].text}")


def test_forced_tokens_honour_max_tokens_and_stop_strings(model_path, restaurant_rows):
    grammar, _validate, prompts = restaurant_rows
    requests = [greedy(i, prompts[0], grammar=grammar, max_tokens=i) for i in range(1, 8)]
    requests.append(greedy(8, prompts[0], grammar=grammar, max_tokens=64, stop=["Type"]))
    engine = LlamaBatchedBackend(ModelSettings(model_path=model_path, n_seq=8, n_ctx=9 * 1024))
    try:
        got = {c.index: c for c in engine.generate(requests)}
        stats = dict(engine.stats)
    finally:
        engine.close()
    assert stats["forced_tokens"] > 0
    for i in range(1, 8):
        assert got[i].finish_reason == "length" and got[i].completion_tokens == i, (i, got[i])
        assert got[7].text.startswith(got[i].text)
    # cut at the stop string: every complete reply holds "eatType" (a required field), and the
    # text is the same greedy generation as the rows above, shorter or longer
    cut = got[8].text
    assert got[8].finish_reason == "stop" and "Type" not in cut, cut
    assert cut.startswith(got[7].text) or got[7].text.startswith(cut), (cut, got[7].text)


def test_grammar_rows_sampled_first_give_grammar_first_text(model_path, restaurant_rows):
    """The chosen token is checked against the grammar before the whole vocabulary is: for greedy
    rows that must give exactly what create_completion's grammar-first sampling gives."""
    grammar, validate, prompts = restaurant_rows
    prompts = prompts[:1]  # per token, so one row of ~60 tokens checks it often enough
    llm = llama_cpp.Llama(model_path, n_ctx=1024, verbose=False)
    try:
        reference = [llm.create_completion(p, max_tokens=160, temperature=0,
                                           grammar=llama_cpp.LlamaGrammar.from_string(grammar, verbose=False))
                     for p in prompts]
    finally:
        llm.close()
    engine = LlamaBatchedBackend(ModelSettings(model_path=model_path, n_seq=4, n_ctx=5 * 1024, jump_forward=False))
    try:
        got = {c.index: c for c in engine.generate([greedy(i, p, grammar=grammar, max_tokens=160)
                                                    for i, p in enumerate(prompts)])}
        stats = dict(engine.stats)
    finally:
        engine.close()
    for i, ref in enumerate(reference):
        assert got[i].text == ref["choices"][0]["text"], (i, got[i].text, ref["choices"][0]["text"])
        assert got[i].completion_tokens == ref["usage"]["completion_tokens"]
        validate(got[i].text)
    # the grammar was asked about the chosen token at each step (the rows' last is the end token), some refused
    ended = sum(c.finish_reason == "stop" for c in got.values())
    assert stats["grammar_samples"] == sum(c.completion_tokens for c in got.values()) + ended
    assert 0 < stats["grammar_rejections"] < stats["grammar_samples"]
