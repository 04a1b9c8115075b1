"""Public SSL weights: the catalogue, checksummed downloads with a cache, conversion to timm, export.

``resolve_weights`` is what a run's ``weights`` stage calls for ``weights.source: fetch | file``.
The catalogue and the downloader are imported here; conversion and export (torch) on first use, so that the
advisor, which reads the catalogue, starts without torch.
"""

from sslrecipe.weights.catalogue import LAYOUTS, Entry, Source, get_entry, load_catalogue
from sslrecipe.weights.fetch import ChecksumError, Fetched, OfflineError, cache_root, fetch, parse_spec

_LAZY = {
    **dict.fromkeys(("Conversion", "UnsafeCheckpointError", "convert_file", "convert_state", "detect_layout",
                     "load_checkpoint", "resolve_weights", "write_encoder"), "sslrecipe.weights.convert"),
    **dict.fromkeys(("EXPORT_FORMATS", "export_encoder_as", "find_encoder"), "sslrecipe.weights.export"),
}

__all__ = [
    "LAYOUTS", "Entry", "Source", "get_entry", "load_catalogue",
    "Conversion", "UnsafeCheckpointError", "convert_file", "convert_state", "detect_layout", "load_checkpoint",
    "resolve_weights", "write_encoder",
    "EXPORT_FORMATS", "export_encoder_as", "find_encoder",
    "ChecksumError", "Fetched", "OfflineError", "cache_root", "fetch", "parse_spec",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sslrecipe.weights' has no attribute {name!r}")
