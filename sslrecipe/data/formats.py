"""Annotation formats: COCO, YOLO (Ultralytics layout), Pascal VOC and HIT-UAV, all read into one COCO dict.

Every labeled data path of a recipe goes through :func:`load_labeled`, which detects the format
(or takes ``format=``) and returns ``(coco, image_root)``: a standard COCO detection dict
(``images`` / ``annotations`` / ``categories``, ``bbox`` as ``[x, y, w, h]`` in pixels from the
top-left corner, ``file_name`` relative to ``image_root``) and the folder the file names are
relative to.

Ignore regions
    Categories named like ``DontCare`` / ``ignore`` / ``ignored regions`` (see
    :func:`is_ignore_name`) are never classes. Their boxes become annotations with ``iscrowd: 1``
    and ``ignore: 1``, **one copy per real category**: pycocotools matches crowd regions within a
    category only, so a detection of any class inside a DontCare region is then neither a true
    nor a false positive. :func:`ignore_regions` recovers the distinct regions. Pascal VOC
    ``difficult`` objects keep their class and become ``iscrowd: 1`` / ``difficult: 1``
    annotations (ignored in evaluation, as in the VOC protocol).

Readers take an optional ``problems`` list: when given, malformed entries are recorded there as
:class:`~sslrecipe.data.problem.Problem` objects and skipped (what ``sslrecipe data check`` does);
when ``None``, the first malformed entries raise :class:`~sslrecipe.errors.DataError`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml
from PIL import Image

from sslrecipe.atomic import atomic_write_text
from sslrecipe.data.images import IMAGE_EXTENSIONS, list_images
from sslrecipe.data.problem import Problem
from sslrecipe.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: Formats :func:`load_labeled` reads.
READ_FORMATS = ("coco", "yolo", "voc", "hit-uav")
#: Formats :func:`convert` writes.
WRITE_FORMATS = ("coco", "yolo")

_IGNORE_NAMES = {"dontcare", "ignore", "ignored", "ignoredregion", "ignoredregions", "ignoreregion", "ignoreregions"}
_MAX_LISTED = 10  # problems named in one DataError message


# --------------------------------------------------------------------------- helpers


def is_ignore_name(name: Any) -> bool:
    """True for category names that mark ignore regions (DontCare, ignore, ignored regions, ...)."""
    key = re.sub(r"[^a-z]", "", str(name).lower())
    return key in _IGNORE_NAMES


def ignore_regions(coco: dict) -> list[tuple[Any, tuple[float, float, float, float]]]:
    """The distinct ignore regions ``(image_id, (x, y, w, h))`` of a COCO dict (copies per category counted once)."""
    seen: dict = {}
    for ann in coco.get("annotations", []):
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            key = (ann.get("image_id"), tuple(float(v) for v in ann.get("bbox", ())))
            seen.setdefault(key, None)
    return list(seen)


def _problem(file: Any, kind: str, message: str) -> Problem:
    return Problem(str(file), kind, message)


class _Issues:
    """Collects malformed entries: into ``problems`` when given, else raised together at the end."""

    def __init__(self, problems: Optional[list], source: Path) -> None:
        self.problems = problems
        self.source = source
        self.found: list = []

    def add(self, file: Any, kind: str, message: str) -> None:
        p = _problem(file, kind, message)
        if self.problems is not None:
            self.problems.append(p)
        else:
            self.found.append(p)

    def raise_if_any(self) -> None:
        if self.found:
            listed = "\n".join(f"  {p}" for p in self.found[:_MAX_LISTED])
            more = f"\n  ... and {len(self.found) - _MAX_LISTED} more" if len(self.found) > _MAX_LISTED else ""
            raise DataError(
                f"{self.source}: {len(self.found)} malformed annotation entr{'y' if len(self.found) == 1 else 'ies'}:\n"
                f"{listed}{more}\nfix them, or run `sslrecipe data check {self.source}` for the full list"
            )


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_bbox(b: Any) -> bool:
    return isinstance(b, (list, tuple)) and len(b) == 4 and all(_finite_number(v) for v in b)


def image_size(path: PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`sslrecipe.data.images.read_image` returns it
    (EXIF orientation applied), read from the header only. Raises :class:`DataError`."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            return int(w), int(h)
    except FileNotFoundError as e:
        raise DataError(f"image not found: {p}") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem
        try:  # layouts Pillow cannot open (e.g. many-band TIFF): the project's reader may manage
            from sslrecipe.data.images import read_image

            arr = read_image(p)
            return int(arr.shape[1]), int(arr.shape[0])
        except Exception:  # noqa: BLE001
            raise DataError(f"cannot read the size of image {p}: {e}") from e


def read_json_file(path: PathLike, what: str = "annotation file") -> Any:
    """Parse a JSON file; DataError naming the file (and line:column for bad JSON) otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        hint = "it is a folder; give the annotation .json file inside it" if p.is_dir() else "check the path"
        raise DataError(f"{what} not found: {p} — {hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {p}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}) — re-export the file or fix the JSON there") from e



def _ignore_copies(
    image_id: Any, bbox: list, category_ids: Iterable[int], next_id: int, extra: Optional[dict] = None
) -> list[dict]:
    """One ``iscrowd``/``ignore`` annotation per category for an ignore region."""
    out = []
    x, y, w, h = (float(v) for v in bbox)
    for cid in category_ids:
        ann = {
            "id": next_id,
            "image_id": image_id,
            "category_id": cid,
            "bbox": [x, y, w, h],
            "area": w * h,
            "iscrowd": 1,
            "ignore": 1,
        }
        if extra:
            ann.update(extra)
        out.append(ann)
        next_id += 1
    return out


# --------------------------------------------------------------------------- COCO and HIT-UAV


def _parse_coco_like(data: Any, source: Path, problems: Optional[list], hit_uav: bool) -> dict:
    """Standard COCO or the HIT-UAV variant -> a standard COCO dict (malformed entries reported)."""
    issues = _Issues(problems, source)
    if not isinstance(data, dict):
        raise DataError(f"{source}: an annotation file must hold a JSON object, found {type(data).__name__}")
    ann_key = "annotations" if "annotations" in data else ("annotation" if "annotation" in data else None)
    present = {"images": "images" in data, "annotations": ann_key is not None, "categories": "categories" in data}
    missing = [k for k, ok in present.items() if not ok]
    if missing:
        raise DataError(
            f"{source}: not a COCO detection file, missing key(s) {', '.join(repr(k) for k in missing)} — "
            "a COCO file needs 'images', 'annotations' and 'categories' (for YOLO or VOC data give format: yolo/voc)"
        )
    for key in ("images", ann_key, "categories"):
        if not isinstance(data[key], list):
            raise DataError(f"{source}: '{key}' must be a list, found {type(data[key]).__name__}")

    offset = 1 if hit_uav else 0  # HIT-UAV counts ids from 0; COCO tools expect ids from 1

    categories: list[dict] = []
    ignore_ids: set = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            issues.add(source, "bad_category", f"categories[{i}] needs an integer 'id' (and a 'name'): {cat!r:.80}")
            continue
        if is_ignore_name(cat.get("name", "")):
            ignore_ids.add(cat["id"])
            continue
        out = {k: v for k, v in cat.items()}
        out["id"] = cat["id"] + offset
        out.setdefault("name", str(cat["id"]))
        categories.append(out)
    real_ids = [c["id"] for c in categories]

    images: list[dict] = []
    for i, img in enumerate(data["images"]):
        name = None
        if isinstance(img, dict):
            name = img.get("file_name", img.get("filename"))
        if not isinstance(img, dict) or "id" not in img or not isinstance(name, str) or not name:
            issues.add(source, "bad_image_entry", f"images[{i}] needs 'id' and 'file_name': {img!r:.80}")
            continue
        out = {k: v for k, v in img.items() if k != "filename"}
        out["file_name"] = name
        if offset and isinstance(img["id"], int):
            out["id"] = img["id"] + offset
        images.append(out)

    annotations: list[dict] = []
    ids = (a.get("id") for a in data[ann_key] if isinstance(a, dict))
    next_id = 1 + max((i for i in ids if isinstance(i, int) and not isinstance(i, bool)), default=0)
    next_id += offset
    for i, ann in enumerate(data[ann_key]):
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= ann.keys():
            issues.add(source, "bad_annotation", f"{ann_key}[{i}] needs 'image_id', 'category_id' and 'bbox': {ann!r:.80}")
            continue
        if not _valid_bbox(ann["bbox"]):
            issues.add(source, "bad_bbox", f"{ann_key}[{i}] (id {ann.get('id', '?')}): bbox must be 4 finite numbers "
                       f"[x, y, w, h], got {ann['bbox']!r:.80}")
            continue
        image_id = ann["image_id"] + offset if offset and isinstance(ann["image_id"], int) else ann["image_id"]
        if ann["category_id"] in ignore_ids:
            extra = {"dontcare": 1}
            copies = _ignore_copies(image_id, ann["bbox"], real_ids, next_id, extra)
            next_id += len(copies)
            annotations.extend(copies)
            continue
        out = {k: v for k, v in ann.items()}
        out["image_id"] = image_id
        if offset:
            if isinstance(ann["category_id"], int):
                out["category_id"] = ann["category_id"] + offset
            if isinstance(ann.get("id"), int):
                out["id"] = ann["id"] + offset
        if "id" not in out:
            out["id"] = next_id
            next_id += 1
        out.setdefault("iscrowd", 0)
        if "area" not in out or not _finite_number(out["area"]):
            out["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        annotations.append(out)
    issues.raise_if_any()

    coco: dict = {k: v for k, v in data.items() if k not in ("images", "annotations", "annotation", "categories")}
    coco["images"] = images
    coco["annotations"] = annotations
    coco["categories"] = categories
    return coco


def read_coco(path: PathLike, problems: Optional[list] = None) -> dict:
    """Read a COCO detection JSON (a ``DontCare``-like category becomes ignore regions)."""
    p = Path(path).expanduser()
    return _parse_coco_like(read_json_file(p), p, problems, hit_uav=False)


def read_hit_uav(path: PathLike, problems: Optional[list] = None) -> dict:
    """Read HIT-UAV's COCO-like JSON into standard COCO.

    ``annotation`` -> ``annotations``, ``filename`` -> ``file_name``; image, annotation and
    category ids are shifted by +1 (they start at 0 in HIT-UAV: Person 1, Car 2, Bicycle 3,
    OtherVehicle 4); ``DontCare`` boxes become ignore regions (one ``iscrowd: 1`` copy per
    category, marked ``dontcare: 1``), never a class. Boxes are kept exactly.
    """
    p = Path(path).expanduser()
    return _parse_coco_like(read_json_file(p), p, problems, hit_uav=True)


def write_coco(coco: dict, path: PathLike, image_root: Optional[PathLike] = None) -> Path:
    """Write ``coco`` as JSON at ``path`` (atomically). With ``image_root``, ``info.image_root``
    records that folder relative to the file, so :func:`load_labeled` finds the images again."""
    p = Path(path).expanduser()
    out = dict(coco)
    if image_root is not None:
        info = dict(out.get("info") or {})
        root = Path(image_root).expanduser().resolve()
        try:
            info["image_root"] = Path(os.path.relpath(root, p.parent.resolve())).as_posix()
        except ValueError:  # different drives on Windows
            info["image_root"] = root.as_posix()
        out = {"info": info, **{k: v for k, v in out.items() if k != "info"}}
    try:
        atomic_write_text(p, json.dumps(out))
    except OSError as e:
        raise DataError(f"cannot write {p}: {e} — check the folder and free disk space") from e
    return p


def _guess_image_root(ann_path: Path, coco: dict, images: Optional[PathLike], strict: bool) -> Path:
    """The folder the ``file_name`` entries are relative to."""
    if images is not None:
        return Path(images).expanduser()
    names = [img["file_name"] for img in coco["images"]]
    if not names:
        return ann_path.parent
    step = max(1, len(names) // 20)
    sample = names[::step][:20]
    d = ann_path.parent
    stem = ann_path.stem
    candidates: list[Path] = []
    recorded = (coco.get("info") or {}).get("image_root") if isinstance(coco.get("info"), dict) else None
    if isinstance(recorded, str) and recorded:
        candidates.append(Path(os.path.normpath(d / recorded)) if not Path(recorded).is_absolute() else Path(recorded))
    candidates += [d, d / "images", d / stem, d / "images" / stem, d.parent, d.parent / "images", d.parent / stem,
                   d.parent / "images" / stem, d.parent / stem / "images"]
    best, best_hits = None, 0
    for c in candidates:
        hits = sum((c / n).is_file() for n in sample)
        if hits > best_hits:
            best, best_hits = c, hits
            if hits == len(sample):
                break
    if best is not None:
        return best
    if strict:
        tried = ", ".join(str(c) for c in candidates[:6])
        raise DataError(
            f"cannot find the images of {ann_path}: none of its file names (e.g. {sample[0]!r}) exist under "
            f"{tried}, ... — give the image folder (recipe `images:`, CLI --images)"
        )
    return d


# --------------------------------------------------------------------------- YOLO


def _yolo_label_path(image: Path) -> Path:
    """Ultralytics rule: the last ``images`` folder in the path becomes ``labels``, extension ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _yolo_names(raw: Any, source: Path) -> list[str]:
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DataError(f"{source}: 'names' keys must be class indices 0..N-1, got {list(raw)[:5]}") from None
        if keys != list(range(len(keys))):
            raise DataError(f"{source}: 'names' must cover class indices 0..{len(keys) - 1} without gaps, got {keys[:10]}")
        return [str(raw.get(k, raw.get(str(k)))) for k in keys]
    if isinstance(raw, list):
        return [str(n) for n in raw]
    raise DataError(f"{source}: 'names' must be a list or a mapping {{index: name}}, got {type(raw).__name__}")


def _yolo_split_images(entry: Any, root: Path, source: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    out: list[Path] = []
    for e in entries:
        if not isinstance(e, str):
            raise DataError(f"{source}: split entries must be folder or list-file paths, got {e!r}")
        p = Path(e).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            out += list_images(p)
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line:
                    continue
                q = Path(line)
                if not q.is_absolute():
                    q = (p.parent / q) if line.startswith("./") else root / q
                    if not q.exists() and (p.parent / line).exists():
                        q = p.parent / line
                out.append(q)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{source}: the split path {e!r} does not exist (looked for {p})")
    return out


def _yaml_with_names(folder: Path) -> Optional[Path]:
    for y in sorted(list(folder.glob("*.yaml")) + list(folder.glob("*.yml"))):
        try:
            d = yaml.safe_load(y.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(d, dict) and "names" in d:
            return y
    return None


def read_yolo(
    path: PathLike, split: Optional[str] = None, images: Optional[PathLike] = None, problems: Optional[list] = None
) -> tuple[dict, Path]:
    """Read a YOLO dataset (Ultralytics layout) into COCO.

    ``path`` is a dataset YAML (``path``/``train``/``val``/``test`` entries that are folders or
    image-list ``.txt`` files, and ``names``), a dataset folder (with such a YAML, or
    ``images/[split/]`` and ``labels/[split/]``), or a folder of images whose labels are found by the
    Ultralytics rule (``.../images/...`` -> ``.../labels/...``, same stem, ``.txt``; else next to the
    image). ``split`` picks ``train`` (default), ``val`` or ``test``. Class ``k`` becomes category
    id ``k + 1`` named ``names[k]`` (``class0``.. when no names are given). Label lines are
    ``class cx cy w h`` normalized to [0, 1]; polygon lines (``class x1 y1 x2 y2 ...``) give their
    bounding box. An image without a label file has no objects.
    """
    p = Path(path).expanduser()
    names: Optional[list[str]] = None
    source = p
    if p.is_dir():
        y = _yaml_with_names(p)
        if y is not None:
            p = y
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        source = p
        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"cannot read the YOLO dataset YAML {p}: {e}") from e
        if not isinstance(d, dict) or "names" not in d:
            raise DataError(f"{p}: a YOLO dataset YAML needs 'names' (and train/val/test entries)")
        names = _yolo_names(d["names"], p)
        root = Path(str(d["path"])).expanduser() if d.get("path") else p.parent
        if not root.is_absolute():
            root = (p.parent / root) if (p.parent / root).is_dir() else root.resolve()
        split = split or "train"
        if not d.get(split):
            have = [k for k in ("train", "val", "test") if d.get(k)]
            raise DataError(f"{p}: no '{split}' split in this dataset YAML (it has: {', '.join(have) or 'none'})")
        files = _yolo_split_images(d[split], root, p)
    elif p.is_file() and p.suffix.lower() == ".txt":
        root = p.parent
        files = _yolo_split_images(str(p), root, p)
    elif p.is_dir():
        root = p
        if (p / "images").is_dir():
            sub = p / "images" / (split or "train")
            folder = sub if sub.is_dir() else p / "images"
            if split and not sub.is_dir():
                raise DataError(f"{p}: no images/{split} folder")
        else:
            folder = p
            root = p.parent if p.name == "images" else p
        files = list_images(folder)
        for cand in (root / "classes.txt", root / "obj.names", folder / "classes.txt"):
            if cand.is_file():
                names = [ln.strip() for ln in cand.read_text(encoding="utf-8").splitlines() if ln.strip()]
                break
    else:
        raise DataError(f"YOLO dataset not found: {p} — give the dataset YAML, the dataset folder or the images folder")
    if not files:
        raise DataError(f"{source}: no images found for this YOLO dataset (split {split or 'train'})")
    if images is not None:
        root = Path(images).expanduser()
    else:  # file names relative to the deepest folder holding every image (e.g. images/train)
        try:
            root = Path(os.path.commonpath([str(f.parent.absolute()) for f in files]))
        except ValueError:  # different drives
            pass

    issues = _Issues(problems, source)
    raw: list[tuple[Path, Path, Optional[tuple[int, int]], list[tuple[int, list[float]]]]] = []
    max_class = -1
    for img_path in files:
        label = _yolo_label_path(img_path)
        if not label.is_file() and img_path.with_suffix(".txt").is_file():
            label = img_path.with_suffix(".txt")
        try:
            size = image_size(img_path)
        except DataError:
            size = None  # missing/unreadable: reported by check, skipped by the dataset
        rows: list[tuple[int, list[float]]] = []
        if label.is_file():
            for n, line in enumerate(label.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    cls_f = float(fields[0])
                    vals = [float(v) for v in fields[1:]]
                except ValueError:
                    issues.add(label, "label_format", f"line {n}: not numbers: {line.strip()!r:.80}")
                    continue
                if cls_f != int(cls_f) or cls_f < 0:
                    issues.add(label, "unknown_category", f"line {n}: class {fields[0]!r} is not a class index 0..N-1")
                    continue
                cls = int(cls_f)
                if names is not None and cls >= len(names):
                    issues.add(label, "unknown_category",
                               f"line {n}: class {cls} but the dataset has {len(names)} names (0..{len(names) - 1})")
                    continue
                if not all(math.isfinite(v) for v in vals):
                    issues.add(label, "label_format", f"line {n}: non-finite value: {line.strip()!r:.80}")
                    continue
                if len(vals) == 4:
                    rows.append((cls, vals))
                elif len(vals) >= 6 and len(vals) % 2 == 0:
                    xs, ys = vals[0::2], vals[1::2]
                    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
                    rows.append((cls, [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]))
                else:
                    issues.add(label, "label_format",
                               f"line {n}: expected 'class cx cy w h' (or a polygon), got {len(fields)} fields")
                    continue
                max_class = max(max_class, cls)
        raw.append((img_path, label, size, rows))
    issues.raise_if_any()

    if names is None:
        names = [f"class{k}" for k in range(max_class + 1)]
    ignore_cls = {k for k, n in enumerate(names) if is_ignore_name(n)}
    categories = [{"id": k + 1, "name": n, "supercategory": "object"} for k, n in enumerate(names) if k not in ignore_cls]
    real_ids = [c["id"] for c in categories]
    coco_images, annotations = [], []
    next_id = 1
    for image_id, (img_path, _label, size, rows) in enumerate(raw, 1):
        entry: dict[str, Any] = {"id": image_id, "file_name": Path(os.path.relpath(img_path, root)).as_posix()}
        if size is not None:
            entry["width"], entry["height"] = size
        coco_images.append(entry)
        if size is None:
            continue
        W, H = size
        for cls, (cx, cy, w, h) in rows:
            bbox = [(cx - w / 2) * W, (cy - h / 2) * H, w * W, h * H]
            if cls in ignore_cls:
                copies = _ignore_copies(image_id, bbox, real_ids, next_id)
                next_id += len(copies)
                annotations.extend(copies)
                continue
            annotations.append({"id": next_id, "image_id": image_id, "category_id": cls + 1, "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})
            next_id += 1
    return {"images": coco_images, "annotations": annotations, "categories": categories}, root


def write_yolo(
    coco: dict, image_root: PathLike, out_dir: PathLike, split: str = "train", link: bool = False
) -> dict:
    """Write ``coco`` as a YOLO dataset: ``out_dir/images/<split>/``, ``out_dir/labels/<split>/*.txt``
    and ``out_dir/data.yaml`` (``names`` as ``{index: name}``; the YAML is merged when another split
    was written there before). Categories are numbered 0..K-1 in ascending id order.

    Images are copied (``link=True``: symlinked). Boxes are clipped to the image; ignore/crowd
    regions have no YOLO equivalent and are left out (counted in the returned summary).
    Raises :class:`DataError` when an image is missing.
    """
    out = Path(out_dir).expanduser()
    root = Path(image_root).expanduser()
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(cats)}
    names = {k: str(c.get("name", c["id"])) for k, c in enumerate(cats)}

    yaml_path = out / "data.yaml"
    doc: dict[str, Any] = {}
    if yaml_path.is_file():
        try:
            doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{yaml_path} exists and is not valid YAML: {e}") from e
        if "names" in doc and _yolo_names(doc["names"], yaml_path) != [names[k] for k in range(len(names))]:
            raise DataError(f"{yaml_path} already holds other class names ({doc['names']}) — write to a new folder")

    missing = [img["file_name"] for img in coco["images"] if not (root / img["file_name"]).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) of the dataset are missing under {root} (e.g. {missing[:3]}) — "
            "give the image folder with --images, or run `sslrecipe data check`"
        )
    by_image: dict[Any, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)

    img_dir, lbl_dir = out / "images" / split, out / "labels" / split
    n_boxes = n_ignored = n_clipped = n_dropped = 0
    used: set = set()
    for img in coco["images"]:
        src = root / img["file_name"]
        rel = Path(img["file_name"])
        if rel.is_absolute() or ".." in rel.parts:
            rel = Path(rel.name)
        if rel.as_posix() in used:  # two entries with one file name after flattening
            rel = rel.with_name(f"{rel.stem}_{img['id']}{rel.suffix}")
        used.add(rel.as_posix())
        dst = img_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if link:
            dst.symlink_to(src.resolve())
        else:
            shutil.copyfile(src, dst)
        W, H = (img.get("width"), img.get("height"))
        if not W or not H:
            W, H = image_size(src)
        lines = []
        for ann in by_image.get(img["id"], []):
            if ann.get("iscrowd", 0) or ann.get("ignore", 0):
                n_ignored += 1
                continue
            if ann["category_id"] not in index:
                raise DataError(f"annotation {ann.get('id')} of {img['file_name']} has unknown category_id {ann['category_id']}")
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                n_clipped += 1
            if x1 <= x0 or y1 <= y0:
                n_dropped += 1
                continue
            lines.append(
                f"{index[ann['category_id']]} {(x0 + x1) / 2 / W:.7f} {(y0 + y1) / 2 / H:.7f} {(x1 - x0) / W:.7f} {(y1 - y0) / H:.7f}"
            )
            n_boxes += 1
        label = (lbl_dir / rel).with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    doc[split] = f"images/{split}"
    doc["nc"] = len(names)
    doc["names"] = names
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return {
        "yaml": str(yaml_path),
        "split": split,
        "images": len(coco["images"]),
        "boxes": n_boxes,
        "ignore_left_out": n_ignored,
        "clipped": n_clipped,
        "dropped_outside": n_dropped,
    }


# --------------------------------------------------------------------------- Pascal VOC


def _voc_text(node: Optional[ET.Element], tag: str) -> Optional[str]:
    if node is None:
        return None
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text is not None else None


def read_voc(
    path: PathLike, images: Optional[PathLike] = None, split: Optional[str] = None, problems: Optional[list] = None,
    one_based: bool = True,
) -> tuple[dict, Path]:
    """Read Pascal VOC XML annotations into COCO.

    ``path`` is a VOC root (``Annotations/``, ``JPEGImages/``, optional ``ImageSets/Main/<split>.txt``
    used when ``split`` is given), a folder of ``.xml`` files, or one ``.xml`` file. Images are looked
    up in ``images``, else ``JPEGImages/`` or ``images/`` beside the XML folder, else the XML folder.
    Boxes follow the VOC devkit convention (1-based inclusive pixel indices) when ``one_based``:
    ``x = xmin - 1``, ``w = xmax - xmin + 1``; with ``one_based=False`` corners are taken as
    continuous coordinates (``w = xmax - xmin``). Category ids 1..K follow the sorted class names;
    ``difficult`` objects keep their class as ``iscrowd: 1`` / ``difficult: 1`` (ignored in
    evaluation); DontCare-like names become ignore regions.
    """
    p = Path(path).expanduser()
    if p.is_file():
        xml_files, xml_dir, voc_root = [p], p.parent, p.parent.parent
    elif (p / "Annotations").is_dir():
        voc_root, xml_dir = p, p / "Annotations"
        ids_file = p / "ImageSets" / "Main" / f"{split}.txt" if split else None
        if ids_file is not None:
            if not ids_file.is_file():
                raise DataError(f"{p}: no split list {ids_file}")
            ids = [ln.split()[0] for ln in ids_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
            xml_files = [xml_dir / f"{i}.xml" for i in ids]
        else:
            xml_files = sorted(xml_dir.glob("*.xml"))
    elif p.is_dir():
        xml_dir, voc_root = p, p.parent
        xml_files = sorted(p.glob("*.xml"))
    else:
        raise DataError(f"Pascal VOC annotations not found: {p}")
    if not xml_files:
        raise DataError(f"{p}: no .xml annotation files found")
    if images is not None:
        root = Path(images).expanduser()
    else:
        guesses = (voc_root / "JPEGImages", voc_root / "images", xml_dir.parent / "images")
        root = next((c for c in guesses if c.is_dir()), xml_dir)

    issues = _Issues(problems, p)
    parsed = []
    for xf in xml_files:
        try:
            tree = ET.parse(xf).getroot()
        except (ET.ParseError, OSError) as e:
            issues.add(xf, "annotation_format", f"cannot parse the XML: {e}")
            continue
        filename = _voc_text(tree, "filename")
        if not filename:
            filename = xf.stem
        if not Path(filename).suffix:
            with_ext = (filename + ext for ext in IMAGE_EXTENSIONS if (root / (filename + ext)).is_file())
            filename = next(with_ext, filename + ".jpg")
        size = tree.find("size")
        try:
            W = int(float(_voc_text(size, "width") or 0))
            H = int(float(_voc_text(size, "height") or 0))
        except ValueError:
            W = H = 0
        objs = []
        for k, obj in enumerate(tree.findall("object")):
            name = _voc_text(obj, "name")
            box = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (float(_voc_text(box, t) or "nan") for t in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError:
                x0 = y0 = x1 = y1 = float("nan")
            if not name or not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                issues.add(xf, "bad_bbox", f"object {k}: needs <name> and a numeric <bndbox> xmin/ymin/xmax/ymax")
                continue
            try:
                difficult = int(float(_voc_text(obj, "difficult") or 0))
            except ValueError:
                difficult = 0
            if one_based:
                bbox = [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]
            else:
                bbox = [x0, y0, x1 - x0, y1 - y0]
            objs.append((name, bbox, difficult))
        parsed.append((xf, filename, W, H, objs))
    issues.raise_if_any()

    class_names = sorted({n for _, _, _, _, objs in parsed for n, _, _ in objs if not is_ignore_name(n)})
    cat_id = {n: i + 1 for i, n in enumerate(class_names)}
    categories = [{"id": cat_id[n], "name": n, "supercategory": "object"} for n in class_names]
    coco_images, annotations = [], []
    next_id = 1
    for image_id, (xf, filename, W, H, objs) in enumerate(parsed, 1):
        entry: dict[str, Any] = {"id": image_id, "file_name": filename}
        if W <= 0 or H <= 0:
            try:
                W, H = image_size(root / filename)
            except DataError:
                W = H = 0
        if W > 0 and H > 0:
            entry["width"], entry["height"] = W, H
        coco_images.append(entry)
        for name, bbox, difficult in objs:
            if is_ignore_name(name):
                copies = _ignore_copies(image_id, bbox, list(cat_id.values()), next_id)
                next_id += len(copies)
                annotations.extend(copies)
                continue
            ann = {"id": next_id, "image_id": image_id, "category_id": cat_id[name], "bbox": bbox,
                   "area": bbox[2] * bbox[3], "iscrowd": 1 if difficult else 0}
            if difficult:
                ann["difficult"] = 1
            annotations.append(ann)
            next_id += 1
    return {"images": coco_images, "annotations": annotations, "categories": categories}, root


# --------------------------------------------------------------------------- detection and dispatch


def _json_kind(path: Path) -> Optional[str]:
    try:
        data = read_json_file(path)
    except DataError:
        return None
    if not isinstance(data, dict):
        return None
    images = data.get("images")
    first = images[0] if isinstance(images, list) and images and isinstance(images[0], dict) else {}
    if "annotation" in data and "annotations" not in data:
        return "hit-uav"
    if "filename" in first and "file_name" not in first:
        return "hit-uav"
    if "images" in data and ("annotations" in data or "categories" in data):
        return "coco"
    return None


def detect_format(path: PathLike) -> str:
    """The annotation format of ``path``: ``coco``, ``hit-uav``, ``yolo`` or ``voc``.

    JSON files are told apart by their keys (HIT-UAV: ``annotation`` / ``filename``); ``.yaml`` and
    ``.txt`` are YOLO, ``.xml`` VOC; folders are VOC when they hold ``Annotations/`` or ``.xml``
    files, YOLO when they hold a YAML with ``names``, a ``labels/`` folder, or are an ``images``
    folder beside ``labels``. Raises :class:`DataError` when nothing matches.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"annotations not found: {p} — check the path (relative paths are resolved from {Path.cwd()})")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".json":
            kind = _json_kind(p)
            if kind is None:
                raise DataError(f"{p}: not a COCO or HIT-UAV annotation file (no 'images' and 'annotations' keys, or invalid JSON)")
            return kind
        if suffix in (".yaml", ".yml", ".txt"):
            return "yolo"
        if suffix == ".xml":
            return "voc"
        raise DataError(f"{p}: cannot tell the annotation format from the extension {suffix!r} — set format: coco/yolo/voc/hit-uav")
    if (p / "Annotations").is_dir() or any(p.glob("*.xml")):
        return "voc"
    if _yaml_with_names(p) is not None or (p / "labels").is_dir():
        return "yolo"
    if p.name == "images" and (p.parent / "labels").is_dir():
        return "yolo"
    if p.name == "images" or (p.parent.name == "images" and (p.parent.parent / "labels").is_dir()):
        if (p.parent / "labels").is_dir() or (p.parent.parent / "labels").is_dir():
            return "yolo"
    jsons = sorted(p.glob("*.json")) + sorted((p / "annotations").glob("*.json"))
    kinds = {j: _json_kind(j) for j in jsons}
    found = [j for j, k in kinds.items() if k]
    if len(found) == 1:
        return kinds[found[0]]  # type: ignore[return-value]
    hint = f" (annotation files here: {', '.join(j.name for j in found)})" if found else ""
    raise DataError(
        f"{p}: cannot tell the annotation format of this folder{hint} — give the annotation file itself "
        "(COCO/HIT-UAV .json, YOLO data.yaml, VOC Annotations folder) or set format:"
    )


def _single_json(p: Path) -> Path:
    if p.is_dir():
        jsons = [j for j in sorted(p.glob("*.json")) + sorted((p / "annotations").glob("*.json")) if _json_kind(j)]
        if len(jsons) == 1:
            return jsons[0]
        raise DataError(f"{p} is a folder; give the annotation .json file inside it")
    return p


def load_labeled(
    annotations: PathLike,
    images: Optional[PathLike] = None,
    format: str = "auto",
    split: Optional[str] = None,
    problems: Optional[list] = None,
) -> tuple[dict, Path]:
    """Read a labeled set in any supported format as ``(coco_dict, image_root)``.

    ``format`` is ``auto`` (see :func:`detect_format`) or one of :data:`READ_FORMATS`. ``images``
    overrides where the images are; otherwise COCO/HIT-UAV images are looked up in ``info.image_root``
    (written by :func:`write_coco`), next to the file, in ``images/``, in a folder named like the file
    (HIT-UAV: ``annotations/train.json`` -> ``train/``) and one level up. ``split`` selects the split
    of a YOLO dataset YAML or a VOC ``ImageSets/Main`` list. With ``problems`` (a list), malformed
    entries are recorded there instead of raising.
    """
    fmt = (format or "auto").lower()
    if fmt not in ("auto",) + READ_FORMATS:
        raise DataError(f"unknown annotation format {format!r} — use one of auto, {', '.join(READ_FORMATS)}")
    p = Path(annotations).expanduser()
    if not p.exists():
        raise DataError(f"annotations not found: {p} — check the path (relative paths are resolved from {Path.cwd()})")
    if fmt == "auto":
        fmt = detect_format(p)
    if fmt in ("coco", "hit-uav"):
        p = _single_json(p)
        coco = read_hit_uav(p, problems) if fmt == "hit-uav" else read_coco(p, problems)
        return coco, _guess_image_root(p, coco, images, strict=problems is None)
    if fmt == "yolo":
        return read_yolo(p, split=split, images=images, problems=problems)
    return read_voc(p, images=images, split=split, problems=problems)


def convert(
    src: PathLike,
    dst: PathLike,
    from_: str = "auto",
    to: str = "coco",
    images: Optional[PathLike] = None,
    split: Optional[str] = None,
    link: bool = False,
) -> dict:
    """Convert a labeled set between formats; returns a summary dict.

    ``to="coco"``: ``dst`` is the JSON file to write (a folder gets ``<split or source name>.json``);
    file names stay relative to the source image folder, which is recorded as ``info.image_root``.
    ``to="yolo"``: ``dst`` is the dataset folder (see :func:`write_yolo`; ``split`` defaults to
    ``train``). Ignore regions survive into COCO as ``iscrowd: 1`` annotations; YOLO has no ignore
    regions, so they are left out (the summary counts them).
    """
    to = to.lower()
    if to not in WRITE_FORMATS:
        raise DataError(f"cannot write format {to!r} — conversion writes {', '.join(WRITE_FORMATS)}")
    coco, root = load_labeled(src, images=images, format=from_, split=split)
    summary: dict[str, Any] = {
        "from": from_ if from_ != "auto" else detect_format(src),
        "to": to,
        "images": len(coco["images"]),
        "categories": [c.get("name") for c in sorted(coco["categories"], key=lambda c: c["id"])],
        "ignore_regions": len(ignore_regions(coco)),
    }
    d = Path(dst).expanduser()
    if to == "coco":
        if d.suffix.lower() != ".json":
            d = d / f"{split or Path(src).stem or 'annotations'}.json"
        write_coco(coco, d, image_root=root)
        summary.update(
            output=str(d),
            image_root=str(root),
            boxes=sum(1 for a in coco["annotations"] if not (a.get("iscrowd", 0) or a.get("ignore", 0))),
        )
    else:
        summary.update(write_yolo(coco, root, d, split=split or "train", link=link))
        summary["output"] = str(d)
    return summary
