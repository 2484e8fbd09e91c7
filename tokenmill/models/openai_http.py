"""A backend that sends rows to an OpenAI-compatible HTTP server.

`--model http://HOST:PORT[/v1][#MODEL]` names llama.cpp's llama-server, llamafile's server,
Ollama's `/v1`, vLLM, LM Studio or llama-cpp-python's own server. Requests run concurrently up
to `concurrency` (default: the slot count the server reports at `/props`, else 4), each with
timeouts and retries with exponential backoff on connection errors, timeouts, 429 and 5xx.
Token counts come from the server's `usage`.

A request holding a rendered `prompt` goes to `/v1/completions` (tokenmill rendered the chat
template itself); one holding `messages` goes to `/v1/chat/completions` and the server applies
its template. A JSON Schema becomes `response_format`: OpenAI's `json_schema` form first, then
llama.cpp's `json_object` + `schema` form; a server that takes neither gets the request
unconstrained and the caller validates and repairs the reply (as for GPT4All).

Row jobs send `messages` when tokenmill has no tokenizer for the server's model (Ollama, vLLM,
LM Studio, or `--backend-option tokenizer=none`; see server_info.py). A reply whose reported
prompt tokens fall short of the prompt is an error row naming the fix (`truncation`): Ollama
cuts a prompt longer than its context without saying so.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import httpx

from tokenmill.errors import ModelError
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings
from tokenmill.models.estimate import least_tokens

DEFAULT_CONCURRENCY = 4
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_SCHEMA_STYLES = ("json_schema", "json_object", None)  # tried in this order, the first that works is kept


def is_http_model(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(("http://", "https://"))


def parse_url(spec: str) -> tuple[str, str, str | None]:
    """`http://HOST:PORT[/v1][#MODEL]` -> (API base ending in /v1, server root, model or None)."""
    parts = urlsplit(spec)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelError(f"--model {spec} is not a server URL; write http://HOST:PORT[/v1][#MODEL]")
    path = parts.path.rstrip("/")
    root_path = path.removesuffix("/v1")
    root = f"{parts.scheme}://{parts.netloc}{root_path}"
    return f"{root}/v1", root, parts.fragment or None


class ServerError(Exception):
    """One request failed; `retry` says whether another try may succeed."""

    def __init__(self, message: str, retry: bool, status: int | None = None):
        super().__init__(message)
        self.retry = retry
        self.status = status


class OpenAIHTTPBackend:
    """Backend protocol (tokenmill.models.base) over an OpenAI-compatible server."""

    polls_input = False  # the feeding thread may block on the next request: replies come from other threads

    def __init__(self, settings: ModelSettings, concurrency: int = 0, timeout_s: float = 600.0,
                 connect_timeout_s: float = 5.0, retries: int = 3, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, api_key: str | None = None):
        self.settings = settings
        self.on_step: Callable[[], None] | None = None
        self.url = settings.model_path
        self.base, self.root, self.model = parse_url(self.url)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s), headers=headers,
                                   limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._schema_style_index = 0
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {"requests": 0, "retries": 0}
        self.server = "openai-compatible"
        self.slots: int | None = None
        self._probe()
        self.concurrency = concurrency or self.slots or DEFAULT_CONCURRENCY

    # ------------------------------------------------------------ discovery

    def _down(self, exc: Exception) -> ModelError:
        reason = _reason(exc)
        return ModelError(f"cannot reach the model server {self.url}: {reason} (is it running? start it or fix --model)")

    def _probe(self) -> None:
        """Check the server is up before any row; learn its model, slot count and kind."""
        try:
            response = self.client.get(f"{self.base}/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise self._down(exc) from None
        if response.status_code in (401, 403):
            raise ModelError(f"the model server {self.url} refused tokenmill (HTTP {response.status_code}); "
                             "set the API key it expects (OPENAI_API_KEY)")
        if response.status_code >= 400:
            raise ModelError(f"the model server {self.url} answered GET {self.base}/models with HTTP "
                             f"{response.status_code}; is it an OpenAI-compatible server?")
        try:
            models = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
        except (ValueError, AttributeError):
            raise ModelError(f"the model server {self.url} answered GET {self.base}/models with something "
                             "other than a model list; is it an OpenAI-compatible server?") from None
        if self.model is None:
            if not models:
                raise ModelError(f"the model server {self.url} lists no models; name one: {self.url}#MODEL")
            self.model = models[0]
        elif models and self.model not in models:
            raise ModelError(f"the model server {self.url} has no model {self.model!r}; it has: "
                             f"{', '.join(models[:10])}")
        self.slots = self._get_json(f"{self.root}/props", "total_slots")  # llama-server, llamafile
        if self._get_json(f"{self.root}/api/version", "version") is not None:
            self.server = "ollama"
        elif self.slots is not None:
            self.server = "llama-server"

    def _get_json(self, url: str, key: str) -> Any:
        try:
            response = self.client.get(url, timeout=5.0)
            return response.json().get(key) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    def device(self) -> str:
        return f"http: {self.url} ({self.server}, model {self.model}, {self.concurrency} concurrent)"

    # ------------------------------------------------------------ generation

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        """Run requests `concurrency` at a time; yield each completion as it finishes."""
        done: queue.Queue = queue.Queue()
        slots = threading.Semaphore(self.concurrency)
        fed = threading.Event()
        failure: list[BaseException] = []
        submitted = 0

        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="tokenmill-http") as pool:
            def run_one(request: GenerationRequest) -> None:
                try:
                    done.put(self._complete(request))
                except BaseException as exc:  # a bug: reported on the row rather than lost
                    done.put(Completion(request.index, None, "error", error=f"{type(exc).__name__}: {exc}"))
                finally:
                    slots.release()

            def feed() -> None:
                nonlocal submitted
                try:
                    for request in requests:
                        if request is None:  # a polling caller's "nothing now"
                            time.sleep(0.01)
                            continue
                        slots.acquire()
                        submitted += 1
                        pool.submit(run_one, request)
                except BaseException as exc:
                    failure.append(exc)
                finally:
                    fed.set()
                    done.put(None)  # wake the consumer

            feeder = threading.Thread(target=feed, name="tokenmill-http-feed", daemon=True)
            feeder.start()
            received = 0
            while True:
                try:
                    item = done.get(timeout=1.0)
                except queue.Empty:  # requests still at the server: alive, not hung (timeouts bound them)
                    if self.on_step:
                        self.on_step()
                    continue
                if item is None:
                    if fed.is_set() and received == submitted:
                        break
                    continue
                received += 1
                if self.on_step:
                    self.on_step()
                yield item
                if fed.is_set() and received == submitted:
                    break
            feeder.join()
        if failure:
            raise failure[0]

    def _complete(self, request: GenerationRequest) -> Completion:
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                body, usage, timings = self._post(request)
                break
            except ServerError as exc:
                if not exc.retry or attempt >= self.retries:
                    tries = f" (gave up after {attempt + 1} tries)" if exc.retry else ""
                    return Completion(request.index, None, "error", error=f"{exc}{tries}",
                                      decode_ms=(time.perf_counter() - started) * 1000)
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
                attempt += 1
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(delay)
        choice = (body.get("choices") or [{}])[0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content")
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion = Completion(
            index=request.index, text=text if text is not None else "",
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=prompt_tokens, completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                              or timings.get("cache_n") or 0),
            prompt_ms=float(timings.get("prompt_ms") or 0.0),
            decode_ms=float(timings.get("predicted_ms") or (time.perf_counter() - started) * 1000))
        truncated = truncation(self.url, self.server, request, prompt_tokens)
        if truncated:
            completion.text, completion.finish_reason, completion.error = None, "error", truncated
        return completion

    def _payload(self, request: GenerationRequest, style: str | None) -> tuple[str, dict]:
        payload: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "seed": request.seed, "stream": False,
            # llama.cpp-family servers read these; others ignore unknown fields
            "top_k": request.top_k, "min_p": request.min_p, "repeat_penalty": request.repeat_penalty,
        }
        if request.stop:
            payload["stop"] = list(request.stop)
        messages = request.messages
        schema = request.json_schema
        if schema is not None and style == "json_schema":
            payload["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": "row", "schema": schema, "strict": True}}
        elif schema is not None and style == "json_object":
            payload["response_format"] = {"type": "json_object", "schema": schema}
        if messages is not None:
            payload["messages"] = messages
            if request.grammar and "response_format" not in payload:
                payload["grammar"] = request.grammar  # llama.cpp-family servers read it (tag's labels); others ignore it
            return f"{self.base}/chat/completions", payload
        payload["prompt"] = request.prompt
        # A raw prompt goes to /completions, where OpenAI's API has no response_format. llama-server
        # (and llamafile's) reads its own `json_schema` field there; llama-cpp-python's server reads
        # a GBNF `grammar` (the request's, made from the same schema by the same converter). A server
        # reads one of the two and refuses both together; others ignore unknown fields.
        if schema is not None and style is not None and self.server == "llama-server":
            payload["json_schema"] = schema
        elif request.grammar:
            payload["grammar"] = request.grammar
        return f"{self.base}/completions", payload

    def _post(self, request: GenerationRequest) -> tuple[dict, dict, dict]:
        schema = request.json_schema
        while True:
            style_index = self._schema_style_index
            url, payload = self._payload(request, _SCHEMA_STYLES[style_index])
            with self._lock:
                self.stats["requests"] += 1
            try:
                response = self.client.post(url, json=payload)
            except httpx.TimeoutException as exc:
                raise ServerError(f"the model server {self.url} did not answer in time ({_reason(exc)})", True)
            except httpx.HTTPError as exc:
                raise ServerError(f"the model server {self.url} is unreachable: {_reason(exc)}", True)
            status = response.status_code
            if status >= 400 and schema is not None and style_index < len(_SCHEMA_STYLES) - 1 \
                    and _refuses_schema(status, _detail(response)):
                with self._lock:  # this form of response_format is refused: try the next one
                    if self._schema_style_index == style_index:
                        self._schema_style_index += 1
                continue
            if status in RETRY_STATUS:
                raise ServerError(f"the model server {self.url} answered HTTP {status}: {_detail(response)}", True,
                                  status)
            if status >= 400:
                raise ServerError(f"the model server {self.url} refused the request: HTTP {status}: "
                                  f"{_detail(response)}", False, status)
            try:
                body = response.json()
            except ValueError:
                raise ServerError(f"the model server {self.url} sent a reply that is not JSON", True) from None
            return body, body.get("usage") or {}, body.get("timings") or {}

    @property
    def schema_style(self) -> str | None:
        """How this server takes a JSON Schema: "json_schema", "json_object" or None (it cannot)."""
        return _SCHEMA_STYLES[self._schema_style_index]

    def close(self) -> None:
        self.client.close()


MIN_WORDS_CHECKED = 32  # a shorter conversation is mostly the server's template: nothing to judge by


def truncation(url: str, server: str, request: GenerationRequest, reported: int) -> str | None:
    """Why a reply cannot stand because the server read less of the prompt than it holds, or None.

    Ollama (and LM Studio) cut a prompt longer than their context without saying so; the reply
    then answers part of the text. The reported prompt tokens tell it: fewer than tokenmill's own
    count (`expected_prompt_tokens`, from the model's tokenizer: exact for a rendered prompt,
    5% slack for messages the server renders), or, with no count of tokenmill's own, fewer than the
    prompt or the messages have words (estimate.least_tokens: no token spans two words).
    """
    if not reported:  # a server that reports no usage: nothing to judge by
        return None
    expected = request.expected_prompt_tokens
    if expected:
        slack = 0 if request.messages is None else max(8, expected // 20)
        if reported >= expected - slack:
            return None
    else:
        text = request.prompt if request.messages is None else \
            "\n".join(str(m.get("content") or "") for m in request.messages)
        expected = least_tokens(text)
        if expected < MIN_WORDS_CHECKED or reported >= expected:
            return None
    fix = ("raise its context to at least --n-ctx (num_ctx: OLLAMA_CONTEXT_LENGTH=N ollama serve, or PARAMETER "
           "num_ctx N in a Modelfile)" if server == "ollama" else "raise the server's context size to at least --n-ctx")
    return (f"the model server {url} read only {reported} of the prompt's {expected}+ tokens: it cut the prompt to "
            f"fit its context; {fix}, or lower --n-ctx to the server's context so long texts are cut into parts")


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    return text.splitlines()[0][:200]


def _refuses_schema(status: int, detail: str) -> bool:
    """A reply refusing the form of response_format (llama-cpp-python's server answers 500)."""
    return status in (400, 422) or "response_format" in detail or "json_schema" in detail


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
        if isinstance(error, dict):
            error = error.get("message", error)
        text = str(error)
    except ValueError:
        text = response.text
    return " ".join(text.split())[:300] or response.reason_phrase
