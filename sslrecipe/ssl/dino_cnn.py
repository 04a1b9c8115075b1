"""DINO on CNN backbones: the official ResNet-50 recipe on top of the shared DINO code (facebookresearch/dino).

Everything algorithmic is :mod:`sslrecipe.ssl.dino` (written for both families and reused here unchanged):
``DINOHead`` (MLP 2048-2048-256, L2 norm, weight-normed ``Linear(256, 65536)`` with ``g = 1`` frozen), ``DINOLoss``
(teacher softmax on the 2 global crops with centering, momentum 0.9; student ``log_softmax(s / 0.1)`` on all crops;
every (teacher view, other student view) pair), the teacher temperature warmup, the per-iteration cosine EMA
``0.996 -> 1`` applied after the optimizer step, multi-crop (2 global + ``local_crops_number`` = 8 local, one
backbone pass per resolution), per-parameter gradient clipping to 3.0 and dropping the last layer's gradients
during the first epoch (``freeze_last_layer = 1`` of 100 epochs), both applied in an optimizer step pre-hook.

What this file adds for CNNs (docs/methods.md, "DINO (ResNet)"; DINO's README "ResNet-50 and other
convnets trainings", ``main_dino.py L157-251``):

- the README's ResNet-50 command ``--optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4
  --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14`` with the code's other defaults (100 epochs, 10 warmup
  epochs, ``lr * batch / 256``, cosine to ``min_lr``, SGD momentum 0.9) as :data:`OPTIM_DEFAULTS` (``pretrain.*``
  keys: the lr is ``blr * batch / 256`` exactly like ``args.lr * batch / 256.``; the warmup is 10 % of training);
  the crop scales and the constant weight decay (no ``weight_decay_end``) are the CNN defaults of ``dino.py``;
- the backbone is the timm CNN with ``num_classes=0`` (global average pool, = torchvision's ``fc = Identity``
  that ``MultiCropWrapper`` sets); no stochastic depth (torchvision ResNets have none);
- torchvision's initialisation: timm zero-initialises the last BatchNorm of every residual block
  (``zero_init_last=True``) while ``torchvision_models.resnet50()`` does not (``zero_init_residual=False``), so
  those weights are reset to 1 (student and teacher), as in the official run; conv and BN init are otherwise the same;
- BatchNorm: student and teacher both run in training mode (batch statistics); the two global crops share one
  backbone pass (their statistics are joint, as with ``MultiCropWrapper``), the local crops another. The official
  code converts BN to SyncBN across 8 GPUs (batch 64 each); in one process the batch is the whole batch;
- the released backbone is the **teacher** (``encoder()``), exported with pure timm keys.

Simplifications vs the official code (also in docs/methods.md, "DINO (ResNet)"): those of :mod:`sslrecipe.ssl.dino`
(epoch-indexed schedules as fractions of the optimizer steps; lr floor ``pretrain.min_lr_ratio`` x peak (0 by default)
instead of ``min_lr = 1e-6``; the loop's warmup starts at ``lr/warmup`` instead of 0; a true Gaussian blur; the
encoder's normalisation, 0.5 / 0.25 from random init, instead of ImageNet statistics); no fp16 loss scaling on CPU; no LARS (the README
recipe for ResNet-50 uses SGD). Any timm CNN is accepted, not only torchvision ResNets.

Wiring: ``dino.py`` registers ``dino`` for both families; its builder hands CNN backbones to :func:`build_dino_cnn`.
"""

from __future__ import annotations

from typing import Optional

from sslrecipe.errors import SSLRecipeError
from sslrecipe.ssl import views as V
from sslrecipe.ssl.dino import DINO, DINOOptions
from sslrecipe.models.family import backbone_family
from sslrecipe.ssl.resim import reset_torchvision_resnet_init

#: The README's ResNet-50 recipe as pretrain.* recipe keys (main_dino.py defaults for everything it does not set).
OPTIM_DEFAULTS = {"optimizer": "sgd", "blr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine",
                  "warmup_fraction": 0.1, "min_lr_ratio": 0.0, "clip_grad": None}  # clipping is per parameter, in DINO


class DINOCNN(DINO):
    """:class:`~sslrecipe.ssl.dino.DINO` with the ResNet specifics (see the module docstring)."""

    optim_defaults = OPTIM_DEFAULTS

    def __init__(self, timm_name: str, in_chans: int, img_size: int, options: DINOOptions, timm_kwargs: Optional[dict] = None):
        if backbone_family(timm_name) != "cnn":
            raise SSLRecipeError(f"DINOCNN is the CNN variant of dino; backbone.name '{timm_name}' is a ViT (use dino.DINO)")
        super().__init__(timm_name, in_chans, img_size, options, timm_kwargs)
        # torchvision's ResNet init (zero_init_residual=False); the teacher starts as an exact copy again
        reset_torchvision_resnet_init(self.student_backbone)
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())


def build_dino_cnn(timm_name: str, in_chans: int, img_size: int, options: dict, timm_kwargs: dict) -> DINOCNN:
    """The ``dino`` builder for CNN backbones (called by ``dino.build_dino`` for the ``cnn`` family)."""
    opts = V.parse_options(DINOOptions, options, "dino")
    return DINOCNN(timm_name, in_chans, img_size, opts, timm_kwargs)
