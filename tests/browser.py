"""Helpers for driving index.html in a real, offline Chromium.

Not a test module: tests/test_browser.py imports it.

* ``launch_chromium()`` starts Debian's ``/usr/bin/chromium`` through
  Playwright (never ``playwright install``: it downloads a browser, and the
  build machines reach only package registries).
* ``CdnRouter`` answers the page's ``https://cdn.jsdelivr.net/npm/...``
  requests from the pinned npm packages in ``tests/node_modules`` (installed
  with ``npm ci --prefix tests``) and aborts every other non-local request, so
  the test sees exactly the assets index.html names, at exactly their version.
* ``ConsoleErrors`` gathers console errors and uncaught page errors.
* The remaining functions read the viewers' state from the page, one
  viewer at a time, by its view name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

NODE_MODULES = Path(__file__).resolve().parent / "node_modules"
CDN_PREFIX = "https://cdn.jsdelivr.net/npm/"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}

# Client 4.x starts fetching the in-browser server's wasm from an unversioned
# URL next to itself (``../../../server/dist/wasm/perspective-server.wasm``)
# as soon as it is imported. index.html names the pinned version instead
# before it starts its worker, so the router answers the unversioned one 404
# and the tests ignore the console line that 404 produces.
UNVERSIONED_SERVER_WASM = re.compile(
    r"^https://cdn\.jsdelivr\.net/npm/@perspective-dev/server/dist/wasm/perspective-server\.wasm$"
)

# ``.wasm`` must be application/wasm: WebAssembly.instantiateStreaming refuses
# anything else and the viewer then waits forever without an error.
CONTENT_TYPES = {
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".css": "text/css",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".map": "application/json",
}

# npm/<pkg>[@<version>]/<path>, where <pkg> may be scoped (@scope/name).
_CDN_PATH = re.compile(r"^(?P<pkg>(?:@[^/@]+/)?[^/@]+)(?:@(?P<version>[^/]+))?/(?P<path>.+)$")


@contextlib.contextmanager
def launch_chromium(viewport=(1280, 720)):
    """Yield a Playwright ``BrowserContext`` on Debian's Chromium with a fresh profile."""
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(
            f"{CHROMIUM} not found: the browser test drives Debian's Chromium. "
            "Install it with `apt-get install chromium` (do not run `playwright install`)."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            yield context
        finally:
            context.close()


class CdnRouter:
    """Serves jsDelivr URLs from ``node_modules``; blocks all other remote requests.

    Problems are recorded rather than raised inside Playwright's callback
    (where an exception would only surface as a stuck page); call
    ``assert_ok()`` from the test.
    """

    def __init__(self, node_modules: Path = NODE_MODULES):
        self.node_modules = Path(node_modules)
        if not (self.node_modules / "@perspective-dev").is_dir():
            raise RuntimeError(
                f"{self.node_modules} has no @perspective-dev packages: run `npm ci --prefix tests` first."
            )
        self.served: list[str] = []
        self.not_found: list[str] = []
        self.blocked: list[str] = []
        self.version_mismatches: list[str] = []

    def install(self, context_or_page) -> "CdnRouter":
        context_or_page.route("**/*", self._handle)
        return self

    def _installed_version(self, pkg: str) -> str | None:
        manifest = self.node_modules / pkg / "package.json"
        if not manifest.is_file():
            return None
        return json.loads(manifest.read_text())["version"]

    def _handle(self, route):
        url = route.request.url
        host = urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            route.continue_()
        elif url.startswith(CDN_PREFIX):
            self._serve_cdn(route, url)
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")

    def _serve_cdn(self, route, url):
        rel = urlsplit(url).path[len("/npm/"):]
        match = _CDN_PATH.match(rel)
        if not match:
            return self._not_found(route, url)
        pkg, version, path = match["pkg"], match["version"], match["path"]
        installed = self._installed_version(pkg)
        if version is None or installed is None:
            # Unversioned (see UNVERSIONED_SERVER_WASM) or not installed.
            return self._not_found(route, url)
        if version != installed:
            self.version_mismatches.append(f"{url} (tests/node_modules has {pkg}@{installed})")
            return route.fulfill(status=500, body=f"version mismatch: installed {pkg}@{installed}")
        file = (self.node_modules / pkg / path).resolve()
        if not file.is_relative_to(self.node_modules.resolve()) or not file.is_file():
            return self._not_found(route, url)
        self.served.append(url)
        route.fulfill(
            status=200,
            body=file.read_bytes(),
            headers={
                "Content-Type": CONTENT_TYPES.get(file.suffix, "application/octet-stream"),
                # Module scripts and crossorigin stylesheets are CORS requests.
                "Access-Control-Allow-Origin": "*",
            },
        )

    def _not_found(self, route, url):
        self.not_found.append(url)
        route.fulfill(status=404, body="not found", headers={"Access-Control-Allow-Origin": "*"})

    def assert_offline(self):
        """Fail unless the page asked for nothing outside its own server:
        no CDN request (not even one this router could have answered)."""
        outside = self.served + self.not_found + self.blocked
        assert not outside, "page reached outside its server: " + ", ".join(outside)

    def unexpected_not_found(self) -> list[str]:
        return [u for u in self.not_found if not UNVERSIONED_SERVER_WASM.match(u)]

    def assert_ok(self):
        """Fail on a pin mismatch, a missing asset or a blocked remote request."""
        problems = []
        if self.version_mismatches:
            problems.append(
                "index.html asks for a version that tests/node_modules does not have "
                "(update tests/package.json and requirements.txt together): "
                + "; ".join(self.version_mismatches)
            )
        if self.unexpected_not_found():
            problems.append("assets missing from tests/node_modules: " + ", ".join(self.unexpected_not_found()))
        if self.blocked:
            problems.append("page tried to reach the network: " + ", ".join(self.blocked))
        assert not problems, "\n".join(problems)


class ConsoleErrors:
    """Collects ``console.error`` lines and uncaught exceptions of a page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _on_console(self, msg):
        if msg.type != "error":
            return
        where = (msg.location or {}).get("url", "")
        if msg.text.startswith("Failed to load resource") and UNVERSIONED_SERVER_WASM.match(where):
            return  # the harmless 404, see UNVERSIONED_SERVER_WASM
        self.errors.append(f"console.error: {msg.text} ({where})")


# --- reading the page -------------------------------------------------------
#
# index.html shows several viewers, each tagged with its view name
# (`<perspective-viewer data-view="candles">`). Functions that read one viewer
# take that name; without one they read the first viewer on the page, which
# is all a page of a single viewer has.

DASHBOARD_VIEWS = ("candles", "lines", "pivot", "blotter")  # index.html's DASHBOARD, in page order

# Finds a viewer in the page: `viewer(name)` is the one tagged `name`, or the
# first viewer when `name` is null. Prepended to the scripts below.
_FIND_VIEWER = """
const viewer = (name) => document.querySelector(
    name ? `perspective-viewer[data-view="${name}"]` : "perspective-viewer");
"""


def _evaluate(page, body: str, arg=None):
    """Runs `async (arg) => { <_FIND_VIEWER> <body> }` in the page."""
    return page.evaluate(f"async (arg) => {{ {_FIND_VIEWER} {body} }}", arg)


def status(page) -> tuple[str, str]:
    """The connection badge as (text, data-state)."""
    text, state = page.evaluate(
        "() => { const s = document.getElementById('status');"
        " return [s.textContent.trim(), s.dataset.state]; }"
    )
    return text, state


def wait_for_status(page, state: str, timeout_ms: int = 30_000):
    page.wait_for_function(
        "(state) => { const s = document.getElementById('status');"
        " return s && s.dataset.state === state && s.textContent.trim() === state; }",
        arg=state,
        timeout=timeout_ms,
    )


def view_names(page) -> list[str]:
    """The views on the page, in page order."""
    return page.evaluate(
        "() => [...document.querySelectorAll('perspective-viewer')].map((v) => v.dataset.view)")


def row_count(page) -> int:
    """Rows in the page's table, the one its viewers show (a copy of the server's)."""
    return _evaluate(page, "return await (await viewer(null).getTable()).size();")


def table_rows(page) -> list[tuple]:
    """Every row of the page's table, each a tuple of (column, value) pairs in column-name order."""
    columns = _evaluate(page, """const view = await (await viewer(null).getTable()).view();
                                 const columns = await view.to_columns();
                                 await view.delete();
                                 return columns;""")
    names = sorted(columns)
    return [tuple(zip(names, values)) for values in zip(*(columns[name] for name in names))]


def wait_for_row_count_above(page, floor: int, timeout_s: float = 15.0, poll_ms: int = 250) -> int:
    """Poll until the table has more than ``floor`` rows; return the count."""
    deadline = time.monotonic() + timeout_s
    count = row_count(page)
    while count <= floor and time.monotonic() < deadline:
        page.wait_for_timeout(poll_ms)
        count = row_count(page)
    return count


def viewer_config(page, view: str | None = None) -> dict:
    return _evaluate(page, "return await viewer(arg).save();", view)


def restore(page, config: dict, view: str | None = None):
    """``viewer.restore(config)`` and wait until the viewer has rendered it."""
    _evaluate(page, "const v = viewer(arg.view); await v.restore(arg.config); await v.flush();",
              {"view": view, "config": config})


def view_columns(page, view: str | None = None, window: dict | None = None) -> dict:
    """``to_columns()`` of the view a viewer is drawing (what its plugin reads)."""
    return _evaluate(page, "return await (await viewer(arg.view).getView()).to_columns(arg.window);",
                     {"view": view, "window": window or {}})


def group_by_types(page, view: str | None = None) -> list[str]:
    """The type of each column a viewer's rows are grouped by (a table column or an expression)."""
    return _evaluate(
        page,
        """const v = viewer(arg);
           const view = await v.getView();
           const types = {...await (await v.getTable()).schema(), ...await view.expression_schema()};
           return (await view.get_config()).group_by.map((column) => types[column]);""",
        view,
    )


def datagrid_cell_count(page, view: str | None = None) -> int:
    """Body cells the datagrid plugin has drawn (its <regular-table> <td>s)."""
    return datagrid_cells(page, view).count()


def datagrid_cells(page, view: str | None = None):
    # Playwright's CSS engine pierces open shadow roots.
    scope = f'perspective-viewer[data-view="{view}"] ' if view else ""
    return page.locator(f"{scope}perspective-viewer-datagrid regular-table tbody td")


def switch_plugin(page, plugin: str, view: str | None = None):
    """Switch a viewer to ``plugin`` (e.g. "Y Bar", "X/Y Line", "Datagrid")."""
    restore(page, {"plugin": plugin}, view)


# d3's time axis labels each tick with the coarsest unit that changes there:
# ".500" (ms), ":05" (seconds), "11:02" or "11 PM" (minutes, hours), "Sun 29",
# "Nov 29", "November", "2026". A category axis of the same datetimes would
# print whole dates ("11/29/2026, 11:02:05.000 PM").
TIME_TICK = re.compile(r"\.\d{3}|:\d\d|\d{1,2}:\d\d( ?[AP]M)?|\d{1,2} ?[AP]M|[A-Z][a-z]{2} \d{1,2}|[A-Z][a-z]+|\d{4}")


def chart_drawn(page, view: str | None = None) -> dict:
    """What a viewer's visible d3fc plugin element drew inside its shadow root.

    Returns the plugin element's tag, counts of drawn SVG shapes and of
    non-empty canvases (so the caller can assert on "something was drawn"),
    and the x axis' tick labels.
    """
    return _evaluate(
        page,
        """const el = [...viewer(arg).children].find(
               (c) => c.tagName.toLowerCase().startsWith("perspective-viewer-d3fc-")
                   && c.offsetParent !== null);
           if (!el) return {plugin: null, shapes: 0, canvases: 0, x_ticks: []};
           const root = el.shadowRoot || el;
           const shapes = root.querySelectorAll(
               "svg path, svg rect, svg line, svg circle").length;
           const canvases = [...root.querySelectorAll("canvas")]
               .filter((c) => c.width > 0 && c.height > 0).length;
           const x_ticks = [...root.querySelectorAll(".x-axis .tick text")]
               .map((t) => t.textContent.trim()).filter((t) => t);
           return {plugin: el.tagName.toLowerCase(), shapes, canvases, x_ticks};""",
        view,
    )
