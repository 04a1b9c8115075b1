"""Checksummed, cached downloads of checkpoints: catalogue names, URLs and Hugging Face hub files.

Where files live
    URL downloads:  ``$SSLRECIPE_CACHE/files/<slug>/<filename>`` (default cache: ``$XDG_CACHE_HOME/sslrecipe``,
                    else ``~/.cache/sslrecipe``).
    Hub files:      the Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``), through huggingface_hub,
                    which also honours ``HF_ENDPOINT`` and tokens. A file placed by hand at the "manual" path
                    ``$SSLRECIPE_CACHE/files/<slug>/<filename>`` is used first.
    Checksums:      ``$SSLRECIPE_CACHE/checksums.json`` records the SHA-256 of every file whose checksum was not
                    known beforehand (trust on first use); later uses verify against it.

Every use verifies: a checksum given by the caller or the catalogue always wins, a recorded one comes next. A
cached file that fails only against a checksum the caller gave, but matches the one it was verified with before,
is kept (the given checksum is the likelier typo) and the error says so.
Downloads go to a temporary file in the destination folder, are verified, and only then renamed into place,
so a truncated transfer or a wrong checksum never leaves a file behind.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

from sslrecipe.atomic import atomic_write_text
from sslrecipe.errors import SSLRecipeError
from sslrecipe.weights.catalogue import Entry, Source, find_entry, get_entry

CACHE_ENV = "SSLRECIPE_CACHE"
OFFLINE_ENVS = ("SSLRECIPE_OFFLINE", "HF_HUB_OFFLINE")
CHECKSUMS_FILE = "checksums.json"
_PROGRESS_MIN_BYTES = 8 * 1024 * 1024
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Warn = Callable[[str], None]


class ChecksumError(SSLRecipeError):
    """A file's SHA-256 is not the expected one."""


class OfflineError(SSLRecipeError):
    """A file is needed, is not cached, and cannot (or may not) be downloaded."""


# --------------------------------------------------------------------------- locations


def _truthy(value: Optional[str]) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """True when ``SSLRECIPE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set: use cached files only."""
    return any(_truthy(os.environ.get(k)) for k in OFFLINE_ENVS)


def cache_root() -> Path:
    """``$SSLRECIPE_CACHE``, else ``$XDG_CACHE_HOME/sslrecipe``, else ``~/.cache/sslrecipe`` (read at each call)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sslrecipe"


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, resolved from the environment now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _slug(source: Source) -> str:
    if source.is_hub:
        repo = str(source.hub_repo).replace("/", "--")
        rev = re.sub(r"[^A-Za-z0-9._-]", "_", source.revision)[:40]
        return f"hf--{repo}--{rev}"
    host = re.sub(r"[^A-Za-z0-9.-]", "_", urlparse(str(source.url)).netloc or "url")
    digest = hashlib.sha256(str(source.url).encode()).hexdigest()[:12]
    return f"{host}-{digest}"


def local_path(source: Source, filename: Optional[str] = None) -> Path:
    """Where a URL download is cached, and where a hub file may be placed by hand."""
    return cache_root() / "files" / _slug(source) / (filename or source.filename)


# --------------------------------------------------------------------------- checksums


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _normalise_sha(value: Optional[str], what: str = "sha256") -> Optional[str]:
    if value is None or str(value).strip() == "":
        return None
    v = str(value).strip().lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:"):]
    if not _SHA256.match(v):
        raise SSLRecipeError(f"{what} must be 64 hexadecimal digits, got {value!r}")
    return v


class ChecksumRegistry:
    """SHA-256 of files first downloaded without a known checksum, keyed by source (``checksums.json``)."""

    def __init__(self, root: Optional[Path] = None):
        self.path = (root or cache_root()) / CHECKSUMS_FILE

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as e:
            raise SSLRecipeError(f"cannot read the checksum registry {self.path}: {e} (fix or delete it)") from None

    def get(self, key: str) -> Optional[str]:
        rec = self._read().get(key)
        return rec.get("sha256") if isinstance(rec, dict) else None

    def record(self, key: str, sha256: str, size: int) -> None:
        data = self._read()
        data[key] = {"sha256": sha256, "size": size, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class FetchSpec:
    source: Source
    entry: Optional[Entry] = None
    filename: Optional[str] = None

    @property
    def cache_filename(self) -> str:
        return self.filename or self.source.filename


def parse_hf_uri(spec: str) -> Source:
    """``hf://OWNER/REPO/PATH/TO/FILE[@REVISION]`` -> a hub :class:`Source`."""
    rest = spec[len("hf://"):]
    revision = "main"
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision:
            raise SSLRecipeError(f"{spec!r}: empty revision after '@'")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 3:
        raise SSLRecipeError(
            f"{spec!r} is not hf://OWNER/REPO/FILE[@REVISION] "
            "(e.g. hf://timm/vit_small_patch16_224.dino/model.safetensors)"
        )
    return Source(hub_repo="/".join(parts[:2]), hub_file="/".join(parts[2:]), revision=revision)


def _hub_url_to_source(url: str) -> Optional[Source]:
    """``https://huggingface.co/OWNER/REPO/resolve/REV/FILE`` (or hf.co) -> a hub source, so it uses the HF cache."""
    u = urlparse(url)
    if u.netloc not in ("huggingface.co", "hf.co", "www.huggingface.co") or u.query:
        return None
    parts = [p for p in u.path.split("/") if p]
    if len(parts) >= 5 and parts[2] == "resolve":
        return Source(hub_repo="/".join(parts[:2]), hub_file="/".join(parts[4:]), revision=parts[3])
    return None


def parse_spec(spec: str) -> FetchSpec:
    """A catalogue name, an http(s) URL or ``hf://REPO/FILE[@REV]``."""
    spec = str(spec).strip()
    if spec.startswith("hf://"):
        source = parse_hf_uri(spec)
        return FetchSpec(source, _entry_for_source(source))
    if spec.startswith(("http://", "https://")):
        source = _hub_url_to_source(spec) or Source(url=spec)
        return FetchSpec(source, _entry_for_source(source))
    entry = find_entry(spec)
    if entry is None:
        if Path(spec).expanduser().exists():
            raise SSLRecipeError(
                f"{spec!r} is a local file, not a catalogue name or URL: use `weights.source: file` with "
                f"`weights.path: {spec}` (or `sslrecipe weights convert {spec} ...`)"
            )
        get_entry(spec)  # raises with suggestions
    assert entry is not None
    return FetchSpec(entry.source, entry, entry.filename)


def _entry_for_source(source: Source) -> Optional[Entry]:
    from sslrecipe.weights.catalogue import load_catalogue

    for e in load_catalogue():
        if e.source.key == source.key:
            return e
    return None


# --------------------------------------------------------------------------- fetch


@dataclass(frozen=True)
class Fetched:
    """A verified local copy of a checkpoint."""

    path: Path
    sha256: str
    source: Source
    entry: Optional[Entry]
    downloaded: bool
    recorded: bool  # the checksum was unknown and has just been recorded


def _offline_message(spec: FetchSpec, reason: str) -> str:
    manual = local_path(spec.source, spec.cache_filename)
    where = spec.entry.page if spec.entry and spec.entry.page else (
        spec.source.url if not spec.source.is_hub else
        f"https://huggingface.co/{spec.source.hub_repo}/blob/{spec.source.revision}/{spec.source.hub_file}"
    )
    check = ""
    expected = spec.entry.sha256 if spec.entry else None
    if expected:
        check = f" It is verified against sha256 {expected}."
    return (
        f"{reason}. Download the file by hand from {where} and put it at:\n  {manual}\n"
        f"then run the command again.{check} (Or point `weights.source: file` / `weights.path` at your copy.)"
    )


def _verify(
    path: Path,
    key: str,
    expected: Optional[str],
    prefix: Optional[str],
    registry: ChecksumRegistry,
    actual: Optional[str] = None,
) -> tuple[str, bool, Optional[str]]:
    """(actual sha256, recorded_now, problem). ``problem`` is None when the file is the expected one."""
    actual = actual or sha256_file(path)
    if expected is not None:
        if actual != expected:
            return actual, False, f"expected sha256 {expected}, got {actual}"
    elif prefix is not None and not actual.startswith(prefix):
        return actual, False, f"expected a sha256 starting with {prefix} (from the file name), got {actual}"
    recorded = registry.get(key)
    if expected is None and recorded is not None and recorded != actual:
        return actual, False, (
            f"expected sha256 {recorded} (recorded at first download in {registry.path}), got {actual}"
        )
    if recorded != actual:
        registry.record(key, actual, path.stat().st_size)
        # "recorded" means trust on first use: no checksum was known before this file
        return actual, expected is None and recorded is None, None
    return actual, False, None


def _verified_before(actual: str, key: str, entry: Optional[Entry], registry: ChecksumRegistry) -> Optional[str]:
    """How a cached file with digest ``actual`` was verified earlier (a phrase for messages), or None."""
    if registry.get(key) == actual:
        return f"was verified when it was cached (recorded in {registry.path})"
    if entry is not None and entry.sha256 == actual:
        return f"is the catalogue's checksum for {entry.name}"
    return None


def _remove(path: Path) -> None:
    """Remove a cached file; for a hub snapshot symlink, its blob too."""
    try:
        if path.is_symlink():
            blob = path.resolve()
            path.unlink()
            if blob.exists():
                blob.unlink()
        elif path.exists():
            path.unlink()
    except OSError:
        pass


def fetch(
    spec: str,
    sha256: Optional[str] = None,
    *,
    progress: Optional[bool] = None,
    warn: Optional[Warn] = None,
) -> Fetched:
    """Return a verified local copy of ``spec`` (catalogue name, URL or ``hf://REPO/FILE[@REV]``).

    ``sha256`` overrides the catalogue's checksum. Raises :class:`ChecksumError` on a mismatch: a download with the
    wrong checksum is deleted, a cached copy whose checksum was verified earlier (recorded, or the catalogue's) is
    kept, since the given ``sha256`` is then the likelier mistake. Raises :class:`OfflineError` when the file is not
    cached and cannot be downloaded.
    """
    fs = parse_spec(spec)
    given = _normalise_sha(sha256)
    expected = given or (fs.entry.sha256 if fs.entry else None)
    prefix = fs.entry.sha256_prefix if fs.entry else None
    registry = ChecksumRegistry()
    key = fs.source.key
    say = warn or (lambda msg: None)
    if fs.entry is not None:
        lic = fs.entry.licence_warning()
        if lic:
            say(lic)

    # 1. a cached (or hand-placed) copy
    for cached in _cached_candidates(fs):
        actual, recorded, problem = _verify(cached, key, expected, prefix, registry)
        if problem is None:
            return Fetched(cached, actual, fs.source, fs.entry, downloaded=False, recorded=recorded)
        trusted = _verified_before(actual, key, fs.entry, registry)
        if given is not None and trusted:  # a mistyped checksum must not cost the good copy
            raise ChecksumError(
                f"the sha256 given (--sha256 / weights.sha256) does not match the cached copy of {key}: expected "
                f"{given}, the file has {actual}, which {trusted}. The cached copy was kept at {cached}. Check "
                "the checksum you gave; if the file really changed upstream, delete the cached copy and fetch again."
            )
        if is_offline():
            raise ChecksumError(
                f"the cached copy of {key} at {cached} is not the expected file: {problem}. "
                "Delete it and fetch again (or give the right --sha256)."
            )
        say(f"the cached copy of {key} at {cached} failed verification ({problem}); removed, downloading again")
        _remove(cached)

    # 2. download
    if is_offline():
        names = "/".join(k for k in OFFLINE_ENVS if _truthy(os.environ.get(k)))
        raise OfflineError(_offline_message(fs, f"{key} is not in the cache and downloads are off ({names}=1)"))
    actual = None
    if fs.source.is_hub:
        path = _hub_download(fs)
    else:
        path = local_path(fs.source, fs.cache_filename)
        actual = _http_download(fs, path, expected, prefix, progress)
    actual, recorded, problem = _verify(path, key, expected, prefix, registry, actual)
    if problem is not None:
        _remove(path)
        raise ChecksumError(f"checksum mismatch for {key}: {problem}. The download was deleted; nothing was cached.")
    return Fetched(path, actual, fs.source, fs.entry, downloaded=True, recorded=recorded)


def _cached_candidates(fs: FetchSpec) -> list[Path]:
    out = []
    manual = local_path(fs.source, fs.cache_filename)
    if manual.is_file():
        out.append(manual)
    if fs.source.is_hub:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(
            str(fs.source.hub_repo), str(fs.source.hub_file),
            cache_dir=str(hf_cache_dir()), revision=fs.source.revision,
        )
        if isinstance(hit, str) and Path(hit).is_file():
            out.append(Path(hit))
    return out


def _hub_download(fs: FetchSpec) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    src = fs.source
    endpoint = os.environ.get("HF_ENDPOINT") or None
    where = f"hf://{src.hub_repo}/{src.hub_file}@{src.revision}" + (f" (endpoint {endpoint})" if endpoint else "")
    try:
        return Path(
            hf_hub_download(
                repo_id=str(src.hub_repo),
                filename=str(src.hub_file),
                revision=src.revision,
                cache_dir=str(hf_cache_dir()),
                endpoint=endpoint,
            )
        )
    except GatedRepoError:
        raise SSLRecipeError(
            f"{where}: the repository is gated; accept its terms on the hub and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise SSLRecipeError(f"{where}: repository not found (or private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise SSLRecipeError(f"{where}: revision {src.revision!r} not found") from None
    except LocalEntryNotFoundError as e:  # could not reach the hub and nothing cached
        raise OfflineError(_offline_message(fs, f"cannot download {where}: {_short(e)}")) from None
    except EntryNotFoundError:
        raise SSLRecipeError(f"{where}: no such file in the repository at that revision") from None
    except HfHubHTTPError as e:
        raise SSLRecipeError(f"{where}: download failed: {_short(e)}") from None
    except OSError as e:
        raise OfflineError(_offline_message(fs, f"cannot download {where}: {_short(e)}")) from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _progress_bar(total: Optional[int], name: str, enabled: Optional[bool]):
    """A rich progress bar on stderr for large downloads (or a no-op)."""
    big = total is None or total >= _PROGRESS_MIN_BYTES
    show = enabled if enabled is not None else (sys.stderr.isatty() and big)
    if not show:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    prog = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )
    return prog, prog.add_task(name, total=total)


def _http_download(
    fs: FetchSpec, dest: Path, expected: Optional[str], prefix: Optional[str], progress: Optional[bool]
) -> str:
    """Download to a temporary file beside ``dest``, verify, rename; returns the SHA-256."""
    url = str(fs.source.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "sslrecipe (+weights fetch)"})
        try:
            resp = urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as e:
            raise SSLRecipeError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise OfflineError(_offline_message(fs, f"cannot download {url}: {reason}")) from None
        with resp:
            ctype = (resp.headers.get("Content-Type") or "").lower()
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if ctype.startswith("text/html") and not dest.name.endswith((".html", ".htm")):
                raise OfflineError(_offline_message(
                    fs, f"{url} answered with a web page instead of the file (a confirmation or login page)"
                ))
            received = 0
            digest = hashlib.sha256()
            bar = _progress_bar(total, dest.name, progress)
            try:
                if bar:
                    bar[0].start()
                with open(tmp, "wb") as f:
                    while True:
                        try:
                            chunk = resp.read(_CHUNK)
                        except (http.client.IncompleteRead, ConnectionError, TimeoutError, OSError) as e:
                            of_total = f" of {total}" if total else ""
                            raise SSLRecipeError(
                                f"download of {url} was cut off after {received} bytes{of_total} "
                                f"({type(e).__name__}); nothing was cached, try again"
                            ) from None
                        if not chunk:
                            break
                        f.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if bar:
                            bar[0].update(bar[1], completed=received)
            finally:
                if bar:
                    bar[0].stop()
            if total is not None and received != total:
                raise SSLRecipeError(
                    f"download of {url} is incomplete: got {received} of {total} bytes; nothing was cached, try again"
                )
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise ChecksumError(
                f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}. "
                "The download was deleted; nothing was cached."
            )
        if expected is None and prefix is not None and not actual.startswith(prefix):
            raise ChecksumError(
                f"checksum mismatch for {url}: expected a sha256 starting with {prefix}, got {actual}. "
                "The download was deleted; nothing was cached."
            )
        os.replace(tmp, dest)
        return actual
    finally:
        if tmp.exists():
            tmp.unlink()
