"""ViT detectors (simple feature pyramid), layer-wise lr decay, the survey's schedules, Mask R-CNN."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from sslrecipe.detect.faster_rcnn import build_faster_rcnn, build_mask_rcnn, encoder_family
from sslrecipe.detect.masks import MaskDetectionDataset, require_masks
from sslrecipe.detect.predict import predict
from sslrecipe.detect.schedules import detector_param_groups, survey_schedule
from sslrecipe.detect.vit_pyramid import ViTFeatures
from sslrecipe.engine.schedules import build_optimizer, build_scheduler, lr_factor
from sslrecipe.errors import DataError
from sslrecipe.evaluate.coco_eval import evaluate_detections
from sslrecipe.models.backbone import create_backbone, export_encoder, load_encoder
from sslrecipe.recipe.schema import FinetuneConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LIGHT = dict(fpn_channels=32, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
             rpn_post_nms_top_n_test=50, box_batch_size_per_image=32, representation_size=64)
TINY_VIT = dict(depth=3, embed_dim=64, num_heads=2)


def _vit(in_chans=1, **kw):
    return create_backbone("vit_tiny_patch16_224", in_chans=in_chans, **{**TINY_VIT, **kw})


def _batch(in_chans=1):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(in_chans, 72, 96, generator=g), torch.rand(in_chans, 96, 80, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 30.0, 28.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[40.0, 50.0, 60.0, 90.0], [5.0, 5.0, 15.0, 13.0]]), "labels": torch.tensor([2, 1])},
    ]
    return images, targets


def test_vit_faster_rcnn_trains_and_predicts_in_original_pixels():
    enc = _vit()
    assert encoder_family(enc) == "vit" and encoder_family(create_backbone("resnet18")) == "cnn"
    model = build_faster_rcnn(enc, 2, 96, None, 1, **LIGHT)
    feats = model.backbone(torch.rand(1, 1, 128, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {
        "0": (32, 24), "1": (16, 12), "2": (8, 6), "3": (4, 3), "pool": (2, 2)}
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    # gradients reach the first layers of the ViT (patch embedding and position embedding)
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0 and enc.pos_embed.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        out = model(images)
    for img, o in zip(images, out):
        h, w = img.shape[1:]
        assert len(o["boxes"]) > 0
        assert float(o["boxes"][:, 2].max()) <= w + 1e-3 and float(o["boxes"][:, 3].max()) <= h + 1e-3


def test_vit_features_equal_timm_with_interpolated_position_embedding():
    enc = _vit(in_chans=3)
    with torch.no_grad():
        enc.pos_embed.normal_(0, 0.5)  # a non-trivial embedding, so that interpolation matters
    enc.eval()
    body = ViTFeatures(enc)
    # timm's own dynamic-size ViT with the same weights is the reference
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **TINY_VIT)
    ref.load_state_dict(enc.state_dict())
    ref.eval()
    for h, w in ((224, 224), (160, 96), (64, 112)):
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            ours = body(x)
            tokens = ref.forward_features(x)[:, ref.num_prefix_tokens:]
        expected = tokens.transpose(1, 2).reshape(1, 64, h // 16, w // 16)
        assert ours.shape == expected.shape
        assert torch.allclose(ours, expected, atol=1e-5), (h, w)
    with torch.no_grad():  # an input that is not a multiple of the patch is zero-padded to one
        assert body(torch.rand(1, 3, 70, 90)).shape[-2:] == (5, 6)


def test_patch14_vit_is_resampled_to_the_stride16_grid():
    model = build_faster_rcnn(_vit(patch_size=14), 1, 96, None, 1, **LIGHT)
    feats = model.backbone(torch.rand(1, 1, 96, 128))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]


def test_vit_detector_holds_the_loaded_encoder_weights(tmp_path):
    src = _vit()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    export_encoder(src, tmp_path)
    enc, _ = load_encoder(tmp_path)
    model = build_faster_rcnn(enc, 2, 64, None, 1, **LIGHT)
    assert model.backbone.body.encoder is enc
    state = model.state_dict()
    for k, v in load_file(str(tmp_path / "encoder.safetensors")).items():
        assert torch.equal(state["backbone.body.encoder." + k], v), k


def test_vit_trainable_stages_are_the_last_blocks():
    model = build_faster_rcnn(_vit(), 1, 64, None, 1, trainable_stages=1, **LIGHT)
    enc = model.backbone.body.encoder
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.2.", "norm.")) for n in trainable)
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    frozen = build_faster_rcnn(_vit(), 1, 64, None, 1, trainable_stages=0, **LIGHT)
    assert not any(p.requires_grad for p in frozen.backbone.body.encoder.parameters())


def test_layer_wise_lr_decay_groups_and_schedule():
    model = build_faster_rcnn(_vit(), 2, 64, None, 1, **LIGHT)
    groups = detector_param_groups(model, weight_decay=0.1, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    enc = model.backbone.body.encoder  # 3 blocks: embeddings 0.5^4, block i 0.5^(3-i), final norm 1
    assert scale_of[id(enc.pos_embed)] == 0.5 ** 4 and decay_of[id(enc.pos_embed)] == 0.0
    assert scale_of[id(enc.patch_embed.proj.weight)] == 0.5 ** 4 and decay_of[id(enc.patch_embed.proj.weight)] == 0.1
    for i in range(3):
        assert scale_of[id(enc.blocks[i].attn.qkv.weight)] == 0.5 ** (3 - i)
    assert scale_of[id(enc.norm.weight)] == 1.0 and decay_of[id(enc.norm.weight)] == 0.0
    assert scale_of[id(model.roi_heads.box_predictor.cls_score.weight)] == 1.0
    assert groups[0]["lr_scale"] == 1.0  # the logged lr is the heads' lr

    cfg = FinetuneConfig(lr=1e-3, warmup_steps=0, **{k: v for k, v in survey_schedule("vit").items() if k != "layer_decay"})
    opt = build_optimizer(groups, cfg, cfg.peak_lr(8))
    sched = build_scheduler(opt, 100, cfg)
    for _ in range(60):
        opt.step()
        sched.step()
    for g in opt.param_groups:  # cosine at 60 % of training, ratios between layers kept
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"] * lr_factor(60, 100, cfg))

    cnn = build_faster_rcnn(create_backbone("resnet18"), 2, 64, None, 3, **LIGHT)
    plain = detector_param_groups(cnn, 0.1)
    assert {g["lr_scale"] for g in plain} == {1.0} and len(plain) == 2
    staged = detector_param_groups(cnn, 0.1, layer_decay=0.5)
    body = cnn.backbone.body.encoder
    by_id = {id(p): g["lr_scale"] for g in staged for p in g["params"]}
    assert by_id[id(body.conv1.weight)] == 0.5 ** 5 and by_id[id(body.layer4[0].conv1.weight)] == 0.5


def test_survey_step_schedule_decays_by_0_2_at_three_quarters_and_eleven_twelfths():
    cfg = FinetuneConfig(lr=1e-3, warmup_steps=0, **{k: v for k, v in survey_schedule("cnn").items() if k != "layer_decay"})
    total = 360
    assert lr_factor(269, total, cfg) == 1.0
    assert lr_factor(270, total, cfg) == pytest.approx(0.2)  # epoch 27 of 36
    assert lr_factor(329, total, cfg) == pytest.approx(0.2)
    assert lr_factor(330, total, cfg) == pytest.approx(0.04)  # epoch 33 of 36
    assert FinetuneConfig(blr=1e-4, batch_size=64).peak_lr(64) == pytest.approx(1e-4 * 64 / 256)  # linear scaling


# ----------------------------------------------------------------------------------------- Mask R-CNN


def _mask_data(tmp_path):
    """Two 64x80 images, each with a triangle (polygon) and a square (RLE) object."""
    from pycocotools import mask as mask_utils

    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in (1, 2):
        arr = (rng.random((64, 80)) * 60).astype(np.uint8)
        arr[10:40, 10:40] = 220
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 80, "height": 64})
        anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 5, "bbox": [10, 10, 30, 30],
                     "segmentation": [[10, 10, 40, 10, 10, 40]], "area": 450, "iscrowd": 0})
        m = np.zeros((64, 80), dtype=np.uint8, order="F")
        m[45:60, 50:75] = 1
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 7, "bbox": [50, 45, 25, 15],
                     "segmentation": rle, "area": 375, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": 5, "name": "a"}, {"id": 7, "name": "b"}]}


def test_mask_targets_follow_boxes_through_flips(tmp_path):
    coco = _mask_data(tmp_path)
    ds = MaskDetectionDataset(coco, tmp_path, 1, train=True, hflip=True, seed=0)
    flips = set()
    for seed in range(8):
        image, target = ds[(0, seed)]
        masks = target["masks"]
        assert masks.shape == (2, 64, 80) and masks.dtype == torch.uint8
        for box, m in zip(target["boxes"], masks):
            ys, xs = torch.nonzero(m, as_tuple=True)
            got = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(got, box, atol=1.0), (seed, got, box)
        flips.add(bool(target["boxes"][0, 0] > 30))
    assert flips == {True, False}  # both flipped and unflipped samples were checked


def test_mask_rcnn_needs_masks_in_the_data():
    box_only = {"images": [{"id": 1, "file_name": "x.png", "width": 10, "height": 10}],
                "categories": [{"id": 1, "name": "a"}],
                "annotations": [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]}
    with pytest.raises(DataError, match="mask_rcnn.*1 of 1 training annotations have no 'segmentation'.*faster_rcnn"):
        require_masks(box_only)


@pytest.mark.parametrize("backbone", ["resnet18", "vit"])
def test_mask_rcnn_trains_predicts_rle_and_evaluates_masks(tmp_path, backbone):
    coco = _mask_data(tmp_path)
    enc = _vit() if backbone == "vit" else create_backbone("resnet18", in_chans=1)
    model = build_mask_rcnn(enc, 2, 64, (8, 12, 16, 24, 32), 1, mask_channels=16, **LIGHT)
    ds = MaskDetectionDataset(coco, tmp_path, 1, train=True, seed=0)
    images, targets = zip(*(ds[i] for i in range(2)))
    model.train()
    losses = model(list(images), list(targets))
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
    sum(losses.values()).backward()

    test = MaskDetectionDataset(coco, tmp_path, 1, train=False)
    dets = predict(model, test, 2, "cpu", score_threshold=0.0, label_to_category=test.label_to_category)
    assert dets and all(set(d) == {"image_id", "category_id", "bbox", "score", "segmentation"} for d in dets)
    assert all(d["segmentation"]["size"] == [64, 80] for d in dets)
    json.dumps(dets)  # RLE counts are text: the results file is valid JSON
    m = evaluate_detections(coco, dets)
    assert {"segm/mAP", "segm/AP50", "segm/AP_small"} <= set(m) and m["segm/mAP"] is not None
