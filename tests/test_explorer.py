"""The latent explorer (metrics/explorer/, the `explorer` stage) on the session's tiny run: what
the page embeds against the stage outputs it reads, and what headless Chromium renders from disk.

The browser tests skip only where Chromium is missing and `CI` is unset; under CI a missing
Chromium fails them (.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.layout import explorer as files
from pipeline.params.file import parse_params
from pipeline.report.explorer import page
from pipeline.stages import explorer

from conftest import TINY_PARAMS

IMAGES = TINY_PARAMS["interpret"]["grid_images"]


def site_json(site: Path) -> dict:
    html = (site / "index.html").read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', html, re.S)
    return json.loads(blob.group(1))


@pytest.fixture(scope="module")
def site(tiny_run: Path) -> Path:
    return tiny_run / files.EXPLORER


@pytest.fixture(scope="module")
def data(site: Path) -> dict:
    return site_json(site)


@pytest.fixture(scope="module")
def latents(tiny_run: Path) -> dict:
    return pq.read_table(tiny_run / "data/interpret/latents.parquet").to_pydict()


# ------------------------------------------------------------------------ what the page embeds
def test_the_site_holds_every_alive_latent_and_every_class_with_what_interpret_wrote(tiny_run, data, latents):
    alive = [j for j, rate in zip(latents["latent"], latents["firing_rate"]) if rate > 0]
    assert alive
    assert [entry["id"] for entry in data["latents"]] == alive
    assert data["n_latents"] == len(latents["latent"])
    top_sets = json.loads((tiny_run / "data/stats/top_sets.json").read_text())
    assert [c["name"] for c in data["classes"]] == top_sets["class_names"]
    assert data["heads"] == [f"h{h}" for h in range(TINY_PARAMS["model"]["num_heads"])]
    for entry in data["latents"]:
        j = entry["id"]
        assert entry["label"] == latents["label"][j]
        assert entry["purity"] == pytest.approx(latents["purity"][j], rel=1e-3)
        assert entry["rate"] == pytest.approx(latents["firing_rate"][j], rel=1e-3)
        assert entry["attr"] == pytest.approx([latents[f"attr_h{h}"][j] for h in range(len(data["heads"]))], rel=1e-3, abs=1e-6)
        # the largest class share of its activation mass is its purity, on its label
        assert entry["mass"][0][1] == pytest.approx(entry["purity"], rel=1e-3)
        assert data["classes"][entry["mass"][0][0]]["name"] == entry["label"]
        # the sets it is in, as latent_stats chose them
        assert entry["sets"] == [[c, top_sets["per_class"][name].index(j)] for c, name in enumerate(top_sets["class_names"])
                                 if j in top_sets["per_class"][name]]
        assert entry["global"] == (top_sets["global"].index(j) if j in top_sets["global"] else None)


def test_each_latent_shows_its_first_gallery_images_in_one_strip_beside_the_page(tiny_run, site, data):
    galleries = pq.read_table(tiny_run / "data/interpret/galleries.parquet").to_pylist()
    size = TINY_PARAMS["data"]["synthetic"]["image_size"]
    strips = sorted(p.name for p in (site / "img").iterdir())
    assert strips == sorted(f"latent_{entry['id']}.webp" for entry in data["latents"])
    for entry in data["latents"]:
        mine = sorted((g["rank"], g["row"], g["label"]) for g in galleries if g["latent"] == entry["id"])[:IMAGES]
        assert [[row, label] for _, row, label in mine] == [t[:2] for t in entry["top"]]
        with Image.open(site / entry["img"]) as strip:
            assert strip.format == "WEBP" and strip.size == (size * len(entry["top"]), size)


def test_every_link_resolves(site, data):
    """Latent links point at alive latents, class links at classes, image paths at files."""
    alive = {entry["id"] for entry in data["latents"]}
    n_classes = len(data["classes"])
    for c in data["classes"]:
        assert set(c["set"]) <= alive  # a top set holds only latents that fire
        assert all(0 <= r < n_classes for r, _ in c["related"])
    assert set(data["global_set"]) <= alive
    for entry in data["latents"]:
        assert (site / entry["img"]).is_file()
        assert all(0 <= c < n_classes for c, _ in entry["sets"]) and all(0 <= c < n_classes for c, _, _ in entry["mass"])
        assert all(0 <= label < n_classes for _, label, _ in entry["top"])
    html = (site / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://", html)  # nothing fetched: no CDN, no server
    assert re.findall(r'src="([^"]+)"', html) == []  # the page's own scripts and styles are inline


def test_each_class_carries_its_steering_headline_and_the_ceilings_pattern(tiny_run, data):
    headline = {r["class"]: r for r in pq.read_table(tiny_run / "data/steer/headline.parquet").to_pylist()}
    ceiling = {r["class"]: r for r in pq.read_table(tiny_run / "data/ceiling/classes.parquet").to_pylist()}
    for c in data["classes"]:
        h, k = headline[c["name"]], ceiling[c["name"]]
        assert c["steer"]["alpha"] == h["alpha"] and c["steer"]["use"] == pytest.approx(h["usage"], rel=1e-3)
        assert c["steer"]["alpha"] in [a for a, _, _ in c["curve"]]
        assert [a for a, _, _ in c["curve"]] == sorted(TINY_PARAMS["steer"]["alphas"])
        assert c["ceiling"]["pattern"] == (None if k["pattern"] == -1 else k["pattern"]) and c["ceiling"]["heads"] == list(k["heads"])


def test_a_rebuild_gives_the_same_bytes(tiny_run, site, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_run)  # the stage reads its inputs relative to the run's folder; it writes elsewhere here
    explorer.run(parse_params(TINY_PARAMS, "params").interpret, out=tmp_path / "again")
    before = {p.relative_to(site): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}
    after = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in sorted((tmp_path / "again").rglob("*")) if p.is_file()}
    assert after == before


BAD_INPUTS = [
    ("data/interpret/galleries.parquet", "truncate", "data/interpret"),
    ("data/stats/latents.parquet", "delete", "data/stats/latents.parquet"),
    ("data/stats/top_sets.json", "truncate", "data/stats/top_sets.json"),
    ("data/steer/headline.parquet", "delete", "data/steer/headline.parquet"),
    ("data/ceiling/classes.parquet", "truncate", "data/ceiling/classes.parquet"),
    ("data/dataset/train.parquet", "delete", "data/dataset/train.parquet"),
]


@pytest.mark.parametrize(("target", "how", "named"), BAD_INPUTS, ids=[f"{t}:{h}" for t, h, _ in BAD_INPUTS])
def test_a_bad_input_exits_1_naming_it_and_leaves_the_site_as_it_was(tiny_run, tmp_path, monkeypatch, target, how, named):
    from typer.testing import CliRunner

    from pipeline.cli import app

    work = tmp_path / "run"
    shutil.copytree(tiny_run, work)
    monkeypatch.chdir(work)
    path = Path(target)
    path.unlink() if how == "delete" else path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = {p: p.read_bytes() for p in sorted(files.EXPLORER.rglob("*")) if p.is_file()}
    result = CliRunner().invoke(app, ["explorer"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and named in result.output, result.output
    assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in sorted(files.EXPLORER.rglob("*")) if p.is_file()} == before
    assert not list(files.EXPLORER.parent.glob(".explorer.*"))  # no temporary left beside it


def test_text_in_the_data_cannot_end_the_script_that_holds_it():
    html = page({"classes": [{"name": "</script><img src=x onerror=alert(1)>"}]})
    assert html.count("</script>") == 2  # the two script elements of the page itself
    assert json.loads(re.search(r'id="explorer-data">(.*?)</script>', html, re.S).group(1))["classes"][0]["name"].startswith("</script>")


# ----------------------------------------------------------------------- in a real browser
@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory):
    """Run headless Chromium on a file:// address: `chromium(site, "#latent/3", "--dump-dom")`
    -> (stdout, stderr). No network: every host name resolves to nothing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set and chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")

    def run(site: Path, fragment: str, *args: str) -> tuple[str, str]:
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND",
                   f"--user-data-dir={profile}", "--enable-logging=stderr", "--hide-scrollbars", "--window-size=1280,900", *args,
                   (site / "index.html").resolve().as_uri() + fragment]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Uncaught" not in result.stderr, result.stderr[-3000:]  # no script error in the page
        return result.stdout, result.stderr

    return run


def body(dom: str) -> dict[str, str]:
    """The attributes the page's script sets on <body>."""
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def count(dom: str, css_class: str) -> int:
    return len(re.findall(rf'<(?:tr|img)[^>]*class="{css_class}"', dom))


def test_chromium_shows_every_alive_latent_in_the_index(chromium, site, data):
    dom, _ = chromium(site, "", "--dump-dom")
    assert body(dom)["data-view"] == "latents"
    assert count(dom, "latent-row") == len(data["latents"])
    assert f"{len(data['latents'])} of {len(data['latents'])} alive latents" in dom


def test_chromium_filters_and_sorts_the_index_from_the_address(chromium, site, data):
    cut = sorted(entry["purity"] for entry in data["latents"])[len(data["latents"]) // 2]
    dom, _ = chromium(site, f"#latents?purity={cut}&sort=purity&desc=1", "--dump-dom")
    expected = sorted((e for e in data["latents"] if e["purity"] >= cut), key=lambda e: (-e["purity"], e["id"]))
    shown = [int(j) for j in re.findall(r'<tr class="latent-row" data-id="(\d+)"', dom)]
    assert shown == [e["id"] for e in expected] and 0 < len(shown) < len(data["latents"]) + 1


def test_chromium_draws_a_latent_page_with_its_images_loaded_from_disk(chromium, site, data):
    busiest = max(data["latents"], key=lambda e: (e["rate"], -e["id"]))
    dom, _ = chromium(site, f"#latent/{busiest['id']}", "--dump-dom")
    attrs = body(dom)
    assert attrs["data-view"] == "latent" and f"Latent {busiest['id']}" in dom
    assert count(dom, "thumb-img") == len(busiest["top"]) == min(IMAGES, len(busiest["top"])) > 0
    assert int(attrs["data-images-loaded"]) == int(attrs["data-images"]) == len(busiest["top"])  # every file decoded
    assert dom.count('href="#class/') >= len(busiest["sets"]) + 1  # its label and its sets link to their classes


def test_chromium_draws_a_class_page_with_its_top_set_and_steering(chromium, site, data):
    c = data["classes"][0]
    dom, _ = chromium(site, f"#class/{c['name']}", "--dump-dom")
    attrs = body(dom)
    assert attrs["data-view"] == "class" and "Steering outcome" in dom and "The ceiling" in dom
    images = sum(len(next(e for e in data["latents"] if e["id"] == j)["top"]) for j in c["set"])
    assert int(attrs["data-images-loaded"]) == count(dom, "thumb-img") == images > 0
    assert all(f'href="#latent/{j}"' in dom for j in c["set"])
    classes, _ = chromium(site, "#classes", "--dump-dom")
    assert body(classes)["data-view"] == "classes" and count(classes, "class-row") == len(data["classes"])


def test_chromium_screenshots_of_the_index_and_a_latent_page_are_not_blank(chromium, site, data, tmp_path):
    for name, fragment in (("index", ""), ("latent", f"#latent/{data['latents'][0]['id']}")):
        shot = tmp_path / f"{name}.png"
        chromium(site, fragment, f"--screenshot={shot}")
        with Image.open(shot) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
        assert pixels.shape[:2] == (900, 1280)
        assert pixels.var() > 0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16, name
