"""sslrecipe: evidence-based self-supervised pre-training recipes for small-object detection."""

__version__ = "0.1.0"


def load_detector(path, device="cpu", warn=None):
    """The fine-tuned detector of a run directory (its newest fine-tuning) or of a detector directory
    (``RUN/finetune-<hash>``): ``load_detector(path).predict(images, score=0.25)`` returns one
    :class:`sslrecipe.detect.detector.Prediction` per image (boxes, scores, category ids, class names).
    See docs/predict.md. torch is imported here, not by ``import sslrecipe``."""
    from sslrecipe.detect.detector import load_detector as _load

    return _load(path, device=device, warn=warn)
