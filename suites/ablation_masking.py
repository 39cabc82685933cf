"""Which masking? MAE's mask ratio and strategy (MAE Fig. 5, Table 1f), random vs blockwise masking for
pixel regression (BEiT Table 4, SimMIM) and for BEiT's visual tokens (BEiT Table 4),
against the no-pre-training baseline; every other registered method at the masking cells it
declares (`Method.suite_cells["ablation_masking"]`), or once at its defaults."""
from runs.identity import RunSpec
from suites.cells import method_cells

DESCRIPTION = "mask ratio (MAE) and mask strategy (pixel, BEiT), with the none baseline; k-NN"


def grid(profile, recipe: str = "paper", flops_per_image=None) -> list[RunSpec]:
    mae = [RunSpec("mae", f"random {ratio}", {"mask": {"strategy": "random", "ratio": ratio}})
           for ratio in (0.25, 0.5, 0.75, 0.9)]
    # MAE Table 1f: random 75% vs blockwise 50% / 75% vs grid 75% (exact counts: MAE's encoder
    # drops the masked patches, so blockwise masks are topped up to ratio * N)
    mae += [RunSpec("mae", f"{strategy} {ratio}", {"mask": {"strategy": strategy, "ratio": ratio}})
            for strategy, ratio in (("block", 0.5), ("block", 0.75), ("grid", 0.75))]
    pixel = [RunSpec("pixel", f"{strategy} 0.6", {"mask": {"strategy": strategy, "ratio": 0.6}})
             for strategy in ("random", "block")]
    # iBOT: the range its per-image blockwise mask ratio is drawn from (on half the images):
    # the paper's [0.1, 0.5], its code's fixed 0.3, and a higher range
    ibot = [RunSpec("ibot", f"block {low}-{high}", {"mask_ratio_range": (low, high)})
            for low, high in ((0.1, 0.5), (0.3, 0.3), (0.4, 0.8))]
    # (BEiT's stage-1 tokenizer settings are the profile's: Profile.method_defaults["beit"])
    beit = [RunSpec("beit", f"{strategy} 0.4", {"mask": {"strategy": strategy, "ratio": 0.4}})
            for strategy in ("block", "random")]
    own = {"mae": mae, "pixel": pixel, "ibot": ibot, "beit": beit}
    return [RunSpec("none", "random init")] + method_cells("ablation_masking", own)
