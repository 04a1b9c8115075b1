"""The concrete stages of a run, wired from the library's parts (data, ssl, models, detect, evaluate, report).

Each function receives a StageContext, writes its outputs into `ctx.stage_dir` and returns a small
summary (stored in `done.json`). The hash inputs of each stage are declared in `build_pipeline`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from sslrecipe.atomic import atomic_write_text
from sslrecipe.engine.checkpoint import atomic_save_safetensors
from sslrecipe.engine.cpu_threads import plan_threads
from sslrecipe.engine.loop import LoopSettings, TrainLoop, resolve_device, resolve_precision
from sslrecipe.engine.pipeline import Pipeline, Stage, StageContext
from sslrecipe.errors import DataError, SSLRecipeError
from sslrecipe.models.normalization import Normalization
from sslrecipe.recipe import Recipe
from sslrecipe.recipe.schema import LabeledSource

MANIFEST = "data.json"


# --------------------------------------------------------------------------- helpers


def _dump(model) -> Any:
    return model.model_dump(mode="json") if model is not None and hasattr(model, "model_dump") else model


def _dump_hashed(model, added: tuple[str, ...] = ()) -> Any:
    """A section for a stage hash, without keys added after runs existed while they are null (their default),
    so older run directories keep their stage hashes and resume."""
    data = _dump(model)
    return {k: v for k, v in data.items() if not (k in added and v is None)}


def finetune_seed(recipe: Recipe) -> int:
    """The seed of fine-tuning alone: `finetune.seed`, or the recipe's `seed` when null."""
    return recipe.seed if recipe.finetune.seed is None else recipe.finetune.seed


def _labeled_source(recipe: Recipe, value) -> Optional[LabeledSource]:
    if value is None:
        return None
    if isinstance(value, str):
        return LabeledSource(annotations=value, images=recipe.data.images, format=recipe.data.format)
    if value.images is None and recipe.data.images is not None:
        return value.model_copy(update={"images": recipe.data.images})
    return value


def _path_fingerprint(path: Optional[str]) -> Any:
    """Cheap content fingerprint: file size + mtime (+ a folder's listing summary)."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p), st.st_size, int(st.st_mtime)]
    if p.is_dir():
        count, size, newest = 0, 0, 0
        for root, _dirs, files in os.walk(p):
            for f in files:
                try:
                    st = os.stat(os.path.join(root, f))
                except OSError:
                    continue
                count, size, newest = count + 1, size + st.st_size, max(newest, int(st.st_mtime))
        return [str(p), count, size, newest]
    return [str(p), "missing"]


def _labeled_fingerprint(recipe: Recipe) -> Any:
    out = {}
    for split in ("train", "val", "test"):
        src = _labeled_source(recipe, getattr(recipe.data, split))
        if src is not None:
            out[split] = [_path_fingerprint(src.annotations), _path_fingerprint(src.images)]
    return out


def read_manifest(data_dir: Path) -> dict[str, Any]:
    return json.loads((Path(data_dir) / MANIFEST).read_text())


def _device_precision(recipe: Recipe) -> tuple[torch.device, str]:
    device = resolve_device(recipe.runtime.device)
    return device, resolve_precision(recipe.runtime.precision, device)


def _loader_workers(recipe: Recipe, device: torch.device) -> int:
    """`runtime.workers`, or the count chosen with the threads from the usable cores when null."""
    return plan_threads(recipe.runtime.threads, recipe.runtime.workers, device.type).workers


def _total_steps(steps: Optional[int], epochs: Optional[int], n: int, batch_size: int, accumulate: int, drop_last: bool) -> int:
    if steps is not None:
        return steps
    per_epoch = (n // batch_size) if drop_last else math.ceil(n / batch_size)
    return max(1, (epochs or 1) * per_epoch // accumulate)


def planned_later(ctx: StageContext) -> tuple[tuple[str, Optional[int]], ...]:
    """The stages after this one with their planned training images (steps x batch x accumulate, the steps from
    `_total_steps` on the data stage's counts), None where unknown before the stage starts (evaluate, YOLO, tiled
    fine-tuning without finetune.steps): what the loop's whole-run ETA is built from."""
    recipe, data_dir, out = ctx.recipe, ctx.upstream.get("data"), []
    for name in ctx.later:
        images = None
        if name in ("pretrain_first", "pretrain") and data_dir is not None:
            p = recipe.pretrain.first if name == "pretrain_first" else recipe.pretrain
            n = len((data_dir / "unlabeled.txt").read_text().splitlines())
            images = _total_steps(p.steps, p.epochs, n, p.batch_size, p.accumulate, drop_last=True) * p.batch_size * p.accumulate
        elif name == "finetune" and data_dir is not None and recipe.finetune.detector != "yolo":
            f = recipe.finetune
            if f.steps is not None or not f.train_tile_size:  # tiles: the count is known once the dataset is built
                n = int(read_manifest(data_dir)["splits"]["train"]["images"])
                images = _total_steps(f.steps, f.epochs, n, f.batch_size, f.accumulate, drop_last=False) * f.batch_size * f.accumulate
        out.append((name, images))
    return tuple(out)


# --------------------------------------------------------------------------- data


def run_data(ctx: StageContext) -> dict:
    from sslrecipe.data.sampling import sample_shots

    recipe, out = ctx.recipe, ctx.stage_dir
    d = recipe.data
    splits, origin = _labeled_splits(ctx)
    ctx.metric("data/split", {k: len(v[0]["images"]) for k, v in splits.items()})
    ctx.metric("data/sources", {k: {**origin[k], "images": len(v[0]["images"])} for k, v in splits.items()})
    _require_images(ctx, splits, origin, after_checks=False)

    _check_labeled(ctx, splits)
    _require_images(ctx, splits, origin, after_checks=True)

    pool_images = [str(Path(splits["train"][1]) / im["file_name"]) for im in splits["train"][0]["images"]]
    train, root = splits["train"]
    if d.shots is not None:
        shots_seed = recipe.seed if d.shots_seed is None else d.shots_seed
        train = sample_shots(train, d.shots, seed=shots_seed)
        ids = sorted(im["id"] for im in train["images"])
        atomic_write_text(out / "shots.json", json.dumps({"shots": d.shots, "seed": shots_seed, "image_ids": ids}, indent=1))
        if len(ids) < d.shots:
            ctx.warn(f"data.shots is {d.shots} but the training set has only {len(ids)} images; using all of them")
        splits["train"] = (train, root)

    manifest: dict[str, Any] = {"splits": {}, "categories": splits["train"][0]["categories"]}
    for name, (coco, root) in splits.items():
        path = out / f"{name}.json"
        atomic_write_text(path, json.dumps(coco))
        manifest["splits"][name] = {"annotations": path.name, "image_root": str(Path(root).resolve()), "images": len(coco["images"]),
                                    "boxes": sum(1 for a in coco["annotations"] if not a.get("iscrowd")), "source": origin[name]}

    unlabeled = _unlabeled_pool(ctx, pool_images)
    if d.dedup is not False:
        from sslrecipe.data.dedup import dedup, keep_list

        groups = dedup(unlabeled, 8 if d.dedup is True else int(d.dedup))
        kept = [str(p) for p in keep_list(unlabeled, groups)]
        ctx.metric("data/dedup_removed", len(unlabeled) - len(kept))
        unlabeled = kept
    if recipe.weights.source == "pretrain":
        # the default pool (the training images) too: a copy of a val/test image among them is pre-trained on
        from sslrecipe.data.dedup import assert_no_leakage

        held_out = [str(Path(root) / im["file_name"]) for name, (coco, root) in splits.items() if name != "train"
                    for im in coco["images"]]
        named = {} if d.unlabeled is not None else {
            "pool": "training image(s) (the pre-training pool, as data.unlabeled is null)",
            "remedy": "remove the copies from the training set or from the val/test set"}
        assert_no_leakage(unlabeled, held_out, allow=d.allow_leakage, warn=ctx.warn, **named)
    atomic_write_text(out / "unlabeled.txt", "".join(p + "\n" for p in unlabeled))
    manifest["unlabeled"] = {"list": "unlabeled.txt", "images": len(unlabeled)}
    manifest["normalization"] = _normalization(ctx, pool_images + unlabeled)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return {k: v["images"] for k, v in manifest["splits"].items()} | {"unlabeled": len(unlabeled)}


_SPLITS = ("train", "val", "test")


def _labeled_splits(ctx: StageContext) -> tuple[dict[str, tuple[dict, Path]], dict[str, dict]]:
    """The labeled sets of the run, and where each came from (``{"from": "data.test", "file": ...}``).

    A set the recipe gives is used as given. The one set that is split (``data.synthetic`` when ``data.train`` is
    null, else ``data.train`` when neither val nor test is given) fills only the splits not given, with the
    ``data.split`` fractions of those splits scaled to sum to 1.
    """
    from sslrecipe.data.coco import load_coco
    from sslrecipe.data.sampling import split_coco
    from sslrecipe.data.synth import generate_synthetic

    recipe, d = ctx.recipe, ctx.recipe.data
    splits: dict[str, tuple[dict, Path]] = {}
    origin: dict[str, dict] = {}
    for name in _SPLITS:
        src = _labeled_source(recipe, getattr(d, name))
        if src is not None:
            splits[name] = _load_labeled(src, name)
            origin[name] = {"from": f"data.{name}", "file": str(src.annotations)}
            if not splits[name][0]["images"]:
                raise DataError(
                    f"data.{name}: {src.annotations} lists no images — give a labeled set with images, "
                    f"or remove data.{name} from the recipe"
                )
    if d.train is None:
        syn = d.synthetic
        ann = generate_synthetic(
            ctx.stage_dir / "synthetic", images=syn.images, width=syn.width, height=syn.height,
            seed=recipe.seed if syn.seed is None else syn.seed, objects_per_image=tuple(syn.objects_per_image),
            bit_depth=syn.bit_depth,
        )
        whole, whole_origin = (load_coco(ann), ann.parent / "images"), {"from": "data.synthetic"}
    elif "val" not in splits and "test" not in splits:
        whole, whole_origin = splits.pop("train"), origin.pop("train")
    else:
        whole = None
    if d.train is not None and d.synthetic is not None:
        ctx.warn("data.synthetic is not used: data.train is given (synthetic data fills only the splits a recipe "
                 "does not give, and the training set is data.train); remove data.synthetic to silence this")
    if whole is not None:
        fill = [n for n in _SPLITS if n not in splits]
        fractions = [f if n in fill else 0.0 for n, f in zip(_SPLITS, d.split)]
        if len(fill) < len(_SPLITS):  # exact fractions when all three are filled: the same split as before
            fractions = [f / sum(fractions) for f in fractions]
        for name, part, share in zip(_SPLITS, split_coco(whole[0], fractions, seed=recipe.seed), fractions):
            if name in fill:
                splits[name] = (part, whole[1])
                origin[name] = {**whole_origin, "share": round(share, 4)}
    return {n: splits[n] for n in _SPLITS if n in splits}, origin


def _require_images(ctx: StageContext, splits: dict[str, tuple[dict, Path]], origin: dict[str, dict],
                    after_checks: bool) -> None:
    """The training set and the evaluated split must hold images (before and after the checks drop broken ones)."""
    recipe = ctx.recipe
    dropped = " after data.skip_invalid dropped the broken ones (listed in the warning above)" if after_checks else ""

    def described(name: str) -> str:
        o = origin[name]
        named = f"{o['from']} ({o['file']})" if "file" in o else o["from"]
        return f"{o['share']:.0%} of {named}" if "share" in o else named

    if not splits["train"][0]["images"]:
        pool = (" The pre-training pool, the training images (data.unlabeled is null), is empty too."
                if recipe.weights.source == "pretrain" and recipe.data.unlabeled is None else "")
        raise DataError(
            f"the training set, {described('train')}, has no images{dropped}.{pool} Fix or replace the images, "
            "give more of them, or a larger train fraction in data.split"
        )
    e = recipe.evaluate.split
    if e not in splits:
        raise DataError(
            f"evaluate.split is '{e}' but there is no {e} set; set data.{e}, or evaluate.split to one of: "
            f"{', '.join(k for k in splits if k != 'train' and splits[k][0]['images']) or '(none: give data.val or data.test)'}"
        )
    if not splits[e][0]["images"]:
        raise DataError(
            f"evaluate.split is '{e}' but the {e} set, {described(e)}, has no images{dropped}; fix or replace its "
            f"images, give data.{e}, or a larger {e} fraction in data.split"
        )


def _load_labeled(src: LabeledSource, split: str) -> tuple[dict, Path]:
    from sslrecipe.data.formats import load_labeled  # COCO, YOLO, VOC, HIT-UAV; auto-detected or `format:`

    coco, root = load_labeled(src.annotations, src.images, src.format, split=split)
    return coco, Path(root)


def _check_labeled(ctx: StageContext, splits: dict[str, tuple[dict, Path]]) -> None:
    """Broken labeled data stops the run with the list of problems, or is dropped with `data.skip_invalid`."""
    from sslrecipe.data.check import check_dataset, drop_invalid

    problems = []
    for name, (coco, root) in splits.items():
        for p in check_dataset(coco, root):
            problems.append(f"{name}: {p.file}: {p.kind}: {p.message}")
    if not problems:
        return
    listing = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
    if ctx.recipe.data.skip_invalid:
        for name, (coco, root) in list(splits.items()):
            splits[name] = (drop_invalid(coco, root)[0], root)
        ctx.warn(f"{len(problems)} problems in the labeled data, dropped (data.skip_invalid is true):\n  {listing}")
        ctx.metric("data/invalid_dropped", len(problems))
        return
    raise DataError(
        f"the labeled data has {len(problems)} problems:\n  {listing}\n"
        "Fix them (see `sslrecipe data check`), or set data.skip_invalid: true to drop the broken images and boxes."
    )


def _normalization(ctx: StageContext, paths: list[str]) -> Optional[dict]:
    """Dataset intensity statistics (stored in the manifest; every dataset applies them), or None."""
    from sslrecipe.data.normalize import dataset_normalization, fixed_normalization

    cfg = ctx.recipe.data.normalize
    mode = cfg.mode
    if mode == "auto":
        mode = "dataset" if _mostly_high_bit_depth(paths) else "none"
    if mode == "none":
        return None
    if mode == "fixed":
        return fixed_normalization(cfg.low, cfg.high, cfg.scale)
    stats = dataset_normalization(sorted(set(paths)), cache_dir=ctx.stage_dir, percentiles=tuple(cfg.percentiles),
                                  max_images=cfg.max_images, seed=ctx.recipe.seed)
    ctx.events.emit("metric", "data", name="data/normalization", value={"low": stats["low"], "high": stats["high"]})
    return stats


def _mostly_high_bit_depth(paths: list[str], sample: int = 25) -> bool:
    from PIL import Image

    picked = paths[:: max(1, len(paths) // sample)][:sample]
    high = 0
    for p in picked:
        try:
            with Image.open(p) as im:
                high += im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
        except OSError:
            continue
    return bool(picked) and high * 2 > len(picked)


def _unlabeled_pool(ctx: StageContext, train_images: list[str]) -> list[str]:
    from sslrecipe.data.unlabeled import scan_unlabeled
    from sslrecipe.data.video import VIDEO_EXTENSIONS, is_video_file, list_videos

    src = ctx.recipe.data.unlabeled
    if src is None:
        return train_images
    videos: list[Path] = []
    if isinstance(src, str):
        folder = Path(src)
        if folder.is_file() and is_video_file(folder):
            videos, folder = [folder], None
        elif folder.is_dir():
            videos = list_videos(folder)
        else:
            raise DataError(f"data.unlabeled: {folder} is not a folder of images or videos, nor a video file "
                            f"({', '.join(VIDEO_EXTENSIONS)}) — check the path")
    else:
        from sslrecipe.data.synth import generate_synthetic

        syn = src.synthetic
        ann = generate_synthetic(
            ctx.stage_dir / "unlabeled", images=syn.images, width=syn.width, height=syn.height,
            seed=(ctx.recipe.seed + 1) if syn.seed is None else syn.seed, objects_per_image=tuple(syn.objects_per_image),
            bit_depth=syn.bit_depth,
        )
        folder = ann.parent / "images"
    good, problems = scan_unlabeled(folder, allow_empty=bool(videos)) if folder is not None else ([], [])
    for path, reason in problems:
        ctx.warn(f"unlabeled image skipped: {path}: {reason}")
    if problems:
        ctx.metric("data/unlabeled_skipped", len(problems))
    pool = [str(p) for p in good] + _video_frames(ctx, videos, folder)
    if not pool:
        raise DataError(f"data.unlabeled: no readable images or video frames in {src} (images: jpg, png, tif, tiff, "
                        f"bmp; videos: {', '.join(VIDEO_EXTENSIONS)})")
    return pool


def _video_frames(ctx: StageContext, videos: list[Path], folder: Optional[Path]) -> list[str]:
    """Every `data.video_stride`-th frame of each video, written once as PNG into this stage's `frames/` (the folder
    layout of the videos kept), so dedup, the leak guard, the statistics and pre-training read them as images."""
    from sslrecipe.data.video import extract_frames

    if not videos:
        return []
    stride = ctx.recipe.data.video_stride
    frames: list[str] = []
    counts: dict[str, int] = {}
    skipped = 0
    for video in videos:
        rel = video.relative_to(folder).as_posix() if folder is not None else video.name
        written, problem = extract_frames(video, ctx.stage_dir / "frames" / rel, stride)
        if problem is not None:
            skipped += 1
            kept = f"; its {len(written)} frames decoded before that are kept" if written else ""
            ctx.warn(f"unlabeled video skipped: {video}: {problem}{kept}")
        frames += [str(p) for p in written]
        counts[rel] = len(written)
    ctx.metric("data/video_frames", {"stride": stride, "frames": counts})
    if skipped:
        ctx.metric("data/videos_skipped", skipped)
    if frames and ctx.recipe.data.dedup is False:
        ctx.warn(f"data.unlabeled holds videos ({len(frames)} frames at data.video_stride {stride}) and data.dedup is "
                 "false: near-duplicate frames (a still or slow camera) all stay in the pool; set data.dedup: true to "
                 "remove them")
    return frames


# --------------------------------------------------------------------------- pretrain


def run_pretrain_first(ctx: StageContext) -> dict:
    """`pretrain.first`: the earlier pre-training whose encoder `pretrain` starts from (e.g. DINO before Leopart)."""
    return _pretrain(ctx, ctx.recipe.pretrain.first, "pretrain.first")


def run_pretrain(ctx: StageContext) -> dict:
    return _pretrain(ctx, ctx.recipe.pretrain, "pretrain")


def _pretrain(ctx: StageContext, p, key: str) -> dict:
    from sslrecipe.data.unlabeled import UnlabeledImages
    from sslrecipe.models.backbone import export_encoder
    from sslrecipe.ssl.registry import create_method

    recipe = ctx.recipe
    method = create_method(p.method, recipe.backbone.name, recipe.backbone.in_chans, p.img_size,
                           p.options.get(p.method, {}), recipe.backbone.kwargs, key=f"{key}.method")
    start = "random"
    if p.init is not None:
        _init_encoder_from(ctx, method, p.init, f"{key}.init")
        start = f"{key}.init"
    elif "pretrain_first" in ctx.upstream:  # only pretrain needs it
        _load_encoder_into(method, ctx.upstream["pretrain_first"] / "encoder.safetensors")
        start = f"pretrain.first ({recipe.pretrain.first.method})"  # recorded in done.json and encoder.json
    elif p.method == "leopart":
        ctx.warn(f"leopart starts from DINO weights in the paper; {key}.init is not set, so it starts from random "
                 f"initialisation and will learn far less (set {key}.init to a DINO checkpoint, or pre-train DINO "
                 "first in this run with pretrain.first: {method: dino})")
    paths = (ctx.upstream["data"] / "unlabeled.txt").read_text().splitlines()
    manifest = read_manifest(ctx.upstream["data"])
    dataset = UnlabeledImages([Path(x) for x in paths], recipe.backbone.in_chans, transform=method.views, seed=recipe.seed,
                              normalize=manifest.get("normalization"),
                              on_error=lambda path, err: ctx.warn(f"unlabeled image skipped: {path}: {err}"))
    device, precision = _device_precision(recipe)
    total = _total_steps(p.steps, p.epochs, len(dataset), p.batch_size, p.accumulate, drop_last=True)
    settings = LoopSettings(
        stage=ctx.name, stage_dir=ctx.stage_dir, stage_hash=ctx.stage_hash, optim=p, batch_size=p.batch_size,
        total_steps=total, seed=recipe.seed, device=device, precision=precision, workers=_loader_workers(recipe, device),
        checkpoint_every=recipe.runtime.checkpoint_every, drop_last=True, collate_fn=method.collate, later=planned_later(ctx),
    )
    torch.manual_seed(recipe.seed)
    loop = TrainLoop(settings, method, method.param_groups(p.weight_decay), dataset,
                     loss_fn=lambda model, batch: model(batch), events=ctx.events, after_step=method.after_step)
    result = loop.run()
    timm_kwargs = {"in_chans": recipe.backbone.in_chans, "num_classes": 0, **recipe.backbone.kwargs}
    timm_kwargs.update(getattr(method, "export_timm_kwargs", {}))
    export_encoder(method.encoder(), ctx.stage_dir, recipe.backbone.name, timm_kwargs,
                   extra={"method": p.method, "steps": result.steps, "start": start},
                   normalization=Normalization(method.input_mean, method.input_std))  # what its views used
    method.export_extra(ctx.stage_dir)  # e.g. ReSim's FPN, which fine-tuning starts from
    return {"method": p.method, "steps": result.steps, "final_loss": result.last_loss, "start": start}


def _load_encoder_into(method, file: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(file))
    encoder = method.encoder()
    if getattr(encoder, "pos_embed", None) is not None:  # a ViT pre-trained at another size: resample its grid
        from sslrecipe.ssl.vit_utils import resize_pos_embed_in_state

        state = resize_pos_embed_in_state(state, encoder)
    method.load_encoder_weights(state)
    # the views are normalised as the start encoder expects (its encoder.json; none recorded: 0.5 / 0.25)
    meta_path = file.with_name("encoder.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    norm = Normalization.from_meta(meta, (meta.get("timm_kwargs") or {}).get("in_chans"), str(meta_path))
    method.set_input_normalization(norm.mean, norm.std)


def _init_encoder_from(ctx: StageContext, method, ref, key: str = "pretrain.init") -> None:
    from sslrecipe.weights import resolve_weights

    if ref.source not in ("fetch", "file"):
        raise SSLRecipeError(f"{key}.source must be fetch or file (got {ref.source})")
    out = resolve_weights(ref.source, ref.id or ref.path, ref.sha256, ref.format, ctx.recipe.backbone.name,
                          ctx.recipe.backbone.in_chans, ctx.stage_dir / "init", timm_kwargs=ctx.recipe.backbone.kwargs,
                          warn=ctx.warn)
    _load_encoder_into(method, Path(out) / "encoder.safetensors")


# --------------------------------------------------------------------------- weights


def run_weights(ctx: StageContext) -> dict:
    from sslrecipe.models.backbone import create_backbone, export_encoder

    recipe, w = ctx.recipe, ctx.recipe.weights
    timm_kwargs = {"in_chans": recipe.backbone.in_chans, "num_classes": 0, **recipe.backbone.kwargs}
    if w.source == "scratch":
        torch.manual_seed(recipe.seed)
        model = create_backbone(recipe.backbone.name, in_chans=recipe.backbone.in_chans, **recipe.backbone.kwargs)
        export_encoder(model, ctx.stage_dir, recipe.backbone.name, timm_kwargs, extra={"source": "scratch", "seed": recipe.seed})
    elif w.source == "pretrain":
        src = ctx.upstream["pretrain"]
        for name in ("encoder.safetensors", "encoder.json"):
            shutil.copy2(src / name, ctx.stage_dir / name)
        for extra in src.glob("encoder*.safetensors"):  # e.g. an exported FPN beside the encoder
            if extra.name != "encoder.safetensors":
                shutil.copy2(extra, ctx.stage_dir / extra.name)
    else:
        from sslrecipe.weights import resolve_weights

        resolve_weights(w.source, w.id if w.source == "fetch" else w.path, w.sha256, w.format, recipe.backbone.name,
                        recipe.backbone.in_chans, ctx.stage_dir, timm_kwargs=recipe.backbone.kwargs, warn=ctx.warn,
                        progress=recipe.runtime.progress != "plain")
    if not (ctx.stage_dir / "encoder.safetensors").is_file():
        raise SSLRecipeError(f"weights stage produced no encoder.safetensors in {ctx.stage_dir}")
    return {"source": w.source}


# --------------------------------------------------------------------------- finetune / evaluate / report


def _datasets(ctx: StageContext, split: str, train: bool, masks: bool = False):
    from sslrecipe.data.coco import DetectionDataset, load_coco

    manifest = read_manifest(ctx.upstream["data"])
    entry = manifest["splits"][split]
    coco = load_coco(ctx.upstream["data"] / entry["annotations"])
    cls = DetectionDataset
    if masks:
        from sslrecipe.detect.masks import MaskDetectionDataset as cls  # checks that the data has masks
    ds = cls(coco, Path(entry["image_root"]), ctx.recipe.backbone.in_chans, train=train,
             hflip=ctx.recipe.finetune.hflip, seed=finetune_seed(ctx.recipe), normalize=manifest.get("normalization"))
    return coco, ds, Path(entry["image_root"])


def build_detector_from(spec: dict, encoder_dir: Optional[Path] = None):
    """Rebuild the fine-tuned detector described by `detector.json` (its weights are loaded by the caller)."""
    from sslrecipe.detect.faster_rcnn import build_detector
    from sslrecipe.models.backbone import create_backbone, load_encoder

    if encoder_dir is not None:
        encoder, _meta = load_encoder(encoder_dir)
    else:
        encoder = create_backbone(spec["timm_name"], **spec["timm_kwargs"])
    # detector.json written before the normalisation was recorded: build_detector's default (the encoder's, else 0.5/0.25)
    return build_detector(
        encoder, num_classes=spec["num_classes"], img_size=spec["img_size"], anchor_sizes=tuple(spec["anchor_sizes"]),
        image_mean=spec.get("mean"), image_std=spec.get("std"),
        in_chans=spec["in_chans"], norm=spec["norm"], trainable_stages=spec["trainable_stages"],
        max_detections=spec["max_detections"], fpn_channels=spec["fpn_channels"],
        box_batch_size_per_image=spec["rois_per_image"], detector=spec.get("detector", "faster_rcnn"),
        mask_channels=spec.get("mask_channels"),
    )


def _run_finetune_yolo(ctx: StageContext) -> dict:
    from sslrecipe.data.coco import load_coco
    from sslrecipe.detect.yolo import finetune_yolo

    recipe, f = ctx.recipe, ctx.recipe.finetune
    manifest = read_manifest(ctx.upstream["data"])
    sets = {}
    for split in ("train", "val"):
        if split in manifest["splits"]:
            entry = manifest["splits"][split]
            sets[split] = (load_coco(ctx.upstream["data"] / entry["annotations"]), Path(entry["image_root"]))
    device, _precision = _device_precision(recipe)
    epochs = f.epochs or 1
    img_size = _finetune_img_size(ctx, sets["train"][0])
    spec = finetune_yolo(ctx.stage_dir, sets["train"], sets.get("val"), ctx.upstream["weights"], epochs=epochs,
                         img_size=img_size, batch_size=f.batch_size, lr=f.peak_lr(f.batch_size), seed=finetune_seed(recipe),
                         device=device.type if device.type in ("cpu", "mps") else str(device.index or 0), workers=_loader_workers(recipe, device),
                         width=f.yolo_width)
    ctx.metric("finetune/yolo_backbone_tensors_verified", spec["backbone_verified"])
    return {"detector": "yolo", "epochs": epochs, "backbone_verified": spec["backbone_verified"], "img_size": img_size}


def _finetune_img_size(ctx: StageContext, coco: dict) -> int:
    """`finetune.img_size`, or when null the size the training boxes call for (`suggest_img_size`), reported."""
    from sslrecipe.detect.faster_rcnn import suggest_img_size

    if ctx.recipe.finetune.img_size is not None:
        return ctx.recipe.finetune.img_size
    size = suggest_img_size(coco)
    ctx.metric("finetune/img_size", size)
    return size


def run_finetune(ctx: StageContext) -> dict:
    from sslrecipe.data.coco import collate_detection
    from sslrecipe.detect.faster_rcnn import encoder_family, suggest_anchor_sizes
    from sslrecipe.detect.schedules import detector_param_groups, survey_schedule

    recipe, f = ctx.recipe, ctx.recipe.finetune
    if f.detector == "yolo":
        return _run_finetune_yolo(ctx)
    coco, dataset, _root = _datasets(ctx, "train", train=True, masks=f.detector == "mask_rcnn")
    meta = json.loads((ctx.upstream["weights"] / "encoder.json").read_text())
    if f.train_tile_size:
        from sslrecipe.detect.tiling import TiledTrainingCrops

        sizes = [(int(im["width"]), int(im["height"])) for im in coco["images"]]
        label_to_category = dataset.label_to_category
        dataset = TiledTrainingCrops(dataset, sizes, f.train_tile_size, overlap=recipe.evaluate.tiling.overlap)
        dataset.label_to_category = label_to_category
        # anchors from the boxes as the detector sees them in a tile (resized tile_size -> img_size)
        coco = {**coco, "images": [{**im, "width": min(im["width"], f.train_tile_size),
                                    "height": min(im["height"], f.train_tile_size)} for im in coco["images"]]}
    img_size = _finetune_img_size(ctx, coco)
    anchors = tuple(f.anchor_sizes) if f.anchor_sizes else tuple(suggest_anchor_sizes(coco, img_size))
    spec = {
        "timm_name": meta["timm_name"], "timm_kwargs": meta["timm_kwargs"], "num_classes": len(dataset.label_to_category),
        "label_to_category": {str(k): v for k, v in dataset.label_to_category.items()}, "img_size": img_size,
        "anchor_sizes": list(anchors), "in_chans": recipe.backbone.in_chans, "norm": f.norm,
        "trainable_stages": f.trainable_stages, "max_detections": f.max_detections, "fpn_channels": f.fpn_channels,
        "rois_per_image": f.rois_per_image, "detector": f.detector, "mask_channels": f.mask_channels,
        # what `sslrecipe predict` / `export` need to read new images as training did: the detector directory stands alone
        "categories": [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))}
                       for c in sorted(coco["categories"], key=lambda c: c["id"])],
        "data_normalization": read_manifest(ctx.upstream["data"]).get("normalization"),
        # the input normalisation the encoder's weights expect, applied by the detector (and after it by predict)
        **Normalization.from_meta(meta, recipe.backbone.in_chans, str(ctx.upstream["weights"] / "encoder.json")).to_meta(),
    }
    torch.manual_seed(finetune_seed(recipe))
    model = build_detector_from(spec, ctx.upstream["weights"])
    family = encoder_family(model.backbone.body.encoder)
    layer_decay = f.layer_decay if f.layer_decay is not None else survey_schedule(family)["layer_decay"]
    optim = f.model_copy(update={"schedule": survey_schedule(family)["schedule"]}) if f.schedule == "auto" else f
    spec["layer_decay"], spec["schedule"] = layer_decay, optim.schedule
    _load_pretrained_fpn(ctx, model, f.fpn_channels)
    device, precision = _device_precision(recipe)
    total = _total_steps(f.steps, f.epochs, len(dataset), f.batch_size, f.accumulate, drop_last=False)
    settings = LoopSettings(
        stage="finetune", stage_dir=ctx.stage_dir, stage_hash=ctx.stage_hash, optim=optim, batch_size=f.batch_size,
        total_steps=total, seed=finetune_seed(recipe), device=device, precision=precision, workers=_loader_workers(recipe, device),
        checkpoint_every=recipe.runtime.checkpoint_every, collate_fn=collate_detection, later=planned_later(ctx),
    )

    def loss_fn(model, batch):
        images, targets = batch
        losses = model(list(images), list(targets))
        return {"loss": sum(losses.values()), **losses}

    groups = detector_param_groups(model, f.weight_decay, layer_decay)
    result = TrainLoop(settings, model, groups, dataset, loss_fn, ctx.events).run()
    # atomic: a kill or a full disk mid-write leaves no torn detector (the stage reruns from its final checkpoint)
    atomic_save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                            ctx.stage_dir / "detector.safetensors")
    atomic_write_text(ctx.stage_dir / "detector.json", json.dumps(spec, indent=1))
    return {"steps": result.steps, "final_loss": result.last_loss, "anchor_sizes": list(anchors), "img_size": img_size}


def _load_pretrained_fpn(ctx: StageContext, model, fpn_channels: int) -> None:
    """Start the detector's FPN from a pre-trained one (ReSim's in-backbone FPN), as the official transfer does."""
    path = ctx.upstream["weights"] / "encoder_fpn.safetensors"
    if not path.is_file():
        return
    from sslrecipe.ssl.resim import fpn_state_for_torchvision, load_fpn

    fpn = load_fpn(path)
    state = fpn_state_for_torchvision(fpn.state_dict(), list(model.backbone.body.strides))
    fpn_model = model.backbone.fpn
    mismatched = [k for k, v in state.items() if k not in fpn_model.state_dict() or fpn_model.state_dict()[k].shape != v.shape]
    if mismatched:
        ctx.warn(f"the pre-trained FPN ({path.name}) does not fit finetune.fpn_channels={fpn_channels}; "
                 f"set finetune.fpn_channels to its width to start from it. Training this FPN from scratch.")
        return
    fpn_model.load_state_dict(state, strict=False)
    ctx.events.emit("metric", "finetune", name="finetune/pretrained_fpn_tensors", value=len(state))


def load_finetuned(finetune_dir: Path):
    from safetensors.torch import load_file

    spec = json.loads((Path(finetune_dir) / "detector.json").read_text())
    model = build_detector_from(spec)
    model.load_state_dict(load_file(str(Path(finetune_dir) / "detector.safetensors")), strict=True)
    return model, spec


def run_evaluate(ctx: StageContext) -> dict:
    from sslrecipe.evaluate.model_eval import ModelEvaluation, evaluate_model, write_evaluation

    recipe, e = ctx.recipe, ctx.recipe.evaluate
    device, _precision = _device_precision(recipe)
    if (ctx.upstream["finetune"] / "yolo.json").is_file():
        from sslrecipe.data.coco import load_coco
        from sslrecipe.detect.yolo import load_finetuned_yolo, predict_yolo
        from sslrecipe.evaluate.coco_eval import evaluate_full

        model, spec = load_finetuned_yolo(ctx.upstream["finetune"])
        entry = read_manifest(ctx.upstream["data"])["splits"][e.split]
        coco = load_coco(ctx.upstream["data"] / entry["annotations"])
        detections = predict_yolo(model, coco, Path(entry["image_root"]), spec["img_size"],
                                  {int(k): v for k, v in spec["label_to_category"].items()}, e.score_threshold,
                                  max_det=recipe.finetune.max_detections,
                                  device=device.type if device.type in ("cpu", "mps") else str(device.index or 0))
        full = evaluate_full(coco, detections, e.max_dets)
        result = ModelEvaluation(full.metrics, detections, full.curves)
    else:
        model, spec = load_finetuned(ctx.upstream["finetune"])
        coco, dataset, _root = _datasets(ctx, e.split, train=False)
        label_to_category = {int(k): v for k, v in spec["label_to_category"].items()}
        result = evaluate_model(model.to(device), dataset, coco, device=device, batch_size=e.batch_size,
                                score_threshold=e.score_threshold, label_to_category=label_to_category,
                                max_dets=e.max_dets, tiling=_dump(e.tiling))
    write_evaluation(ctx.stage_dir, result)
    for name, value in result.metrics.items():
        ctx.metric(name, value)
    return {"split": e.split, "images": len(coco["images"]), "detections": len(result.detections)}


def run_report(ctx: StageContext) -> dict:
    from sslrecipe.data.coco import load_coco
    from sslrecipe.report.report import write_report

    recipe = ctx.recipe
    split = recipe.evaluate.split
    manifest = read_manifest(ctx.upstream["data"])
    entry = manifest["splits"][split]
    gt = load_coco(ctx.upstream["data"] / entry["annotations"])
    metrics = json.loads((ctx.upstream["evaluate"] / "metrics.json").read_text())
    detections = json.loads((ctx.upstream["evaluate"] / "detections.json").read_text())
    curves_path = ctx.upstream["evaluate"] / "curves.json"
    curves = json.loads(curves_path.read_text()) if curves_path.is_file() else None
    write_report(ctx.stage_dir, metrics, ctx.run_dir / "events.jsonl", gt, detections, Path(entry["image_root"]),
                 n_images=recipe.report.images, score_threshold=recipe.report.score_threshold, title=recipe.name,
                 curves=curves)
    atomic_write_text(ctx.stage_dir / "metrics.json", json.dumps(metrics, indent=1))
    return {"report": "report.md"}


def publish(run_dir: Path, report_dir: Path) -> None:
    """Copy the report stage's outputs to the run directory's top level (RUN/report.md, RUN/metrics.json)."""
    for item in Path(report_dir).iterdir():
        if item.suffix in (".md", ".png", ".json") and item.name != "done.json":
            shutil.copy2(item, Path(run_dir) / item.name)


# --------------------------------------------------------------------------- the pipeline


def _pool_has_videos(r: Recipe) -> bool:
    """Whether `data.unlabeled` is a video or a folder holding videos: only then does `data.video_stride` enter the
    hashes (older runs and image pools keep theirs)."""
    from sslrecipe.data.video import is_video_file, list_videos

    src = r.data.unlabeled
    if not isinstance(src, str):
        return False
    path = Path(src)
    return is_video_file(path) if path.is_file() else path.is_dir() and bool(list_videos(path))


def _unlabeled_pool_config(r: Recipe) -> Any:
    common = {"dedup": r.data.dedup, "normalize": _dump(r.data.normalize), "seed": r.seed}
    if r.data.unlabeled is not None:
        videos = {"video_stride": r.data.video_stride} if _pool_has_videos(r) else {}
        return {"unlabeled": _dump(r.data.unlabeled) if not isinstance(r.data.unlabeled, str) else r.data.unlabeled,
                **common, **videos}
    # the pool is the training images: it depends on the labeled sources and the split, never on `shots`
    pool = {"train": _dump(r.data.train), "synthetic": _dump(r.data.synthetic), "split": list(r.data.split),
            "images": r.data.images, "format": r.data.format, **common}
    # which sets are given decides what the training set is, and skip_invalid what is left of it; entered only
    # where they matter, so that the most common pools (synthetic alone, train with val/test) keep their hashes
    given = [n for n in ("val", "test") if getattr(r.data, n) is not None]
    if r.data.train is None and given:  # synthetic data fills only the splits not given
        pool["given"] = given
    if r.data.train is not None and not given:  # data.train is split: the pool is its train share
        pool["train_split"] = True
    if r.data.skip_invalid:
        pool["skip_invalid"] = True
    return pool


def _pool_fingerprint(r: Recipe) -> dict:
    return {"labeled": _labeled_fingerprint(r),
            "unlabeled": _path_fingerprint(r.data.unlabeled) if isinstance(r.data.unlabeled, str) else None}


def _data_config(r: Recipe) -> dict:
    data = _dump_hashed(r.data, ("shots_seed",))
    if data.get("shots_seed") == r.seed:  # the same subset as the default: the same stage
        del data["shots_seed"]
    if not _pool_has_videos(r):  # it changes nothing then: image pools and older runs keep their hash
        data.pop("video_stride", None)
    return {"data": data, "seed": r.seed, "eval_split": r.evaluate.split}


def _input_norm_salt(starts_from_weights: bool) -> dict:
    """Stages that start from given weights record and apply those weights' mean/std since issue 14 (before: always
    0.5 / 0.25): a new hash, so a cached result made with the old normalisation is not reused. Others keep theirs."""
    return {"input_norm": "from_weights"} if starts_from_weights else {}


def build_pipeline() -> Pipeline:
    return Pipeline(
        [
            Stage("data", (), _data_config, run_data,
                  fingerprint=lambda r: {"labeled": _labeled_fingerprint(r),
                                         "unlabeled": _path_fingerprint(r.data.unlabeled) if isinstance(r.data.unlabeled, str) else None}),
            # pre-training hashes the pool definition, never data.shots: shot changes reuse it
            Stage("pretrain_first", ("data",),
                  lambda r: {"pretrain": _dump(r.pretrain.first), "backbone": _dump(r.backbone), "seed": r.seed,
                             "precision": r.runtime.precision, "pool": _unlabeled_pool_config(r),
                             **_input_norm_salt(r.pretrain.first is not None and r.pretrain.first.init is not None)},
                  run_pretrain_first, enabled=lambda r: r.weights.source == "pretrain" and r.pretrain.first is not None,
                  hash_upstream=(), fingerprint=_pool_fingerprint),
            # its config holds pretrain.first whole, so the first stage's hash need not enter it
            Stage("pretrain", ("data", "pretrain_first"),
                  lambda r: {"pretrain": _dump(r.pretrain), "backbone": _dump(r.backbone), "seed": r.seed,
                             "precision": r.runtime.precision, "pool": _unlabeled_pool_config(r), **_input_norm_salt(
                                 r.pretrain.init is not None or (r.pretrain.first is not None and r.pretrain.first.init is not None))},
                  run_pretrain, enabled=lambda r: r.weights.source == "pretrain", hash_upstream=(),
                  fingerprint=_pool_fingerprint),
            Stage("weights", ("pretrain",), lambda r: {"weights": _dump(r.weights), "backbone": _dump(r.backbone),
                                                       "seed": r.seed if r.weights.source == "scratch" else None,
                                                       **_input_norm_salt(r.weights.source in ("fetch", "file"))}, run_weights),
            Stage("finetune", ("data", "weights"),
                  lambda r: {"finetune": {k: v for k, v in _dump(r.finetune).items() if k != "seed"},
                             "in_chans": r.backbone.in_chans, "seed": finetune_seed(r), "precision": r.runtime.precision},
                  run_finetune),
            Stage("evaluate", ("data", "finetune"), lambda r: {"evaluate": _dump(r.evaluate)}, run_evaluate),
            Stage("report", ("data", "evaluate"),  # loggers mirror events; they change no output
                  lambda r: {"report": {k: v for k, v in _dump(r.report).items() if k != "loggers"}, "name": r.name},
                  run_report),
        ]
    )
