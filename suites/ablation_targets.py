"""What to predict for the masked patches? BEiT's visual tokens vs raw pixels vs per-patch
normalised pixels (BEiT Table 4, MAE Table 1d), with the masking of each paper held fixed:
BEiT's blockwise 40% for the token-vs-pixel question, MAE's random 75% for raw-vs-normalised.
Every other registered method at the cells it declares (`Method.suite_cells["ablation_targets"]`),
or once at its defaults."""
from runs.identity import RunSpec
from suites.cells import method_cells

DESCRIPTION = "prediction targets: BEiT tokens vs raw vs normalised pixels (BEiT T4, MAE T1d); k-NN"

BLOCK_40 = {"strategy": "block", "ratio": 0.4}


def grid(profile, recipe: str = "paper", flops_per_image=None) -> list[RunSpec]:
    own = {
        "beit": [RunSpec("beit", "tokens, block 0.4", {"mask": BLOCK_40})],
        "pixel": [RunSpec("pixel", "raw pixels, block 0.4", {"mask": BLOCK_40, "norm_pix_loss": False}),
                  RunSpec("pixel", "norm. pixels, block 0.4", {"mask": BLOCK_40, "norm_pix_loss": True})],
        "mae": [RunSpec("mae", "raw pixels, random 0.75", {"norm_pix_loss": False}),
                RunSpec("mae", "norm. pixels, random 0.75", {"norm_pix_loss": True})],
    }
    return [RunSpec("none", "random init")] + method_cells("ablation_targets", own)
