"""The gateway's page (GET /, routes/page.py, gateway/static/) against a real stack: tiny random pair, real
services, real uvicorn on loopback, API keys on (the page is open; its calls carry the key the user pastes).

Without a browser: the page and its assets (type, CSP, same-origin references only), the static route's 404 for
unknown names and traversal, and the docs' status table. With one (marker `browser`: the OS's Chromium driven by
Playwright, skipped with the reason where either is missing): load the page, paste the key, compare, read what
is rendered against the API's own answer, an error's envelope message, the latency history, and a screenshot
saved as a test artifact (tmp_path, and $TELEPATHY_TEST_ARTIFACTS when set).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from test_gateway import assert_error
from test_gateway_hardening import documented_statuses

from telepathy.gateway.routes.page import CONTENT_SECURITY_POLICY
from telepathy.gateway.settings import GatewaySettings
from telepathy.testing import GatewayThread
from tests.services_support import start_receiver, start_sender

API_KEY = "page-key"
KEY = {"Authorization": f"Bearer {API_KEY}"}
SST2 = {"text": "a gripping , beautifully acted film", "task": "sst2"}
ASSETS = {"/static/app.js": "text/javascript; charset=utf-8", "/static/style.css": "text/css; charset=utf-8",
          "/static/favicon.svg": "image/svg+xml"}
FILES = "app.js, favicon.svg, index.html, style.css"
MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


@pytest.fixture(scope="module")
def gateway(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir, max_batch_size=4, grace_s=1.0)
    sender = start_sender(tiny_bridges_dir, receiver.address, max_batch_size=4, grace_s=1.0, max_relay_tokens=8)
    gw = GatewayThread(GatewaySettings(port=0, sender_addr=sender.address, receiver_addr=receiver.address,
                                       api_keys=(API_KEY,))).start()
    yield gw
    gw.stop()
    sender.stop()
    receiver.stop()


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=30.0) as c:
        yield c


def assert_works(c: httpx.Client) -> None:
    r = c.post("/v1/compare", json=SST2, headers=KEY)
    assert r.status_code == 200, r.text
    assert r.json()["bridge"]["label"] in ("negative", "positive")


class _Refs(HTMLParser):
    """Every URL the page refers to, its inline scripts, and any inline style or event-handler attribute."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "action", "formaction", "poster", "data"):
                self.urls.append(value or "")
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{tag} {name}")
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append(f"script {data.strip()[:40]}")


# -- without a browser ------------------------------------------------------------------------------------------

def test_page_is_open_html_with_csp_and_same_origin_assets_only(client):
    r = client.get("/")  # no key: the page is open, like /docs
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "connect-src 'self'" in CONTENT_SECURITY_POLICY
    assert r.headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    refs = _Refs()
    refs.feed(r.text)
    assert sorted(refs.urls) == sorted(ASSETS), refs.urls  # its own two files, same-origin paths, nothing else
    assert refs.inline == []  # no inline script, style attribute or on* handler: the CSP would block them
    for path, media in ASSETS.items():
        asset = client.get(path)
        assert asset.status_code == 200 and asset.headers["content-type"] == media
        assert asset.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        text = asset.text.replace("// ", "").replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, no fetch
        assert not re.search(r"https?://|//[a-z]", text), path  # no other origin
    script = client.get("/static/app.js").text
    assert "<script" not in client.get("/static/favicon.svg").text
    assert "/v1/tasks" in script and "/v1/compare" in script and "Bearer " in script
    assert "localStorage" not in script and "sessionStorage" not in script and "cookie" not in script


@pytest.mark.parametrize("path, name", [
    ("/static/nope.js", "nope.js"),
    ("/static/..%2Fsettings.py", "../settings.py"),
    ("/static/%2e%2e/%2e%2e/app.py", "../../app.py"),
    ("/static/%2E%2E%2F%2E%2E%2Fgateway%2Fsettings.py", "../../gateway/settings.py"),
    ("/static//etc/passwd", "/etc/passwd"),
    ("/static/", ""),
])
def test_static_route_refuses_unknown_files_and_traversal(client, path, name):
    assert_error(client.get(path), 404, "not_found_error", f"no static file {name!r}; the page's files are {FILES}")
    assert_works(client)


def test_raw_dot_segments_reach_the_static_route_and_are_refused(gateway, client):
    """httpx normalises `..` away; a raw request line keeps it, and the route still serves only its own files."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"GET /static/../../gateway/settings.py HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head
    assert b"no static file '../../gateway/settings.py'" in body and b"class GatewaySettings" not in body
    assert_works(client)


def test_page_routes_are_documented_and_kept_out_of_the_schema(client):
    assert_error(client.post("/"), 405, "invalid_request_error", "method POST is not allowed on /; allowed: GET")
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/static/{name}" not in paths  # the page is not part of the API
    documented = documented_statuses()
    assert documented["GET /"] == {200, 500}
    assert documented["GET /static/{name}"] == {200, 404, 500}
    assert_works(client)


# -- in a browser -----------------------------------------------------------------------------------------------

def _chromium() -> str | None:
    for candidate in (os.environ.get("TELEPATHY_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(pip install -e '.[dev]')")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium, or set TELEPATHY_CHROMIUM to its path)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _artifact(tmp_path: Path, name: str) -> list[Path]:
    paths = [tmp_path / name]
    if os.environ.get("TELEPATHY_TEST_ARTIFACTS"):
        folder = Path(os.environ["TELEPATHY_TEST_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / name)
    return paths


@pytest.mark.browser
def test_page_in_a_browser_compares_both_paths(browser, gateway, client, tmp_path):
    tasks = client.get("/v1/tasks", headers=KEY).json()["tasks"]
    expected = client.post("/v1/compare", json=SST2, headers=KEY).json()
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems: list[str] = []  # a CSP violation or a script error shows up here
    expected_refusals = {"401 (Unauthorized)", "422 (Unprocessable Entity)"}  # the two this test provokes

    def console(message) -> None:
        if message.type == "error" and not any(message.text.endswith(e) for e in expected_refusals):
            problems.append(f"{message.text} ({message.location.get('url')})")

    page.on("console", console)
    page.on("pageerror", lambda e: problems.append(str(e)))
    timeout = 15_000
    try:
        page.goto(f"{gateway.url}/", wait_until="load")
        # API keys are on: the task list is refused, with the envelope's message.
        page.wait_for_selector("#error:not([hidden])", timeout=timeout)
        assert page.inner_text("#error") == f"401: {MISSING_KEY}"
        assert page.inner_text("#state") == "paste an API key"
        page.fill("#key", API_KEY)
        page.press("#key", "Tab")  # change → the task list again, now with the key
        page.wait_for_function(f"() => document.querySelectorAll('#task option').length === {len(tasks)}", timeout=timeout)
        assert page.is_hidden("#error")
        assert page.eval_on_selector_all("#task option", "os => os.map(o => o.value)") == [t["name"] for t in tasks]

        page.select_option("#task", "sst2")
        page.fill("#text", SST2["text"])
        page.click("#submit")
        page.wait_for_function("() => document.getElementById('state').textContent.startsWith('done')", timeout=timeout)
        labels = next(t["labels"] for t in tasks if t["name"] == "sst2")
        for section in ("#bridge", "#text-path"):
            assert page.is_visible(section)
            rows = page.eval_on_selector_all(f"{section} .score", "rs => rs.map(r => [r.dataset.label, "
                                             "parseFloat(r.querySelector('.p').textContent), "
                                             "r.querySelector('.bar span').style.width])")
            assert [r[0] for r in rows] == labels  # a bar per label, in label order
            assert abs(sum(r[1] for r in rows) - 1.0) < 0.01
            assert all(re.fullmatch(r"\d+(\.\d)?%", r[2]) for r in rows)
            shown = page.inner_text(f"{section} [data-field=label]")
            assert shown == max(rows, key=lambda r: r[1])[0] and shown in labels
            stages = page.eval_on_selector_all(f"{section} [data-field=timings] tr", "rs => rs.map(r => "
                                               "[r.dataset.stage, parseFloat(r.querySelector('td').textContent)])")
            assert [s for s, _ in stages] == ["sender", "wire", "receiver", "total"]
            assert all(ms >= 0 for _, ms in stages) and dict(stages)["total"] > 0
            wire = int(page.inner_text(f"{section} [data-field=wire_bytes]"))
            assert wire > 0
        assert int(page.inner_text("#bridge [data-field=wire_bytes]")) == expected["bridge"]["wire_bytes"]
        relay = page.inner_text("#text-path [data-field=relay_text]")
        assert int(page.inner_text("#text-path [data-field=wire_bytes]")) == len(
            page.eval_on_selector("#text-path [data-field=relay_text]", "e => e.textContent").encode())
        assert relay.strip() == expected["text"]["relay_text"].strip()  # greedy decoding: the API's own relay
        assert page.inner_text("#bridge [data-field=bridge_id]").startswith("sst2-")
        assert re.fullmatch(r"\d+\.\d\d×", page.inner_text("#speedup"))
        assert page.inner_text("#agree") in ("agree", "differ")

        # An error shows the envelope's message; the next good request clears it and joins the history.
        page.fill("#text", "   ")
        page.click("#submit")
        page.wait_for_selector("#error:not([hidden])", timeout=timeout)
        assert page.inner_text("#error") == "422: text: must not be empty or whitespace"
        assert page.inner_text("#state") == "failed"
        page.fill("#text", "Who invented the telephone?")
        page.select_option("#task", "trec")
        page.click("#submit")
        page.wait_for_function("() => document.querySelectorAll('#history tbody tr').length === 2", timeout=timeout)
        assert page.is_hidden("#error")
        history = page.eval_on_selector_all("#history tbody tr", "rs => rs.map(r => [...r.cells].map(c => "
                                            "c.textContent))")
        assert [h[:2] for h in history] == [["2", "trec"], ["1", "sst2"]]  # newest first
        assert all(float(h[2]) > 0 and float(h[3]) > 0 and h[5] in ("yes", "no") for h in history)
        trec_labels = next(t["labels"] for t in tasks if t["name"] == "trec")
        assert page.eval_on_selector_all("#bridge .score", "rs => rs.map(r => r.dataset.label)") == trec_labels
        assert problems == [], problems
    finally:
        shots = _artifact(tmp_path, "gateway-page.png")
        image = page.screenshot(full_page=True)
        for shot in shots:
            shot.write_bytes(image)
        page.close()
    assert all(shot.stat().st_size > 10_000 for shot in shots)
