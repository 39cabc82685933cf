"""Quality of a visual tokenizer (BEiT's stage 1) on a split: how well the images come back
from their tokens, and how much of the codebook the tokens use, so a collapsed tokenizer
is visible in its run record.

Like the encoder evaluations it imports no method: a tokenizer is anything with
`vocab_size`, `tokenize(images) -> (B, N) codes` and `decode(codes) -> images`, where
images are normalised as `engine.data.normalize` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from core.config import ConfigError
from engine.data import Splits, denormalize, normalize
from eval.registry import EvalContext, EvalResult, register_evaluation


@dataclass(frozen=True)
class TokenizerEvalConfig:
    split: str = "test"             # the split whose images are tokenized and decoded

    def validate(self) -> None:
        if self.split not in ("train", "test"):
            raise ConfigError(f"tokenizer evaluation split {self.split!r} unknown; known: train, test")


@register_evaluation("tokenizer", TokenizerEvalConfig, takes="tokenizer", check_inputs=TokenizerEvalConfig.validate)
@torch.inference_mode()
def run(tokenizer, splits: Splits, cfg: TokenizerEvalConfig, ctx: EvalContext) -> EvalResult:
    """Reconstruction from the argmax tokens (what stage 2 predicts) and code statistics:

    tokenizer_recon_mse        mean squared error on pixels in [0, 1], over the whole split
    tokenizer_psnr             10 log10(1 / recon_mse), in dB
    tokenizer_codebook_usage   fraction of the |V| codes that occur at least once
    tokenizer_perplexity       exp(entropy) of the code histogram (|V| = uniform use, 1 = collapse)
    """
    data = getattr(splits, cfg.split)
    device, batch_size = ctx.device, ctx.feature_batch
    tokenizer = tokenizer.eval().to(device)
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64, device=device)
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    for start in tqdm(range(0, len(data), batch_size), desc=f"tokenizer {cfg.split}", unit="batch", leave=False,
                      disable=not ctx.progress):
        uint8 = data.images[start:start + batch_size].to(device)
        codes = tokenizer.tokenize(normalize(uint8))                           # (B, N)
        recon = denormalize(tokenizer.decode(codes)).clamp(0, 1)              # (B, 3, H, W) in [0, 1]
        squared_error += (recon - uint8.float() / 255).pow(2).sum(dtype=torch.float64)
        counts += torch.bincount(codes.flatten(), minlength=tokenizer.vocab_size)
    recon_mse = squared_error.item() / data.images.numel()
    probs = counts[counts > 0] / counts.sum()
    return EvalResult({
        "tokenizer_recon_mse": recon_mse,
        "tokenizer_psnr": 10 * math.log10(1 / recon_mse) if recon_mse > 0 else math.inf,
        "tokenizer_codebook_usage": (counts > 0).double().mean().item(),
        "tokenizer_perplexity": math.exp(-(probs * probs.log()).sum().item()),
    })
