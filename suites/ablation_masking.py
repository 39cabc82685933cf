"""Which masking? MAE's mask ratio (MAE Fig. 5) and random vs blockwise masking for
pixel regression (BEiT Table 4, SimMIM), against the no-pre-training baseline."""
from suites.runner import RunSpec

DESCRIPTION = "mask ratio (MAE) and mask strategy (pixel), with the none baseline; k-NN"


def grid(profile) -> list[RunSpec]:
    runs = [RunSpec("none", "random init")]
    runs += [RunSpec("mae", f"random {ratio}", {"mask": {"strategy": "random", "ratio": ratio}})
             for ratio in (0.25, 0.5, 0.75, 0.9)]
    runs += [RunSpec("pixel", f"{strategy} 0.6", {"mask": {"strategy": strategy, "ratio": 0.6}})
             for strategy in ("random", "block")]
    # iBOT: the range its per-image blockwise mask ratio is drawn from (on half the images):
    # the paper's [0.1, 0.5], its code's fixed 0.3, and a higher range
    runs += [RunSpec("ibot", f"block {low}-{high}", {"mask_ratio_range": (low, high)})
             for low, high in ((0.1, 0.5), (0.3, 0.3), (0.4, 0.8))]
    return runs
