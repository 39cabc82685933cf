"""Published reference numbers (ImageNet-1k pre-training), from ../shared/DESIGN.md.
Shown beside our numbers for context, in their own clearly labelled columns, never mixed:
a method's headline result (ViT-B/16), or where a paper ablated a suite's setting, that
ablation's row (the setting column names model and schedule)."""

REFERENCE = {
    # method: (setting, fine-tune top-1, linear top-1, k-NN top-1, ADE20K mIoU)
    "beit": ("BEiT 800 ep", 83.2, 56.7, None, 47.1),
    "mae": ("MAE 1600 ep, norm. pixels", 83.6, 68.0, None, 48.1),
    "pixel": ("SimMIM 800 ep", 83.8, None, None, None),
    "ibot": ("iBOT 400 ep, multi-crop", 84.0, 79.5, 77.1, 50.0),
}
# (method, setting as the suites name it): the papers' ablations of that setting
ABLATIONS = {
    # MAE Fig. 5 and Table 1f (ViT-L, 800 ep)
    ("mae", "random 0.75"): ("MAE ViT-L 800 ep, random 75%", 84.9, 73.5, None, None),
    ("mae", "random 0.9"): ("MAE ViT-L 800 ep, random 90%", None, 66.1, None, None),
    ("mae", "block 0.75"): ("MAE ViT-L 800 ep, block 75%", 82.8, 63.9, None, None),
    ("mae", "grid 0.75"): ("MAE ViT-L 800 ep, grid 75%", 84.0, 66.0, None, None),
    # BEiT Table 4 (ViT-B, 300 ep; fine-tune / ADE20K); its pixel rows regress raw pixels at
    # BEiT's 40% (our pixel cells mask 60%)
    ("beit", "block 0.4"): ("BEiT ViT-B 300 ep, block 40%", 82.86, None, None, 44.65),
    ("beit", "random 0.4"): ("BEiT ViT-B 300 ep, random 40%", 82.77, None, None, 42.93),
    ("pixel", "block 0.6"): ("BEiT T4 pixels, block 40%, 300 ep", 81.04, None, None, 41.38),
    ("pixel", "random 0.6"): ("BEiT T4 pixels, random 40%, 300 ep", 80.50, None, None, 37.09),
}
COLUMNS = ("paper setting", "paper fine-tune", "paper linear", "paper k-NN", "paper ADE20K mIoU")
SOURCE = ("published ImageNet-1k numbers (a method's ViT-B/16 headline, or the paper's ablation of the "
          "same setting, model and schedule named; sources in reports/papers.py), not measured here")
