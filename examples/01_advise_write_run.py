"""Ask the advisor, write the recipe it recommends, run it, read the comparison.

    python examples/01_advise_write_run.py [OUT_DIR]          (default OUT_DIR: runs/example-advised)

The constraints are those of `recipes/ir_custom.yaml`: a ResNet, 25 labeled images, infrared, small objects,
and pre-training on your own images required (no public weights). The written recipe runs the advised
arm and the baseline to beat (scratch) on built-in synthetic thermal scenes, so it runs as written; a real
run replaces `data:` with your data. On a CPU this takes a while at the written sizes (ResNet-50): pass
--tiny for a seconds-long version.
"""

import sys
from pathlib import Path

from _tiny import TINY_SETS, tiny

from sslrecipe.engine.runner import run_recipe
from sslrecipe.guide.advisor import advise
from sslrecipe.guide.write import write_recipe

out = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "runs/example-advised"))
out.mkdir(parents=True, exist_ok=True)

# 1. advise: the options ranked by the survey's evidence under these constraints
advice = advise(backbone="resnet", shots=25, domain="ir", object_size="small", custom_pretrain="required")
for rank, option in enumerate(advice.recommendations, 1):
    print(f"{rank}. {option.label}: method {option.method}, init {option.init}, confidence {option.level}")
print(f"baseline to beat: {advice.baseline.backbone} from scratch")

# 2. write the recipe for the top option: a matrix of the advised arm and the baseline arm
recipe = write_recipe(advice, out / "advised.yaml")
print(f"wrote {recipe}")

# 3. run it (every finished stage is cached: running this again resumes where it stopped)
overrides = TINY_SETS if tiny() else []
run_dir = run_recipe(recipe, overrides, run_dir=out / "run")

# 4. the comparison table (also RUN/comparison.csv for a spreadsheet)
print((run_dir / "comparison.md").read_text())
