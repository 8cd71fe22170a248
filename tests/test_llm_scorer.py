"""LLMScorer against a real HTTP server on 127.0.0.1: good replies, retries, timeouts, broken JSON."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from adaptivek.llm_scorer import PROMPT_VERSION, LLMScorer, parse_scores

GOOD = {"lexical": 2.0, "syntactic": 4.0, "conceptual": 6.0, "domain": 8.0, "logical": 10.0, "contextual": 0.0}
GOOD_WEIGHTED = 0.2 * 2 + 0.2 * 4 + 0.25 * 6 + 0.15 * 8 + 0.1 * 10 + 0.1 * 0  # 4.9


class _Handler(BaseHTTPRequestHandler):
    """Behaviour by URL prefix: /ok, /flaky (500 once per text), /slow (sleeps), /broken, /range, /auth."""

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

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
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
    kw = {"timeout": 2.0, "max_retries": 2, "backoff": 0.01, "cache_dir": tmp_path / "cache", **kw}
    return LLMScorer(f"http://{host}:{port}/{mode}/v1", "test-model", api_key="sk-test", **kw)


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
