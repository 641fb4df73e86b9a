"""``iterwego serve``: the local web app answers exactly what ``iterwego order`` gives, and survives bad input.

The browser test drives Debian's chromium through Debian's chromedriver with
Selenium; it is skipped only when ``/usr/bin/chromium`` is absent. Set
``ITERWEGO_UPDATE_SCREENSHOT=1`` to copy its screenshot to ``docs/app.png``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from iterwego.apps.cli import main
from iterwego.apps.commands import cmd_serve
from iterwego.apps.commands import register_serve as register
from iterwego.apps.order import order_stories, stories_from_args
from iterwego.apps.serve import MAX_BODY_BYTES, MAX_ITEMS, OrderService, make_server, run_server
from iterwego.data.readers import load_split
from iterwego.errors import IterWeGOError, ModelLoadError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,860",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "app.png"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(trained_run) -> SimpleNamespace:
    data, run = trained_run.data, trained_run.run
    story = next(s for s in load_split(data, "test") if len(s.items) >= 3)
    items = story.items[:3]
    # presented out of gold order, images and sentences shuffled differently, as a user would paste them
    images = [items[k].image for k in (2, 0, 1)]
    sentences = [items[k].sentence for k in (1, 2, 0)]
    return SimpleNamespace(data=data, run=run, images=images, sentences=sentences)


@pytest.fixture(scope="module")
def app(trained, tmp_path_factory):
    tmp_root = tmp_path_factory.mktemp("uploads")
    service = OrderService.load(trained.run, "cpu", tmp_root=tmp_root)
    server = make_server(service, port=0)  # default host
    out = io.StringIO()
    thread = threading.Thread(target=run_server, args=(server,), kwargs={"out": out}, daemon=True)
    thread.start()
    yield SimpleNamespace(server=server, service=service, url=server.url, out=out, tmp_root=tmp_root, **vars(trained))
    server.shutdown()
    thread.join(10)


def _image_payload(paths: list[str]) -> list[dict]:
    return [
        {"name": Path(p).name, "data": "data:image/png;base64," + base64.b64encode(Path(p).read_bytes()).decode()}
        for p in paths
    ]


def _post(url: str, body: bytes | dict, ctype: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "api/order", data=data, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str) -> tuple[int, bytes, dict]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read(), dict(r.headers)


def _expected(app, images: list[str], sentences: list[str]) -> dict:
    """What ``iterwego order`` computes for the same album, with file names as the page sends them."""
    res = order_stories(  # the run's inference settings apply by default, as in `iterwego order`
        app.service.model, stories_from_args(images, sentences)
    )[0]
    res["images"] = [Path(p).name for p in res["images"]]
    return json.loads(json.dumps(res))  # the wire format (tuples -> lists)


def _assert_still_serving(app) -> None:
    status, body, _ = _get(app.url + "api/info")
    assert status == 200 and json.loads(body)["limits"]["max_items"] == MAX_ITEMS
    status, answer = _post(app.url, {"sentences": app.sentences})
    assert status == 200, answer
    assert answer["result"] == _expected(app, [], app.sentences)


# ----------------------------------------------------------------------------- unit level
@pytest.mark.parametrize("case", ["both", "unequal", "sentences_only", "images_only"])
def test_order_endpoint_equals_order_stories(app, case):
    images = {"both": app.images, "unequal": app.images, "sentences_only": [], "images_only": app.images}[case]
    sentences = {
        "both": app.sentences,
        "unequal": app.sentences[:2],
        "sentences_only": app.sentences,
        "images_only": [],
    }[case]
    status, answer = _post(app.url, {"images": _image_payload(images), "sentences": sentences})
    assert status == 200, answer
    want = _expected(app, images, sentences)
    assert answer["result"] == want
    assert answer["result"]["mode"] == ("fused" if case == "both" else "unimodal")
    if case == "unequal":
        assert "3 images but 2 sentences" in answer["result"]["note"]
    # thumbnails come in the predicted image order, as small data URIs (PNG for these tiny pictures)
    assert [t["index"] for t in answer["thumbnails"]] == want.get("image_order", [])
    for t in answer["thumbnails"]:
        assert t["name"] == want["images"][t["index"]]
        head, b64 = t["src"].split(",", 1)
        assert head == "data:image/png;base64"
        assert max(Image.open(io.BytesIO(base64.b64decode(b64))).size) <= 192
    assert not any(app.tmp_root.iterdir()), "the per-request temporary directory was left behind"


def test_photo_sized_uploads_get_jpeg_thumbnails_and_keep_their_names(app, tmp_path):
    paths = []
    for k, colour in enumerate(["red", "blue", "green"]):
        p = tmp_path / f"same name {k}.png" if k else tmp_path / "IMG 0001.png"
        Image.new("RGB", (640, 400), colour).save(p)
        paths.append(str(p))
    payload = _image_payload(paths)
    payload[2]["name"] = "C:\\Users\\me\\IMG 0001.png"  # Windows path, and a name given twice
    status, answer = _post(app.url, {"images": payload})
    assert status == 200, answer
    assert answer["result"]["images"] == ["IMG 0001.png", "same name 1.png", "IMG 0001.png"]
    assert answer["result"]["image_order"] == _expected(app, paths, [])["image_order"]
    for t in answer["thumbnails"]:
        head, b64 = t["src"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (192, 120)


def _with_capture_times(paths: list[str], times: list[str | None], out: Path) -> list[str]:
    """Copies of ``paths`` whose EXIF carries the given DateTimeOriginal (None: no EXIF), all from one camera."""
    copies = []
    for k, (p, when) in enumerate(zip(paths, times)):
        exif = Image.Exif()
        if when is not None:
            exif[0x0110] = "Test Camera"
            exif.get_ifd(0x8769)[0x9003] = when
        q = out / f"photo{k}.png"
        Image.open(p).save(q, exif=exif)
        copies.append(str(q))
    return copies


def test_photos_with_capture_times_are_placed_by_them_and_the_answer_says_so(app, tmp_path):
    # the first shown photo was taken at 18:00, the second at 09:00, the third carries no time
    paths = _with_capture_times(app.images, ["2024:06:01 18:00:00", "2024:06:01 09:00:00", None], tmp_path)
    status, answer = _post(app.url, {"images": _image_payload(paths), "sentences": app.sentences})
    assert status == 200, answer
    res = answer["result"]
    assert res == _expected(app, paths, app.sentences)
    assert res["capture_time"]["used"] and res["capture_time"]["mode"] == "auto"
    assert [p["placed_by"] for p in res["capture_time"]["photos"]] == ["capture time", "capture time", "model"]
    assert res["capture_time"]["photos"][1] == {
        "time": "2024-06-01T09:00:00",
        "camera": "Test Camera",
        "placed_by": "capture time",
    }
    v = res["variants"]
    for order in (res["image_order"], v["guided"]["image_order"], v["image_only"]["order"]):
        assert order.index(1) < order.index(0)
    o, conf = res["image_order"], v["fused"]["confidence"]
    if o.index(0) == o.index(1) + 1:  # neighbours: the step between them is certain
        assert conf[o.index(1)] > 0.9999
    status, off = _post(app.url, {"images": _image_payload(paths), "capture_time": "off"})
    assert status == 200 and not off["result"]["capture_time"]["used"]
    assert {p["placed_by"] for p in off["result"]["capture_time"]["photos"]} == {"model"}
    info = json.loads(_get(app.url + "api/info")[1])
    assert info["capture_time"] == "auto" and info["limits"]["capture_time_modes"] == ["auto", "on", "off"]
    # the page draws what the answer says: a note and a mark on every photo of an image order
    js = _get(app.url + "app.js")[1].decode()
    assert "placed by capture time" in js and "placed_by" in js and "capture_time:" in js


def test_more_than_twelve_items_says_beam_search_was_used(app):
    sentences = [f"{s} ({k})" for k, s in enumerate(app.sentences * 5)][:13]
    status, answer = _post(app.url, {"sentences": sentences})
    assert status == 200, answer
    assert answer["result"] == _expected(app, [], sentences)
    assert any("beam search" in n for n in answer["notes"])
    assert _post(app.url, {"sentences": sentences[:12]})[1]["notes"] == []


BAD = [
    (
        "not an image",
        lambda a: {
            "images": [{"name": "notes.txt", "data": base64.b64encode(b"just text").decode()}]
            + _image_payload(a.images[:2])
        },
        400,
        ["notes.txt", "not an image"],
    ),
    ("single item", lambda a: {"sentences": ["only one"]}, 400, ["at least 2"]),
    (
        "one image one sentence",
        lambda a: {"images": _image_payload(a.images[:1]), "sentences": a.sentences[:1]},
        400,
        ["at least 2"],
    ),
    (
        "too many",
        lambda a: {"sentences": [f"sentence {k}" for k in range(MAX_ITEMS + 1)]},
        400,
        [f"at most {MAX_ITEMS}", "12", "beam"],
    ),
    (
        "bad base64",
        lambda a: {"images": [{"name": "x.png", "data": "@@@"}, {"name": "y.png", "data": "@@@"}]},
        400,
        ["x.png", "base64"],
    ),
    ("empty sentence", lambda a: {"sentences": ["one", "  "]}, 400, ["sentence 2"]),
    ("bad decoder", lambda a: {"sentences": a.sentences, "decoder": "magic"}, 400, ["decoder"]),
    ("bad capture_time", lambda a: {"sentences": a.sentences, "capture_time": "yes"}, 400, ["capture_time", "auto"]),
    ("not a list", lambda a: {"images": "a.png"}, 400, ["lists"]),
    ("not an object", lambda a: [1, 2], 400, ["JSON object"]),
    ("not JSON", lambda a: b"{nope", 400, ["not valid JSON"]),
]


@pytest.mark.parametrize("name,make,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_json_error_and_the_server_keeps_serving(app, name, make, status, words):
    got, answer = _post(app.url, make(app))
    assert got == status, answer
    assert set(answer) == {"error"} and "\n" not in answer["error"]
    for w in words:
        assert w in answer["error"]
    assert not any(app.tmp_root.iterdir())
    _assert_still_serving(app)


def test_oversized_body_wrong_type_and_foreign_host_are_refused(app):
    host, port = app.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/api/order")  # announces more than the limit and sends nothing: refused before reading
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "limit 50 MB" in json.loads(r.read())["error"]
    conn.close()
    assert _post(app.url, b"{}", ctype="text/plain")[0] == 415
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/api/info", headers={"Host": "attacker.example:7860"})  # DNS rebinding
    assert conn.getresponse().status == 400
    conn.close()
    _assert_still_serving(app)


def test_binds_loopback_by_default_and_prints_the_url(app):
    assert app.server.server_address[0] == "127.0.0.1"
    assert f"ready at http://127.0.0.1:{app.server.server_address[1]}/" in app.out.getvalue()
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    a = p.parse_args(["serve", "--run", "r"])
    assert (a.host, a.port, a.func) == ("127.0.0.1", 7860, cmd_serve)


def test_page_loads_nothing_from_outside(app):
    status, html, headers = _get(app.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    page = html.decode()
    for needle in (
        'type="file"',
        "multiple",
        "<textarea",
        ">Order<",
        "Download JSON",
        'src="app.js"',
        'href="app.css"',
    ):
        assert needle in page
    for path in ("", "app.js", "app.css"):
        text = _get(app.url + path)[1].decode()
        assert not re.search(r"https?://", text), f"{path or 'index.html'} references an external URL"
        assert "@import" not in text and "url(" not in text


def test_busy_port_and_missing_run_are_user_errors(app, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(IterWeGOError, match="cannot listen on 127.0.0.1"):
            make_server(app.service, port=s.getsockname()[1])
    with pytest.raises(ModelLoadError, match="run directory not found"):
        cmd_serve(argparse.Namespace(run=str(tmp_path / "nope"), host="127.0.0.1", port=0, quiet=True))


# ----------------------------------------------------------------------------- real browser
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install -y chromium chromium-driver)"
)


def _chrome(tmp_path: Path, downloads: Path | None = None):
    """Debian's headless chromium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    if downloads is not None:
        opts.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
    return webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))


def _choose(driver, files: list[str], sentences: list[str]) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "images")
    box.clear()
    box.send_keys("\n".join(files))
    area = driver.find_element(By.ID, "sentences")
    area.clear()
    area.send_keys("\n".join(sentences))


def _result_drawn(n: int):
    from selenium.webdriver.common.by import By

    return lambda d: (
        d.find_element(By.ID, "result").is_displayed() and len(d.find_elements(By.CSS_SELECTOR, "#strip .card")) == n
    )


@needs_chromium
def test_browser_orders_like_the_cli(app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cli_json = tmp_path / "cli.json"
    assert (
        main(
            [
                "order",
                "--run",
                str(app.run),
                "--images",
                *app.images,
                "--sentences",
                *app.sentences,
                "--json",
                str(cli_json),
            ]
        )
        == 0
    )
    cli = json.loads(cli_json.read_text())
    cli["images"] = [Path(p).name for p in cli["images"]]
    assert cli["mode"] == "fused"

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _chrome(tmp_path, downloads)
    wait = WebDriverWait(driver, 30, poll_frequency=0.02)
    try:
        driver.get(app.url)
        wait.until(lambda d: d.find_element(By.ID, "limits").text)  # /api/info answered and drawn

        def cards(what: str) -> list[int]:
            return [
                int(c.get_attribute(f"data-{what}-index"))
                for c in driver.find_elements(By.CSS_SELECTOR, "#strip .card")
            ]

        # a file that is not an image: a clear message, nothing drawn
        bad = tmp_path / "holiday-notes.txt"
        bad.write_text("not a picture")
        _choose(driver, [str(bad), *app.images[1:]], app.sentences)
        driver.find_element(By.ID, "order").click()
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "holiday-notes.txt" in driver.find_element(By.ID, "error").text
        assert "not an image" in driver.find_element(By.ID, "error").text
        assert not driver.find_element(By.ID, "result").is_displayed()
        driver.save_screenshot(str(tmp_path / "app-error.png"))

        # then a valid album in the same page
        _choose(driver, app.images, app.sentences)
        driver.find_element(By.ID, "order").click()
        wait.until(_result_drawn(3))
        assert not driver.find_element(By.ID, "error").is_displayed()

        v = cli["variants"]
        assert driver.find_element(By.ID, "variant-fused").is_selected()
        assert cards("image") == cli["image_order"] and cards("sentence") == cli["sentence_order"]
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#strip .step .p")] == [
            f"{c:.2f}" for c in v["fused"]["confidence"]
        ]
        shown = [
            c.find_element(By.CSS_SELECTOR, ".sentence").text
            for c in driver.find_elements(By.CSS_SELECTOR, "#strip .card")
        ]
        assert shown == [cli["sentences"][t] for t in cli["sentence_order"]]
        driver.find_element(By.ID, "variant-guided").click()
        assert cards("image") == v["guided"]["image_order"] and cards("sentence") == v["guided"]["sentence_order"]
        driver.find_element(By.ID, "variant-image_only").click()
        assert cards("image") == v["image_only"]["order"]
        driver.find_element(By.ID, "variant-text_only").click()
        assert cards("sentence") == v["text_only"]["order"]
        driver.find_element(By.ID, "variant-fused").click()

        driver.find_element(By.ID, "download").click()
        target = downloads / "iterwego-order.json"
        wait.until(lambda d: target.is_file() and target.stat().st_size > 0)
        assert json.loads(target.read_text()) == cli

        # photos with EXIF capture times: the page marks what placed each photo, as the answer says
        timed = _with_capture_times(app.images, ["2024:06:01 18:00:00", "2024:06:01 09:00:00", None], tmp_path)
        want = _expected(app, timed, app.sentences)
        _choose(driver, timed, app.sentences)
        driver.find_element(By.ID, "order").click()
        # read in one script call: the strip is redrawn while the answer arrives, and elements found earlier go stale
        marks = lambda d: d.execute_script(  # noqa: E731
            "return [...document.querySelectorAll('#strip .card')].map(c => c.dataset.placedBy || null)"
        )
        wait.until(lambda d: len(marks(d)) == 3 and all(marks(d)))
        assert cards("image") == want["image_order"]
        placed = want["capture_time"]["photos"]
        assert marks(driver) == [
            ("time" if placed[i]["placed_by"] == "capture time" else "model") for i in cards("image")
        ]
        assert "Capture times: 2 of 3 photos placed by their capture time" in driver.find_element(By.ID, "notes").text
        assert "taken 2024-06-01 09:00:00, placed by capture time" in driver.find_element(By.ID, "strip").text

        # nothing but this server (and the page's own data:/blob: images) was ever fetched
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and all(u.startswith((app.url, "data:", "blob:")) for u in fetched), fetched

        # the whole page, from the top, for the README
        driver.set_window_size(
            1200, min(2000, driver.execute_script("return document.documentElement.scrollHeight") + 140)
        )
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("ITERWEGO_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, DOCS_SCREENSHOT)
    finally:
        driver.quit()


@pytest.mark.benchmark
@needs_chromium
def test_browser_timings(app, tmp_path, capsys):
    """Page load and press-to-result times in a real browser (printed and written, never asserted)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome(tmp_path)
    wait = WebDriverWait(driver, 30, poll_frequency=0.02)
    timings = {}
    try:
        t0 = time.perf_counter()
        driver.get(app.url)
        wait.until(lambda d: d.find_element(By.ID, "limits").text)
        timings["page_load_s"] = time.perf_counter() - t0
        timings["page_load_event_ms"] = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;"
        )
        _choose(driver, app.images, app.sentences)
        t0 = time.perf_counter()
        driver.find_element(By.ID, "order").click()
        wait.until(_result_drawn(3))
        timings["press_to_result_s"] = time.perf_counter() - t0
        timings["press_to_result_page_ms"] = float(driver.execute_script("return document.body.dataset.orderMs"))
    finally:
        driver.quit()
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=2))
    with capsys.disabled():
        print("\nserve timings: " + ", ".join(f"{k}={v:.3f}" for k, v in timings.items()))
