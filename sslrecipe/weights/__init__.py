"""Public SSL weights: the catalogue, checksummed downloads with a cache, conversion to timm, export.

``resolve_weights`` is what a run's ``weights`` stage calls for ``weights.source: fetch | file``.
"""

from sslrecipe.weights.catalogue import LAYOUTS, Entry, Source, get_entry, load_catalogue
from sslrecipe.weights.convert import (
    Conversion,
    UnsafeCheckpointError,
    convert_file,
    convert_state,
    detect_layout,
    load_checkpoint,
    resolve_weights,
    write_encoder,
)
from sslrecipe.weights.export import EXPORT_FORMATS, export_encoder_as, find_encoder
from sslrecipe.weights.fetch import ChecksumError, Fetched, OfflineError, cache_root, fetch, parse_spec

__all__ = [
    "LAYOUTS", "Entry", "Source", "get_entry", "load_catalogue",
    "Conversion", "UnsafeCheckpointError", "convert_file", "convert_state", "detect_layout", "load_checkpoint",
    "resolve_weights", "write_encoder",
    "EXPORT_FORMATS", "export_encoder_as", "find_encoder",
    "ChecksumError", "Fetched", "OfflineError", "cache_root", "fetch", "parse_spec",
]
