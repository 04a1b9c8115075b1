"""Settings that shrink the examples to a few seconds on a CPU (`--tiny`, or SSLRECIPE_EXAMPLES_TINY=1): the
test suite runs every example this way. Not needed to read the examples."""

import os
import sys

TINY_SETS = [
    "backbone.name=resnet18",
    "data.synthetic={images: 16, width: 128, height: 96, objects_per_image: [2, 4]}",
    "data.shots=6",
    "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.img_size=64",
    "finetune.steps=2", "finetune.batch_size=2", "finetune.img_size=128", "finetune.fpn_channels=32",
    "finetune.rois_per_image=32", "evaluate.batch_size=4", "report.images=1",
    "runtime={device: cpu, workers: 0, checkpoint_every: 2, progress: plain}",
]


def tiny() -> bool:
    return "--tiny" in sys.argv or os.environ.get("SSLRECIPE_EXAMPLES_TINY") == "1"
