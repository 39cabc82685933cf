"""Quality of a visual tokenizer (BEiT's stage 1) on a split: how well the images come back
from their tokens, and how much of the codebook the tokens use, so a collapsed tokenizer
is visible in its run record.

Like the encoder evaluations it imports no method: a tokenizer is anything with
`vocab_size`, `tokenize(images) -> (B, N) codes` and `decode(codes) -> images`, where
images are normalised as `engine.data.normalize` does.
"""
from __future__ import annotations

import math

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from tqdm import tqdm

from engine.data import ImageSet, normalize


@torch.inference_mode()
def run(tokenizer, data: ImageSet, batch_size: int = 1024, device: str | torch.device = "cpu",
        progress: bool = True) -> dict[str, float]:
    """Reconstruction from the argmax tokens (what stage 2 predicts) and code statistics:

    tokenizer_recon_mse        mean squared error on pixels in [0, 1], over the whole split
    tokenizer_psnr             10 log10(1 / recon_mse), in dB
    tokenizer_codebook_usage   fraction of the |V| codes that occur at least once
    tokenizer_perplexity       exp(entropy) of the code histogram (|V| = uniform use, 1 = collapse)
    """
    tokenizer = tokenizer.eval().to(device)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64, device=device)
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    for start in tqdm(range(0, len(data), batch_size), desc="tokenizer test", unit="batch", leave=False,
                      disable=not progress):
        uint8 = data.images[start:start + batch_size].to(device)
        codes = tokenizer.tokenize(normalize(uint8))                           # (B, N)
        recon = (tokenizer.decode(codes).float() * std + mean).clamp(0, 1)     # (B, 3, H, W) in [0, 1]
        squared_error += (recon - uint8.float() / 255).pow(2).sum(dtype=torch.float64)
        counts += torch.bincount(codes.flatten(), minlength=tokenizer.vocab_size)
    recon_mse = squared_error.item() / data.images.numel()
    probs = counts[counts > 0] / counts.sum()
    return {
        "tokenizer_recon_mse": recon_mse,
        "tokenizer_psnr": 10 * math.log10(1 / recon_mse) if recon_mse > 0 else math.inf,
        "tokenizer_codebook_usage": (counts > 0).double().mean().item(),
        "tokenizer_perplexity": math.exp(-(probs * probs.log()).sum().item()),
    }
