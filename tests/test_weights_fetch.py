"""Catalogue and checksummed fetch, against HTTP and Hugging-Face-compatible servers on 127.0.0.1.

Real bytes and real checksums: the servers serve files these tests write, huggingface_hub downloads through
HF_ENDPOINT, and stopping a server proves that later fetches come from the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from sslrecipe.errors import SSLRecipeError
from sslrecipe.weights import catalogue as cat
from sslrecipe.weights.fetch import (
    ChecksumError,
    ChecksumRegistry,
    OfflineError,
    fetch,
    hf_cache_dir,
    local_path,
    parse_spec,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _checkpoint_bytes(seed: int = 0, n: int = 4096) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.randn(n, generator=g)}}, buf)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Server:
    """A threaded HTTP server on 127.0.0.1 serving ``files`` (path -> bytes) in plain or hub style."""

    def __init__(self, hub: bool = False):
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.hits: list[tuple[str, str]] = []
        self.hub = hub
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def _lookup(self):
                path = self.path.split("?")[0]
                if server.hub:
                    # /<owner>/<repo>/resolve/<revision>/<file...>
                    parts = path.strip("/").split("/")
                    if len(parts) < 5 or parts[2] != "resolve":
                        return None, path
                    key = "/".join(parts[:2]) + "/" + "/".join(parts[4:])
                    return server.files.get(key), key
                return server.files.get(path), path

            def _headers(self, data: bytes, key: str):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                if server.hub:
                    self.send_header("ETag", f'"{_sha(data)}"')
                    self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()

            def do_HEAD(self):
                data, key = self._lookup()
                server.hits.append(("HEAD", key))
                if data is None:
                    self._not_found()
                    return
                self._headers(data, key)

            def _not_found(self):
                self.send_response(404)
                if server.hub:  # what the hub says for a missing file
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Error-Message", "Entry not found")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                data, key = self._lookup()
                server.hits.append(("GET", key))
                if data is None:
                    self._not_found()
                    return
                self._headers(data, key)
                if key in server.truncate:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self):
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.running = False


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLRECIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for k in ("HF_HUB_CACHE", "SSLRECIPE_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


@pytest.fixture
def http():
    s = _Server()
    yield s
    s.stop()


@pytest.fixture
def hub(monkeypatch):
    s = _Server(hub=True)
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    yield s
    s.stop()


def _cached_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name != "checksums.json"] if root.exists() else []


def _hub_payloads(root: Path) -> list[Path]:
    """Downloaded files in a Hugging Face cache (its bookkeeping: refs, locks, CACHEDIR.TAG, is not counted)."""
    return [p for p in _cached_files(root) if {"blobs", "snapshots"} & set(p.parts)]


# --------------------------------------------------------------------------- catalogue


def test_catalogue_has_the_survey_checkpoints_with_complete_entries():
    entries = {e.name: e for e in cat.load_catalogue()}
    wanted = {  # the survey's public checkpoints: (method, backbone)
        "dino-resnet50": ("dino", "resnet50"),
        "dino-vits16": ("dino", "vit_small_patch16_224"),
        "dino-vitb16": ("dino", "vit_base_patch16_224"),
        "mae-vitb16": ("mae", "vit_base_patch16_224"),
        "spark-resnet50": ("spark", "resnet50"),
        "spark-resnet200": ("spark", "resnet200"),
        "resim-fpn-resnet50-400ep": ("resim", "resnet50"),
        "leopart-vits16": ("leopart", "vit_small_patch16_224"),
    }
    for name, (method, backbone) in wanted.items():
        assert (entries[name].method, entries[name].backbone) == (method, backbone)
    for e in entries.values():
        assert timm.is_model(e.backbone), e.name
        assert e.paper and e.licence and e.in_chans >= 1
        assert e.source.key.startswith(("https://", "hf://"))
        # MAE and ReSim weights are non-commercial, and the entry says so
        assert e.non_commercial == (e.method in ("mae", "resim")), e.name
        if e.non_commercial:
            assert "NON-COMMERCIAL" in e.licence_warning()
    assert any(e.name.startswith("ssl4eo-") and e.in_chans == 13 for e in entries.values())
    assert any(e.name.startswith("timm-") and e.source.is_hub for e in entries.values())


def test_parse_spec_forms():
    s = parse_spec("hf://owner/repo/sub/dir/w.safetensors@v1.0")
    assert s.source.hub_repo == "owner/repo" and s.source.hub_file == "sub/dir/w.safetensors" and s.source.revision == "v1.0"
    assert parse_spec("hf://owner/repo/w.pth").source.revision == "main"
    # a pasted hub URL goes through the hub client (and its cache) and finds the catalogue entry
    tg = parse_spec(
        "https://hf.co/torchgeo/resnet50_sentinel2_all_dino/resolve/d7f14bf5530d70ac69d763e58e77e44dbecfec7c/"
        "resnet50_sentinel2_all_dino-d6c330e9.pth"
    )
    assert tg.source.is_hub and tg.entry is not None and tg.entry.name == "ssl4eo-s12-resnet50-s2-all-dino"
    assert parse_spec("mae-vitb16").entry.layout == "mae"
    with pytest.raises(SSLRecipeError, match="Did you mean"):
        parse_spec("dino-vits61")
    with pytest.raises(SSLRecipeError, match="hf://OWNER/REPO/FILE"):
        parse_spec("hf://only-owner/file")


# --------------------------------------------------------------------------- plain HTTP


def test_url_fetch_verifies_caches_and_survives_server_stop(env, http):
    data = _checkpoint_bytes(1)
    http.files["/ckpt/dino.pth"] = data
    url = http.url + "/ckpt/dino.pth"
    got = fetch(url, _sha(data), progress=True)
    assert got.downloaded and got.path.read_bytes() == data and got.sha256 == _sha(data)
    assert got.path == local_path(got.source) and str(got.path).startswith(str(env / "cache"))
    assert not list(got.path.parent.glob("*.part"))
    assert [h for h in http.hits if h[0] == "GET"] == [("GET", "/ckpt/dino.pth")]
    http.stop()  # a second download attempt would now fail
    again = fetch(url, _sha(data))
    assert not again.downloaded and again.path == got.path and again.sha256 == _sha(data)


def test_unknown_checksum_is_recorded_then_enforced(env, http, monkeypatch):
    data = _checkpoint_bytes(2)
    http.files["/w.pth"] = data
    url = http.url + "/w.pth"
    first = fetch(url)
    assert first.recorded and ChecksumRegistry().get(url) == _sha(data)
    second = fetch(url)
    assert not second.recorded and not second.downloaded

    # the cached copy changes behind our back: offline, that is an error naming both hashes
    first.path.write_bytes(b"tampered" + data)
    monkeypatch.setenv("SSLRECIPE_OFFLINE", "1")
    with pytest.raises(ChecksumError) as e:
        fetch(url)
    assert _sha(data) in str(e.value) and _sha(b"tampered" + data) in str(e.value)

    # online, and upstream now serves other bytes: rejected against the recorded hash, nothing left behind
    monkeypatch.delenv("SSLRECIPE_OFFLINE")
    http.files["/w.pth"] = _checkpoint_bytes(3)
    warned: list[str] = []
    with pytest.raises(ChecksumError) as e:
        fetch(url, warn=warned.append)
    assert _sha(data) in str(e.value) and _sha(_checkpoint_bytes(3)) in str(e.value)
    assert any("failed verification" in w for w in warned)
    assert _cached_files(env / "cache") == []


def test_wrong_checksum_is_rejected_with_both_hashes_and_leaves_nothing(env, http):
    data = _checkpoint_bytes(4)
    http.files["/x.pth"] = data
    wrong = "ab" * 32
    with pytest.raises(ChecksumError) as e:
        fetch(http.url + "/x.pth", wrong)
    assert wrong in str(e.value) and _sha(data) in str(e.value)
    assert _cached_files(env / "cache") == []
    assert ChecksumRegistry().get(http.url + "/x.pth") is None
    with pytest.raises(SSLRecipeError, match="64 hexadecimal"):
        fetch(http.url + "/x.pth", "not-a-hash")


def test_truncated_transfer_is_rejected_and_not_cached(env, http):
    data = _checkpoint_bytes(5, n=200_000)
    http.files["/big.pth"] = data
    http.truncate.add("/big.pth")
    with pytest.raises(SSLRecipeError, match="cut off|incomplete") as e:
        fetch(http.url + "/big.pth")
    assert str(len(data)) in str(e.value)
    assert _cached_files(env / "cache") == []
    http.truncate.clear()
    assert fetch(http.url + "/big.pth").path.read_bytes() == data


def test_http_errors_are_clear(env, http):
    with pytest.raises(SSLRecipeError, match="HTTP 404"):
        fetch(http.url + "/missing.pth")
    url = http.url + "/gone.pth"
    http.stop()
    with pytest.raises(OfflineError, match="cannot download") as e:
        fetch(url)
    assert str(local_path(parse_spec(url).source)) in str(e.value)


def test_offline_without_cache_says_where_to_put_the_file(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    warned: list[str] = []
    with pytest.raises(OfflineError) as e:
        fetch("mae-vitb16", warn=warned.append)
    entry = cat.get_entry("mae-vitb16")
    manual = local_path(entry.source, entry.cache_filename)
    assert str(manual) in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    assert any("NON-COMMERCIAL" in w for w in warned)  # the licence is said on every use
    # placed by hand where the message says: used offline, its checksum recorded, then enforced
    data = _checkpoint_bytes(6)
    manual.parent.mkdir(parents=True)
    manual.write_bytes(data)
    got = fetch("mae-vitb16")
    assert got.path == manual and got.recorded and got.entry.name == "mae-vitb16"
    manual.write_bytes(data + b"x")
    with pytest.raises(ChecksumError):
        fetch("mae-vitb16")


# --------------------------------------------------------------------------- Hugging Face hub


def test_hub_fetch_through_hf_endpoint_and_cache(env, hub, monkeypatch):
    data = _checkpoint_bytes(7)
    hub.files["owner/repo/sub/model.pth"] = data
    got = fetch("hf://owner/repo/sub/model.pth", _sha(data))
    assert got.downloaded and got.path.read_bytes() == data
    assert str(got.path).startswith(str(hf_cache_dir())) and str(hf_cache_dir()).startswith(str(env / "hf"))
    assert ("GET", "owner/repo/sub/model.pth") in hub.hits
    hub.stop()
    again = fetch("hf://owner/repo/sub/model.pth", _sha(data))
    assert not again.downloaded and again.path == got.path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch("hf://owner/repo/sub/model.pth").path == got.path


def test_catalogue_hub_entry_fetches_from_hf_endpoint_and_converts(env, hub):
    from safetensors.torch import save

    # timm's DINO ViT-S/16 is a hub entry: serve a real (random-init) safetensors file under its repo name
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224", num_classes=0)
    g = torch.Generator().manual_seed(0)
    data = save({k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()})
    hub.files["timm/vit_small_patch16_224.dino/model.safetensors"] = data
    got = fetch("timm-vits16-dino")
    assert got.entry.name == "timm-vits16-dino" and got.sha256 == _sha(data) and got.recorded

    # what a recipe's `weights.source: fetch` does: fetch (cached now), convert, write the encoder
    from safetensors.torch import load, load_file

    from sslrecipe.weights import resolve_weights

    hub.stop()
    warned: list[str] = []
    out = resolve_weights("fetch", "timm-vits16-dino", None, None, "vit_small_patch16_224", 1, env / "enc",
                          warn=warned.append)
    meta = json.loads((out / "encoder.json").read_text())
    enc = load_file(str(out / "encoder.safetensors"))
    ref = load(data)
    assert meta["catalogue"] == "timm-vits16-dino" and meta["file_sha256"] == _sha(data)
    assert meta["licence"] == "Apache-2.0" and not meta["non_commercial"]
    assert meta["timm_name"] == "vit_small_patch16_224" and meta["timm_kwargs"]["in_chans"] == 1
    # the entry's ImageNet mean/std, adapted to 1 channel as the patch embedding (summed over RGB)
    assert meta["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3]) and meta["std"] == pytest.approx([0.226])
    assert torch.equal(enc["blocks.5.attn.qkv.weight"], ref["blocks.5.attn.qkv.weight"])
    assert torch.allclose(enc["patch_embed.proj.weight"], ref["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert any("input channels" in w for w in warned)


def test_resolve_weights_fetches_a_url_and_converts_it(env, http):
    from sslrecipe.models.backbone import load_encoder
    from sslrecipe.weights import resolve_weights

    with torch.device("meta"):
        ref = timm.create_model("resnet18", num_classes=0)
    g = torch.Generator().manual_seed(3)
    sd = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype))
          for k, v in ref.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"epoch": 200, "state_dict": {**{f"module.encoder_q.{k}": v for k, v in sd.items()},
                                              "module.queue": torch.randn(128, 8)}}, buf)
    http.files["/moco_v2_200ep_pretrain.pth.tar"] = buf.getvalue()
    url = http.url + "/moco_v2_200ep_pretrain.pth.tar"
    out = resolve_weights("fetch", url, _sha(buf.getvalue()), "moco", "resnet18", 3, env / "w", warn=lambda m: None)
    enc, meta = load_encoder(out)
    assert meta["conversion"]["layout"] == "moco" and meta["id"] == url
    assert all(torch.equal(enc.state_dict()[k], sd[k]) for k in sd if not k.endswith("num_batches_tracked"))


def test_hub_wrong_checksum_and_prefix_leave_the_hf_cache_empty(env, hub):
    data = _checkpoint_bytes(8)
    hub.files["owner/repo/w.pth"] = data
    with pytest.raises(ChecksumError) as e:
        fetch("hf://owner/repo/w.pth", "cd" * 32)
    assert "cd" * 32 in str(e.value) and _sha(data) in str(e.value)
    assert _hub_payloads(hf_cache_dir()) == []
    # torchgeo-style entries carry the hash prefix from the file name: a file that does not match is rejected
    entry = cat.get_entry("ssl4eo-s12-resnet18-s2-all-moco")
    hub.files[f"{entry.source.hub_repo}/{entry.source.hub_file}"] = data
    assert not _sha(data).startswith(entry.sha256_prefix)
    with pytest.raises(ChecksumError, match=entry.sha256_prefix):
        fetch(entry.name)
    assert _hub_payloads(hf_cache_dir()) == []


def test_hub_missing_file_is_a_clear_error(env, hub):
    with pytest.raises(SSLRecipeError, match="no such file|not found"):
        fetch("hf://owner/repo/nothing.pth")


# --------------------------------------------------------------------------- CLI


def test_cli_list_json_and_table():
    from sslrecipe.cli import main

    res = CliRunner().invoke(main, ["weights", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {"name", "method", "backbone", "source", "licence"} <= set(rows[0])
    assert {r["name"] for r in rows} == {e.name for e in cat.load_catalogue()}
    res = CliRunner().invoke(main, ["weights", "list", "--method", "mae"])
    assert res.exit_code == 0 and "mae-vitb16" in res.output and "non-commercial" in res.output
    assert "dino-vits16" not in res.output


def test_cli_fetch_prints_path_and_fails_cleanly_offline(env, http, monkeypatch):
    from sslrecipe.cli import main

    data = _checkpoint_bytes(9)
    http.files["/c.pth"] = data
    res = CliRunner().invoke(main, ["weights", "fetch", http.url + "/c.pth", "--sha256", _sha(data)])
    assert res.exit_code == 0, res.output
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == data
    monkeypatch.setenv("SSLRECIPE_OFFLINE", "1")
    res = CliRunner().invoke(main, ["weights", "fetch", "resim-fpn-resnet50-400ep"])
    assert res.exit_code == 2
    assert "put it at" in res.output and "NON-COMMERCIAL" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["weights", "info", "leopart-vits16"])
    assert res.exit_code == 0 and "manual_path" in res.output and "MIT" in res.output
