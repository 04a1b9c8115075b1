"""YOLO (optional extra): the SSL encoder's weights are really in the model that Ultralytics trains.

Ultralytics rebuilds the model when training starts, so weights loaded by hand into ``YOLO("x.yaml")``
are silently dropped (ultralytics #8811, #17520). These tests look at the model from inside the trainer
(``on_train_start``): through sslrecipe's checkpoint route it holds the encoder's tensors; the naive route
(the control) does not.
"""

import numpy as np
import pytest
import torch
from PIL import Image

ultralytics = pytest.importorskip(
    "ultralytics", reason="Ultralytics is the optional extra `yolo` (pip install 'sslrecipe[yolo]'); not installed here"
)

from sslrecipe.detect import yolo  # noqa: E402
from sslrecipe.evaluate.coco_eval import evaluate_detections  # noqa: E402
from sslrecipe.models.backbone import create_backbone  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(root):
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    images, anns = [], []
    for i in range(2):
        a = (rng.random((64, 64)) * 50).astype(np.uint8)
        a[20:30, 20:34] = 230
        Image.fromarray(a).convert("RGB").save(root / "img" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": 64, "height": 64})
        anns.append({"id": i + 1, "image_id": 10 + i, "category_id": 3, "bbox": [20, 20, 14, 10], "area": 140, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "car"}]}


def _encoder():
    enc = create_backbone("resnet18", in_chans=1)
    with torch.no_grad():  # recognisable weights, far from any initialisation
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + 0.05)
        enc.bn1.running_mean.fill_(0.3)
    return enc


class Stop(Exception):
    pass


def _stop(trainer):
    raise Stop  # only the model at the start of training matters


def test_ssl_backbone_weights_are_in_the_model_that_trains(tmp_path):
    coco = _data(tmp_path)
    enc = _encoder()
    ckpt = yolo.write_checkpoint(1, tmp_path / "init.pt", "resnet18", enc.state_dict(), width=8, names=["car"])
    data = yolo.export_dataset((coco, tmp_path / "img"), None, tmp_path / "yolo")
    trained = {}
    with pytest.raises(Stop):
        yolo.train_yolo(ckpt, data, tmp_path / "runs", epochs=1, imgsz=64, batch=2, record_into=trained,
                        callbacks={"on_train_start": _stop})
    expected = yolo.encoder_to_yolo_state(enc.state_dict())
    assert len(expected) > 100 and set(expected) <= set(trained)
    for k, v in expected.items():
        assert torch.equal(trained[k].float(), v.float()), k
    # the 1-channel first convolution was spread over Ultralytics' 3 input channels
    assert torch.allclose(trained["model.0.m.0.weight"].sum(1, keepdim=True), enc.conv1.weight)


def test_finetune_yolo_stage_end_to_end(tmp_path):
    from sslrecipe.models.backbone import export_encoder

    coco = _data(tmp_path)
    enc = _encoder()
    export_encoder(enc, tmp_path / "enc")
    spec = yolo.finetune_yolo(tmp_path / "ft", (coco, tmp_path / "img"), None, tmp_path / "enc", epochs=1,
                              img_size=64, batch_size=2, width=8)
    assert spec["backbone"] == "resnet18" and spec["backbone_verified"] == len(yolo.encoder_to_yolo_state(enc.state_dict()))
    model, spec2 = yolo.load_finetuned_yolo(tmp_path / "ft")
    assert spec2 == spec
    # predictions go through our own COCO evaluation (category ids of the ground truth)
    l2c = {int(k): v for k, v in spec["label_to_category"].items()}
    dets = yolo.predict_yolo(model, coco, tmp_path / "img", spec["img_size"], l2c, max_det=20)
    assert all(d["category_id"] == 3 and d["image_id"] in (10, 11) for d in dets)
    assert "bbox/mAP" in evaluate_detections(coco, dets)


def test_control_hand_loaded_weights_are_dropped_by_ultralytics(tmp_path):
    """The trap this module avoids: YOLO(yaml) + load_state_dict trains a rebuilt, random backbone."""
    import yaml
    from ultralytics import YOLO

    coco = _data(tmp_path)
    enc = _encoder()
    data = yolo.export_dataset((coco, tmp_path / "img"), None, tmp_path / "yolo")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump(yolo.model_yaml(1, "resnet18", width=8)))
    model = YOLO(str(cfg))
    expected = yolo.encoder_to_yolo_state(enc.state_dict())
    model.model.load_state_dict(expected, strict=False)
    assert torch.equal(model.model.state_dict()["model.0.m.0.weight"], expected["model.0.m.0.weight"])

    seen = {}

    def record(trainer):
        seen.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        raise Stop

    model.add_callback("on_train_start", record)
    with pytest.raises(Stop):
        model.train(data=str(data), epochs=1, imgsz=64, batch=2, device="cpu", workers=0, project=str(tmp_path / "r"),
                    val=False, plots=False, amp=False)
    assert not torch.equal(seen["model.0.m.0.weight"], expected["model.0.m.0.weight"])


def test_model_yaml_rejects_non_resnet_backbones():
    from sslrecipe.errors import SSLRecipeError

    with pytest.raises(SSLRecipeError, match="torchvision-compatible ResNets"):
        yolo.model_yaml(2, "convnext_tiny")
