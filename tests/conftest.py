import os
from pathlib import Path

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing when tests run model code.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
HIT_UAV = REPO.parent / "shared" / "data" / "hit-uav"


@pytest.fixture
def hit_uav() -> Path:
    if not HIT_UAV.is_dir():
        pytest.skip(f"HIT-UAV data not found at {HIT_UAV} (CI provides ../shared/data/hit-uav)")
    return HIT_UAV
