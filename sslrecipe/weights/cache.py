"""The download cache as the user sees it: what is in it, clearing it, and whether a checkpoint can be had now.

`fetch.py` owns where files go (`$SSLRECIPE_CACHE/files/<slug>/<file>` for URLs, the Hugging Face cache for
hub files); this module lists and removes them, and answers "is this checkpoint cached or downloadable?"
without downloading it (`availability`), which `sslrecipe run` asks before any stage starts. The checksum
registry (`checksums.json`) is never cleared: it is what later downloads are verified against.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sslrecipe.weights.catalogue import Entry, load_catalogue
from sslrecipe.weights.fetch import (
    CHECKSUMS_FILE,
    OFFLINE_ENVS,
    FetchSpec,
    _cached_candidates,
    _remove,
    _truthy,
    cache_root,
    is_offline,
    local_path,
    parse_spec,
)

PROBE_TIMEOUT = 10  # seconds: a reachability check must not stall a run's start


@dataclass
class CachedFile:
    path: Path
    bytes: int
    name: Optional[str]  # the catalogue entry it belongs to, when it does
    kind: str  # "download" | "partial" (an interrupted download) | "hub"


def _entry_files() -> dict[Path, Entry]:
    return {local_path(e.source, e.cache_filename).resolve(): e for e in load_catalogue()}


def cached_files(names: tuple[str, ...] = ()) -> list[CachedFile]:
    """Every file the cache holds (restricted to these catalogue names when given): URL downloads and partial
    downloads under the cache folder, and the catalogue's hub files in the Hugging Face cache."""
    by_path = _entry_files()
    out: list[CachedFile] = []
    files = cache_root() / "files"
    if files.is_dir():
        for root, _dirs, found in os.walk(files):
            for fname in sorted(found):
                p = Path(root) / fname
                partial = fname.startswith(".") and fname.endswith(".part")
                # a partial download is ".<file>.<random>.part" beside where <file> goes (fetch._http_download)
                final = p.parent / fname[1:-len(".part")].rsplit(".", 1)[0] if partial else p
                entry = by_path.get(final.resolve())
                out.append(CachedFile(p, p.lstat().st_size, entry.name if entry else None,
                                      "partial" if partial else "download"))
    seen = {c.path.resolve() for c in out}
    for e in load_catalogue():
        if not e.source.is_hub:
            continue
        for p in _cached_candidates(FetchSpec(e.source, e, e.filename)):
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append(CachedFile(p, p.stat().st_size, e.name, "hub"))
    if names:
        unknown = set(names) - {e.name for e in load_catalogue()}
        if unknown:
            from sslrecipe.weights.catalogue import get_entry

            get_entry(min(unknown))  # raises with the closest names
        out = [c for c in out if c.name in names]
    return sorted(out, key=lambda c: (c.name or "~", str(c.path)))


def clear_cached(files: list[CachedFile]) -> int:
    """Remove these cached files (a hub file with its blob); returns the bytes freed."""
    freed = 0
    for c in files:
        _remove(c.path)
        if not c.path.exists():
            freed += c.bytes
            parent = c.path.parent
            try:
                if parent != cache_root() / "files" and not any(parent.iterdir()):
                    parent.rmdir()
            except OSError:
                pass
    return freed


def checksum_registry() -> Path:
    return cache_root() / CHECKSUMS_FILE


def availability(spec: str) -> Optional[str]:
    """None when `spec` (catalogue name, URL, hf://...) is cached or its server answers now; else why not, in
    one sentence. Nothing is downloaded: a URL gets a HEAD request, a hub file a metadata request."""
    fs = parse_spec(spec)
    if _cached_candidates(fs):
        return None
    key = fs.source.key
    if is_offline():
        names = "/".join(k for k in OFFLINE_ENVS if _truthy(os.environ.get(k)))
        return f"{key} is not in the cache and downloads are off ({names}=1)"
    if fs.source.is_hub:
        try:
            from huggingface_hub import get_hf_file_metadata, hf_hub_url

            get_hf_file_metadata(
                hf_hub_url(str(fs.source.hub_repo), str(fs.source.hub_file), revision=fs.source.revision,
                           endpoint=os.environ.get("HF_ENDPOINT") or None),
                timeout=PROBE_TIMEOUT,
            )
        except Exception as e:  # noqa: BLE001 - any failure means "cannot be downloaded now"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return f"{key} is not in the cache and the hub does not serve it now ({first})"
        return None
    request = urllib.request.Request(str(fs.source.url), method="HEAD",
                                     headers={"User-Agent": "sslrecipe (+weights check)"})
    try:
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403, 404, 410) or e.code >= 500:
            return f"{key} is not in the cache and its server answers HTTP {e.code} {e.reason}"
        return None  # e.g. 405: HEAD not allowed, but the server is there
    except (urllib.error.URLError, OSError) as e:
        return f"{key} is not in the cache and cannot be downloaded ({getattr(e, 'reason', e)})"
    return None
