"""Load the detector a run fine-tuned and detect objects on new images, through the library.

    python examples/03_detect_new_images.py RUN_DIR [IMAGE_OR_FOLDER ...]

RUN_DIR is a finished run (or a matrix cell: RUN/<cell>), or the detector directory itself
(RUN/finetune-<hash>, which stands alone when copied elsewhere). Without images, the run's own test images
are used. `sslrecipe.load_detector` reads each image exactly as training did (bit depth, the run's data
normalization such as 16-bit percentiles, channels); the detections (boxes in the image's pixels) are printed
and written to RUN_DIR/detections_new.json. From the command line, `sslrecipe predict RUN_DIR IMAGES...` does
the same and also draws the boxes (docs/predict.md).
"""

import json
import sys
from pathlib import Path

import sslrecipe
from sslrecipe.data.images import list_images
from sslrecipe.engine.events import read_events

args = [a for a in sys.argv[1:] if not a.startswith("--")]
if not args:
    sys.exit(__doc__)
run_dir = Path(args[0])
detector = sslrecipe.load_detector(run_dir)

if len(args) > 1:
    images = [p for a in args[1:] for p in (list_images(a) if Path(a).is_dir() else [Path(a)])]
else:  # the run's test images: its data stage (found through its events) lists them
    data_dir = next(Path(e["dir"]) for e in read_events(run_dir / "events.jsonl")
                    if e["event"] in ("stage_end", "stage_cached") and e["stage"] == "data")
    test = json.loads((data_dir / "data.json").read_text())["splits"]["test"]
    coco = json.loads((data_dir / test["annotations"]).read_text())
    images = [Path(test["image_root"]) / im["file_name"] for im in coco["images"]]

results = []
for path, found in zip(images, detector.predict(images, score=0.3)):
    detections = [{"category": name, "score": round(float(score), 3), "box_xyxy": [round(float(v), 1) for v in box]}
                  for box, score, name in zip(found.boxes, found.scores, found.names)]
    results.append({"image": str(path), "detections": detections})
    best = ", ".join(f"{d['category']} {d['score']:.2f}" for d in detections[:3]) or "nothing above 0.3"
    print(f"{path.name}: {len(detections)} detection(s); {best}")

(run_dir / "detections_new.json").write_text(json.dumps(results, indent=1))
print(f"wrote {run_dir / 'detections_new.json'}")
