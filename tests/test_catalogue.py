"""The released-model catalogue: entries, downloads, checks and the cache, against a local HTTP server.

No internet: each test starts an http.server on 127.0.0.1 in a thread serving the committed Open-Unmix fixture
(tests/fixtures/umx/bidirectional) under published-style file names, and points a test catalogue at it.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from components.inference import catalogue
from components.inference.catalogue import CatalogueError
from tests.cli import ROOT, environment

UMX = ROOT / "tests" / "fixtures" / "umx" / "bidirectional"


class Server:
    """Files by name over HTTP/1.1 with ranges; can drop a connection mid-file once and slow every response."""

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []  # (path, Range header)
        self.drop_once = set()
        self.delay = 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = urllib.parse.unquote(self.path.rsplit("/", 1)[-1])
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                time.sleep(server.delay)
                if name in server.drop_once:
                    server.drop_once.discard(name)
                    self.wfile.write(body[start: start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def gets(self, name):
        return [r for r in self.requests if r[0] == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _published(path: Path) -> str:
    """`<target>-<8 hex of sha256>.pth`, as open-unmix publishes its files."""
    return f"{path.stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}.pth"


@pytest.fixture
def server():
    files = {_published(p): p.read_bytes() for p in sorted(UMX.glob("*.pth"))}
    files.update({p.name: p.read_bytes() for p in sorted(UMX.glob("*.json"))})
    served = Server(files)
    yield served
    served.close()


def _catalogue(tmp_path, server, default=None, **entry):
    """A test catalogue (MUSICSEP_CATALOG) with entry 'tiny-umx' serving the fixture (and `default` as the model
    `separate` uses when given none); the env for it."""
    files = [{"url": f"{server.url}/models/{name}",
              "sha256": name[:-4].split("-")[1] if name.endswith(".pth") else None} for name in server.files]
    item = {"name": "tiny-umx", "family": "umx", "files": files, "import": {}, "sample_rate": 8000,
            "targets": ["vocals", "drums", "bass", "other"], "license": "MIT", "source": "tests/fixtures/make_umx.py"}
    item.update(entry)
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps({"models": [item]} | ({"default": default} if default else {})))
    return {"MUSICSEP_CATALOG": str(path), "MUSICSEP_CACHE": str(tmp_path / "cache")}


def _cached(env):
    return sorted(p.name for p in (Path(env["MUSICSEP_CACHE"]) / "tiny-umx" / "files").glob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- the shipped data
def test_every_shipped_entry_is_well_formed_and_named_as_its_importer_recognises():
    from models.open_unmix import PUBLISHED, PUBLISHED_FILES, _target_of

    entries = catalogue.catalogue({})
    assert {"umxhq", "umx", "umxl", "umxse", "spleeter-2stems", "spleeter-4stems", "spleeter-5stems"} <= set(entries)
    for item in entries.values():
        for released in item.files:
            if item.manual:
                assert released.url is None and released.name
                continue
            parts = urllib.parse.urlsplit(released.url)
            assert parts.scheme == "https" and parts.netloc and released.name == parts.path.rsplit("/", 1)[-1]
        if item.family == "umx":  # the name says the target and the sha256 prefix torch.hub checks
            model = item.import_options["model"]
            assert tuple(item.targets) == PUBLISHED[model]["targets"] and item.sample_rate == PUBLISHED[model]["sample_rate"]
            for released in item.files:
                stem = released.name[:-4]
                assert PUBLISHED_FILES[stem] == model and _target_of(stem) in item.targets
                assert re.fullmatch(r"[0-9a-f]{8}", released.sha256) and stem.endswith(released.sha256)
                assert released.url.startswith("https://zenodo.org/records/")
        if item.family == "unet":  # spleeter's provider: releases/download/v1.4.0/<name>.tar.gz, unpacked
            assert item.files[0].archive and item.files[0].url == (
                f"https://github.com/deezer/spleeter/releases/download/v1.4.0/{item.name.split('-')[1]}.tar.gz")
            assert catalogue.released_path(item, {"MUSICSEP_CACHE": "/c"}) == Path(
                f"/c/{item.name}/files/{item.files[0].name}.unpacked")
    assert entries["umxhq"].reported_sdr() == pytest.approx((6.25 + 6.04 + 5.07 + 4.28) / 4, abs=0.01)


def test_unknown_names_and_invalid_catalogues_are_one_line_errors(tmp_path):
    with pytest.raises(CatalogueError, match=r"no released model named 'umxh'; did you mean umxhq"):
        catalogue.entry("umxh", {})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [{"name": "x", "family": "umx", "files": [{"url": "ftp://a/b.pth"}]}]}))
    with pytest.raises(CatalogueError, match=r"entry 'x': field 'files\[0\].url' 'ftp://a/b.pth' is not an http"):
        catalogue.entry("x", {"MUSICSEP_CATALOG": str(bad)})
    bad.write_text(json.dumps({"models": [{"name": "x", "family": "umx", "files": [{"url": "https://a/b.pth",
                                                                                     "sha256": "xyz"}]}]}))
    with pytest.raises(CatalogueError, match=r"entry 'x': field 'files\[0\].sha256' must be 8 to 64 hex"):
        catalogue.catalogue({"MUSICSEP_CATALOG": str(bad)})
    bad.write_text("{")
    with pytest.raises(CatalogueError, match=r"is not valid JSON"):
        catalogue.catalogue({"MUSICSEP_CATALOG": str(bad)})


def test_the_default_model_is_the_catalogues_and_a_user_catalogue_may_replace_it(tmp_path):
    assert catalogue.default_name({}) == "umxl"  # the best MUSDB18 score of the releases we run (6.32 dB)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"default": "umxhq", "models": []}))
    assert catalogue.default_name({"MUSICSEP_CATALOG": str(path)}) == "umxhq"
    path.write_text(json.dumps({"default": "umxhx", "models": []}))
    with pytest.raises(CatalogueError, match=r"^no released model named 'umxhx'; did you mean umxhq"):
        catalogue.default_name({"MUSICSEP_CATALOG": str(path)})


def test_cache_location_follows_musicsep_cache_then_xdg():
    assert catalogue.cache_root({"MUSICSEP_CACHE": "/a", "XDG_CACHE_HOME": "/b"}) == Path("/a")
    assert catalogue.cache_root({"XDG_CACHE_HOME": "/b"}) == Path("/b/music-separation")
    assert catalogue.cache_root({}) == Path.home() / ".cache" / "music-separation"


def test_manual_entry_not_in_place_says_where_to_put_which_file(tmp_path):
    env = {"MUSICSEP_CACHE": str(tmp_path)}
    with pytest.raises(CatalogueError, match=r"model 'dttnet-vocals' is not downloadable: get vocals.ckpt by hand "
                                             r"\(.*mega.nz.*\) and put it at .*/dttnet-vocals/files/vocals.ckpt"):
        catalogue.fetch(catalogue.entry("dttnet-vocals", env), environ=env)


# ---------------------------------------------------------------------------------------------- downloads
def test_fetch_downloads_checks_caches_and_the_importer_reads_the_folder(tmp_path, server):
    env = _catalogue(tmp_path, server)
    item = catalogue.entry("tiny-umx", env)
    assert not catalogue.is_cached(item, env)
    folder = catalogue.fetch(item, environ=env, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(server.files) and catalogue.is_cached(item, env)
    for name, body in server.files.items():
        assert (folder / name).read_bytes() == body
    # the json files have no published checksum: trusted on first use
    trusted = json.loads((folder.parent / "trusted.json").read_text())
    assert trusted == {n: hashlib.sha256(b).hexdigest() for n, b in server.files.items() if n.endswith(".json")}
    count = len(server.requests)
    assert catalogue.fetch(item, environ=env, progress=False) == folder and len(server.requests) == count  # cached

    from models.open_unmix import read_released

    released, local = read_released(folder), read_released(UMX)  # as from the authors' folder, tensor for tensor
    assert len(released.tensors) == 184 and released.config_overrides == local.config_overrides
    assert all((released.tensors[k] == v).all() for k, v in local.tensors.items()) and released.tensors.keys() == local.tensors.keys()


def test_mirror_with_a_different_file_is_refused_and_nothing_is_cached(tmp_path, server):
    env = _catalogue(tmp_path, server)
    mirror = Server({name: body[:-1] + bytes([body[-1] ^ 1]) for name, body in server.files.items()})
    try:
        env["MUSICSEP_MIRROR"] = f"{mirror.url}/mirror/"
        name = next(n for n in server.files if n.startswith("vocals-"))
        with pytest.raises(CatalogueError, match=rf"download {mirror.url}/mirror/\w+-\w+\.pth: sha256 [0-9a-f]{{64}} "
                                                 r"does not match the expected [0-9a-f]{8}; the file was not kept"):
            catalogue.fetch(catalogue.entry("tiny-umx", env), environ=env, progress=False)
        assert not server.requests and mirror.requests and not _cached(env)
        assert not list((Path(env["MUSICSEP_CACHE"]) / "tiny-umx" / "files").glob("*.part"))
        assert name in mirror.files
    finally:
        mirror.close()


def test_trust_on_first_use_refuses_a_later_different_file(tmp_path, server, capsys):
    env = _catalogue(tmp_path, server)
    folder = catalogue.fetch(catalogue.entry("tiny-umx", env), environ=env, progress=False)
    assert re.search(r"separator.json: no published checksum; recorded sha256 [0-9a-f]{64}", capsys.readouterr().err)
    (folder / "separator.json").unlink()
    server.files["separator.json"] = b'{"changed": true}'
    with pytest.raises(CatalogueError, match=r"separator.json: sha256 [0-9a-f]{64} does not match the expected"):
        catalogue.fetch(catalogue.entry("tiny-umx", env), environ=env, progress=False)
    assert not (folder / "separator.json").exists() and not (folder / "separator.json.part").exists()


def test_connection_dropped_mid_file_leaves_no_entry_and_the_next_run_resumes(tmp_path, server):
    env = _catalogue(tmp_path, server)
    name = next(n for n in server.files if n.startswith("drums-"))
    server.drop_once.add(name)
    with pytest.raises(CatalogueError, match=rf"download {server.url}/models/{name} failed \(.*\); run again to resume"):
        catalogue.fetch(catalogue.entry("tiny-umx", env), environ=env, progress=False)
    assert name not in _cached(env)
    part = Path(env["MUSICSEP_CACHE"]) / "tiny-umx" / "files" / f"{name}.part"
    half = len(server.files[name]) // 2
    assert part.stat().st_size == half
    folder = catalogue.fetch(catalogue.entry("tiny-umx", env), environ=env, progress=False)
    assert (folder / name).read_bytes() == server.files[name] and not part.exists()
    assert server.gets(name) == [(name, None), (name, f"bytes={half}-")]  # resumed, not restarted


def test_unreachable_host_names_the_url_and_where_to_put_the_file(tmp_path, server):
    env = _catalogue(tmp_path, server)
    env["MUSICSEP_MIRROR"] = "http://127.0.0.1:9"  # the discard port: connection refused
    with pytest.raises(CatalogueError, match=r"download http://127.0.0.1:9/\S+ failed \(.*refused.*\); run again to "
                                             r"resume it, or get \S+ by hand and put it at .*/tiny-umx/files/"):
        catalogue.fetch(catalogue.entry("tiny-umx", env), environ=env, progress=False)
    assert not _cached(env)


def test_disk_full_in_the_cache_leaves_nothing(tmp_path, server, monkeypatch):
    import errno

    env = _catalogue(tmp_path, server)

    def full(url, part, progress, timeout):
        part.write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(catalogue, "_download", full)
    with pytest.raises(CatalogueError, match=r"cache .*/tiny-umx/files: disk full while writing \S+; free space"):
        catalogue.fetch(catalogue.entry("tiny-umx", env), environ=env, progress=False)
    assert not list((Path(env["MUSICSEP_CACHE"]) / "tiny-umx" / "files").iterdir())


def test_two_processes_at_once_download_each_file_once(tmp_path, server):
    env = environment() | _catalogue(tmp_path, server)
    server.delay = 0.3
    code = ("from components.inference import catalogue as c; "
            "print(c.fetch(c.entry('tiny-umx'), progress=False))")
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert sorted(name for name, _ in server.requests) == sorted(server.files)  # one GET per file


def test_an_archive_is_unpacked_after_its_check(tmp_path):
    archive = tmp_path / "2stems.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        for path in sorted(UMX.glob("vocals.*")):
            bundle.add(path, arcname=path.name)
    body = archive.read_bytes()
    served = Server({"2stems.tar.gz": body})
    try:
        path = tmp_path / "catalogue.json"
        path.write_text(json.dumps({"models": [{"name": "tiny-archive", "family": "umx", "files": [
            {"url": f"{served.url}/v1/2stems.tar.gz", "sha256": hashlib.sha256(body).hexdigest()}]}]}))
        env = {"MUSICSEP_CATALOG": str(path), "MUSICSEP_CACHE": str(tmp_path / "cache")}
        folder = catalogue.fetch(catalogue.entry("tiny-archive", env), environ=env, progress=False)
        assert folder.name == "2stems.tar.gz.unpacked"
        assert sorted(p.name for p in folder.iterdir()) == ["vocals.json", "vocals.pth"]
        assert (folder / "vocals.pth").read_bytes() == (UMX / "vocals.pth").read_bytes()
    finally:
        served.close()


# ---------------------------------------------------------------------------------------------- separate -n
def test_separate_by_name_equals_the_import_export_separate_path(tmp_path, server):
    """`separate -n <entry>` (download, convert once into the cache, separate) gives the stems of
    `--stage import with import.path=<the authors' folder>`, `--stage export` (no prepare), `separate`."""
    import numpy as np
    import soundfile as sf

    from tests.cli import command

    env = environment() | _catalogue(tmp_path, server, default="tiny-umx")
    song = tmp_path / "song.wav"
    sf.write(song, np.random.default_rng(0).normal(0, 0.1, (8000 * 2, 2)).astype(np.float32), 8000, subtype="FLOAT")
    by_name = subprocess.run(command("separate", song, "-n", "tiny-umx", "-o", tmp_path / "by-name", "-q"), cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=900)
    assert by_name.returncode == 0, by_name.stderr[-2000:]
    cache = Path(env["MUSICSEP_CACHE"]) / "tiny-umx" / "converted"
    (converted,) = [p for p in cache.iterdir() if p.is_dir()]  # one conversion, renamed into place
    assert (converted / "export" / "artifact.json").is_file() and not (converted / "prepare").exists()

    reference = tmp_path / "reference"
    for argv in (("--stage", "import", "--no-file-observer", "-q", "with", "model.name=umx", f"import.path={UMX}",
                  f"artifacts_dir={reference}"),
                 ("--stage", "export", "--no-file-observer", "-q", "with", f"artifacts_dir={reference}")):
        run = subprocess.run(command("run", *argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
    run = subprocess.run(command("separate", song, "--artifacts-dir", reference, "-o", tmp_path / "local", "-q"),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    for target in ("vocals", "drums", "bass", "other"):
        ours, theirs = (sf.read(tmp_path / where / "song" / f"{target}.wav")[0] for where in ("by-name", "local"))
        assert ours.shape == (16000, 2) and np.abs(ours).max() > 1e-4
        np.testing.assert_allclose(ours, theirs, atol=1e-6)

    requests = len(server.requests)  # second use: cached, no download, no conversion; no -n: the default model
    again = subprocess.run(command("separate", song, "-o", tmp_path / "again", "-q"), cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and len(server.requests) == requests and "converting" not in again.stderr
    assert again.stderr.strip() == ("separating with the released model tiny-umx (MIT); -n NAME for another "
                                    "(--list-models), --artifacts-dir DIR for a pipeline export")
    assert np.array_equal(sf.read(tmp_path / "again" / "song" / "bass.wav")[0],
                          sf.read(tmp_path / "by-name" / "song" / "bass.wav")[0])
    # the Python API by name: the same cached conversion, the same stems
    script = ("import soundfile as sf, numpy as np\nfrom pipeline import Separator\n"
              "separator = Separator.from_pretrained('tiny-umx', two_stems='vocals')\n"
              f"audio, rate = sf.read({str(song)!r}, dtype='float32')\nstems = separator(audio, rate)\n"
              f"ref = {{t: sf.read({str(tmp_path / 'by-name' / 'song')!r} + f'/{{t}}.wav', dtype='float32')[0] "
              "for t in ('vocals', 'drums', 'bass', 'other')}\n"
              "print(sorted(stems), float(np.abs(stems['vocals'] - ref['vocals']).max()), "
              "float(np.abs(stems['no_vocals'] - ref['drums'] - ref['bass'] - ref['other']).max()))")
    api = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert api.returncode == 0, api.stderr[-2000:]
    names, vocals_error, rest_error = api.stdout.split("] ")[0] + "]", *map(float, api.stdout.split("] ")[1].split())
    assert names == "['no_vocals', 'vocals']" and vocals_error < 1e-6 and rest_error < 1e-5
    assert len(server.requests) == requests
    listed = subprocess.run(command("separate", "--list-models"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert re.search(r"^tiny-umx\s+umx\s+vocals,drums,bass,other\s+8000\s+MIT\s+yes$", listed.stdout, re.M)
    assert re.search(r"^umxhq\s+umx\s+vocals,drums,bass,other\s+44100\s+5\.41\s+MIT\s+no$", listed.stdout, re.M)

    # fine-tuning from the release by name starts from the same cached conversion (no download, no conversion)
    shown = subprocess.run(command("run", "--stage", "train", "--print-config", "with", "unittest",
                                   "train.init_from=tiny-umx", f"artifacts_dir={tmp_path / 'tuned'}"),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert shown.returncode == 0, shown.stderr[-2000:]
    config = json.loads(shown.stdout)
    assert config["train"]["init_from"] == str(converted) and config["model"]["name"] == "umx"
    assert config["data"]["sample_rate"] == 8000 and len(server.requests) == requests
    unknown = subprocess.run(command("run", "--stage", "train", "--print-config", "with", "unittest",
                                     "train.init_from=tiny-umc"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines()[-1] == (
        "error: no released model named 'tiny-umc'; did you mean tiny-umx? (separate --list-models lists them)")
