"""Faster R-CNN on a timm encoder: losses, predictions, weight identity, BatchNorm protocol, predict()."""

import pytest
import torch
from safetensors.torch import load_file

from sslrecipe.detect.faster_rcnn import build_faster_rcnn, suggest_anchor_sizes
from sslrecipe.detect.predict import predict
from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.backbone import create_backbone, export_encoder, load_encoder

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test machine is shared: one intra-op thread avoids oversubscription (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# CPU-sized heads: the tests check wiring, not accuracy.
LIGHT = dict(
    fpn_channels=32,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
    box_batch_size_per_image=32,
    representation_size=64,
)
LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def _detector(in_chans=3, encoder=None, **kw):
    encoder = encoder if encoder is not None else create_backbone("resnet18", in_chans=in_chans)
    return build_faster_rcnn(encoder, num_classes=2, img_size=96, anchor_sizes=None, in_chans=in_chans, **LIGHT, **kw)


def _batch(in_chans):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(in_chans, 72, 96, generator=g), torch.rand(in_chans, 96, 80, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 30.0, 28.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[40.0, 50.0, 60.0, 90.0], [5.0, 5.0, 15.0, 13.0]]), "labels": torch.tensor([2, 1])},
    ]
    return images, targets


@pytest.mark.parametrize("in_chans", [1, 3])
def test_train_losses_and_eval_boxes_in_original_pixels(in_chans):
    model = _detector(in_chans)
    images, targets = _batch(in_chans)
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())

    model.eval()
    with torch.inference_mode():
        out = model(images)
    assert len(out) == 2
    for img, o in zip(images, out):
        assert set(o) == {"boxes", "labels", "scores"}
        assert o["boxes"].shape[1] == 4 and 0 < len(o["boxes"]) <= 300
        h, w = img.shape[1:]
        # boxes are mapped back from the 96-px network input to each image's own size
        assert float(o["boxes"][:, 2].max()) <= w + 1e-3 and float(o["boxes"][:, 3].max()) <= h + 1e-3
        assert set(o["labels"].tolist()) <= {1, 2}
    t = model.transform
    assert (t.min_size, t.max_size) == ((96,), 96)
    assert t.image_mean == [0.5] * in_chans and t.image_std == [0.25] * in_chans


def test_detector_uses_the_loaded_encoder_weights(tmp_path):
    src = create_backbone("resnet18", in_chans=1)
    with torch.no_grad():
        for p in src.parameters():
            p.mul_(1.5)
        src.bn1.running_mean.fill_(0.25)
    export_encoder(src, tmp_path)
    encoder, _ = load_encoder(tmp_path)
    model = _detector(1, encoder=encoder)
    assert model.backbone.body.encoder is encoder

    saved = load_file(str(tmp_path / "encoder.safetensors"))
    det_state = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(det_state["backbone.body.encoder." + k], v), k
    # building the detector (which probes feature shapes) did not touch BatchNorm statistics
    assert torch.equal(model.backbone.body.encoder.bn1.running_mean, torch.full((64,), 0.25))


def test_batchnorm_trainable_by_default_and_frozen_on_request():
    images, targets = _batch(3)

    model = _detector(3)
    enc = model.backbone.body.encoder
    before = enc.layer1[0].bn1.running_mean.clone()
    model.train()
    sum(model(images, targets).values()).backward()
    # (timm zero-initialises each block's last BN weight, so the layers before it see no gradient yet)
    bns = [enc.bn1, enc.layer1[0].bn2, enc.layer4[1].bn2]
    assert all(m.training for m in bns)
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in bns)
    assert not torch.equal(enc.layer1[0].bn1.running_mean, before)

    frozen = _detector(3, norm="frozen_bn")
    enc = frozen.backbone.body.encoder
    before = {k: v.clone() for k, v in enc.state_dict().items() if "bn" in k}
    frozen.train()
    sum(frozen(images, targets).values()).backward()
    for name, m in enc.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert not m.training, name
            assert not m.weight.requires_grad and m.weight.grad is None, name
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in before.items())
    assert enc.conv1.weight.grad is not None  # convolutions still train


def test_trainable_stages_freezes_all_but_the_last():
    model = _detector(3, trainable_stages=1)
    enc = model.backbone.body.encoder
    trainable = {n.split(".")[0] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    model.train()
    assert not enc.layer3[0].bn1.training and enc.layer4[0].bn1.training  # frozen stage keeps BN stats
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.roi_heads.parameters())
    none = _detector(3, trainable_stages=0)
    assert not any(p.requires_grad for p in none.backbone.body.encoder.parameters())


def test_anchor_sizes_and_max_detections_reach_torchvision():
    model = build_faster_rcnn(
        create_backbone("resnet18"), 3, 128, (6, 12, 24, 48, 96), 3, max_detections=17,
        image_mean=(0.4, 0.4, 0.4), image_std=(0.2, 0.2, 0.2), **LIGHT,
    )
    assert model.rpn.anchor_generator.sizes == ((6,), (12,), (24,), (48,), (96,))
    assert model.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert model.roi_heads.detections_per_img == 17
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.transform.image_mean == [0.4] * 3


def test_single_stride_non_vit_is_a_clear_error():
    class Flat(torch.nn.Module):  # timm-like metadata, every feature at stride 16, not a VisionTransformer
        feature_info = [{"reduction": 16, "module": "a", "num_chs": 8}, {"reduction": 16, "module": "b", "num_chs": 8}]

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 16, 16)
            self.b = torch.nn.Conv2d(8, 8, 1)

        def forward_intermediates(self, x, **kw):
            return [self.a(x), self.b(self.a(x))]

    with pytest.raises(SSLRecipeError, match="not a timm VisionTransformer.*supported: timm CNNs"):
        build_faster_rcnn(Flat(), 1, 64, None, 3)


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(SSLRecipeError, match="3-channel input but the data has 1"):
        build_faster_rcnn(create_backbone("resnet18", in_chans=3), 1, 64, None, in_chans=1)
    with pytest.raises(SSLRecipeError, match="unknown Faster R-CNN option.*representation"):
        build_faster_rcnn(create_backbone("resnet18"), 1, 64, None, 3, representation=64)


def test_suggest_anchor_sizes_from_resized_boxes():
    coco = {
        "images": [{"id": 1, "width": 200, "height": 100}, {"id": 2, "width": 100, "height": 400}],
        "annotations": (
            # image 1 scales by 2 (200 -> 400): 4x4 -> 8 px, 10x10 -> 20 px
            [{"id": i, "image_id": 1, "bbox": [0, 0, 4, 4], "category_id": 1} for i in range(50)]
            + [{"id": 100 + i, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1} for i in range(50)]
            # image 2 scales by 1: 60x60 -> 60 px; a crowd region is ignored
            + [{"id": 200, "image_id": 2, "bbox": [0, 0, 60, 60], "category_id": 1}]
            + [{"id": 201, "image_id": 2, "bbox": [0, 0, 300, 300], "category_id": 1, "iscrowd": 1}]
        ),
    }
    sizes = suggest_anchor_sizes(coco, img_size=400)
    assert len(sizes) == 5 and list(sizes) == sorted(set(sizes))
    assert sizes[0] == 8 and 20 <= sizes[-1] <= 60
    assert suggest_anchor_sizes({"images": [], "annotations": []}, 512) == (8, 16, 32, 64, 128)
    tiny = {"images": [{"id": 1, "width": 1000, "height": 1000}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 2, 2], "category_id": 1}]}
    assert suggest_anchor_sizes(tiny, 100, n_levels=3) == (4, 5, 6)


class _TinySet(torch.utils.data.Dataset):
    def __init__(self, in_chans):
        g = torch.Generator().manual_seed(3)
        self.items = [
            (torch.rand(in_chans, 64, 96, generator=g), {"image_id": 11, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}),
            (torch.rand(in_chans, 120, 60, generator=g), {"image_id": torch.tensor(12), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}),
            (torch.rand(in_chans, 80, 80, generator=g), {"image_id": 13, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}),
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_predict_returns_coco_results_with_original_ids():
    model = _detector(1, max_detections=5)
    model.train()
    results = predict(model, _TinySet(1), batch_size=2, device="cpu", score_threshold=0.0,
                      label_to_category={1: 7, 2: 42})
    assert model.training  # mode restored
    assert {r["image_id"] for r in results} == {11, 12, 13}
    assert {r["category_id"] for r in results} <= {7, 42}
    sizes = {11: (96, 64), 12: (60, 120), 13: (80, 80)}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        x, y, w, h = r["bbox"]
        W, H = sizes[r["image_id"]]
        assert all(isinstance(v, float) for v in r["bbox"]) and isinstance(r["score"], float)
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= W + 1e-2 and y + h <= H + 1e-2
    assert max(sum(r["image_id"] == i for r in results) for i in (11, 12, 13)) <= 5


def test_predict_applies_the_score_threshold():
    model = _detector(3, max_detections=20)
    one = torch.utils.data.Subset(_TinySet(3), [2])
    everything = predict(model, one, batch_size=1, device="cpu", score_threshold=0.0)
    assert {r["category_id"] for r in everything} <= {1, 2}  # no mapping: the model's labels
    scores = sorted(r["score"] for r in everything)
    cut = scores[len(scores) // 2]
    kept = predict(model, one, batch_size=1, device="cpu", score_threshold=cut)
    assert len(kept) == sum(s >= cut for s in scores) and all(r["score"] >= cut for r in kept)


def test_suggest_img_size_grows_for_tiny_objects():
    from sslrecipe.detect.faster_rcnn import suggest_img_size

    def coco(box_side, n=20):
        return {"images": [{"id": 1, "width": 640, "height": 512}],
                "annotations": [{"id": i, "image_id": 1, "bbox": [0, 0, box_side, box_side], "category_id": 1} for i in range(n)]}

    assert suggest_img_size(coco(20)) == 640  # objects already >= 8 px: native size
    assert suggest_img_size(coco(5)) == 1024  # 5 px objects: 8/5 = 1.6x -> 1024
    assert suggest_img_size(coco(2)) == 1280  # at most 2x
    assert suggest_img_size({"images": [], "annotations": []}) == 512


def test_sync_batchnorm_conversion_keeps_frozen_layers_frozen():
    from sslrecipe.detect.faster_rcnn import to_sync_batchnorm

    model = to_sync_batchnorm(_detector(3, trainable_stages=1))
    enc = model.backbone.body.encoder
    assert isinstance(enc.bn1, torch.nn.SyncBatchNorm) and isinstance(enc.layer4[0].bn1, torch.nn.SyncBatchNorm)
    model.train()
    assert not enc.layer3[0].bn1.training and not enc.layer3[0].bn1.weight.requires_grad
    assert enc.layer4[0].bn1.training and enc.layer4[0].bn1.weight.requires_grad
