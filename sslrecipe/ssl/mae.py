"""MAE: masked autoencoder pre-training of a timm ViT (He et al. 2022; facebookresearch/mae, ``models_mae.py``).

Mapping to the official code (docs/ssl.md, "MAE"):

- encoder = the timm ViT itself (``patch_embed``, cls token, ``blocks``, ``norm``), its ``pos_embed`` replaced by
  the fixed 2-D sin-cos embedding (``requires_grad=False``, cls slot zero); the position embedding is added
  **before** masking and the cls token gets ``pos_embed[:, :1]`` after masking (``forward_encoder``);
- masking: per-sample argsort of uniform noise, ``len_keep = int(L * (1 - mask_ratio))`` (49 of 196 at 0.75),
  ``mask`` 0 = keep / 1 = removed, ``ids_restore = argsort(ids_shuffle)`` (``random_masking``); the noise comes
  from torch's global RNG as in the official code (the training loop checkpoints and restores it);
- decoder: ``decoder_embed`` Linear -> mask tokens appended and unshuffled with ``ids_restore``, cls put back,
  fixed sin-cos decoder position embedding, ``decoder_depth`` timm Blocks (mlp 4, qkv bias, LayerNorm eps 1e-6),
  LayerNorm, Linear to ``p*p*C``; the cls output is dropped (``forward_decoder``);
- loss: ``patchify`` ('nchpwq->nhwpqc' order), optional norm-pix target ``(t - mean) / sqrt(var + 1e-6)`` with
  torch's unbiased ``var``, per-patch MSE averaged over the **removed** patches only: ``sum(l*m)/sum(m)``;
- init: Xavier-uniform for every Linear and for the patch-embed conv viewed as a Linear, cls and mask tokens
  normal(0.02), LayerNorm 1/0 (``initialize_weights``);
- views: ``RandomResizedCrop(img_size, scale=(0.2, 1), bicubic)`` + horizontal flip, nothing else.

Defaults follow the paper recipe (PRETRAIN.md): ``norm_pix_loss`` on, mask ratio 0.75, decoder 8 x 512 with 16
heads; for encoders of width <= 384 (ViT-S, ViT-Ti) the decoder is 256 wide with 8 heads, the ViT-S setting the
survey's reference run used (SparK issue #41). The optimizer side of the recipe (AdamW betas (0.9, 0.95), wd 0.05
without decay on biases and 1-D parameters, ``lr = blr * batch / 256`` with blr 1.5e-4, linear warmup and
half-cosine to 0) is set through ``pretrain.*`` keys; see docs/ssl.md for the exact keys and ``OPTIM_DEFAULTS``.

Differences from the official code (also listed in docs/ssl.md):
- inputs are normalised with the mean/std the encoder expects (``SSLMethod.input_mean`` / ``input_std``): the
  project's 0.5 / 0.25 from random init (ImageNet RGB statistics mean nothing on 1-channel thermal data), the
  start encoder's with ``pretrain.init`` / ``pretrain.first``; encoder.json records them for fine-tuning;
- any patch grid is allowed (non-square inputs would work; the recipe's crops are square) and ViTs with
  register tokens or ``no_embed_class`` are handled (their extra prefix slots get zero sin-cos entries);
- a fetched MAE checkpoint initialises the encoder only; the decoder always starts fresh (public ``_full``
  checkpoints with a decoder are not loaded).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslrecipe.ssl import views as V
from sslrecipe.ssl.views import CropScale
from sslrecipe.ssl.registry import SSLMethod, register
from sslrecipe.ssl.vit_utils import check_img_size, check_vit, grid_size_of, patch_size_of, patch_tokens, prefix_tokens, sincos_pos_embed_2d

#: The official pre-training optimiser settings (PRETRAIN.md / main_pretrain.py), as pretrain.* recipe keys.
OPTIM_DEFAULTS = {"optimizer": "adamw", "betas": (0.9, 0.95), "weight_decay": 0.05, "blr": 1.5e-4, "schedule": "cosine",
                  "min_lr_ratio": 0.0, "warmup_fraction": 0.05}  # 40 warmup epochs of 800


class MAEOptions(BaseModel):
    """``pretrain.options.mae``."""

    model_config = ConfigDict(extra="forbid")

    mask_ratio: float = Field(0.75, gt=0, lt=1, description="Fraction of patches removed per image.")
    norm_pix_loss: bool = Field(True, description="Per-patch normalised pixel targets (the paper recipe).")
    decoder_dim: Optional[int] = Field(None, ge=8, description="Decoder width; null = 512 (256 for encoders <= 384 wide).")
    decoder_depth: int = Field(8, ge=1, description="Decoder Transformer blocks.")
    decoder_heads: Optional[int] = Field(None, ge=1, description="Decoder attention heads; null = 16 (8 for encoders <= 384 wide).")
    decoder_mlp_ratio: float = Field(4.0, gt=0, description="Decoder MLP ratio.")
    crop_scale: CropScale = Field((0.2, 1.0), description="RandomResizedCrop area range.")
    hflip: bool = Field(True, description="Random horizontal flip.")



class MAE(SSLMethod):
    name = "mae"
    optim_defaults = OPTIM_DEFAULTS

    def __init__(self, timm_name: str, in_chans: int, img_size: int, options: MAEOptions, timm_kwargs: Optional[dict] = None):
        super().__init__()
        from sslrecipe.models.backbone import create_backbone

        self.opts = options
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.vit = create_backbone(timm_name, in_chans=in_chans, **{**(timm_kwargs or {}), "img_size": self.img_size})
        check_vit(self.vit, timm_name, "mae")
        check_img_size(self.img_size, self.vit, "mae")
        if self.vit.pos_embed is None:
            from sslrecipe.errors import SSLRecipeError

            raise SSLRecipeError(f"pretrain.method 'mae': backbone '{timm_name}' has no absolute position embedding")
        self.export_timm_kwargs = {"img_size": self.img_size}
        self.patch = patch_size_of(self.vit)
        self.grid = grid_size_of(self.vit)
        self.num_prefix = int(self.vit.num_prefix_tokens)
        self.pos_prefix = 0 if self.vit.no_embed_class else self.num_prefix  # prefix slots inside pos_embed
        embed_dim = int(self.vit.embed_dim)
        small = embed_dim <= 384
        dec_dim = options.decoder_dim or (256 if small else 512)
        dec_heads = options.decoder_heads or (8 if small else 16)
        if dec_dim % dec_heads:
            from sslrecipe.errors import RecipeError

            raise RecipeError(f"pretrain.options.mae.decoder_dim ({dec_dim}) must be divisible by decoder_heads ({dec_heads})")
        norm = partial(nn.LayerNorm, eps=1e-6)
        from timm.models.vision_transformer import Block

        self.decoder_embed = nn.Linear(embed_dim, dec_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        n_tokens = self.num_prefix + self.grid[0] * self.grid[1]
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(dec_dim, dec_heads, options.decoder_mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(options.decoder_depth)]
        )
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, self.patch[0] * self.patch[1] * self.in_chans, bias=True)
        self._initialize_weights()

    # ------------------------------------------------------------------ init (models_mae.initialize_weights)
    def _initialize_weights(self) -> None:
        vit = self.vit
        d = vit.pos_embed.shape[-1]
        vit.pos_embed.data.copy_(sincos_pos_embed_2d(d, *self.grid, num_prefix=self.pos_prefix))
        vit.pos_embed.requires_grad_(False)
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], *self.grid, num_prefix=self.num_prefix))
        w = vit.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for tok in (vit.cls_token, getattr(vit, "reg_token", None), self.mask_token):
            if tok is not None:
                nn.init.normal_(tok, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ data
    def views(self, image: torch.Tensor, rng) -> torch.Tensor:
        crop, _box = V.random_resized_crop(image, self.img_size, rng, scale=self.opts.crop_scale)
        if self.opts.hflip:
            crop = V.random_hflip(crop, rng)
        return V.normalize(crop, self.input_mean, self.input_std)

    # ------------------------------------------------------------------ model
    def len_keep(self, num_patches: int) -> int:
        return int(num_patches * (1 - self.opts.mask_ratio))

    def random_masking(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """Keep ``len_keep`` patches per sample: the ones with the smallest noise. Returns
        (kept tokens ``(N, len_keep, D)``, mask ``(N, L)`` with 1 = removed, ids_restore ``(N, L)``)."""
        n, length, dim = x.shape
        keep = self.len_keep(length)
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None):
        vit = self.vit
        x, grid = patch_tokens(vit, imgs)
        if grid != self.grid:
            raise ValueError(f"MAE was built for {self.img_size}-px inputs (grid {self.grid}), got grid {grid}")
        x = x + vit.pos_embed[:, self.pos_prefix :]  # position embedding before masking
        x, mask, ids_restore = self.random_masking(x, noise)
        pre = prefix_tokens(vit, x.shape[0])
        if pre:
            pre_t = torch.cat(pre, dim=1)
            if self.pos_prefix:
                pre_t = pre_t + vit.pos_embed[:, : self.pos_prefix]
            x = torch.cat([pre_t, x], dim=1)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        p = self.num_prefix
        n_mask = ids_restore.shape[1] + p - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], n_mask, -1)
        x_ = torch.cat([x[:, p:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :p], x_], dim=1) + self.decoder_pos_embed
        x = self.decoder_blocks(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, p:]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, L, ph*pw*C)``, each patch flattened row by row with the channel last."""
        n, c, h, w = imgs.shape
        ph, pw = self.patch
        x = imgs.reshape(n, c, h // ph, ph, w // pw, pw)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // ph) * (w // pw), ph * pw * c)

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.opts.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default in the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.targets(imgs)
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # per patch
        return (loss * mask).sum() / mask.sum()  # removed patches only

    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return {"loss": self.forward_loss(imgs, pred, mask)}

    def encoder(self) -> nn.Module:
        return self.vit


@register("mae", ("vit",), "masked autoencoder (He et al. 2022): ViT encoder on 25% visible patches, pixel decoder", optim_defaults=OPTIM_DEFAULTS)
def build_mae(timm_name: str, in_chans: int, img_size: int, options: dict, timm_kwargs: dict) -> MAE:
    opts = V.parse_options(MAEOptions, options, "mae")
    return MAE(timm_name, in_chans, img_size, opts, timm_kwargs)
