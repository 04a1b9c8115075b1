"""`sslrecipe weights cache [--clear]` and the availability check `sslrecipe run` makes before any stage."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading

import pytest
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.weights.cache import availability, cached_files
from sslrecipe.weights.catalogue import get_entry
from sslrecipe.weights.fetch import local_path


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "enc.safetensors").write_bytes(b"x" * 3000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLRECIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("SSLRECIPE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def test_cache_lists_downloads_by_catalogue_name_and_clear_keeps_the_checksums(cache, server):
    runner = CliRunner()
    assert "holds no checkpoints" in runner.invoke(main, ["weights", "cache"]).output
    fetched = runner.invoke(main, ["weights", "fetch", f"{server}/enc.safetensors"])
    assert fetched.exit_code == 0, fetched.output
    # a catalogue file put in place by hand (as the offline message says), and a partial download
    entry = get_entry("dino-resnet50")
    manual = local_path(entry.source, entry.cache_filename)
    manual.parent.mkdir(parents=True)
    manual.write_bytes(b"y" * 5000)
    (manual.parent / f".{manual.name}.abc.part").write_bytes(b"z" * 10)

    res = runner.invoke(main, ["weights", "cache"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "dino-resnet50" in res.output and "(not in the catalogue)" in res.output and "partial" in res.output
    assert "3 files" in res.output and all(len(line) <= 80 for line in res.output.splitlines()[:-1])
    assert res.output.splitlines()[-1] == f"in {cache}"
    rows = json.loads(runner.invoke(main, ["weights", "cache", "--json"]).output)
    assert sorted((r["name"], r["kind"], r["bytes"]) for r in rows if r["name"]) == [
        ("dino-resnet50", "download", 5000), ("dino-resnet50", "partial", 10)]
    assert [r["name"] for r in json.loads(runner.invoke(main, ["weights", "cache", "dino-resnet50", "--json"]).output)] \
        == ["dino-resnet50", "dino-resnet50"]

    res = runner.invoke(main, ["weights", "cache", "dino-resnet50", "--clear"])
    assert res.exit_code == 0 and "deleted 2 files" in res.output
    assert not manual.exists() and len(cached_files()) == 1  # the URL download is still there
    res = runner.invoke(main, ["weights", "cache", "--clear"])
    assert res.exit_code == 0 and "deleted 1 files" in res.output
    assert cached_files() == [] and (cache / "checksums.json").is_file()
    bad = runner.invoke(main, ["weights", "cache", "dino-resnet5O"])
    assert bad.exit_code == 2 and "dino-resnet50" in bad.output  # the closest name


def test_availability_cached_reachable_unreachable_offline(cache, server, monkeypatch):
    assert availability(f"{server}/enc.safetensors") is None  # the server answers
    assert "HTTP 404" in availability(f"{server}/missing.safetensors")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert "cannot be downloaded" in availability(f"http://127.0.0.1:{closed}/enc.safetensors")
    monkeypatch.setenv("SSLRECIPE_OFFLINE", "1")
    assert "downloads are off (SSLRECIPE_OFFLINE=1)" in availability("dino-resnet50")
    entry = get_entry("dino-resnet50")
    manual = local_path(entry.source, entry.cache_filename)
    manual.parent.mkdir(parents=True)
    manual.write_bytes(b"y")
    assert availability("dino-resnet50") is None  # cached: offline is fine
