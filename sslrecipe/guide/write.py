"""Write the advised option as a runnable recipe (`sslrecipe advise ... --write-recipe PATH`).

The recipe runs as written: it uses the built-in synthetic IR data, with comments saying where the
user's own annotation files go. Its `matrix.arms` hold the advised arm and the baseline to beat
(`weights.source: scratch`), so one `sslrecipe run` checks the advice on the user's data. The file is
validated with `load_recipe` before it replaces anything at PATH.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Optional

import yaml

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


def recipe_data(advice: Advice, option: Optional[Option] = None) -> dict[str, Any]:
    """The recipe as plain data (what the YAML file holds, without its comments)."""
    o = option or advice.best
    r = advice.constraints
    res = o.resolution
    data: dict[str, Any] = {"synthetic": {"images": SyntheticConfig().images}}
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
    # the advised finetune.img_size (from --data) is written as a comment: the synthetic scenes that make
    # the recipe run as written are small, and the user switches it on with their own data
    finetune: dict[str, Any] = {"detector": "faster_rcnn", "schedule": "cosine"}
    if res is not None and res.max_dets:
        finetune["max_detections"] = res.max_dets
    recipe["finetune"] = finetune
    if res is not None and res.max_dets:
        recipe["evaluate"] = {"max_dets": res.max_dets}
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


def recipe_yaml(advice: Advice, option: Optional[Option] = None) -> str:
    """The recipe as commented YAML."""
    o = option or advice.best
    r = advice.constraints
    data = recipe_data(advice, o)
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
        "to beat, then compares them. Replace the synthetic data with your own (see `data:`) to check the "
        "advice where it matters.",
    ]
    out = [_comment("\n".join(head))]
    out.append(_section("name", data["name"]) + _section("seed", data["seed"]))
    out.append("\n" + _comment(
        "Built-in synthetic IR scenes, so this recipe runs as written. For your own data, delete "
        "`synthetic:` and set, e.g.:\n"
        f"  train: {{annotations: {r.data or 'path/to/train.json'}, images: path/to/images}}\n"
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
    if o.resolution is not None and o.resolution.finetune_img_size:
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
    text = recipe_yaml(advice, option)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SSLRecipeError(f"--write-recipe {path}: folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".advised-", suffix=".yaml", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            load_recipe(tmp)
        except SSLRecipeError as e:  # a bug here, never the user's
            raise SSLRecipeError(f"internal error: the advised recipe does not validate:\n{e}") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
