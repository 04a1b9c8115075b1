"""Dataset checks: broken image files and inconsistent annotations, each named with its file.

:func:`check_dataset` takes an annotation file or dataset folder in any format
:func:`~sslrecipe.data.formats.load_labeled` reads, a COCO dict with its image root, or a plain
folder of images (an unlabeled pool), and returns every :class:`Problem` found. It never raises
for bad data: a file that cannot be parsed at all is itself a problem.

Problem kinds (``Problem.kind``):

==============================  ===============================================================
``missing``                     an image listed in the annotations does not exist
``empty``                       a 0-byte image file, an image with no pixels, or a folder without images
``too_small``                   an image narrower or lower than 8 pixels (e.g. 1x1): nothing to learn from
``truncated``                   the image data ends early (an interrupted copy or download)
``unreadable``                  not a decodable image (wrong extension, corrupt header or data, bad checksum)
``size_mismatch``               the annotated width/height differ from the image file's
``bbox_outside``                a box extends past the image border (by more than 0.5 px)
``zero_area``                   a box with width or height <= 0
``bad_bbox``                    a box that is not 4 finite numbers
``unknown_category``            a box whose category id (YOLO: class index) is not in the categories
``unknown_image``               an annotation whose ``image_id`` is not in ``images``
``duplicate_image_id``          two ``images`` entries with one id
``duplicate_annotation_id``     two annotations with one id
``duplicate_file``              two ``images`` entries with one file name
``annotation_format``           the annotation file cannot be read or parsed
``label_format``, ``bad_*``     a malformed entry in a label or annotation file
==============================  ===============================================================
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from PIL import Image, ImageFile, UnidentifiedImageError

from sslrecipe.data.formats import detect_format, load_labeled
from sslrecipe.data.images import list_images, read_image, too_small
from sslrecipe.data.problem import Problem
from sslrecipe.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: Boxes may extend this far (pixels) past the border before they count as outside.
BORDER_TOLERANCE = 0.5


@contextlib.contextmanager
def _strict_decoding():
    """Make Pillow raise on truncated files, whatever another module set globally."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def inspect_image(path: PathLike) -> tuple[Optional[Problem], Optional[tuple[int, int]]]:
    """Decode one image fully: ``(problem or None, (width, height) or None)``.

    The size is the oriented one (EXIF rotation applied), as the training reader sees the image.
    """
    p = Path(path)
    if not p.exists():
        return Problem(str(p), "missing", "file not found — check the image folder and the file names"), None
    if not p.is_file():
        return Problem(str(p), "unreadable", "not a regular file"), None
    try:
        if p.stat().st_size == 0:
            return Problem(str(p), "empty", "the file is empty (0 bytes) — remove it or copy it again"), None
    except OSError as e:
        return Problem(str(p), "unreadable", f"cannot stat the file: {e}"), None
    try:
        with _strict_decoding():
            with Image.open(p) as im:
                im.verify()  # structure and (PNG) chunk checksums
            with Image.open(p) as im:
                im.load()  # every pixel: catches truncated data
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w
    except UnidentifiedImageError:
        fallback = _fallback_read(p)
        if fallback is not None:
            return None, fallback
        return Problem(str(p), "unreadable", "not a recognised image format (wrong extension or corrupt header)"), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        text = str(e) or type(e).__name__
        if "truncated" in text.lower() or isinstance(e, EOFError):
            return Problem(str(p), "truncated", f"the image data ends early ({text}) — copy or export the file again"), None
        if "broken data stream" in text.lower() or "crc" in text.lower():
            return Problem(str(p), "unreadable", f"corrupt image data ({text}) — copy or export the file again"), None
        fallback = _fallback_read(p)
        if fallback is not None:
            return None, fallback
        return Problem(str(p), "unreadable", f"cannot decode: {text}"), None
    except Exception as e:  # noqa: BLE001 - a decoder may raise anything on hostile input
        return Problem(str(p), "unreadable", f"cannot decode: {type(e).__name__}: {e}"), None
    if w == 0 or h == 0:
        return Problem(str(p), "empty", f"the image has no pixels ({w}x{h})"), None
    small = too_small(w, h)
    if small is not None:
        return Problem(str(p), "too_small", f"{small} — remove it, or replace it with the full frame"), None
    return None, (int(w), int(h))


def _fallback_read(p: Path) -> Optional[tuple[int, int]]:
    """Layouts Pillow cannot decode (many-band or 16-bit RGB TIFF) via the project's reader."""
    if p.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        arr = read_image(p)
    except Exception:  # noqa: BLE001
        return None
    return int(arr.shape[1]), int(arr.shape[0])


def check_images(paths: Iterable[PathLike]) -> list[Problem]:
    """Decode every image; the problems of those that are missing, empty, truncated or unreadable."""
    out = []
    for path in paths:
        problem, _ = inspect_image(path)
        if problem is not None:
            out.append(problem)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Findings:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.bad_images: set = set()  # ids of images that cannot be used
        self.bad_annotations: set = set()  # indices into coco["annotations"]
        self.outside: set = set()  # annotation indices with boxes past the border


def _inspect_coco(coco: dict, image_root: Optional[PathLike], source: str, images: bool) -> _Findings:
    found = _Findings()
    problems = found.problems
    root = Path(image_root) if image_root is not None else None

    def image_file(img: dict) -> str:
        name = str(img.get("file_name", "?"))
        return str(root / name) if root is not None else name

    def add(file: str, kind: str, message: str) -> None:
        problems.append(Problem(file, kind, message))

    cat_ids = {c.get("id") for c in coco.get("categories", []) if isinstance(c, dict)}
    id_counts = Counter(img.get("id") for img in coco.get("images", []))
    name_counts = Counter(img.get("file_name") for img in coco.get("images", []))
    by_id: dict[Any, dict] = {}
    reported_dup: set = set()
    for img in coco.get("images", []):
        iid = img.get("id")
        if id_counts[iid] > 1 and iid not in reported_dup:
            reported_dup.add(iid)
            names = ", ".join(str(i.get("file_name")) for i in coco["images"] if i.get("id") == iid)
            add(image_file(img), "duplicate_image_id",
                f"image id {iid} is used by {id_counts[iid]} images ({names:.200}) in {source} — give each image its own id")
        by_id.setdefault(iid, img)
    for name, n in name_counts.items():
        if n > 1:
            add(str(root / name) if root is not None else str(name), "duplicate_file",
                f"listed {n} times in {source} — its boxes are split over several entries")

    actual_size: dict[Any, Optional[tuple[int, int]]] = {}
    if images:
        if root is None:
            raise ValueError("checking the image files needs image_root (or images=False)")
        checked: dict[str, tuple[Optional[Problem], Optional[tuple[int, int]]]] = {}
        for img in coco.get("images", []):
            f = image_file(img)
            if f not in checked:
                checked[f] = inspect_image(f)
                if checked[f][0] is not None:
                    problems.append(checked[f][0])
            size = checked[f][1]
            if size is None:
                found.bad_images.add(img.get("id"))
            actual_size[img.get("id")] = size
            declared = (img.get("width"), img.get("height"))
            if size is not None and None not in declared and (declared[0], declared[1]) != size:
                found.bad_images.add(img.get("id"))
                add(f, "size_mismatch",
                    f"the file is {size[0]}x{size[1]} pixels but {source} says {declared[0]}x{declared[1]} "
                    f"(image id {img.get('id')}) — boxes would be misplaced")

    ann_counts = Counter(a.get("id") for a in coco.get("annotations", []) if "id" in a)
    reported_ann: set = set()
    for index, ann in enumerate(coco.get("annotations", [])):
        aid = ann.get("id", "?")
        img = by_id.get(ann.get("image_id"))
        where = f"annotation {aid} in {source}"
        if img is None:
            found.bad_annotations.add(index)
            add(source, "unknown_image", f"{where} refers to image id {ann.get('image_id')!r}, which is not in 'images'")
            continue
        f = image_file(img)
        if ann_counts.get(aid, 0) > 1 and aid not in reported_ann:
            reported_ann.add(aid)
            add(f, "duplicate_annotation_id", f"annotation id {aid} is used {ann_counts[aid]} times in {source}")
        if ann.get("category_id") not in cat_ids:
            found.bad_annotations.add(index)
            add(f, "unknown_category",
                f"{where}: category_id {ann.get('category_id')!r} is not in the categories {sorted(map(str, cat_ids))}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            found.bad_annotations.add(index)
            add(f, "bad_bbox", f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r:.80}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            found.bad_annotations.add(index)
            add(f, "zero_area", f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] has no area — delete it or fix its size")
            continue
        size = actual_size.get(img.get("id"))
        if size is None and img.get("width") and img.get("height"):
            size = (img["width"], img["height"])
        if size is not None:
            W, H = size
            t = BORDER_TOLERANCE
            if x < -t or y < -t or x + w > W + t or y + h > H + t:
                found.outside.add(index)
                add(f, "bbox_outside", f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] extends outside the {W}x{H} image")
    return found


def check_coco(coco: dict, image_root: Optional[PathLike], source: str = "annotations", images: bool = True) -> list[Problem]:
    """Check a COCO dict and (with ``images``) decode every image it lists under ``image_root``."""
    return _inspect_coco(coco, image_root, source, images).problems


def drop_invalid(
    coco: dict, image_root: Optional[PathLike], images: bool = True, source: str = "annotations"
) -> tuple[dict, list[Problem]]:
    """A copy of ``coco`` without what :func:`check_coco` finds broken, and the problems found.

    Images that are missing, unreadable or of another size than annotated are removed with their
    boxes; boxes with no area, a malformed bbox, an unknown category or image are removed; boxes
    past the border are clipped to the image (removed when nothing is left); a repeated image id or
    file name keeps its first entry, which gets the boxes of the others. For ``data.skip_invalid``.
    """
    found = _inspect_coco(coco, image_root, source, images)
    first_by_name: dict[Any, Any] = {}
    first_by_id: dict[Any, Any] = {}
    remap: dict[Any, Any] = {}
    kept_images = []
    for img in coco.get("images", []):
        iid, name = img.get("id"), img.get("file_name")
        if iid in found.bad_images:
            continue
        if iid in first_by_id:
            continue  # a repeated id: its boxes cannot be told apart, they stay with the first entry
        if name in first_by_name:
            remap[iid] = first_by_name[name]
            first_by_id[iid] = img
            continue
        first_by_id[iid] = img
        first_by_name[name] = iid
        kept_images.append(img)
    kept_ids = {img.get("id") for img in kept_images}
    sizes = {img.get("id"): (img.get("width"), img.get("height")) for img in kept_images}
    annotations = []
    for index, ann in enumerate(coco.get("annotations", [])):
        if index in found.bad_annotations:
            continue
        image_id = remap.get(ann.get("image_id"), ann.get("image_id"))
        if image_id not in kept_ids:
            continue
        ann = dict(ann, image_id=image_id)
        if index in found.outside:
            W, H = sizes[image_id]
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(W or x + w), x + w), min(float(H or y + h), y + h)
            if x1 <= x0 or y1 <= y0:
                continue
            ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            ann["area"] = (x1 - x0) * (y1 - y0)
        annotations.append(ann)
    clean = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    clean["images"] = kept_images
    clean["annotations"] = annotations
    return clean, found.problems


def check_folder(folder: PathLike) -> list[Problem]:
    """Decode every image below ``folder`` (recursive); a folder without images is a problem too."""
    paths = list_images(folder)
    if not paths:
        return [Problem(str(folder), "empty", "no image files found (searched recursively for jpg/png/tif/tiff/bmp)")]
    return check_images(paths)


def check_dataset(
    path_or_coco: Union[PathLike, dict],
    image_root: Optional[PathLike] = None,
    format: str = "auto",
    split: Optional[str] = None,
    images: bool = True,
) -> list[Problem]:
    """Every problem of a dataset, each naming its file (empty list = clean).

    ``path_or_coco`` is an annotation file / dataset folder (any format :func:`load_labeled` reads;
    ``image_root`` overrides where its images are), a COCO dict (``image_root`` required when
    ``images``), or a plain folder of images, which is checked image by image. ``images=False``
    skips decoding the image files (annotation checks only).
    """
    if isinstance(path_or_coco, dict):
        return check_coco(path_or_coco, image_root, "annotations", images=images)
    p = Path(path_or_coco).expanduser()
    if not p.exists():
        return [Problem(str(p), "missing", "no such file or folder")]
    if p.is_dir() and (format or "auto") == "auto":
        try:
            detect_format(p)
        except DataError:
            return check_folder(p)  # a plain folder of images
    problems: list[Problem] = []
    try:
        coco, root = load_labeled(p, images=image_root, format=format, split=split, problems=problems)
    except DataError as e:
        return problems + [Problem(str(p), "annotation_format", str(e))]
    return problems + check_coco(coco, root, str(p), images=images)
