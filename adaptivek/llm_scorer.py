"""Complexity labels from any OpenAI-compatible chat-completions endpoint (the paper's method).

The paper labelled its contexts with GPT-4.1-mini on a six-dimension rubric and let the model
compute the weighted score; API errors, timeouts and unparsable replies were stored as 0.0 and
trained on. :class:`LLMScorer` asks for the six dimension scores only (our own prompt wording,
versioned by ``PROMPT_VERSION``), recomputes the weighted score itself with the paper's weights,
and turns every failure into NaN with the reason in an ``error`` column and the log.

Works with OpenAI, vLLM, llama.cpp, Ollama, LM Studio ... (``base_url`` up to ``/v1``). Requests
run ``concurrency`` at a time in threads (so it also works inside Jupyter's event loop), with
exponential backoff on timeouts, connection errors, 408/429 and 5xx (a server's ``Retry-After`` is
honoured up to 60 s; a negative, non-finite or unparsable one falls back to that backoff). Successful
replies are cached on disk, one JSON file per (model, prompt version, text), written atomically; a
cache directory that cannot be written is refused before any request is sent.

No reply is thrown away: every text is scored on its own, so a failure of any kind (an HTTP error, a
broken reply, an unexpected exception, a cache write that fails) costs only that text's row, which
becomes NaN with the reason in ``error``. Error texts are passed through :func:`redact` before they
are stored or logged, so a server that echoes the API key (in full or masked) does not leak it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from .checks import finite_number, int_at_least, text_list
from .complexity import COLUMNS, DIMENSIONS
from .io import cache_root, write_json

log = logging.getLogger(__name__)

PROMPT_VERSION = "adaptivek-rubric-1"
SYSTEM_PROMPT = "You rate how demanding English passages are to read and understand. You answer in JSON only."
PROMPT = """Rate the passage below on six dimensions of complexity. Use a scale from 0 (extremely simple, \
e.g. a sentence for young children) to 10 (highly complex, e.g. a specialist research paper); decimals are \
allowed. Judge each dimension on its own.

- lexical: how demanding the vocabulary is: rare or long words, technical terms, variety of words, and \
the share of content words.
- syntactic: how demanding the sentence structure is: sentence length, clauses per sentence, \
subordination and nesting, passive voice, varied constructions.
- conceptual: how dense and abstract the ideas are: how many distinct concepts, how abstract, how \
tightly related, how much information per sentence.
- domain: how much specialist background the reader needs: field-specific terms, methods, theories or \
figures, and how far the text targets specialists rather than general readers.
- logical: how demanding the reasoning is: conditional, causal and comparative relations, the length of \
reasoning chains, and how much must be inferred.
- contextual: how much the text depends on knowledge it does not give: references to other texts or \
events, cultural or historical knowledge, unstated assumptions, reliance on surrounding discourse.

Passage:
<<<
{text}
>>>

Reply with a JSON object with exactly these keys and numbers from 0 to 10 as values:
{{"lexical": _, "syntactic": _, "conceptual": _, "domain": _, "logical": _, "contextual": _}}"""

# the reference prompt's key names, accepted too (its values are {"score": x})
_ALIASES = {f"{d}_{s}": d for d, s in [("lexical", "complexity"), ("syntactic", "complexity"),
                                         ("conceptual", "density"), ("domain", "specificity"),
                                         ("logical", "structure"), ("contextual", "dependencies")]}
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After is cut to this

REDACTED = "[REDACTED]"
# what looks like a credential in an error body, a log line or an exception message -> its replacement
_SECRET_PATTERNS = [
    (re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+"), rf"\1 {REDACTED}"),  # an Authorization header value
    (re.compile(r"(?i)\b((?:x-)?api[_-]?key|(?:access[_-]?)?token|secret|password|authorization)(\"?\s*[:=]\s*\"?)"
                r"[^\s\"',;}]+"), rf"\1\2{REDACTED}"),  # key=value and "key": "value"
    (re.compile(r"\bsk-[\w*.-]{3,}"), REDACTED),  # OpenAI-style keys, also masked as sk-...****abcd
    (re.compile(r"[^\s\"',;:=]*\*{3,}[^\s\"',;]*"), REDACTED),  # any token a server partly masked with ***
    (re.compile(r"(?<![\w-])[0-9a-fA-F]{32,}(?![\w-])"), REDACTED),  # long hex tokens
    (re.compile(r"(?<![\w+/-])(?=[\w+/=-]*\d)(?=[\w+/=-]*[A-Za-z])[\w+/-]{32,}={0,2}(?![\w+/=-])"),
     REDACTED),  # base64-like tokens mixing letters and digits
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"), REDACTED),  # user:password@ in a URL
]


def parse_scores(content: str) -> tuple[dict[str, float] | None, str | None]:
    """The six dimension scores from a model reply, or ``(None, reason)``."""
    m = _FENCE.match(content)
    try:
        obj = json.loads(m.group(1) if m else content)
    except (json.JSONDecodeError, TypeError) as e:
        return None, f"malformed JSON in reply ({e.msg if hasattr(e, 'msg') else e}): {str(content)[:120]!r}"
    if not isinstance(obj, dict):
        return None, f"reply is JSON {type(obj).__name__}, not an object: {str(content)[:120]!r}"
    obj = {_ALIASES.get(k, k): v for k, v in obj.items()}
    scores: dict[str, float] = {}
    for dim in DIMENSIONS:
        v = obj.get(dim)
        if isinstance(v, dict):
            v = v.get("score")
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            return None, f"missing or non-numeric {dim!r} in reply: {str(content)[:120]!r}"
        try:
            x = float(v)
        except ValueError:
            return None, f"non-numeric {dim!r}={v!r} in reply"
        if not (math.isfinite(x) and 0.0 <= x <= 10.0):
            return None, f"{dim!r}={x} is outside [0, 10]"
        scores[dim] = x
    return scores, None


def weighted(scores: dict[str, float]) -> float:
    """The paper's weighted complexity, recomputed from the dimension scores."""
    return sum(scores[d] * w for d, w in DIMENSIONS.items())


def redact(text: str, secrets: Sequence[str | None] = ()) -> str:
    """``text`` with anything that looks like a credential replaced by ``[REDACTED]``.

    Removes each of ``secrets`` verbatim (the scorer passes its own API key), then bearer/basic
    tokens, ``api_key=...``-style pairs, ``sk-...`` keys, tokens partly masked with ``***``, hex
    tokens of 32+ digits, base64-like tokens of 32+ characters mixing letters and digits, and the
    password of a ``user:password@host`` URL. Used on every error text before it is stored or logged.
    """
    text = str(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    for pat, replacement in _SECRET_PATTERNS:
        text = pat.sub(replacement, text)
    return text


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), at most
    ``MAX_RETRY_AFTER``; None (use the backoff) when it is absent, negative, not finite or unparsable."""
    if value is None:
        return None
    try:
        wait = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            wait = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(wait) or wait < 0:
        return None
    return min(wait, MAX_RETRY_AFTER)


class LLMScorer:
    """Score texts with an LLM on the paper's six-dimension rubric.

    Args:
        base_url: the API root, e.g. ``"https://api.openai.com/v1"`` or ``"http://localhost:8000/v1"``
            (``/chat/completions`` is appended unless already there).
        model: the model name sent to the endpoint, e.g. ``"gpt-4.1-mini"``.
        api_key: bearer token; default ``$OPENAI_API_KEY``; none is sent when neither is set
            (local servers).
        concurrency: requests in flight at once.
        timeout: seconds per request.
        max_retries: retries after the first attempt on timeouts, connection errors, 408/429/5xx.
        backoff: first retry delay in seconds, doubled each retry (a server's valid Retry-After wins).
        cache_dir: where replies are cached; default ``cache_root()/llm_labels``; ``False`` disables.
            One that cannot be written makes ``score`` raise before it sends any request.
        temperature: sampling temperature (the paper used 0.1).
        json_mode: send ``response_format={"type": "json_object"}`` (turn off for servers without it).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 5,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        cache_dir: str | os.PathLike | bool | None = None,
        temperature: float = 0.0,
        json_mode: bool = True,
    ):
        if not base_url or not model:
            raise ValueError("LLMScorer needs a base_url (e.g. https://api.openai.com/v1) and a model name")
        int_at_least(concurrency, "concurrency")
        int_at_least(max_retries, "max_retries", 0)
        finite_number(timeout, "timeout", low=0, low_open=True)
        finite_number(backoff, "backoff", low=0)
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.temperature, self.json_mode = temperature, json_mode
        if cache_dir is False:
            self.cache_dir = None
        else:
            self.cache_dir = Path(cache_dir) if cache_dir not in (None, True) else cache_root() / "llm_labels"

    # ------------------------------------------------------------------------------------- cache
    def _cache_path(self, text: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.model, PROMPT_VERSION, text]).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, text: str) -> dict[str, float] | None:
        path = self._cache_path(text)
        if path is None or not path.exists():
            return None
        try:
            scores, err = parse_scores(json.dumps(json.loads(path.read_text())["scores"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return scores if err is None else None

    # ----------------------------------------------------------------------------------- request
    def _payload(self, text: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": PROMPT.format(text=text)}],
            "temperature": self.temperature,
        }
        if self.json_mode:
            payload["response_format"] = {"type": "json_object"}
        return payload

    def _request(self, client, text: str) -> tuple[dict[str, float] | None, str | None]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        reason, wait = "no attempt made", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(wait or self.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random()))
            wait = 0.0
            try:
                r = client.post(self.url, json=self._payload(text), headers=headers, timeout=self.timeout)
            except httpx.TimeoutException:
                reason = f"timeout after {self.timeout:g} s"
                continue
            except httpx.TransportError as e:
                reason = f"connection error: {type(e).__name__}: {e}"
                continue
            if r.status_code in _RETRY_STATUS:
                reason = f"HTTP {r.status_code}: {r.text[:200]}"
                wait = _retry_after(r.headers.get("retry-after")) or 0.0
                continue
            if r.status_code != 200:
                return None, f"HTTP {r.status_code} (not retried): {r.text[:200]}"
            try:
                content = r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return None, f"malformed API response body: {r.text[:200]!r}"
            return parse_scores(content if isinstance(content, str) else json.dumps(content))
        return None, f"{reason} (gave up after {self.max_retries + 1} attempts)"

    def _redact(self, text: str) -> str:
        return redact(text, [self.api_key])

    def _score_one(self, client, text: str) -> dict[str, Any]:
        """One text's row; any exception costs only this row (NaN with the reason), never the others."""
        if not text.strip():
            return {"error": "empty text"}
        try:
            scores = self._cached(text)
            if scores is None:
                scores, err = self._request(client, text)
                if err is not None:
                    err = self._redact(err)
                    log.warning("LLM label failed (%s) for text %r", err, text[:60])
                    return {"error": err}
                self._store(text, scores)
        except Exception as e:  # noqa: BLE001 - a bug or fault here must not discard the other replies
            err = self._redact(f"unexpected error: {type(e).__name__}: {e}")
            log.warning("LLM label failed (%s) for text %r", err, text[:60])
            return {"error": err}
        return {**scores, "complexity": weighted(scores), "error": None}

    def _store(self, text: str, scores: dict[str, float]) -> None:
        """Cache a reply; a failed write is logged and the reply kept (it was received and paid for)."""
        path = self._cache_path(text)
        if path is None:
            return
        try:
            write_json(path, {"model": self.model, "prompt_version": PROMPT_VERSION, "scores": scores})
        except OSError as e:
            log.warning("could not cache an LLM reply in %s (%s); the label is kept", path.parent, e)

    def _check_cache_dir(self) -> None:
        """Refuse a cache directory that cannot be created or written, before any request is paid for."""
        if self.cache_dir is None:
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.cache_dir):
                pass
        except OSError as e:
            raise PermissionError(
                f"LLMScorer cannot write its cache directory {self.cache_dir} ({type(e).__name__}: "
                f"{e.strerror or e}); pass a writable cache_dir=, or cache_dir=False to score without a cache"
            ) from None

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """One row per text: the six dimensions and ``complexity`` in [0, 10] (NaN on failure), ``error``.

        Raises ``PermissionError`` before any request when ``cache_dir`` cannot be written. Otherwise
        it never raises for a single text: failed rows are NaN, their (redacted) reason in ``error``,
        and one warning counts them by reason.
        """
        import httpx

        texts = text_list(texts)
        self._check_cache_dir()
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(limits=limits) as client, ThreadPoolExecutor(self.concurrency) as pool:
            rows = list(pool.map(lambda t: self._score_one(client, t), texts))
        df = pd.DataFrame(rows, columns=[*COLUMNS, "error"]).astype({c: float for c in COLUMNS})
        failed = df["error"].notna()
        if failed.any():
            reasons = df.loc[failed, "error"].str.replace(r"\(gave up.*|:.*", "", regex=True).value_counts()
            warnings.warn(f"{int(failed.sum())} of {len(df)} texts could not be scored and are NaN: "
                          + "; ".join(f"{k.strip()} x{v}" for k, v in reasons.items()), stacklevel=2)
        return df
