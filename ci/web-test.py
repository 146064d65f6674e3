#!/usr/bin/env python3
"""`just web-test`: the web client in a real browser against a real cluster.

Starts `dynamo dev` (3 nodes) on free ports, makes two siblings of one key with
writes that did not see each other, then drives headless Chromium over the
DevTools protocol through the page served at node 1's `/`:

  1. the page lists the three members up and this node's figures;
  2. `#key=color` opens the key: 300 with both siblings and a context;
  3. "keep this one" on a sibling writes it back with the context, and a
     re-read gives that one value (200), on another node too;
  4. a put with the read's context replaces it; a delete with the context
     leaves a 404 that still carries a context;
  5. a bad W shows the API's error text.

Any JavaScript exception or console error fails the test. Usage:
ci/web-test.py PATH_TO_DYNAMO. Needs chromium (Debian's package) and the
websocket-client module (PyPI).
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

DEADLINE = 15.0


def free_base(count):
    """A port p such that p .. p + count - 1 are all free on loopback."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        ok = True
        for p in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit("no free port range found")


def http(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class Page:
    """One tab of headless Chromium, driven over the DevTools protocol."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.errors = []

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            event = msg.get("method")
            if event == "Runtime.exceptionThrown":
                details = msg["params"]["exceptionDetails"]
                self.errors.append(details.get("exception", {}).get("description") or details.get("text"))
            elif event == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in msg["params"]["args"]))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr):
        result = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"evaluating {expr!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self, element_id):
        return self.js(f"document.getElementById({json.dumps(element_id)}).innerText")

    def wait(self, what, predicate):
        """Polls `predicate()` until it is truthy; returns its value."""
        start = time.monotonic()
        last = None
        while time.monotonic() - start < DEADLINE:
            last = predicate()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} (last: {last!r}); result box: {self.text('result')!r}")

    def result_after(self, button_js, starts_with):
        """Clicks the element `button_js` evaluates to, with the result box emptied
        first, and waits for the box to start with `starts_with`."""
        self.js(f"(() => {{ const b = {button_js}; "
                "document.getElementById('result').replaceChildren(); b.click(); })()")
        return self.wait(f"a result starting {starts_with!r}",
                         lambda: (t := self.text("result")).startswith(starts_with) and t)

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


def main():
    dynamo = os.path.abspath(sys.argv[1])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("web-test: chromium is not installed (apt-get install chromium)")
    work = tempfile.mkdtemp(prefix="dynamo-web-test-")
    base = free_base(13)
    peer, client, http_port, resp, debug = base, base + 3, base + 6, base + 9, base + 12
    dev = subprocess.Popen(
        [dynamo, "dev", "--nodes", "3", "--peer-port", str(peer), "--client-port", str(client),
         "--http-port", str(http_port), "--resp-port", str(resp), "--data-dir", os.path.join(work, "dev")],
        stdout=open(os.path.join(work, "dev.out"), "w"), stderr=subprocess.STDOUT)
    browser = None
    ok = False
    try:
        node = lambda i: f"http://127.0.0.1:{http_port + i}"
        start = time.monotonic()
        while "dev cluster is up" not in open(os.path.join(work, "dev.out")).read():
            if dev.poll() is not None or time.monotonic() - start > 90:
                raise AssertionError("the dev cluster did not come up: " + open(os.path.join(work, "dev.out")).read()[-2000:])
            time.sleep(0.2)

        # Two writes that did not see each other: siblings.
        for i, value in [(0, b"red"), (1, b"blue")]:
            status, _, _ = http("PUT", node(i) + "/kv/color", value)
            assert status == 204, status
        status, body, _ = http("GET", node(2) + "/kv/color")
        assert status == 300, (status, body)

        browser = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={os.path.join(work, 'chromium')}", f"--remote-debugging-port={debug}",
             "--window-size=1300,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.monotonic()
        while True:
            try:
                tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{debug}/json", timeout=2))
                tab = next(t for t in tabs if t["type"] == "page")
                break
            except Exception:
                if browser.poll() is not None or time.monotonic() - start > 30:
                    raise AssertionError("chromium did not start")
                time.sleep(0.2)
        page = Page(websocket.create_connection(tab["webSocketDebuggerUrl"], suppress_origin=True))
        page.call("Runtime.enable")
        page.call("Page.enable")
        page.call("Page.navigate", url=node(0) + "/#key=color")

        # 1. Members and figures.
        rows = page.wait("three members up", lambda: (r := page.js(
            "[...document.querySelectorAll('#members tr')].map(r => r.innerText.split('\\t').slice(0, 2).join(' '))"
        )) == ["n1 up", "n2 up", "n3 up"] and r)
        figures = page.wait("this node's figures", lambda: "peers reachable" in page.text("metrics") and page.text("metrics"))
        assert "2 of 2" in figures, figures
        print(f"web-test: 1. members {rows}; figures shown")

        # 2. The linked key opens with both siblings.
        shown = page.wait("the siblings of color", lambda: (t := page.text("result")).startswith("300") and t)
        siblings = page.js("[...document.querySelectorAll('#result .sibling pre')].map(p => p.innerText)")
        assert sorted(siblings) == ["blue", "red"], siblings
        assert "context:" in shown, shown
        page.screenshot(os.path.join(work, "siblings.png"))
        print("web-test: 2. #key=color shows 300 with siblings", siblings)

        # 3. Keep one: it is the only value, on any node.
        keep = siblings.index("blue")
        page.result_after(f"document.querySelectorAll('#result .sibling button')[{keep}]", "204")
        reread = page.result_after("document.getElementById('get')", "200")
        assert "blue" in reread and "red" not in reread, reread
        status, body, _ = http("GET", node(2) + "/kv/color")
        assert (status, body) == (200, b"blue"), (status, body)
        print("web-test: 3. 'keep this one' resolved the siblings to blue")

        # 4. Put with the read's context replaces; delete with it removes.
        page.js("document.getElementById('value').value = 'green'")
        page.result_after("document.getElementById('put')", "204: written (replacing")
        reread = page.result_after("document.getElementById('get')", "200")
        assert "green" in reread, reread
        page.result_after("document.getElementById('delete')", "204: deleted")
        gone = page.result_after("document.getElementById('get')", "404")
        assert "context:" in gone, gone
        status, _, _ = http("GET", node(1) + "/kv/color")
        assert status == 404, status
        print("web-test: 4. put with context replaced, delete with context removed")

        # 5. The API's error reaches the user.
        page.js("document.getElementById('key').value = 'other'; document.getElementById('w').value = '9'")
        error = page.result_after("document.getElementById('put')", "400")
        assert "W = 9" in error, error
        print("web-test: 5. a bad W shows:", error)

        assert not page.errors, f"JavaScript errors: {page.errors}"
        ok = True
        print("web-test: passed")
    finally:
        if browser:
            browser.kill()
            browser.wait()
        dev.send_signal(signal.SIGTERM)
        try:
            dev.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dev.kill()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"web-test: kept {work} (dev.out, siblings.png)", file=sys.stderr)


if __name__ == "__main__":
    main()
