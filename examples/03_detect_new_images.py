"""Load the detector a run fine-tuned and detect objects on new images.

    python examples/03_detect_new_images.py RUN_DIR [IMAGE_OR_FOLDER ...]

RUN_DIR is a finished run (or a matrix cell: RUN/<cell>). Without images, the run's own test images are
used. Each image is read and scaled exactly as in training (the run's data normalization, e.g. the 16-bit
percentiles), and the detections (boxes in the image's pixels) are printed and written to
RUN_DIR/detections_new.json. (A later `sslrecipe predict` command will do this from the command line.)
"""

import json
import sys
from pathlib import Path

import torch

from sslrecipe.data.images import list_images, read_normalized, to_channels
from sslrecipe.engine.events import read_events
from sslrecipe.engine.stages import load_finetuned

args = [a for a in sys.argv[1:] if not a.startswith("--")]
if not args:
    sys.exit(__doc__)
run_dir = Path(args[0])

# where the run's stages are (a matrix cell's may be shared with other cells): its events say
stages = {e["stage"]: Path(e["dir"]) for e in read_events(run_dir / "events.jsonl")
          if e["event"] in ("stage_end", "stage_cached")}
if "finetune" not in stages:
    sys.exit(f"{run_dir} has no finished fine-tuning yet")
manifest = json.loads((stages["data"] / "data.json").read_text())
names = {c["id"]: c["name"] for c in manifest["categories"]}

model, spec = load_finetuned(stages["finetune"])
model.eval()
label_to_category = {int(k): v for k, v in spec["label_to_category"].items()}

if len(args) > 1:
    images = [p for a in args[1:] for p in (list_images(a) if Path(a).is_dir() else [Path(a)])]
else:  # the run's test images
    test = manifest["splits"]["test"]
    coco = json.loads((stages["data"] / test["annotations"]).read_text())
    images = [Path(test["image_root"]) / im["file_name"] for im in coco["images"]]

results = []
with torch.inference_mode():
    for path in images:
        arr = to_channels(read_normalized(path, manifest.get("normalization")), spec["in_chans"], source=path)
        image = torch.from_numpy(arr.transpose(2, 0, 1).copy()).float()
        out = model([image])[0]
        keep = out["scores"] >= 0.3
        found = [{"category": names[label_to_category[int(label)]], "score": round(float(score), 3),
                  "box_xyxy": [round(float(v), 1) for v in box]}
                 for box, label, score in zip(out["boxes"][keep], out["labels"][keep], out["scores"][keep])]
        results.append({"image": str(path), "detections": found})
        best = ", ".join(f"{d['category']} {d['score']:.2f}" for d in found[:3]) or "nothing above 0.3"
        print(f"{path.name}: {len(found)} detection(s); {best}")

(run_dir / "detections_new.json").write_text(json.dumps(results, indent=1))
print(f"wrote {run_dir / 'detections_new.json'}")
