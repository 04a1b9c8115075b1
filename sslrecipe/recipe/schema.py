"""The recipe schema: every key a user can write, with its type, default and meaning.

These pydantic models are the documentation of the recipe format (`docs/recipe.md` is generated
from them by `sslrecipe validate --schema`). Unknown keys are errors everywhere (`extra="forbid"`),
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from sslrecipe.versions import RECIPE_VERSION

DATA_FORMATS = ("auto", "coco", "yolo", "voc", "hit-uav")
DataFormat = Literal["auto", "coco", "yolo", "voc", "hit-uav"]
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit


def _plain_name(v: str) -> str:
    # the name becomes a directory under runs/ (or under a matrix run): it must stay there
    if not v or v in (".", "..") or any(c in v for c in "/\\") or any(ord(c) < 32 for c in v) or len(v) > 100:
        raise ValueError(
            f"{v!r} is not a plain name: it names a directory (runs/<name>-<timestamp>), so it may not be empty, "
            "'.' or '..', or hold '/', '\\' or control characters (at most 100 characters); choose a path with "
            "--run-dir instead"
        )
    return v


PlainName = Annotated[str, AfterValidator(_plain_name)]


def _finite(value: Any, key: str = "") -> None:
    """Raise on a non-finite float anywhere in a free mapping (method options, timm kwargs)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key or 'value'} must be a finite number (got {value})")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{key}[{i}]")


class Section(BaseModel):
    """Base of every recipe section: strict about unknown keys, validated on assignment, numbers finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- data


class SyntheticConfig(Section):
    """Built-in synthetic infrared scenes (`sslrecipe data synth`): no download needed."""

    images: int = Field(120, ge=1, description="Number of images to generate.")
    width: int = Field(320, ge=32, description="Image width in pixels.")
    height: int = Field(256, ge=32, description="Image height in pixels.")
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX, description="Generator seed; null = the recipe's `seed`.")
    objects_per_image: tuple[int, int] = Field(
        (3, 12), description="Inclusive range [min, max] of objects placed in each image."
    )
    bit_depth: Literal[8, 16] = Field(8, description="Bits per pixel of the written PNGs (16 = raw-like thermal).")

    @field_validator("objects_per_image")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError("must be [min, max] with 0 <= min <= max")
        return v


class UnlabeledSynthetic(Section):
    """An unlabeled pool made by the synthetic generator (its labels are discarded)."""

    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Generator settings.")


class LabeledSource(Section):
    """One labeled set: an annotation file (or YOLO dataset YAML / VOC folder) and its images."""

    annotations: str = Field(..., description="Annotation file or dataset folder.")
    images: Optional[str] = Field(None, description="Image folder; null = `data.images`, else next to the annotations.")
    format: DataFormat = Field("auto", description="Annotation format; `auto` detects it from the file.")


class NormalizeConfig(Section):
    """Intensity normalization of the images (thermal 16-bit data is not clipped to 8 bits blindly)."""

    mode: Literal["auto", "none", "dataset", "fixed"] = Field(
        "auto",
        description="auto: dataset statistics when most images are 16-bit or float, else none; dataset: per-dataset "
        "percentiles computed once and cached; fixed: the `low`/`high` given here; none: bit-depth scaling only.",
    )
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="`dataset`: the intensity percentiles mapped to 0 and 1.")
    low: Optional[list[float]] = Field(None, description="`fixed`: per-channel (or one) value mapped to 0, in the files' own counts.")
    high: Optional[list[float]] = Field(None, description="`fixed`: per-channel (or one) value mapped to 1, in the files' own counts.")
    scale: float = Field(65535, gt=0, description="`fixed`: the files' full-scale count (65535 for 16-bit).")
    max_images: Optional[int] = Field(1000, ge=1, description="`dataset`: at most this many images are read for the statistics.")

    @model_validator(mode="after")
    def _fixed_needs_range(self) -> "NormalizeConfig":
        if self.mode == "fixed" and (self.low is None or self.high is None):
            raise ValueError("data.normalize.mode is 'fixed' but low/high are not both set")
        return self


class DataConfig(Section):
    """Where the images come from: an unlabeled pool for pre-training and labeled sets for fine-tuning."""

    unlabeled: Union[str, UnlabeledSynthetic, None] = Field(
        None,
        description="Unlabeled pool for pre-training: a folder of images (searched recursively; "
        "jpg/png/tif/tiff/bmp, 8/16-bit, 1 or 3 channels) and/or videos (mp4/avi/mov/mkv/..., read with PyAV: the "
        "`video` extra), a single video file, or `{synthetic: {...}}`. null = the training images without their labels.",
    )
    video_stride: int = Field(
        30, ge=1, description="Videos in `unlabeled`: every N-th frame enters the pool (30 = one a second at 30 fps); "
        "the frames are stored as PNG in the data stage's folder. Set `dedup` to drop near-duplicate frames.",
    )
    train: Union[str, LabeledSource, None] = Field(None, description="Labeled training set (path or {annotations, images, format}).")
    val: Union[str, LabeledSource, None] = Field(None, description="Labeled validation set.")
    test: Union[str, LabeledSource, None] = Field(None, description="Labeled test set.")
    images: Optional[str] = Field(None, description="Default image root for labeled sets given as a bare path.")
    format: DataFormat = Field("auto", description="Default annotation format for bare paths.")
    shots: Optional[int] = Field(
        None, ge=1, description="Use only this many labeled training images (seeded; every class kept where possible). null = all."
    )
    shots_seed: Optional[int] = Field(
        None, ge=0, le=SEED_MAX, description="Seed that picks the `shots` images; null = the recipe's `seed`. Only the few-shot "
        "subset depends on it (pre-training is reused): a matrix axis over it resamples the labeled subset."
    )
    split: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2),
        description="train/val/test fractions for splitting `train` when neither val nor test is given, or `synthetic` "
        "over the splits not given (the fractions of those scaled to sum to 1); the survey's 60:20:20.",
    )
    synthetic: Optional[SyntheticConfig] = Field(
        None, description="Built-in labeled synthetic IR data, used when `train` is null: it fills train and whichever of "
        "val/test is not given (a given set always wins), split by `split`."
    )
    skip_invalid: bool = Field(
        False, description="Drop invalid labeled images/boxes with a warning instead of stopping the run."
    )
    dedup: Union[bool, int] = Field(
        False,
        description="Remove near-duplicate frames from the pre-training pool: true = perceptual-hash distance <= 8 "
        "of 63 bits, or the distance to use; the first frame of each group (path order) is kept.",
    )
    allow_leakage: bool = Field(
        False,
        description="Continue when the pre-training pool holds copies (exact, re-encoded or resized) of val/test "
        "images; by default the run stops and lists them.",
    )
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="Intensity normalization.")

    @field_validator("dedup")
    @classmethod
    def _dedup_range(cls, v: Union[bool, int]) -> Union[bool, int]:
        if not isinstance(v, bool) and not 0 <= v <= 63:
            raise ValueError("must be true/false or a hash distance from 0 to 63")
        return v

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError("must be three non-negative fractions [train, val, test] summing to 1, train > 0")
        return v


# --------------------------------------------------------------------------- model and weights


class BackboneConfig(Section):
    """The encoder: any timm model name."""

    name: str = Field("resnet18", description="timm model name, e.g. resnet18, resnet50, vit_small_patch16_224.")
    in_chans: int = Field(3, ge=1, description="Input channels (1 for single-band thermal; the first layer is adapted as timm does).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for timm.create_model.")

    @field_validator("kwargs")
    @classmethod
    def _finite_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        _finite(v)
        return v


class WeightsConfig(Section):
    """Where the encoder's initial weights come from."""

    source: Literal["scratch", "pretrain", "fetch", "file"] = Field(
        "scratch",
        description="scratch: random init; pretrain: SSL pre-training in this run (`pretrain:`); "
        "fetch: a public checkpoint (`id`); file: a local checkpoint (`path`).",
    )
    id: Optional[str] = Field(None, description="Catalogue name, URL or hf://REPO/FILE[@REV] for `source: fetch`.")
    path: Optional[str] = Field(None, description="Local checkpoint for `source: file` (safetensors, or a weights-only torch file).")
    sha256: Optional[str] = Field(None, description="Expected SHA-256 of the fetched/loaded file.")
    format: Optional[str] = Field(None, description="Checkpoint layout for conversion (dino, mae, timm, ...); null = detect.")

    @model_validator(mode="after")
    def _needs_reference(self) -> "WeightsConfig":
        if self.source == "fetch" and not self.id:
            raise ValueError("weights.source is 'fetch' but weights.id is not set (a catalogue name, URL or hf:// path)")
        if self.source == "file" and not self.path:
            raise ValueError("weights.source is 'file' but weights.path is not set")
        return self


class OptimConfig(Section):
    """Optimizer and schedule keys shared by pre-training and fine-tuning."""

    optimizer: Literal["adamw", "sgd", "lamb"] = Field("adamw", description="Optimizer.")
    lr: Optional[float] = Field(None, gt=0, description="Peak learning rate; null = `blr` x batch_size / 256 (linear scaling rule).")
    blr: float = Field(1e-4, gt=0, description="Base learning rate per 256 images, used when `lr` is null.")
    weight_decay: float = Field(0.05, ge=0, description="Weight decay (not applied to biases and norm parameters).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/LAMB betas, each in [0, 1).")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Linear warmup steps; null = `warmup_fraction` of training.")
    warmup_fraction: float = Field(0.05, ge=0, le=1, description="Warmup length as a fraction of all steps when `warmup_steps` is null.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of the peak lr.")
    milestones: tuple[float, ...] = Field((0.75, 11 / 12), description="`step` schedule: decay points as fractions of training.")
    gamma: float = Field(0.2, gt=0, description="`step` schedule: lr multiplier at each milestone (the survey's x0.2).")
    clip_grad: Optional[float] = Field(None, gt=0, description="Clip the gradient norm to this value; null = no clipping.")
    accumulate: int = Field(1, ge=1, description="Gradient accumulation: optimizer step every N batches.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1), e.g. [0.9, 0.999]")
        return v

    def peak_lr(self, batch_size: int) -> float:
        return self.lr if self.lr is not None else self.blr * batch_size * self.accumulate / 256


class PretrainConfig(OptimConfig):
    """SSL pre-training of the backbone on the unlabeled pool (used when `weights.source: pretrain`)."""

    method: Optional[str] = Field(None, description="SSL method: mae, spark, dino, resim, leopart, hybrid.")
    epochs: Optional[int] = Field(None, ge=1, description="Epochs over the unlabeled pool (or give `steps`).")
    steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; overrides `epochs`.")
    batch_size: int = Field(64, ge=1, description="Images per batch (global).")
    img_size: int = Field(224, ge=16, description="Pre-training crop size in pixels.")
    blr: float = Field(1.5e-4, gt=0, description="Base learning rate per 256 images.")
    init: Optional[WeightsConfig] = Field(None, description="Start from these weights instead of random init (e.g. continue public MAE weights).")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Method-specific keys, one mapping per method name (e.g. `options: {mae: {mask_ratio: 0.75}}`); "
        "each method validates its own keys.",
    )
    first: Optional["PretrainConfig"] = Field(
        None,
        description="An earlier pre-training in this run (its own stage, `pretrain_first`) whose encoder this one starts "
        "from, e.g. `first: {method: dino, epochs: 100}` before `method: leopart`. Same keys as `pretrain`; one level.",
    )

    @field_validator("options")
    @classmethod
    def _finite_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        _finite(v)
        return v

    @model_validator(mode="after")
    def _length(self) -> "PretrainConfig":
        if self.epochs is None and self.steps is None:
            self.epochs = 100
        if self.first is not None:
            if self.first.first is not None:
                raise ValueError("pretrain.first.first: only one earlier pre-training is supported; chain at most two")
            if self.init is not None:
                raise ValueError(
                    "pretrain.init and pretrain.first are both set: pretrain starts from pretrain.first's encoder; "
                    "to start pretrain.first from a checkpoint, move the init there (pretrain.first.init)"
                )
            if not self.first.method:
                raise ValueError("pretrain.first.method is not set (e.g. dino before leopart)")
        return self


class FinetuneConfig(OptimConfig):
    """Detector fine-tuning on the labeled training set."""

    detector: Literal["faster_rcnn", "mask_rcnn", "yolo"] = Field("faster_rcnn", description="Detector architecture.")
    seed: Optional[int] = Field(
        None, ge=0, le=SEED_MAX, description="Seed of fine-tuning alone (detector head init, data order, augmentation); null = the "
        "recipe's `seed`. Changing it reruns fine-tuning only, on the same pre-training and labeled subset (`matrix.seeds`)."
    )
    epochs: Optional[int] = Field(12, ge=1, description="Epochs over the (few-shot) training set.")
    steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; overrides `epochs`.")
    batch_size: int = Field(8, ge=1, description="Images per batch (global).")
    img_size: Optional[int] = Field(
        None, ge=32, description="Longest image side fed to the detector (images are resized so this side matches; small "
        "objects grow with it). null = from the training boxes: the images' median longest side (tiles: the tile), grown "
        "up to 2x until the 10th-percentile object is 8 px, a multiple of 32 (recorded in the finetune stage's done.json)."
    )
    schedule: Literal["auto", "cosine", "step", "constant"] = Field(
        "auto", description="auto = the survey's: CNNs step x0.2 at 3/4 and 11/12 of training, ViTs cosine."
    )
    blr: float = Field(1e-4 * 256 / 16, gt=0, description="Base learning rate per 256 images (AdamW 1e-4 at batch 16).")
    layer_decay: Optional[float] = Field(
        None, gt=0, le=1,
        description="Layer-wise lr decay: encoder layer i of L trains at lr x layer_decay^(L+1-i) (heads and pyramid "
        "at lr). null = 0.7 for ViTs (ViTDet), none for CNNs; 1 = off.",
    )
    mask_channels: Optional[int] = Field(None, ge=8, description="mask_rcnn: mask head width; null = fpn_channels.")
    train_tile_size: Optional[int] = Field(
        None, ge=32, description="Train on overlapping crops of this many pixels instead of whole images (small objects "
        "in large images); null = whole images."
    )
    yolo_width: int = Field(64, ge=8, description="yolo: base channel width of the neck on the ResNet backbone.")
    weight_decay: float = Field(0.1, ge=0, description="Weight decay.")
    anchor_sizes: Optional[tuple[int, ...]] = Field(
        None, description="One anchor size per FPN level in pixels; null = chosen from the training boxes' sizes."
    )
    trainable_stages: Optional[int] = Field(
        None, ge=0, description="Train only the last N backbone stages; null = all (the SSL-transfer protocol)."
    )
    norm: Literal["bn", "frozen_bn"] = Field("bn", description="Backbone BatchNorm: trainable (SSL transfer) or frozen.")
    hflip: bool = Field(True, description="Random horizontal flip augmentation.")
    max_detections: int = Field(300, ge=1, description="Detections kept per image (dense small-object scenes exceed 100).")
    fpn_channels: int = Field(256, ge=8, description="FPN width (torchvision's 256; 128 is much cheaper on CPU).")
    rois_per_image: int = Field(512, ge=8, description="RoIs sampled per image for the box head in training (torchvision's 512).")


class TilingConfig(Section):
    """Sliced inference for small objects in large images: tiles with overlap plus a full-image pass, merged by NMS."""

    enabled: bool = Field(False, description="Also evaluate with sliced inference; every metric appears again under tiled/.")
    tile_size: int = Field(320, ge=32, description="Tile side in pixels (each tile is resized to finetune.img_size).")
    overlap: float = Field(0.2, ge=0, lt=1, description="Overlap of neighbouring tiles, as a fraction of the tile.")
    full_image: bool = Field(True, description="Add the whole-image pass (keeps large objects that tiles cut).")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="NMS IoU for merging tile and full-image detections.")
    class_agnostic: bool = Field(False, description="Merge across classes (default: per class).")


class EvaluateConfig(Section):
    """Evaluation of the fine-tuned detector."""

    split: Literal["val", "test"] = Field("test", description="Which labeled set to evaluate on.")
    max_dets: int = Field(100, ge=1, description="COCO maxDets used for AP (100 is COCO's; raise it for dense scenes).")
    batch_size: int = Field(8, ge=1, description="Images per inference batch.")
    score_threshold: float = Field(0.05, ge=0, le=1, description="Detections below this score are dropped before evaluation.")
    tiling: TilingConfig = Field(default_factory=TilingConfig, description="Sliced inference, reported beside the whole-image pass.")


class ReportConfig(Section):
    """The run report (`RUN/report.md`)."""

    images: int = Field(4, ge=0, description="Test images drawn with their detections.")
    score_threshold: float = Field(0.5, ge=0, le=1, description="Detections drawn on the report images.")
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers that mirror the progress and metric events: tensorboard "
        "(RUN/tensorboard/), mlflow (MLFLOW_TRACKING_URI, else RUN/mlruns/). Each needs its extra: "
        "pip install 'sslrecipe[tensorboard]' / 'sslrecipe[mlflow]'. Not part of any stage hash.")


class RuntimeConfig(Section):
    """Where and how to compute."""

    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto = cuda when available, else mps (Apple GPUs), else cpu.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Autocast precision; auto = bf16 on a GPU that has it, else fp32.")
    workers: Optional[int] = Field(None, ge=0, le=64, description="Data-loading worker processes; null = chosen with `threads` from the usable cores (none on a CPU below 4 cores).")
    threads: Optional[int] = Field(None, ge=1, le=1024, description="CPU threads for torch; null = an exported OMP_NUM_THREADS (torchrun sets one), else this process's share of the usable cores (affinity and cgroup quota).")
    omp_wait_policy: Literal["auto", "passive", "active"] = Field("auto", description="OpenMP's wait policy (read once, when torch loads): passive idle threads sleep, active ones spin. auto = an exported OMP_WAIT_POLICY, else passive; active only on a machine dedicated to this run.")
    checkpoint_every: int = Field(50, ge=1, description="Write a resumable checkpoint every N optimizer steps (and at each stage end).")
    progress: Literal["auto", "rich", "plain"] = Field("auto", description="Progress display: rich bar on a terminal, plain lines otherwise.")


class MatrixArm(Section):
    """One named variant of the recipe."""

    name: PlainName = Field(..., description="Arm name (used in the run directory and the comparison table); a plain name, unique among the arms.")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted-key overrides for this arm, as with --set.")


class MatrixConfig(Section):
    """Several runs from one recipe (methods x backbones x shots x seeds) compared in one table."""

    axes: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values; the cartesian product makes the cells.")
    arms: list[MatrixArm] = Field(default_factory=list, description="Named variants, each crossed with `axes` (e.g. the advised method and its baseline).")
    seeds: int = Field(
        1, ge=1, le=100, description="Repeat each cell's fine-tuning with this many seeds (`finetune.seed` = its seed, "
        "+1, ...) on the same pre-training and labeled subset; the comparison shows mean ± std."
    )
    baseline: Optional[str] = Field(
        None, description="Arm the comparison's deltas are taken against; null = the arm whose name starts with "
        "'baseline' when there is exactly one."
    )


class Recipe(Section):
    """A complete sslrecipe run: data -> [pretrain] -> weights -> finetune -> evaluate -> report."""

    version: int = Field(
        RECIPE_VERSION, ge=1, description="The recipe format this recipe is written for; omitted = the current one "
        f"({RECIPE_VERSION}). A recipe for a newer format is refused (upgrade sslrecipe); it enters no stage hash."
    )
    name: PlainName = Field(
        "run", description="Run name; the default run dir is runs/<name>-<timestamp>. A plain name (no '/' or '..'): "
        "`--run-dir` chooses another place."
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed for sampling, augmentation, initialisation and the synthetic generator (0 to 2^32-1).")
    extends: Union[str, list[str], None] = Field(
        None, description="Base recipe(s) deep-merged under this one (paths relative to this file); written in a recipe "
        "file only (`--set extends=...` is an error: the bases are merged as the file is read)."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets.")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="Encoder.")
    weights: WeightsConfig = Field(default_factory=WeightsConfig, description="Initial encoder weights.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="SSL pre-training (weights.source: pretrain).")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Detector fine-tuning.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Report.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Device, precision, workers, checkpoints.")
    matrix: Optional[MatrixConfig] = Field(None, description="Run a grid of variants of this recipe and compare them.")

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        # a newer format may mean keys this sslrecipe reads differently: refuse it rather than misread it
        if v > RECIPE_VERSION:
            raise ValueError(f"this recipe is written for a newer sslrecipe (recipe format {v}; this sslrecipe "
                             f"reads formats up to {RECIPE_VERSION}): upgrade sslrecipe (pip install -U sslrecipe)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.weights.source == "pretrain" and not self.pretrain.method:
            raise ValueError("weights.source is 'pretrain' but pretrain.method is not set (e.g. mae, spark, dino, resim, leopart)")
        if self.data.train is None and self.data.synthetic is None:
            raise ValueError("no labeled data: set data.train (a path or {annotations, images}) or data.synthetic")
        return self
