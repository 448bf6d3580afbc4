"""The live page at /proxy/ui over real sockets: its files, their headers, who may fetch them."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import aiohttp
import pytest

from proxy.api import ui
from proxy.keystore import add_key
from tests.integration.farm import farm

CSP = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
FILES = {
    "/proxy/ui": ("index.html", "text/html; charset=utf-8"),
    "/proxy/ui/": ("index.html", "text/html; charset=utf-8"),
    "/proxy/ui/index.html": ("index.html", "text/html; charset=utf-8"),
    "/proxy/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/proxy/ui/style.css": ("style.css", "text/css; charset=utf-8"),
    "/proxy/ui/icon.svg": ("icon.svg", "image/svg+xml; charset=utf-8"),
}


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def packaged(name: str) -> bytes:
    return resources.files("proxy").joinpath("ui").joinpath(name).read_bytes()


async def test_page_and_assets_come_from_the_package_with_types_and_csp(tmp_path: Path) -> None:
    async with farm(tmp_path) as box:
        for path, (name, content_type) in FILES.items():
            status, headers, body = await get(box.url + path)
            assert status == 200, path
            assert headers["Content-Type"] == content_type, path
            assert headers["Content-Security-Policy"] == CSP, path
            assert headers["X-Content-Type-Options"] == "nosniff", path
            assert body == packaged(name), path


def test_the_page_is_self_contained_and_polls_the_status() -> None:
    html, js, css = (packaged(n).decode() for n in ("index.html", "app.js", "style.css"))
    assert '<script src="/proxy/ui/app.js"' in html
    assert '<link rel="stylesheet" href="/proxy/ui/style.css">' in html
    assert 'name="viewport"' in html  # a phone renders it at its own width
    assert "<script>" not in html and " style=" not in html  # nothing inline: the CSP allows none
    assert re.search(r"""["']/proxy/status["']""", js)
    assert "Authorization" in js and "sessionStorage" in js  # the key, when status needs one
    assert ".innerHTML" not in js  # model names and reasons come from clients: text only
    assert '<link rel="icon" href="/proxy/ui/icon.svg"' in html
    for text in (html, js, css):  # no CDN, no other site
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert "@media (max-width" in css


async def test_other_paths_under_ui_go_on_as_any_unknown_path_does(tmp_path: Path) -> None:
    async with farm(tmp_path) as box:
        proxied = await get(box.url + "/proxy/ui/secret.txt")
        direct = await get(str(box.servers[0].make_url("/proxy/ui/secret.txt")))
        assert proxied[0] == direct[0] == 404
        assert proxied[2] == direct[2]
        assert "Content-Security-Policy" not in proxied[1]
        assert set(ui.PATHS) == set(FILES)


async def test_with_protect_status_the_page_opens_and_the_status_needs_the_key(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "ops")
    async with farm(tmp_path, auth={"keys_file": str(keys), "protect_status": True}) as box:
        for path in FILES:
            assert (await get(box.url + path))[0] == 200, path
        assert (await get(box.url + "/proxy/status"))[0] == 401
        status, _, _ = await get(box.url + "/proxy/status", {"Authorization": f"Bearer {key}"})
        assert status == 200
        assert (await get(box.url + "/proxy/ui/secret.txt"))[0] == 401  # not the page's: a key


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_the_page_takes_only_reads(tmp_path: Path, method: str) -> None:
    keys = tmp_path / "keys.yaml"
    add_key(keys, "ops")
    async with (
        farm(tmp_path, auth={"keys_file": str(keys)}) as box,
        aiohttp.ClientSession() as s,
        s.request(method, box.url + "/proxy/ui") as r,
    ):
        assert r.status == 401  # open to reads only; anything else needs a key as usual
