"""Bring your own labeled set: convert it to COCO, check it, and look at its statistics before a run.

    python examples/02_bring_your_own_dataset.py [DATASET] [OUT_DIR]

DATASET is anything `sslrecipe data convert` reads: a YOLO dataset YAML or folder, a COCO JSON, a VOC
folder, a HIT-UAV JSON (the format is detected). Without one, the example makes a small 16-bit thermal
set in YOLO layout to stand for yours. The same steps on the command line: `sslrecipe data convert`,
`sslrecipe data check`, `sslrecipe data stats`.
"""

import json
import sys
from pathlib import Path

from sslrecipe.data.check import check_dataset
from sslrecipe.data.formats import convert, load_labeled, write_yolo
from sslrecipe.data.stats import dataset_stats
from sslrecipe.data.synth import generate_synthetic

args = [a for a in sys.argv[1:] if not a.startswith("--")]
out = Path(args[1] if len(args) > 1 else "runs/example-dataset")
out.mkdir(parents=True, exist_ok=True)

if args:
    dataset = Path(args[0])
else:  # a stand-in for your data: 16-bit single-band frames with YOLO labels
    coco_file = generate_synthetic(out / "synthetic", images=12, width=160, height=128, seed=1, bit_depth=16)
    coco, root = load_labeled(coco_file)
    write_yolo(coco, root, out / "yolo", split="train")
    dataset = out / "yolo" / "data.yaml"

# 1. convert to COCO (file names stay relative to the image folder, recorded in the JSON)
summary = convert(dataset, out / "train.json", to="coco")
print(f"converted {dataset} ({summary['from']}) -> {out / 'train.json'}: {summary['images']} images")

# 2. check: every broken image or box, each naming its file (an empty list = clean)
problems = check_dataset(out / "train.json")
print(f"check: {len(problems)} problem(s)")
for p in problems[:20]:
    print(f"  {p}")

# 3. statistics: boxes per class, object sizes (COCO buckets), channels, bit depth
stats = dataset_stats(out / "train.json")
print(json.dumps({k: stats[k] for k in list(stats)[:12]}, indent=1, default=str))
print(f"use it in a recipe:  data: {{train: {out / 'train.json'}}}")
