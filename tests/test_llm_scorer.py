"""LLMScorer against a real HTTP server on 127.0.0.1: good replies, retries, timeouts, broken JSON."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from adaptivek.llm_scorer import PROMPT_VERSION, LLMScorer, parse_scores

GOOD = {"lexical": 2.0, "syntactic": 4.0, "conceptual": 6.0, "domain": 8.0, "logical": 10.0, "contextual": 0.0}
GOOD_WEIGHTED = 0.2 * 2 + 0.2 * 4 + 0.25 * 6 + 0.15 * 8 + 0.1 * 10 + 0.1 * 0  # 4.9


KEY = "sk-proj-T3stKey0123456789abcdefXYZ"
_LEAKS = {  # mode -> the error body, from the Authorization header the server received
    "echo": lambda auth: f"Incorrect API key provided: {auth[len('Bearer '):]}",
    "masked": lambda auth: f"Incorrect API key provided: {auth[7:15]}{'*' * 20}{auth[-4:]}",
    "bearer": lambda auth: f"rejected header Authorization: {auth}",
    "hex": lambda auth: f"session {'0123456789abcdef' * 3} expired",
    "base64": lambda auth: "token=" + "QWxhZGRpbjpvcGVuIHNlc2FtZQ9x" * 2,
    "verbatim": lambda auth: f"your key {auth[len('Bearer '):]} is not allowed",
}


class _Handler(BaseHTTPRequestHandler):
    """Behaviour by URL prefix: /ok, /flaky (500 once per text), /slow (sleeps), /broken, /range, /fenced,
    /retry=<Retry-After> (503 once per text), and the key-leaking error bodies of ``_LEAKS``."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        mode = self.path.split("/")[1]
        srv = self.server
        with srv.lock:
            srv.calls[mode] += 1
            srv.seen[(mode, text)] += 1
            first = srv.seen[(mode, text)] == 1
            srv.bodies.append(body)
            srv.headers_seen.append(dict(self.headers))
        if mode == "slow":
            time.sleep(0.6)
        if mode == "flaky" and first:
            return self._send(500, {"error": "overloaded"})
        if mode.startswith("retry=") and first:  # 503 once per text, with the Retry-After after "="
            return self._send(503, {"error": "busy"}, {"Retry-After": mode[len("retry="):]})
        if mode in _LEAKS:  # an error body that echoes the caller's key, as some servers do
            return self._send(401, {"error": _LEAKS[mode](self.headers.get("Authorization", ""))})
        content = json.dumps(GOOD)
        if mode == "broken":
            content = '{"lexical": 3, "syntactic": '
        elif mode == "range":
            content = json.dumps({**GOOD, "domain": 11})
        elif mode == "fenced":  # the reference prompt's nested keys inside a markdown fence
            content = "```json\n" + json.dumps({"lexical_complexity": {"score": 2}, "syntactic_complexity": {"score": 4},
                                                "conceptual_density": {"score": 6}, "domain_specificity": {"score": 8},
                                                "logical_structure": {"score": 10},
                                                "contextual_dependencies": {"score": 0}}) + "\n```"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client already gave up (timeout test)
            pass

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock, srv.calls, srv.seen, srv.bodies, srv.headers_seen = threading.Lock(), Counter(), Counter(), [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _scorer(server, mode, tmp_path, **kw):
    host, port = server.server_address
    kw = {"timeout": 2.0, "max_retries": 2, "backoff": 0.01, "cache_dir": tmp_path / "cache", "api_key": "sk-test", **kw}
    return LLMScorer(f"http://{host}:{port}/{mode}/v1", "test-model", **kw)


def test_good_replies_weighted_by_us_and_cached(server, tmp_path):
    sc = _scorer(server, "ok", tmp_path, concurrency=3)
    texts = [f"passage number {i}" for i in range(6)]
    df = sc.score(texts)
    assert list(df.columns) == [*GOOD, "complexity", "error"]
    assert df["error"].isna().all()
    assert (df[list(GOOD)] == list(GOOD.values())).all().all()
    assert df["complexity"].tolist() == pytest.approx([GOOD_WEIGHTED] * 6)
    calls = server.calls["ok"]
    assert calls >= 6
    # second call: every text from the on-disk cache, no request
    assert sc.score(texts)["complexity"].tolist() == pytest.approx([GOOD_WEIGHTED] * 6)
    assert server.calls["ok"] == calls
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 6 and json.loads(files[0].read_text())["prompt_version"] == PROMPT_VERSION
    body, headers = server.bodies[-1], server.headers_seen[-1]
    assert body["model"] == "test-model" and body["temperature"] == 0.0
    assert body["response_format"] == {"type": "json_object"}
    assert headers["Authorization"] == "Bearer sk-test"
    # the cache key includes the model: another model asks the server again
    other = _scorer(server, "ok", tmp_path)
    other.model = "other-model"
    other.score(texts[:1])
    assert server.calls["ok"] == calls + 1


def test_server_error_is_retried(server, tmp_path):
    df = _scorer(server, "flaky", tmp_path).score(["a flaky passage", "another one"])
    assert df["error"].isna().all(), df["error"].tolist()
    assert df["complexity"].tolist() == pytest.approx([GOOD_WEIGHTED] * 2)
    assert server.calls["flaky"] == 4  # one 500 and one success per text


def test_server_error_gives_nan_when_retries_run_out(server, tmp_path):
    with pytest.warns(UserWarning, match="could not be scored"):
        df = _scorer(server, "flaky", tmp_path, max_retries=0).score(["fails once, no retry allowed"])
    assert math.isnan(df.loc[0, "complexity"]) and math.isnan(df.loc[0, "lexical"])
    assert "HTTP 500" in df.loc[0, "error"]


def test_timeout_gives_nan_not_zero(server, tmp_path):
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="timeout"):
        df = _scorer(server, "slow", tmp_path, timeout=0.15, max_retries=1).score(["a slow passage"])
    assert time.perf_counter() - t0 < 2.0
    assert df[["lexical", "complexity"]].isna().all(axis=None)
    assert "timeout" in df.loc[0, "error"] and "2 attempts" in df.loc[0, "error"]
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are not cached


@pytest.mark.parametrize("mode, text, reason", [
    ("broken", "broken reply", "malformed JSON"),
    ("range", "out of range", "outside [0, 10]"),
])
def test_broken_json_and_out_of_range_give_nan(server, tmp_path, mode, text, reason):
    with pytest.warns(UserWarning):
        df = _scorer(server, mode, tmp_path).score([text])
    assert math.isnan(df.loc[0, "complexity"]) and reason in df.loc[0, "error"]


def test_reference_format_and_fences_are_parsed(server, tmp_path):
    df = _scorer(server, "fenced", tmp_path).score(["fenced reply"])
    assert df.loc[0, "complexity"] == pytest.approx(GOOD_WEIGHTED)


def test_empty_text_is_nan_without_request(server, tmp_path):
    before = sum(server.calls.values())
    with pytest.warns(UserWarning, match="empty text"):
        df = _scorer(server, "ok", tmp_path).score(["   "])
    assert math.isnan(df.loc[0, "complexity"]) and df.loc[0, "error"] == "empty text"
    assert sum(server.calls.values()) == before


def test_unreachable_server_gives_nan(tmp_path):
    sc = LLMScorer("http://127.0.0.1:9/v1", "m", timeout=0.5, max_retries=1, backoff=0.01, cache_dir=False)
    with pytest.warns(UserWarning, match="connection error"):
        df = sc.score(["anything"])
    assert math.isnan(df.loc[0, "complexity"])


def test_parse_scores_accepts_good_values():
    assert parse_scores(json.dumps(GOOD))[0] == GOOD


@pytest.mark.parametrize("reply, reason", [
    ("[1, 2]", "reply is JSON list"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "logical"}), "missing"),
    (json.dumps({**GOOD, "logical": "high"}), "non-numeric"),
    (json.dumps({**GOOD, "logical": -1}), "outside"),
], ids=["list", "missing", "non_numeric", "outside"])
def test_parse_scores_rejects_bad_values(reply, reason):
    scores, err = parse_scores(reply)
    assert scores is None and reason in err


@pytest.mark.parametrize("kw, match", [
    ({"texts": "one string"}, "single string"),
    ({"texts": ["ok", 3]}, r"texts\[1\] is a int"),
    ({"concurrency": 0}, "concurrency must be an int >= 1"),
    ({"max_retries": -1}, "max_retries must be an int >= 0"),
    ({"timeout": 0.0}, "timeout must be a finite number"),
], ids=["single_string", "not_a_str", "concurrency", "max_retries", "timeout"])
def test_bad_arguments_are_refused(kw, match):
    texts = kw.pop("texts", None)
    with pytest.raises(TypeError if texts is not None else ValueError, match=match):
        LLMScorer("http://x/v1", "m", **kw).score(texts)


# ------------------------------------------------------------------------ faults: no reply thrown away (issue 15)
@pytest.mark.parametrize("retry_after", ["-1", "nan", "inf", "-inf", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", ""],
                         ids=["negative", "nan", "inf", "minus_inf", "garbage", "date_in_the_past", "empty"])
def test_bad_retry_after_waits_the_backoff_and_scores(server, tmp_path, retry_after):
    t0 = time.perf_counter()
    df = _scorer(server, f"retry={retry_after}", tmp_path).score([f"retry after {retry_after!r}", "and another"])
    assert time.perf_counter() - t0 < 5.0  # "inf" is capped, never slept
    assert df["error"].isna().all(), df["error"].tolist()
    assert df["complexity"].tolist() == pytest.approx([GOOD_WEIGHTED] * 2)


@pytest.mark.parametrize("value, wait", [
    ("2", 2.0), ("0.5", 0.5), ("1e9", 60.0), ("-1", None), ("nan", None), ("inf", None), ("soon", None),
    (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", None),
], ids=["seconds", "fraction", "huge_capped", "negative", "nan", "inf", "garbage", "absent", "past_date"])
def test_retry_after_parsing(value, wait):
    from adaptivek.llm_scorer import _retry_after

    assert _retry_after(value) == wait


def test_a_future_http_date_retry_after_is_honoured():
    from email.utils import formatdate

    from adaptivek.llm_scorer import _retry_after

    assert 1.0 < _retry_after(formatdate(time.time() + 3, usegmt=True)) <= 3.0


def test_an_unexpected_worker_error_costs_only_its_row(server, tmp_path, monkeypatch, caplog):
    sc = _scorer(server, "ok", tmp_path, concurrency=3)
    real = sc._request

    def request(client, text):
        if "boom" in text:
            raise RuntimeError(f"a bug while sending with {KEY}")
        return real(client, text)

    monkeypatch.setattr(sc, "_request", request)
    texts = ["first fine text", "boom", "third fine text", "fourth fine text"]
    with pytest.warns(UserWarning, match="1 of 4 texts could not be scored"):
        df = sc.score(texts)
    assert df["complexity"].notna().tolist() == [True, False, True, True]
    assert df.loc[1, "error"].startswith("unexpected error: RuntimeError: a bug while sending with")
    assert KEY not in df.loc[1, "error"] and KEY not in caplog.text
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3  # what arrived is kept and cached


@pytest.mark.parametrize("blocker, cache_dir", [("cache", "cache"), ("cache", "cache/llm_labels")],
                         ids=["path_is_a_file", "parent_is_a_file"])  # chmod does not stop root, a file does
def test_unwritable_cache_dir_is_refused_before_any_request(server, tmp_path, blocker, cache_dir):
    (tmp_path / blocker).write_text("a file where the cache folder should be")
    before = sum(server.calls.values())
    with pytest.raises(PermissionError, match=r"cannot write its cache directory .*cache_dir=False"):
        _scorer(server, "ok", tmp_path, cache_dir=tmp_path / cache_dir).score(["a text"])
    assert sum(server.calls.values()) == before  # nothing sent, nothing paid for


def test_a_cache_write_failing_mid_run_keeps_the_reply(server, tmp_path, monkeypatch, caplog):
    import adaptivek.llm_scorer as mod

    def full_disk(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod, "write_json", full_disk)
    df = _scorer(server, "ok", tmp_path).score(["a text that cannot be cached"])
    assert df.loc[0, "complexity"] == pytest.approx(GOOD_WEIGHTED) and df.loc[0, "error"] is None
    assert "could not cache" in caplog.text


# ------------------------------------------------------------------------------------ faults: secrets (issue 15)
@pytest.mark.parametrize("mode", list(_LEAKS), ids=list(_LEAKS))
def test_secrets_in_error_bodies_are_redacted(server, tmp_path, caplog, mode):
    caplog.set_level(logging.WARNING, logger="adaptivek.llm_scorer")
    with pytest.warns(UserWarning, match="HTTP 401"):
        df = _scorer(server, mode, tmp_path, api_key=KEY).score([f"leaky {mode}"])
    err = df.loc[0, "error"]
    assert "[REDACTED]" in err and "HTTP 401" in err
    for secret in (KEY, KEY[8:15], "0123456789abcdef" * 2, "QWxhZGRpbjpvcGVuIHNlc2FtZQ9x"):
        assert secret not in err and secret not in caplog.text


@pytest.mark.parametrize("text, secrets, kept", [
    ("Incorrect API key provided: sk-abc123def456", (), "Incorrect API key provided:"),
    ("Authorization: Bearer abc.def-123", (), "Authorization:"),
    ('{"api_key": "plain-words-secret"}', (), '{"api_key": "'),
    ("x-api-key=s3cr3t; retry", (), "retry"),
    ("masked: abcd**********wxyz done", (), "masked:"),
    ("id " + "deadbeef" * 5, (), "id "),
    ("connect to http://me:pa55@host:8000/v1 failed", (), "@host:8000/v1 failed"),
    ("the key my-own-local-secret was refused", ("my-own-local-secret",), "was refused"),
], ids=["sk_key", "bearer", "json_api_key", "header_pair", "masked", "long_hex", "url_password", "own_key_verbatim"])
def test_redact(text, secrets, kept):
    from adaptivek.llm_scorer import redact

    out = redact(text, secrets)
    assert "[REDACTED]" in out and kept in out
    for word in ("sk-abc123", "abc.def-123", "plain-words-secret", "s3cr3t", "wxyz", "deadbeef", "pa55", "my-own"):
        assert word not in out


@pytest.mark.parametrize("text", ["HTTP 500: overloaded, retry later", "timeout after 2 s (gave up after 3 attempts)",
                                  "token limit exceeded; password reset is not an API call", "malformed JSON: {'a': 1"],
                         ids=["http_500", "timeout", "prose_with_key_words", "json_excerpt"])
def test_redact_leaves_ordinary_errors_alone(text):
    from adaptivek.llm_scorer import redact

    assert redact(text, ["sk-test"]) == text
