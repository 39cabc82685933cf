"""BEiT's stage-1 visual tokenizer: a small discrete VAE in the spirit of DALL-E's
(Ramesh et al., 2021), our own code.

    encoder q(z|x)   convolutions that shrink the image by the ViT's patch size, so each
                     patch position gets logits over a vocabulary of |V| codes
    relaxation       Gumbel-softmax with a temperature annealed from 1 towards 1/16 (DALL-E)
    decoder p(x|z)   the (relaxed) one-hot codes -> convolutions back up to the image
    tokenize         argmax of the encoder's logits: (B, N) codes on the ViT's patch grid
    loss             pixel MSE (normalised images) + an entropy penalty that keeps the argmax
                     codes confident and diverse (`code_entropies`); DALL-E's KL to a uniform
                     prior is available as `kl_weight`, off by default

It is registered as the method `dvae`, so the project's one trainer trains it and a
tokenizer is an ordinary content-addressed run folder holding `tokenizer.safetensors`;
BEiT runs name it as a prerequisite (see `BEiT.prerequisites`). It has no ViT: its
`cfg.encoder` only says which ViT geometry the tokens are for (image and patch size).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from core.config import ConfigError, build_config
from methods.base import Batch, Horizon, Method
from methods.registry import register_method
from methods.vit import ViTConfig

TOKENIZER_FILE = "tokenizer.safetensors"


@dataclass(frozen=True)
class TokenizerConfig:
    """What defines a tokenizer apart from the image geometry (BEiT runs carry this)."""
    vocab_size: int = 512               # |V|; DALL-E / BEiT: 8192 at 224 px; 512 for 8x8-token CIFAR images
    hidden_dim: int = 32                # channels at full resolution, doubled per 2x down-sampling up to 4x
    temperature_start: float = 1.0      # Gumbel-softmax temperature at step 0 (DALL-E)
    temperature_end: float = 1 / 16     # DALL-E anneals to 1/16; here exponentially over the whole run
    entropy_weight: float = 0.05        # confident, diverse codes: H(q) per position - H(batch-mean q)
    kl_weight: float = 0.0              # weight of KL(q(z|x) || uniform prior) per position (DALL-E's beta)

    def validate(self) -> None:
        if self.vocab_size < 2:
            raise ConfigError(f"tokenizer vocab_size {self.vocab_size} must be >= 2, e.g. 512")
        if self.hidden_dim < 2 or self.hidden_dim % 2:
            raise ConfigError(f"tokenizer hidden_dim {self.hidden_dim} must be an even number >= 2, e.g. 32")
        if not 0 < self.temperature_end <= self.temperature_start:
            raise ConfigError(f"need 0 < temperature_end ({self.temperature_end}) <= temperature_start "
                              f"({self.temperature_start}); DALL-E anneals 1 -> 1/16")
        if self.kl_weight < 0 or self.entropy_weight < 0:
            raise ConfigError(f"tokenizer kl_weight ({self.kl_weight}) and entropy_weight "
                              f"({self.entropy_weight}) must be >= 0")


@dataclass(frozen=True)
class DVAEConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)   # geometry of the ViT the tokens are for
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self) -> None:
        self.encoder.validate()
        self.tokenizer.validate()


def resampling_strides(patch_size: int) -> list[int]:
    """Strides whose product is the patch size: 2x steps while it is even, then the odd rest
    (16 -> [2, 2, 2, 2]; 14 -> [2, 7]), so any patch size the ViT takes has a token grid."""
    strides = []
    while patch_size % 2 == 0:
        strides.append(2)
        patch_size //= 2
    if patch_size > 1:
        strides.append(patch_size)
    return strides


def resampling_conv(in_dim: int, out_dim: int, stride: int, up: bool) -> nn.Module:
    """Non-overlapping (kernel = stride): 4x cheaper than 4x4 kernels at stride 2, which
    matters on CPUs; the 3x3 convolutions of the residual blocks smooth the seams."""
    conv = nn.ConvTranspose2d if up else nn.Conv2d
    return conv(in_dim, out_dim, kernel_size=stride, stride=stride)


class ResBlock(nn.Module):
    """DALL-E-style pre-activation residual block with a bottleneck (cheap on CPUs)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim // 2, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(dim // 2, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """Image (B, C, H, W) -> code logits (B, |V|, H/p, W/p)."""

    def __init__(self, in_chans: int, dims: list[int], strides: list[int], vocab_size: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, dims[0], 3, padding=1)]
        for in_dim, out_dim, stride in zip(dims, dims[1:], strides):
            layers += [ResBlock(in_dim), resampling_conv(in_dim, out_dim, stride, up=False)]
        # logits straight from the residual stream: after a ReLU all features are >= 0 and a few
        # codes win the argmax at every position from initialisation on (measured: perplexity ~5)
        layers += [ResBlock(dims[-1]), nn.Conv2d(dims[-1], vocab_size, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.blocks(images.contiguous(memory_format=torch.channels_last))


class ConvDecoder(nn.Module):
    """(Relaxed) one-hot codes (B, |V|, H/p, W/p) -> image (B, C, H, W). The first 1x1
    convolution is the codebook: it maps each code to its embedding."""

    def __init__(self, in_chans: int, dims: list[int], strides: list[int], vocab_size: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(vocab_size, dims[-1], 1), ResBlock(dims[-1])]
        for in_dim, out_dim, stride in zip(dims[::-1], dims[-2::-1], strides[::-1]):
            layers += [resampling_conv(in_dim, out_dim, stride, up=True), ResBlock(out_dim)]
        layers += [nn.ReLU(), nn.Conv2d(dims[0], in_chans, 3, padding=1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, codes: Tensor) -> Tensor:
        return self.blocks(codes.contiguous(memory_format=torch.channels_last))


@register_method("dvae", DVAEConfig)
class DVAE(Method):
    """A tokenizer trained like a method (same trainer, same run folders) but not a
    `MIMMethod`: it has no ViT. Its run's product is itself (tokenizer.safetensors)."""

    product = "tokenizer"
    # convolutions train at about two thirds of MAE's FLOP/s on the CPU: the cpu profile's
    # tokenizer ran at 34.8 GFLOP/s while MAE's pre-training ran at 52.4 in the same 1-thread
    # lanes (2-core AMD EPYC, torch 2.14.1, 2026-12-07; the plan said 8.1 min, it took 14.6)
    training_efficiency = 0.66

    def __init__(self, cfg: DVAEConfig):
        cfg.validate()
        super().__init__(cfg)
        tok = cfg.tokenizer
        strides = resampling_strides(cfg.encoder.patch_size)
        dims = [tok.hidden_dim * 2 ** min(i, 2) for i in range(len(strides) + 1)]
        self.encoder = ConvEncoder(cfg.encoder.in_chans, dims, strides, tok.vocab_size)
        self.decoder = ConvDecoder(cfg.encoder.in_chans, dims, strides, tok.vocab_size)
        # channels-last: 1.3-2x faster per convolution with oneDNN on the 2-core CPU (measured per layer)
        self.to(memory_format=torch.channels_last)
        # a buffer, so checkpoints carry it and a resumed run continues the same schedule
        self.register_buffer("temperature", torch.tensor(tok.temperature_start))

    @property
    def vocab_size(self) -> int:
        return self.cfg.tokenizer.vocab_size

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.encoder(batch.images).float()                         # (B, V, g, g)
        codes = F.gumbel_softmax(logits, tau=self.temperature, dim=1)       # (B, V, g, g), relaxed one-hot
        recon = self.decoder(codes).float()                                 # (B, C, H, W)
        recon_mse = F.mse_loss(recon, batch.images.float())
        metrics = {"recon_mse": recon_mse.detach(), "temperature": self.temperature.clone(),
                   "code_perplexity": code_perplexity(logits.detach().argmax(dim=1), self.vocab_size)}
        tok = self.cfg.tokenizer
        loss = recon_mse
        if tok.entropy_weight > 0 or tok.kl_weight > 0:
            position_entropy, batch_entropy = code_entropies(logits)
            # DALL-E's KL(q || uniform) = log|V| - H(q), averaged over positions
            loss = loss + tok.kl_weight * (math.log(self.vocab_size) - position_entropy)
            loss = loss + tok.entropy_weight * (position_entropy - batch_entropy)
            metrics.update(position_entropy=position_entropy.detach(), batch_entropy=batch_entropy.detach())
        return loss, {"loss": loss.detach(), **metrics}

    def after_step(self, step: int, horizon: Horizon) -> None:
        """Anneal the Gumbel temperature exponentially from start to end over the run."""
        tok = self.cfg.tokenizer
        progress = min(1.0, (step + 1) / max(1, horizon.total_steps))
        ratio = tok.temperature_end / tok.temperature_start
        self.temperature.fill_(tok.temperature_start * ratio ** progress)

    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised images -> (B, N) codes, raster order of the ViT's patch grid.
        Argmax, no sampling: the same image always gives the same tokens."""
        return self.encoder(images).argmax(dim=1).flatten(1)

    def decode(self, tokens: Tensor) -> Tensor:
        """(B, N) codes on a square grid -> (B, C, H, W) reconstructed (normalised) images."""
        grid = math.isqrt(tokens.shape[1])
        codes = F.one_hot(tokens.view(-1, grid, grid), self.vocab_size).permute(0, 3, 1, 2)
        return self.decoder(codes.float())


def code_entropies(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy of q(z|x) averaged over positions, and entropy of q averaged over the batch.

    Why the entropy penalty (MAGVIT-v2's, Yu et al. 2024): stage 2 predicts argmax tokens,
    but Gumbel training only needs the *samples* to be informative. Measured on CIFAR-10
    without it, q kept spreading its mass over many similar codes while one generic code
    held the largest share at every position: training loss fell, yet the argmax tokens
    used 5 of 512 codes. Low entropy per position makes the argmax the sampled code; high
    entropy of the batch mean keeps many codes in use."""
    log_q = logits.log_softmax(dim=1)                                   # (B, V, g, g)
    q = log_q.exp()
    position_entropy = -(q * log_q).sum(dim=1).mean()
    mean_q = q.mean(dim=(0, 2, 3))                                      # (V,)
    batch_entropy = -(mean_q * mean_q.clamp(min=1e-12).log()).sum()
    return position_entropy, batch_entropy


def code_perplexity(codes: Tensor, vocab_size: int) -> Tensor:
    """exp(entropy) of the code histogram: |V| when all codes are used equally, 1 when collapsed."""
    counts = torch.zeros(vocab_size, device=codes.device).scatter_add_(
        0, codes.flatten(), torch.ones(codes.numel(), device=codes.device))
    probs = counts / counts.sum()
    return torch.exp(-(probs * probs.clamp(min=1e-12).log()).sum())


def save_tokenizer(dvae: DVAE, path: Path) -> None:
    """Write the weights with the DVAEConfig in the metadata (the run layer writes it through
    a temp file and a rename: `runs.execute.save_product`)."""
    state = {k: v.detach().cpu().contiguous() for k, v in dvae.state_dict().items()}
    save_file(state, str(path), metadata={"dvae_config": json.dumps(asdict(dvae.cfg))})


def load_tokenizer(path: str | Path) -> DVAE:
    """Rebuild a tokenizer from a file written by `save_tokenizer` (a dvae run's
    tokenizer.safetensors, or one of your own in that format); frozen, in eval mode."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"tokenizer checkpoint {path} not found; pass the {TOKENIZER_FILE} of a dvae "
                          f"run (outputs/runs/dvae-<hash>/{TOKENIZER_FILE})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ConfigError(f"{path} is not a safetensors file ({err}); pass a {TOKENIZER_FILE}") from None
    if "dvae_config" not in meta:
        raise ConfigError(f"{path} has no dvae config in its metadata; write it with "
                          f"methods.dvae.save_tokenizer")
    cfg = build_config(DVAEConfig, json.loads(meta["dvae_config"]), where=str(path))
    dvae = DVAE(cfg)
    try:
        dvae.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ConfigError(f"{path} does not match the dvae config in its metadata "
                          f"({str(err).splitlines()[0]})") from None
    return dvae.requires_grad_(False).eval()
