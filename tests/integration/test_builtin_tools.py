"""The built-in HTTP tools against real local servers: the allow-list, size and time limits,
redirects, and what each side-effect class does when the target fails mid-request
(`HttpSink` counts what it received and what it applied)."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from undying.actors import ToolArgumentsError, ToolContext
from undying.actors.builtin_tools import (
    AllowList,
    HttpOutcomeUnknown,
    HttpRefused,
    HttpToolError,
    http_fetch,
    http_post,
    http_post_once,
)
from undying.testing import HttpSink, MemoryStore, run_inline, sink_agent, sink_task

pytestmark = pytest.mark.timeout(60)


class _Pages(http.server.BaseHTTPRequestHandler):
    """GET /text, /big (declared length), /chunked-big (no length), /hang, /to?url=..."""

    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path, _, query = self.path.partition("?")
        if path == "/text":
            self._send(200, b"hello \xc3\xa9t\xc3\xa9", "text/plain; charset=utf-8")
        elif path == "/big":
            self._send(200, b"x" * 5000, "text/plain")
        elif path == "/chunked-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/hang":
            self.release.wait(30)  # until the test ends: the client must give up first
            self._send(200, b"late", "text/plain")
        elif path == "/to":
            self.send_response(302)
            self.send_header("Location", query.removeprefix("url="))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"no such page", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pages() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _Pages.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def sink() -> Iterator[HttpSink]:
    with HttpSink() as s:
        yield s


def ctx(allow: list[str] | str | None, key: str = "run-1:2:0", **config: Any) -> ToolContext:
    cfg: dict[str, Any] = dict(config)
    if allow is not None:
        cfg["http_allow"] = allow
    return ToolContext(run_id="run-1", call_id="t2.0", key=key, config=cfg)


def call(tool: Any, args: dict[str, Any], c: ToolContext) -> Any:
    out = asyncio.run(tool.invoke(args, c))
    return json.loads(out)


def fails(tool: Any, args: dict[str, Any], c: ToolContext) -> BaseException:
    try:
        asyncio.run(tool.invoke(args, c))
    except Exception as exc:
        return exc
    raise AssertionError("the call succeeded")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- the allow-list ---------------------------------------------------------------------------


@pytest.mark.parametrize("entries,url,ok", [
    (["127.0.0.1:8080"], "http://127.0.0.1:8080/x", True),
    (["127.0.0.1:8080"], "http://127.0.0.1:8081/x", False),
    (["127.0.0.1:*"], "http://127.0.0.1:1234/x", True),
    (["example.com"], "https://example.com/a", True),  # the scheme's default port
    (["example.com"], "http://example.com/a", True),
    (["example.com"], "https://example.com:8443/a", False),
    (["EXAMPLE.com"], "https://Example.COM/a", True),
    (["*.example.com"], "https://api.example.com/a", True),
    (["*.example.com"], "https://example.com/a", False),  # a subdomain, never the domain
    (["*.example.com"], "https://evilexample.com/a", False),
    (["example.com"], "https://example.com.evil.test/a", False),
    (["[::1]:9000"], "http://[::1]:9000/", True),
    (["127.0.0.1:*"], "ftp://127.0.0.1:21/x", False),
    ([], "http://127.0.0.1/", False),
])
def test_allow_list(entries: list[str], url: str, ok: bool) -> None:
    allow = AllowList.from_config({"http_allow": entries})
    if ok:
        allow.check("http_fetch", url)
    else:
        with pytest.raises(HttpRefused, match=r"^http_fetch refused "):
            allow.check("http_fetch", url)


def test_refusals_say_what_and_why(pages: str) -> None:
    err = fails(http_fetch, {"url": "http://user:secret@10.1.2.3:81/p?token=abc"},
                ctx(["127.0.0.1:*"]))
    assert isinstance(err, HttpRefused)
    assert str(err) == ("http_fetch refused http://10.1.2.3:81/p: host 10.1.2.3:81 is not in "
                        "this agent's config['http_allow'] (allowed: 127.0.0.1:*)")
    assert "secret" not in str(err) and "token" not in str(err)
    err = fails(http_fetch, {"url": pages + "/text"}, ctx(None))
    assert "allowed: nothing: set config['http_allow'] on the agent" in str(err)
    err = fails(http_fetch, {"url": "file:///etc/passwd"}, ctx(["127.0.0.1:*"]))
    assert "scheme 'file' is not http or https" in str(err)
    err = fails(http_fetch, {"url": pages}, ctx(["http://127.0.0.1"]))
    assert "give a host, not a URL" in str(err)


# -- http_fetch ---------------------------------------------------------------------------------


def test_fetch_returns_status_type_and_text(pages: str) -> None:
    out = call(http_fetch, {"url": pages + "/text"}, ctx([f"127.0.0.1:{port_of(pages)}"]))
    assert out == {"url": pages + "/text", "status": 200,
                   "content_type": "text/plain; charset=utf-8", "body": "hello été"}
    out = call(http_fetch, {"url": pages + "/nothing"}, ctx(["127.0.0.1:*"]))
    assert out["status"] == 404 and out["body"] == "no such page"  # a status, not an error


@pytest.mark.parametrize("path", ["/big", "/chunked-big"])
def test_fetch_refuses_a_body_over_the_size_limit(pages: str, path: str) -> None:
    err = fails(http_fetch, {"url": pages + path}, ctx(["127.0.0.1:*"], http_max_bytes=4096))
    assert isinstance(err, HttpRefused)
    assert "limit of 4096" in str(err) and "config['http_max_bytes']" in str(err)
    assert str(err).startswith(f"http_fetch: the response from {pages}{path} is ")


def test_fetch_gives_up_at_the_time_limit(pages: str) -> None:
    err = fails(http_fetch, {"url": pages + "/hang"}, ctx(["127.0.0.1:*"], http_timeout_s=0.3))
    assert isinstance(err, HttpToolError)
    assert str(err) == (f"http_fetch: no complete answer from {pages}/hang within 0.3 s "
                        "(config['http_timeout_s'])")


def test_redirects_are_followed_only_to_allowed_hosts(pages: str) -> None:
    out = call(http_fetch, {"url": f"{pages}/to?url=/text"}, ctx(["127.0.0.1:*"]))
    assert out["status"] == 200 and out["url"] == pages + "/text"
    err = fails(http_fetch, {"url": f"{pages}/to?url=http://169.254.169.254/latest"},
                ctx(["127.0.0.1:*"]))
    assert isinstance(err, HttpRefused)
    assert "refused http://169.254.169.254/latest: host 169.254.169.254:80 is not" in str(err)


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ToolArgumentsError, match=r"bad arguments for tool 'http_post': body: "):
        asyncio.run(http_post.invoke({"url": "http://x/", "body": "not an object"},
                                     ctx(["x"])))
    with pytest.raises(ToolArgumentsError, match=r"'http_fetch': url: Field required"):
        asyncio.run(http_fetch.invoke({}, ctx(["x"])))
    assert http_post.side_effect == "keyed" and http_post_once.side_effect == "at_most_once"
    assert http_fetch.side_effect == "idempotent"
    assert http_post.schema()["parameters"]["required"] == ["url", "body"]


# -- a target that fails mid-request --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["die_before", "die_after"])
def test_a_keyed_post_is_sent_again_with_the_same_key(sink: HttpSink, mode: str) -> None:
    gate = sink.gate("k1", mode)  # type: ignore[arg-type]
    out = call(http_post, {"url": sink.url + "/d", "body": {"key": "k1"}}, ctx(["127.0.0.1:*"]))
    assert gate.arrived.is_set() and out["status"] == 200 and out["attempts"] == 2
    c = sink.counts("k1")
    assert c["received"] == 2 and c["applied"] == 1  # the effect happened once
    assert c["idempotency_keys"] == ["run-1:2:0"]
    # died after applying it: the second delivery got the stored answer
    assert out.get("replayed", False) is (mode == "die_after")


def test_a_keyed_post_that_keeps_failing_says_it_is_safe_to_call_again(sink: HttpSink) -> None:
    sink.gate("k2", "die_before", times=10)
    err = fails(http_post, {"url": sink.url + "/d", "body": {"key": "k2"}},
                ctx(["127.0.0.1:*"], http_retries=1))
    assert isinstance(err, HttpOutcomeUnknown)
    assert "(after 2 attempts)" in str(err) and "again with the same key is safe" in str(err)
    assert sink.counts("k2") == {"received": 2, "applied": 0, "replayed": 0, "answered": 0,
                                 "idempotency_keys": ["run-1:2:0"]}


@pytest.mark.parametrize("mode", ["die_before", "die_after"])
def test_an_at_most_once_post_is_never_sent_again(sink: HttpSink, mode: str) -> None:
    sink.gate("once1", mode)  # type: ignore[arg-type]
    err = fails(http_post_once, {"url": sink.url + "/d", "body": {"key": "once1"}},
                ctx(["127.0.0.1:*"]))
    assert isinstance(err, HttpOutcomeUnknown)
    assert "may or may not have been applied; it is not sent again" in str(err)
    assert "its call key is run-1:2:0" in str(err)
    c = sink.counts("once1")
    assert c["received"] == 1 and c["applied"] == (mode == "die_after")
    assert sink.deliveries("once1")[0].request_id == "run-1:2:0"


def test_an_at_most_once_post_that_could_not_connect_was_not_sent() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = fails(http_post_once, {"url": f"http://127.0.0.1:{port}/d", "body": {}},
                ctx(["127.0.0.1:*"]))
    assert type(err) is HttpToolError and "not sent, cannot connect" in str(err)


def test_sink_gates_hold_and_release(sink: HttpSink) -> None:
    before = sink.gate("h1", "hold_before")
    after = sink.gate("h2", "hold_after")
    c = ctx(["127.0.0.1:*"])

    async def go() -> list[Any]:
        t1 = asyncio.ensure_future(http_post.invoke({"url": sink.url, "body": {"key": "h1"}}, c))
        t2 = asyncio.ensure_future(http_post_once.invoke({"url": sink.url, "body": {"key": "h2"}},
                                                         c))
        await asyncio.to_thread(before.wait_arrived, 10)
        await asyncio.to_thread(after.wait_arrived, 10)
        # held: h1 not yet applied, h2 applied but not answered
        assert sink.counts("h1")["applied"] == 0 and sink.counts("h2")["applied"] == 1
        assert not t1.done() and not t2.done()
        before.release()
        after.release()
        return list(await asyncio.gather(t1, t2))

    outs = asyncio.run(go())
    assert [json.loads(o)["status"] for o in outs] == [200, 200]
    assert before.answered.is_set() and after.answered.is_set()
    assert sink.counts("h1")["applied"] == sink.counts("h2")["applied"] == 1


def test_a_held_delivery_whose_client_hangs_up_is_dropped(sink: HttpSink) -> None:
    gate = sink.gate("h3", "hold_before")
    err = fails(http_post_once, {"url": sink.url, "body": {"key": "h3"}},
                ctx(["127.0.0.1:*"], http_timeout_s=0.5))
    assert isinstance(err, HttpOutcomeUnknown) and "within 0.5 s" in str(err)
    assert gate.client_gone.wait(10)
    assert sink.counts("h3") == {"received": 1, "applied": 0, "replayed": 0, "answered": 0,
                                 "idempotency_keys": []}
    assert sink.deliveries("h3")[0].outcome == "client_gone"


def test_the_sink_agent_in_process(sink: HttpSink) -> None:
    for mode in ("keyed", "once"):
        state = run_inline(MemoryStore(), sink_agent, sink_task(sink.url, f"item-{mode}", mode),
                           run_id=f"inline-{mode}")
        assert state.status == "finished", state.error
        (entry,) = state.journal.values()
        assert entry.status == "done" and entry.key == f"inline-{mode}:2:0"
        assert state.result is not None and state.result.startswith(f"item-{mode}: HTTP 200")
        assert sink.counts(f"item-{mode}")["applied"] == 1
    assert sink.deliveries("item-keyed")[0].idempotency_key == "inline-keyed:2:0"
    assert sink.deliveries("item-once")[0].idempotency_key is None
