import os

# Before torch loads (OpenMP reads it once): idle threads sleep instead of spinning, as the CLI sets it.
# With it, torch's default of one thread per core is the fastest on a quiet machine (CI) and no slower
# than one thread on a busy one (docs/results.md, "CPU threads"), so the thread count is left alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HIT_UAV = REPO.parent / "shared" / "data" / "hit-uav"


@pytest.fixture
def hit_uav() -> Path:
    if not HIT_UAV.is_dir():
        pytest.skip(f"HIT-UAV data not found at {HIT_UAV} (CI provides ../shared/data/hit-uav)")
    return HIT_UAV


@pytest.fixture(scope="session")
def ssl_probe():
    """``benchmarks/ssl_probe.py`` as a module: the stripes proxy task, a pre-training through the training loop and
    the k-NN probe that the learning tests and the benchmark share."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ssl_probe", REPO / "benchmarks" / "ssl_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PILLOW_OPEN = __import__("PIL.Image", fromlist=["open"]).open


@pytest.fixture(autouse=True)
def _pillow_open_restored():
    """Tests that import Ultralytics directly let it patch PIL.Image.open; later tests need Pillow's own."""
    yield
    from PIL import Image

    Image.open = _PILLOW_OPEN
