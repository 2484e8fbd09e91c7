"""One `generate` call of the batched engine (llama_batched.py): its rows, slots, the prefix
sequence and the step loop.

How a run works:
- Sequence 0 holds the most recently seen common prompt prefix; rows live in sequences
  1..S. A new row copies the prefix it shares (`llama_memory_seq_cp`) and decodes only the
  rest of its prompt; the prefix is trimmed to what rows keep sharing.
- Each step decodes the next token of every generating row, prefix tokens and prompt
  chunks of rows being admitted, up to n_batch tokens (see `Run.plan_step`).
- Requests are pulled only when a slot is free; a row waits until its KV cells fit.
- Isolated mode keeps a finished row's prompt in its slot (`_held`), across rows and
  `generate` calls. A new row whose prompt begins with tokens a free slot still holds is
  seated there and decodes only the rest, with no copy (an agent's chat step after step, a
  repair turn, few-shot examples): the row reports them as cached_tokens. The tokens it
  generated are not kept: they were decoded one at a time, which rounds differently from a
  prompt evaluation, so a row continuing from them would not give the text create_completion
  gives for its prompt, and a resumed simulation would drift from an uninterrupted one (2 of
  4 agents' first actions after a kill differed when they were kept). Their text mostly has
  to be evaluated again anyway: the tokenizer splits a reply differently from how it was
  sampled (measured: about 10 of 45 reply tokens matched). A slot's old tokens are simply
  overwritten when it is reused, and a new row prefers an empty slot, then the one used
  longest ago.
- Jump-forward (`ModelSettings.jump_forward`, see jump_forward.py): after a grammar row
  samples a token, the tokens its grammar forces next are appended unsampled and decoded
  with it in the row's next generation call. Isolated mode: llama.cpp cuts that call into
  equal parts per sequence, so every row's first token lands in the first part as before
  (rows without grammar keep their exact text) and forced tails go in later parts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import llama_cpp

from tokenmill.models.base import Completion, GenerationRequest
from tokenmill.models.llama_sampling import RowError, RowText, token_piece, tokenize_prompt
from tokenmill.models.row_sampler import RowSampler

if TYPE_CHECKING:
    from tokenmill.models.llama_batched import LlamaBatchedBackend

PREFIX_SEQ = 0
MIN_SHARED = 8  # a shorter common prefix is not worth trimming the cached one for
IDLE_WAIT_S = 0.005


@dataclass(eq=False)
class Row:
    req: GenerationRequest
    tokens: list[int]
    sampler: object
    text: RowText
    t_pulled: float
    slot: int = -1
    shared: int = 0  # prompt tokens copied from the prefix sequence
    counted: int = 0  # of those, cells the prefix's reservation still pays for
    n_past: int = 0  # this row's positions now in the KV cache
    started: bool = False  # prefix copied, own tokens being decoded
    next_token: int = -1  # sampled, decoded in the next step; -1 while prompting
    forced: list[int] = field(default_factory=list)  # jump-forward tokens decoded after next_token
    grammar: object = None  # the chain's grammar sampler when jump-forward applies to this row
    t_admit: float = 0.0
    t_prompt_end: float = 0.0

    @property
    def cells(self) -> int:
        return len(self.tokens) + self.req.max_tokens - self.counted


class Run:
    """The state of one `generate` call: slots, rows, the prefix sequence and the step loop."""

    def __init__(self, engine: "LlamaBatchedBackend", source: Iterator[GenerationRequest]):
        self.e = engine
        self.source = source
        self.exhausted = False
        self.pending: Row | None = None  # pulled, waiting for a slot or KV cells
        self.rows: list[Row] = []  # admitted, in admission order
        self.free = list(range(1, engine.n_seq + 1))  # sequence ids 1..S
        self.out: list[Completion] = []

    def loop(self) -> Iterator[Completion]:
        base, t0 = self.e.stats["run_s"], time.perf_counter()
        while True:
            self.e.stats["run_s"] = base + time.perf_counter() - t0  # time inside generate, for the breakdown
            self.admit()
            yield from self.flush()
            if not self.rows:
                if self.exhausted:
                    return  # admit() seats any pending row once nothing runs, so all is done
                time.sleep(IDLE_WAIT_S)  # the source has nothing now; more may come
                self.e.stats["idle_s"] += IDLE_WAIT_S
                continue
            self.start_ready()
            for call in self.plan_step():
                self.decode(call)
            yield from self.flush()

    def flush(self) -> Iterator[Completion]:
        out, self.out = self.out, []
        yield from out

    # -- admission --

    def admit(self) -> None:
        t0 = time.perf_counter()
        while self.free and (self.pending is not None or self.pull()):
            need = len(self.pending.tokens) + self.pending.req.max_tokens
            if need > self.e.stream_ctx:  # a longer row than the streams hold: drain, then grow them
                if self.rows:
                    break
                self.e.grow_streams(need)
            plan = self.choose_plan(self.pending)
            if plan is None:
                break  # no room: wait for a running row to finish
            row, self.pending = self.pending, None
            self.seat(row, *plan)
        self.e.stats["admit_s"] += time.perf_counter() - t0  # reading requests, tokenizing, samplers

    def pull(self) -> bool:
        """Fetch and check requests until one is pending; False when the input has ended."""
        while not self.exhausted:
            try:
                req = next(self.source)
            except StopIteration:
                self.exhausted = True
                return False
            if req is None:  # nothing to admit right now (see LlamaBatchedBackend.polls_input)
                return False
            self.pending = self.prepare(req)
            if self.pending is not None:
                return True
        return False

    def prepare(self, req: GenerationRequest) -> Row | None:
        t, e, tokens = time.perf_counter(), self.e, []
        try:
            tokens = tokenize_prompt(e._vocab, req.prompt)
            if req.max_tokens <= 0:
                raise RowError(f"max_tokens must be at least 1 (got {req.max_tokens})")
            if not tokens:
                raise RowError("the prompt is empty (it tokenizes to no tokens)")
            if len(tokens) + req.max_tokens > e.row_ctx:
                raise RowError(
                    f"row needs {len(tokens) + req.max_tokens} tokens (prompt {len(tokens)} + max_tokens "
                    f"{req.max_tokens}) but the context holds only {e.row_ctx}; raise --n-ctx or lower --max-tokens"
                )
            sampler = RowSampler(e._vocab, req, e._candidates, e.stats)
        except RowError as err:
            self.out.append(Completion(req.index, None, "error", error=str(err), prompt_tokens=len(tokens)))
            return None
        text = RowText(stop=[s.encode("utf-8") for s in req.stop if s], bos=llama_cpp.llama_vocab_bos(e._vocab))
        grammar = sampler.grammar if e.jump else None
        return Row(req=req, tokens=tokens, sampler=sampler, text=text, t_pulled=t, grammar=grammar)

    def choose_plan(self, row: Row) -> tuple[str, int, int | None] | None:
        """(mode, shared tokens, slot or None for any): how the row will use what the cache
        holds, or None while its cells do not fit. "keep": continue from a free slot's held
        tokens; else how it uses the prefix sequence."""
        e, n = self.e, len(row.tokens)
        # the row decodes at least its last 2 prompt tokens: the last for logits, and a lone
        # token would take another kernel path (see plan_step)
        lcp = _common_prefix(e._prefix, row.tokens, n - 2)
        kept, slot = self.best_kept(row)
        if kept >= MIN_SHARED and kept >= lcp:
            return "keep", kept, slot
        nobody_waits = all(r.started for r in self.rows)  # else the prefix must stay as it is
        options = []
        if lcp >= MIN_SHARED:
            options.append(("share", lcp))
        elif nobody_waits and n - 2 >= MIN_SHARED:
            options.append(("replace", n - 2))
        options.append(("none", 0))
        if nobody_waits:
            options.append(("drop", 0))  # give the prefix's cells back when memory is tight
        for mode, shared in options:
            if not e.kv_unified or self.cells_after(row, mode, shared) <= e.n_ctx:
                return mode, shared, None
        return None

    def best_kept(self, row: Row) -> tuple[int, int | None]:
        """(tokens, slot): the free slot whose held tokens begin the row's prompt the longest way
        (the lowest such slot on a tie); (0, None) when none does."""
        best, slot = 0, None
        for s in self.free:
            held = self.e._held.get(s)
            if held:
                k = _common_prefix(held, row.tokens, len(row.tokens) - 2)
                if k > best or (k == best and k and s < slot):
                    best, slot = k, s
        return best, slot

    def take_slot(self) -> int:
        """A free slot for a row that keeps nothing: the lowest empty one (slots in use stay
        packed, see fill_gaps), else the one a row left longest ago."""
        e = self.e
        return min(self.free, key=lambda s: (s in e._held, e._last_used.get(s, 0), s))

    def cells_after(self, row: Row, mode: str, shared: int) -> int:
        """Unified cache: cells reserved once `row` is seated this way (never an underestimate)."""
        need = len(row.tokens) + row.req.max_tokens
        if mode == "share":  # the prefix shrinks to `shared`; rows sharing more pay the rest
            return shared + sum(r.cells + r.counted - min(r.counted, shared) for r in self.rows) + need - shared
        if mode in ("replace", "drop"):  # rows keep their copies alone; the new prefix is this row's
            return sum(r.cells + r.counted for r in self.rows) + need
        return len(self.e._prefix) + sum(r.cells for r in self.rows) + need

    def seat(self, row: Row, mode: str, shared: int, slot: int | None) -> None:
        e = self.e
        row.slot = slot if mode == "keep" else self.take_slot()
        self.free.remove(row.slot)
        if e._held.pop(row.slot, None) is not None:  # what the slot held beyond the shared part goes
            llama_cpp.llama_memory_seq_rm(e._mem, row.slot, shared if mode == "keep" else 0, -1)
        if mode == "keep":
            row.shared, row.n_past, row.started = shared, shared, True
        elif mode == "share":
            self.trim_prefix(shared)
        elif mode in ("replace", "drop"):
            llama_cpp.llama_memory_seq_rm(e._mem, PREFIX_SEQ, -1, -1)
            for r in self.rows:
                r.counted = 0
            e._prefix, e._prefix_done = (row.tokens[:shared] if mode == "replace" else []), 0
        if mode != "keep":
            row.shared = row.counted = shared
        row.t_admit = time.perf_counter()
        self.rows.append(row)

    def trim_prefix(self, length: int) -> None:
        e = self.e
        if length >= len(e._prefix):
            return
        e._prefix = e._prefix[:length]
        keep = max(0, length - 2) if e._prefix_done == length - 1 else length  # no lone token left to decode
        if e._prefix_done > keep:
            llama_cpp.llama_memory_seq_rm(e._mem, PREFIX_SEQ, keep, -1)
            e._prefix_done = keep
        for r in self.rows:
            r.counted = min(r.counted, length)
            if not r.started:
                r.shared = min(r.shared, length)

    def start_ready(self) -> None:
        """Copy the prefix into rows whose shared part is now in the cache."""
        for r in self.rows:
            if not r.started and self.e._prefix_done >= r.shared:
                if r.shared:
                    self.e._copy_prefix(PREFIX_SEQ, r.slot, r.shared)
                r.n_past, r.started = r.shared, True

    # -- one decode step --

    def plan_step(self) -> list[list[tuple[Row | None, int]]]:
        """Split this step's work into llama_decode calls of (row or None for the prefix, tokens).

        At most n_batch tokens in all: generated tokens first, then the prefix, then prompt
        chunks. Unified: one call. Isolated: one call for the generated tokens, then one per
        prompt chunk, because llama.cpp splits a multi-stream batch into equal parts per
        sequence, which could leave a prompt token alone in a part; a lone token's attention
        takes another kernel path and rounds differently from the reference.
        """
        e = self.e
        gen = sorted(((r, 1 + len(r.forced)) for r in self.rows if r.next_token >= 0), key=lambda rk: rk[0].slot)
        room = e.n_batch - sum(k for _r, k in gen)
        work = []
        k = _chunk(len(e._prefix) - e._prefix_done, room)
        if k:
            work.append((None, k))
            room -= k
        for r in self.rows:
            if r.started and r.next_token < 0:
                k = _chunk(len(r.tokens) - r.n_past, room)
                if k:
                    work.append((r, k))
                    room -= k
        if e.kv_unified:
            return [gen + work] if gen or work else []
        return ([gen] if gen else []) + [[w] for w in work]

    def decode(self, call: list[tuple[Row | None, int]]) -> None:
        e, plan, n = self.e, [], 0
        call = [(r, k) for r, k in call if r is None or r in self.rows]  # an earlier call may have failed rows
        for row, k in call:
            if row is None:
                for j in range(k):
                    pos = e._prefix_done + j
                    e._put(n + j, e._prefix[pos], pos, PREFIX_SEQ, False)
                plan.append((None, -1, k))
            elif row.next_token >= 0:  # the sampled token, then any forced ones
                for j, token in enumerate([row.next_token, *row.forced]):
                    e._put(n + j, token, row.n_past + j, row.slot, j == k - 1)
                plan.append((row, n + k - 1, k))
            else:
                last = row.n_past + k == len(row.tokens)  # logits only for the prompt's last token
                for j in range(k):
                    e._put(n + j, row.tokens[row.n_past + j], row.n_past + j, row.slot, last and j == k - 1)
                plan.append((row, n + k - 1 if last else -1, k))
            n += k
        if not n:
            return
        gaps = self.fill_gaps(call, n) if not e.kv_unified else []
        ret = e._decode(n + len(gaps))
        for slot, pos in gaps:  # the stand-in tokens leave nothing behind
            llama_cpp.llama_memory_seq_rm(e._mem, slot, pos, -1)
        if e.on_step is not None:
            e.on_step()  # the worker's heartbeat: long prompts are work, not a hang
        if ret != 0:
            return self.on_decode_failure(ret, plan)
        n_gen = sum(k for r, k in call if r is not None and r.next_token >= 0)
        e.stats["generate_calls"] += n_gen > 0
        e.stats["prompt_tokens"] += n - n_gen
        e.stats["generated_tokens"] += n_gen
        # per-phase time: a mixed call (unified mode) is shared out by its tokens
        e.stats["generate_s"] += e.last_decode_s * n_gen / n
        e.stats["prompt_s"] += e.last_decode_s * (n - n_gen) / n
        self.after_decode(plan)

    def fill_gaps(self, call: list[tuple[Row | None, int]], n: int) -> list[tuple[int, int]]:
        """Isolated streams: llama.cpp cuts a batch into parts of consecutive sequence ids, so
        generated tokens of slots 1, 2, 4 would take two passes over the weights where one does.
        A stand-in token for each slot in such a gap (at the slot's next position, no logits)
        keeps them one part; it is removed after the call. Returns the (slot, position) added."""
        if not call or any(r is None or r.next_token < 0 for r, _k in call):
            return []  # only the call of generated tokens
        slots = {r.slot for r, _k in call}
        if n + max(slots) - min(slots) + 1 - len(slots) > self.e.n_batch:
            return []  # no room in the batch: llama.cpp will cut it
        owner = {r.slot: r for r in self.rows}
        gaps = []
        for slot in range(min(slots) + 1, max(slots)):
            if slot not in slots:
                row = owner.get(slot)
                pos = row.n_past if row is not None and row.started else len(self.e._held.get(slot, ()))
                self.e._put(n + len(gaps), self.e._filler, pos, slot, False)
                gaps.append((slot, pos))
        return gaps

    def after_decode(self, plan) -> None:
        e, now = self.e, time.perf_counter()
        for row, idx, k in plan:
            if row is None:
                e._prefix_done += k
                continue
            row.n_past += k
            if idx < 0:
                continue  # a prompt chunk with more to come
            if row.next_token < 0:
                row.t_prompt_end = now
            row.forced = []
            t0 = time.perf_counter()
            token = row.sampler.sample(e._ctx, idx)  # this also accepts it
            t1 = time.perf_counter()
            self.consume(row, token)
            e.stats["sample_s"] += t1 - t0
            e.stats["text_s"] += time.perf_counter() - t1  # detokenize, stops, jump-forward (also in jump_forward_s)

    def consume(self, row: Row, token: int) -> None:
        e = self.e
        if llama_cpp.llama_vocab_is_eog(e._vocab, token):
            return self.finish(row, "stop")  # the EOG token is not counted, as in create_completion
        if self.append(row, token):
            return
        row.sampler.watch(row.text.data)  # a grammar row whose string repeats a phrase closes it next
        if row.grammar is not None:  # jump-forward: tokens the grammar forces next, unsampled
            row.forced = e.jump.forced_tokens(row.grammar, min(e.max_forced, row.req.max_tokens - len(row.text.tokens)))
            for tok in row.forced:
                row.sampler.accept(tok)  # once: nothing sampled it
                e.stats["forced_tokens"] += 1
                if self.append(row, tok):
                    return
        row.next_token = token

    def append(self, row: Row, token: int) -> bool:
        """Add a generated token to the row's text; True when that finished the row."""
        if row.text.add(token, token_piece(self.e._vocab, token)):
            self.finish(row, "stop")
        elif len(row.text.tokens) >= row.req.max_tokens:
            self.finish(row, "length")
        else:
            return False
        return True

    def finish(self, row: Row, reason: str, error: str | None = None) -> None:
        now = time.perf_counter()
        end = row.t_prompt_end or now
        self.out.append(Completion(
            index=row.req.index,
            text=None if error else row.text.text(),
            finish_reason="error" if error else reason,
            error=error,
            prompt_tokens=len(row.tokens),
            cached_tokens=row.shared if row.started else 0,
            completion_tokens=len(row.text.tokens),
            queue_ms=(row.t_admit - row.t_pulled) * 1000,
            prompt_ms=(end - row.t_admit) * 1000,
            decode_ms=(now - end) * 1000,
            logprob=row.sampler.logprob if row.sampler is not None else None,
        ))
        self.release(row, keep=error is None)

    def release(self, row: Row, keep: bool = False) -> None:
        """Give the row's slot back; `keep` (isolated mode, a row that ended well) leaves its
        prompt's tokens in the slot for a later row that begins with them."""
        e = self.e
        if row.sampler is not None:
            row.sampler.free()
            row.sampler = None
        if row in self.rows:
            self.rows.remove(row)
            if keep and row.started and not e.kv_unified:
                e._held[row.slot] = row.tokens[: row.n_past]  # the prompt only (module docstring)
                llama_cpp.llama_memory_seq_rm(e._mem, row.slot, len(e._held[row.slot]), -1)
                e._releases += 1
                e._last_used[row.slot] = e._releases
            elif e._ctx:  # the engine may have been closed under a suspended generator
                llama_cpp.llama_memory_seq_rm(e._mem, row.slot, -1, -1)
            self.free.append(row.slot)

    def release_all(self) -> None:
        """Free what an interrupted run still holds (the prefix stays cached for the next run)."""
        for row in list(self.rows):
            self.release(row)
        if self.pending is not None:
            self.release(self.pending)
            self.pending = None

    def on_decode_failure(self, ret: int, plan) -> None:
        """Fail rows, not the run. On 1 (no KV slot) llama.cpp restored the cache."""
        e = self.e
        if ret == 1:  # our budget should prevent this; the newest row gives way
            return self.finish(self.rows[-1], "error", "the KV cache is full (llama_decode returned 1); lower --n-seq")
        for row, _idx, _k in plan:
            if row is not None and row in self.rows:
                self.finish(row, "error", f"llama_decode failed (returned {ret})")
        if any(row is None for row, _idx, _k in plan):  # the prefix may be half written
            llama_cpp.llama_memory_seq_rm(e._mem, PREFIX_SEQ, -1, -1)
            e._prefix, e._prefix_done = [], 0
            for r in self.rows:
                r.counted = 0
                if not r.started:
                    r.shared = 0


def _chunk(remaining: int, room: int) -> int:
    """Tokens to decode now out of `remaining`: never split off a lone token (see plan_step)."""
    k = min(remaining, room)
    if remaining - k == 1:
        k -= 1
    return 0 if k == 1 and remaining > 1 else k


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
