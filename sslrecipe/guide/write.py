"""Write the advised option as a runnable recipe (`sslrecipe advise ... --write-recipe PATH`).

The recipe runs as written. With `--data FILE` it trains on the user's labeled set (the file and its images
as its format defines; `--val FILE`, the format's own val split, or a seeded split carved from the file) and
pre-trains on `--pool DIR`; without `--data` it uses the built-in synthetic IR data and says so, with comments
showing where the user's annotation files go. Its `matrix.arms` hold the advised arm and the baseline to beat
(`weights.source: scratch`), so one `sslrecipe run` checks the advice on the user's data. Paths are written
relative to the recipe's folder (the loader reads them so). The file is validated with `load_recipe` before it
replaces anything at PATH.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any, Optional

import yaml

from sslrecipe.atomic import atomic_write_file
from sslrecipe.errors import SSLRecipeError
from sslrecipe.guide.advisor import INIT_PHRASES, Advice, Option
from sslrecipe.guide.evidence import BACKBONES
from sslrecipe.recipe.loader import load_recipe
from sslrecipe.recipe.schema import DataConfig, SyntheticConfig

SHORT = {"resnet50": "r50", "resnet200": "r200", "vit_small_patch16_224": "vits16", "vit_base_patch16_224": "vitb16"}
# the survey's fine-tuning lengths (Table III/IV set-up): 36 epochs (3x) for ResNets, 50 for ViTs
SURVEY_EPOCHS = {"resnet": 36, "vit": 50}


def _synthetic_train_images() -> int:
    images = SyntheticConfig().images
    return int(images * DataConfig().split[0])


def _weights(option: Option) -> dict[str, Any]:
    if option.init == "public":
        return {"source": "fetch", "id": option.candidate.weights}
    return {"source": "pretrain"}


def _rel(path: str, base: Optional[Path]) -> str:
    """`path` (as the user gave it, from the working directory) relative to the recipe's folder when it is
    near it (inside it or a sibling: the two move together), else absolute."""
    full = os.path.abspath(os.path.expanduser(path))
    if base is None:
        return full
    rel = os.path.relpath(full, os.path.abspath(base))
    return full if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel


def _format_splits(path: str) -> tuple[str, ...]:
    """The labeled splits a dataset file defines itself (a YOLO dataset YAML's train/val/test), else ()."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        try:
            spec = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return ()
        if isinstance(spec, dict):
            return tuple(k for k in ("train", "val", "test") if spec.get(k))
    return ()


def _user_data(advice: Advice, o: Option, base: Optional[Path]) -> dict[str, Any]:
    """`data:` for the user's own labeled set (`--data`), validation set (`--val`) and pool (`--pool`)."""
    r = advice.constraints
    assert r.data is not None
    own = _format_splits(r.data)
    data: dict[str, Any] = {"train": {"annotations": _rel(r.data, base)}}
    if r.val is not None:
        data["val"] = {"annotations": _rel(r.val, base)}
    elif "val" in own:  # the format's own splits (split=<name> selects each)
        for name in ("val", "test"):
            if name in own:
                data[name] = {"annotations": _rel(r.data, base)}
    else:  # carve val and test from the labeled set, seeded by `seed`
        data["split"] = list(DataConfig().split)
    if r.pool is not None and o.init != "public":
        data["unlabeled"] = _rel(r.pool, base)
    if r.shots is not None and r.origin.get("shots") == "given":
        data["shots"] = r.shots
    return data


def _format_name(path: str) -> str:
    from sslrecipe.data.formats import detect_format

    try:
        return f" ({detect_format(path)})"
    except SSLRecipeError:
        return ""


def _eval_split(data: dict[str, Any]) -> Optional[str]:
    """The evaluation split when the labeled sets given have no test set."""
    return "val" if "val" in data and "test" not in data else None


def recipe_data(advice: Advice, option: Optional[Option] = None, base: Optional[Path] = None) -> dict[str, Any]:
    """The recipe as plain data (what the YAML file holds, without its comments); `base`: the recipe's folder,
    that paths are written relative to (None: absolute)."""
    o = option or advice.best
    r = advice.constraints
    res = o.resolution
    if r.data is not None:
        data = _user_data(advice, o, base)
    else:
        data = {"synthetic": {"images": SyntheticConfig().images}}
        if r.shots is not None and r.shots <= _synthetic_train_images():
            data["shots"] = r.shots
    recipe: dict[str, Any] = {
        "name": f"advised-{o.method}-{SHORT.get(o.backbone, o.backbone)}",
        "seed": 0,
        "data": data,
        "backbone": {"name": o.backbone, "in_chans": r.channels or 3},
        "weights": _weights(o),
    }
    if o.init != "public":
        pretrain: dict[str, Any] = {"method": o.method, "img_size": res.pretrain_img_size if res else 224}
        if o.init == "public+custom-pretrain":
            pretrain["init"] = {"source": "fetch", "id": o.candidate.continue_from or o.candidate.weights}
        elif o.method == "leopart":  # Leopart fine-tunes DINO features: pre-train DINO first, in the same run
            pretrain["first"] = {"method": "dino", "img_size": pretrain["img_size"]}
        recipe["pretrain"] = pretrain
    # the advised finetune.img_size (from --data) is set when the recipe trains on that data; on the synthetic
    # scenes it stays a comment (they are small, and the recipe has to run quickly as written)
    finetune: dict[str, Any] = {"detector": "faster_rcnn", "schedule": "cosine"}
    if r.data is not None and res is not None and res.finetune_img_size:
        finetune["img_size"] = res.finetune_img_size
    if res is not None and res.max_dets:
        finetune["max_detections"] = res.max_dets
    recipe["finetune"] = finetune
    evaluate: dict[str, Any] = {}
    if r.data is not None and _eval_split(data):
        evaluate["split"] = _eval_split(data)
    if res is not None and res.max_dets:
        evaluate["max_dets"] = res.max_dets
    if evaluate:
        recipe["evaluate"] = evaluate
    advised_set = {"weights.source": recipe["weights"]["source"]}
    recipe["matrix"] = {
        "arms": [
            {"name": f"advised-{o.method}", "set": advised_set},
            {"name": "baseline-scratch", "set": {"weights.source": "scratch"}},
        ]
    }
    return recipe


def _comment(text: str, indent: str = "", width: int = 100) -> str:
    lines = []
    for para in text.split("\n"):
        wrapped = textwrap.wrap(para, width=width - len(indent) - 2, break_on_hyphens=False,
                                break_long_words=False) or [""]
        lines += [f"{indent}# {w}".rstrip() for w in wrapped]
    return "\n".join(lines) + "\n"


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[:1].upper() + text[1:]).rstrip(".") + "."


def _section(key: str, value: Any) -> str:
    return yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=100)


def recipe_yaml(advice: Advice, option: Optional[Option] = None, base: Optional[Path] = None) -> str:
    """The recipe as commented YAML; `base`: the folder it is written to (paths are relative to it)."""
    o = option or advice.best
    r = advice.constraints
    data = recipe_data(advice, o, base)
    cits = "; ".join(row.cite() for row in o.evidence[:4]) or "none (not measured by the survey)"
    head = [
        f"Written by `sslrecipe advise` for: backbone {r.backbone}, model size {r.model_size}, "
        f"shots {r.shots if r.shots is not None else 'plenty'}, objects {r.object_size}, localization "
        f"{r.localization}, domain {r.domain} (shift {r.domain_shift}), custom pre-training {r.custom_pretrain}"
        + (f", unlabeled {r.unlabeled}" if r.unlabeled is not None else "") + ".",
        "",
        f"Advice: {o.label} with {INIT_PHRASES[o.init]} (confidence {o.level}, {o.confidence:.2f}).",
        f"Evidence: {cits}.",
    ]
    if o.extrapolated:
        head.append("Extrapolated: " + "; ".join(o.extrapolated) + ".")
    for c in o.caveats:
        head.append(f"Caveat: {c}")
    head += [
        "",
        "Run it with `sslrecipe run THIS_FILE`: the matrix below runs the advised arm and the baseline "
        "to beat, then compares them"
        + (" on your data." if r.data is not None else ". It runs on built-in synthetic data: replace it with "
           "your own (see `data:`) to check the advice where it matters."),
    ]
    out = [_comment("\n".join(head))]
    out.append(_section("name", data["name"]) + _section("seed", data["seed"]))
    if r.data is not None:
        d = data["data"]
        how = [(f"Your labeled set{_format_name(r.data)}: its images are found as the format defines (for COCO "
                "next to the file or in `images/`, else set `images:` in the entry; a YOLO YAML names them).")]
        if "split" in d:
            how.append("No validation set was given, so val and test are carved from it by `split` "
                       f"({d['split'][0]:g}/{d['split'][1]:g}/{d['split'][2]:g}), seeded by `seed`; give "
                       "your own with `val:` / `test:` entries.")
        elif "val" in d and "test" not in d:
            how.append("Evaluated on the validation set (`evaluate.split: val`): there is no test set.")
        if "unlabeled" in d:
            how.append("`unlabeled`: your pool to pre-train on (--pool).")
        elif o.init != "public":
            how.append("`unlabeled` is not set, so pre-training uses the training images without their labels; "
                       "point it at a folder of your unlabeled images (--pool).")
        elif r.pool is not None:
            how.append(f"Your pool ({r.pool}) is not used: the advised arm fine-tunes public weights; an arm "
                       "that pre-trains would set data.unlabeled to it.")
        if "shots" in d:
            how.append(f"`shots`: only {d['shots']} labeled training images are used, as you asked (seeded).")
        out.append("\n" + _comment(" ".join(how)))
    else:
        out.append("\n" + _comment(
            "Built-in synthetic IR scenes (no --data was given), so this recipe runs as written. For your own "
            "data, delete `synthetic:` and set, e.g. (or rerun `sslrecipe advise --data FILE [--pool DIR]`):\n"
            "  train: {annotations: path/to/train.json, images: path/to/images}\n"
            "  val: {annotations: path/to/val.json, images: path/to/images}\n"
            "  test: {annotations: path/to/test.json, images: path/to/images}\n"
            + ("  unlabeled: path/to/unlabeled/images   (the pool to pre-train on; null = the training images)\n"
               if o.init != "public" else "")
            + (f"  shots: {r.shots}   (the number of labeled training images you advised for)\n"
               if r.shots is not None and "shots" not in data["data"] else "")
        ))
    out.append(_section("data", data["data"]))
    family = BACKBONES[o.backbone][1]
    out.append("\n" + _comment(
        f"{o.label.split(' ')[-1]} = timm `{o.backbone}`."
        + (f" in_chans {r.channels}: from your data." if r.channels else
           " Set in_chans to your images' channel count (1 for single-band thermal).")
    ))
    out.append(_section("backbone", data["backbone"]))
    if o.init == "public":
        wnote = f"Public {o.label} weights from the catalogue (`sslrecipe weights list`). " + _sentence(o.init_why)
    else:
        wnote = f"Pre-train {o.label} in this run (`pretrain:` below). " + _sentence(o.init_why)
    out.append("\n" + _comment(wnote))
    out.append(_section("weights", data["weights"]))
    if "pretrain" in data:
        pnote = (
            f"SSL pre-training with `{o.method}` on data.unlabeled. The survey pre-trained each method with its "
            "original paper's settings (e.g. MAE ViT/S-16: 400 ImageNet epochs; SSL-IR: ~720k images); "
            "raise epochs for a real pool."
        )
        if o.init == "public+custom-pretrain":
            pnote += " `init` continues from the public weights instead of random ones."
        elif o.method == "leopart":
            pnote += " Leopart refines DINO features: `first` pre-trains DINO on the same images before it."
        if o.resolution is not None:
            pnote += " Crops at native resolution: never shrink whole images to img_size."
        out.append("\n" + _comment(pnote))
        out.append(_section("pretrain", data["pretrain"]))
    fnote = (
        f"Faster R-CNN as in the survey's VEDAI runs (Tables IV, VI, VII), cosine schedule. The survey fine-tuned "
        f"{SURVEY_EPOCHS[family]} epochs for {'ViTs' if family == 'vit' else 'ResNets'}; the default here is "
        "shorter: raise finetune.epochs for real data."
    )
    if o.resolution is not None:
        fnote += " " + o.resolution.text
    if o.resolution is not None and o.resolution.finetune_img_size and r.data is None:
        fnote += (f"\nWith your data: set img_size: {o.resolution.finetune_img_size} (left at the default here so "
                  "the synthetic scenes run quickly).")
    out.append("\n" + _comment(fnote))
    out.append(_section("finetune", data["finetune"]))
    if "evaluate" in data:
        out.append(_section("evaluate", data["evaluate"]))
    mnote = (
        "Two arms: the advised initialisation and the baseline to beat. " + advice.baseline.rationale
    )
    others = [x for x in advice.recommendations if x is not o]
    if others:
        nxt = others[0]
        mnote += (
            f"\nRunner-up: {nxt.label} with {INIT_PHRASES[nxt.init]}; to compare it too, add an arm setting "
            f"backbone.name: {nxt.backbone} and "
            + (f"weights.id: {nxt.candidate.weights}" if nxt.init == "public" else
               f"weights.source: pretrain, pretrain.method: {nxt.method}"
               + (f", pretrain.init: {{source: fetch, id: {nxt.candidate.continue_from}}}"
                  if nxt.init == "public+custom-pretrain" else ""))
            + "."
        )
    mnote += "\nAdd `axes: {seed: [0, 1, 2]}` to repeat every arm with three seeds."
    out.append("\n" + _comment(mnote))
    out.append(_section("matrix", data["matrix"]))
    return "".join(out)


def write_recipe(advice: Advice, path: str | Path, option: Optional[Option] = None) -> Path:
    """Write the recipe for the advised option (default: the best) to `path`, validated first."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    text = recipe_yaml(advice, option, parent)
    if not parent.is_dir():
        raise SSLRecipeError(f"--write-recipe {path}: folder {parent} does not exist")

    def write_checked(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")
        try:
            load_recipe(tmp)
        except SSLRecipeError as e:  # a bug here, never the user's
            raise SSLRecipeError(f"internal error: the advised recipe does not validate:\n{e}") from None

    atomic_write_file(path, write_checked, suffix=".yaml")  # validated before it replaces anything
    return path
