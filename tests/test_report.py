"""`grounding report`: the static site's content (provenance, worst-first gallery, pager, errors, metrics),
its links (every src/href a relative file that exists, no URL), and the site opened in headless Chromium
(screenshots not blank, images decoded, gallery pages reachable, no request outside file://)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding.cli import app
from grounding.shards import FieldSpec, ShardSetSpec, ShardWriter

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
PER_PAGE = 4


def cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


def _pseudo_set(tmp: Path) -> Path:
    """A hand-made sentence-level set like refclip-pseudo: a box per sentence (some far off the GT), a score,
    a heat map, and one recorded error."""
    from grounding.data.schema import CanonicalDataset

    ds = CanonicalDataset.load(tmp / "prepared" / "synthetic")
    refs = [r for r in ds.refs if r.box is not None][:10]
    out = tmp / "teachers" / "toy-pseudo" / "synthetic"
    spec = ShardSetSpec(
        stage="toy-pseudo", stage_key="k" * 64, level="sentence", rows_per_shard=4, on_error="skip",
        fields=(FieldSpec("box", "float32", (4,), meaning="pseudo-box, xyxy original pixels"),
                FieldSpec("score", "float32", (), meaning="confidence"),
                FieldSpec("map", "float32", (4, 4), meaning="heat map")),
        teacher={"name": "toy", "weights_sha256": "ab" * 32}, params={"k": 1}, inputs={"dataset": ds.fingerprint()},
        extra={"dataset": ds.name, "dataset_dir": os.path.relpath(tmp / "prepared" / "synthetic", out)})
    with ShardWriter(out, spec, [r.ref_id for r in refs]) as w:
        for i, r in enumerate(refs):
            if i == 3:
                w.skip(r.ref_id, "ValueError: <b>made-up</b> failure")
                continue
            box = np.array(r.box, dtype=np.float32)
            if i % 2:  # every other row is shifted off its GT box: these must come first
                box = box + np.float32((box[2] - box[0]) * 0.8)
            w.add(r.ref_id, {"box": box, "score": np.float32(i / 10), "map": np.eye(4, dtype=np.float32)})
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("report")
    sets = ["--params", str(ROOT / "params.yaml"), "--set", "dataset.synthetic.n_images=8",
            "--set", f"paths.prepared={tmp}/prepared", "--set", f"paths.teachers={tmp}/teachers",
            "--set", "progress=false"]
    code, out = cli("run", "gt-boxes", *sets)
    assert code == 0, out
    _pseudo_set(tmp)
    metrics = tmp / "metrics"
    metrics.mkdir()
    (metrics / "student-toy.json").write_text(json.dumps(
        {"acc50": {"val": 0.25, "testA": 0.5}, "n": {"val": 4, "testA": 4}, "baselines": {"centred box": {"val": 0.1}}}))
    (metrics / "student-toy-curve.json").write_text(json.dumps(
        [{"epoch": e, "loss": 1 / e, "seed": s} for s in (0, 1) for e in (1, 2, 3)]))
    report = tmp / "report"
    code, out = cli("report", str(tmp), "-o", str(report), "--per-page", str(PER_PAGE), "--pages", "2")
    assert code == 0, out
    assert "2 shard sets" in out
    return tmp, report


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []  # (tag, url)
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.urls.append((tag, v))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: Path) -> _Links:
    p = _Links()
    p.feed(page.read_text())
    return p


def test_every_link_is_a_local_file(site: tuple[Path, Path]) -> None:
    _, report = site
    pages = sorted(report.rglob("*.html"))
    assert len(pages) >= 6  # index, metrics, 2 set pages, >= 2 gallery pages
    for page in pages:
        text = page.read_text()
        assert not re.search(r"(?i)\b(https?|ftp|wss?):|//[a-z0-9.-]+\.[a-z]{2,}/", text), page
        for tag, url in _parse(page).urls:
            assert not re.match(r"^[a-z][a-z0-9+.-]*:|^/", url), f"{page}: {tag} {url} is not a relative path"
            assert (page.parent / url).is_file(), f"{page}: {tag} {url} does not exist"


def test_index_provenance_gallery_errors(site: tuple[Path, Path]) -> None:
    tmp, report = site
    index = " ".join(_parse(report / "index.html").text)
    assert "gt-boxes" in index and "toy-pseudo" in index and index.count("OK") == 2
    set_dir = report / "sets" / "teachers__toy-pseudo__synthetic"
    page = (set_dir / "index.html").read_text()
    assert "ab" * 32 in page and "k" * 64 in page  # weights sha256 and stage key
    assert "&lt;b&gt;made-up&lt;/b&gt;" in page and "<b>made-up" not in page  # recorded error, escaped
    assert (set_dir / "hist.png").is_file()
    # 9 rows, 4 per page, at most 2 pages: 8 shown, worst (lowest IoU) first
    galleries = sorted(set_dir.glob("gallery-*.html"))
    assert [g.name for g in galleries] == ["gallery-1.html", "gallery-2.html"]
    captions = [t for g in galleries for t in _parse(g).text if "IoU" in t and "·" in t]
    ious = [float(re.search(r"IoU (\d\.\d\d)", c).group(1)) for c in captions]
    assert len(ious) == 8 and ious == sorted(ious) and ious[0] < 0.5 and ious[-1] == 1.0
    assert len(list((set_dir / "img").iterdir())) == 8  # only the rows shown are rendered
    metrics = (report / "metrics.html").read_text()
    assert "student-toy" in metrics and "50.0 %" in metrics
    assert (report / "metrics" / "acc50.png").is_file() and (report / "metrics" / "student-toy-curve.png").is_file()


def test_bad_inputs_one_line(site: tuple[Path, Path], tmp_path: Path) -> None:
    code, out = cli("report", str(tmp_path / "nope"), "-o", str(tmp_path / "r"))
    assert code == 2 and "no such directory" in out
    code, out = cli("report", str(tmp_path / "nope"), "-o", str(site[1]))
    assert code == 2 and (site[1] / "index.html").is_file()  # an earlier report is kept when the input is wrong
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    code, out = cli("report", str(site[0] / "metrics"), "-o", str(other))
    assert code == 2 and "not a report" in out and (other / "keep.txt").is_file()


# ---- in a real browser --------------------------------------------------------------------------------
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => `${i.getAttribute("src")} ${i.complete} ${i.naturalWidth}x${i.naturalHeight}`);
  const res = performance.getEntriesByType("resource").map(e => e.name);
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({imgs, res, href: location.href});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    exe = os.environ.get("GROUNDING_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium is not installed and could not be (make test installs Debian's `chromium`; "
                    "or `apt-get install chromium`, or set GROUNDING_CHROMIUM to a Chromium binary)")
    return exe


def _browse(exe: str, url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with every network path closed: a proxy on an unused local port and a resolver
    that finds no host, so any request that leaves file:// fails (and shows in the probe / log)."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--allow-file-access-from-files", "--virtual-time-budget=5000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp)})


def _probe(exe: str, page: Path, tmp: Path) -> dict:
    """The page as Chromium loaded it: each img's decoded size and every resource URL fetched."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        r = _browse(exe, probe.as_uri(), tmp, "--dump-dom")
    finally:
        probe.unlink()
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"no probe output from chromium (rc {r.returncode}): {r.stderr[-500:]}"
    import html

    return json.loads(html.unescape(m.group(1)))


def test_report_in_chromium(site: tuple[Path, Path], tmp_path: Path) -> None:
    exe = _chromium()
    _, report = site
    set_dir = report / "sets" / "teachers__toy-pseudo__synthetic"
    for page in (report / "index.html", set_dir / "index.html", set_dir / "gallery-1.html", set_dir / "gallery-2.html",
                 report / "metrics.html"):
        got = _probe(exe, page, tmp_path)
        html_imgs = [u for t, u in _parse(page).urls if t == "img"]
        assert len(got["imgs"]) == len(html_imgs)
        for line in got["imgs"]:
            src, complete, size = line.split(" ")
            w, h = map(int, size.split("x"))
            assert complete == "true" and w > 16 and h > 16, f"{page}: {src} did not render ({size})"
        assert all(u.startswith("file://") for u in got["res"]), got["res"]
    # the pager: page 1 links to page 2, and Chromium opens it from that link
    links = [u for t, u in _parse(set_dir / "gallery-1.html").urls if t == "a" and u.startswith("gallery-")]
    assert "gallery-2.html" in links
    # screenshots: not blank, the gallery's image areas not uniform
    shot = tmp_path / "gallery.png"
    r = _browse(exe, (set_dir / "gallery-1.html").as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,900",
                "--hide-scrollbars", "--enable-logging=stderr", "--v=1")
    assert shot.is_file(), r.stderr[-500:]
    # the network log: Chromium's own services (time sync, account and search helpers on Google hosts) try to
    # call home even headless and fail at the dead proxy; nothing else may be requested
    hosts = {m.group(1) for m in re.finditer(r"\bhttps?://([^/\s\"':?]+)", r.stderr)}
    assert all(re.search(r"(^|\.)(google\.com|googleapis\.com|gvt1\.com|gstatic\.com)$", h) for h in hosts), hosts
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert px.shape[:2] == (900, 1200)
    assert px.std() > 20 and (px.mean(axis=-1) < 250).mean() > 0.2  # mostly not white
    thumbs = px[200:500, 20:340]  # first figure of the first row
    assert thumbs.std(axis=(0, 1)).min() > 5 and len(np.unique(thumbs.reshape(-1, 3), axis=0)) > 100


def test_detector_rows_ranked_by_gt_recall(site: tuple[Path, Path]) -> None:
    from grounding.data.schema import CanonicalDataset
    from grounding.report.collect import row_quality
    from grounding.shards import ShardSet

    tmp, _ = site
    ds = CanonicalDataset.load(tmp / "prepared" / "synthetic")
    gt: dict[str, set] = {}
    for r in ds.refs:
        if r.box is not None:
            gt.setdefault(r.image_id, set()).add(tuple(r.box))
    gt_images = {k: np.array(sorted(v), dtype=np.float64) for k, v in gt.items()}
    ids = sorted(gt_images)[:3]
    spec = ShardSetSpec(stage="toy-det", stage_key="d" * 64, level="image", teacher={"name": "toy-det"},
                        fields=(FieldSpec("boxes", "float32", (4,), ragged=True),
                                FieldSpec("scores", "float32", (), ragged=True)))
    out = tmp / "toy-det"
    with ShardWriter(out, spec, ids) as w:
        for i, k in enumerate(ids):  # all GT boxes, none, half of them
            b = gt_images[k].astype(np.float32)
            b = b if i == 0 else b[:0] if i == 1 else b[: max(1, len(b) // 2)]
            w.add(k, {"boxes": b, "scores": np.ones(len(b), np.float32)})
    keys, captions = row_quality(ShardSet(out), {}, gt_images)
    assert keys[0] == ids[1] and keys[-1] == ids[0]
    assert captions[ids[1]] == "GT recall@0.5 0.00" and captions[ids[0]] == "GT recall@0.5 1.00"
