"""Published reference numbers (ViT-B/16, ImageNet-1k pre-training), from ../shared/DESIGN.md.
Shown beside our numbers for context, in their own clearly labelled columns, never mixed."""

REFERENCE = {
    # method: (setting, fine-tune top-1, linear top-1, k-NN top-1, ADE20K mIoU)
    "beit": ("BEiT 800 ep", 83.2, 56.7, None, 47.1),
    "mae": ("MAE 1600 ep, norm. pixels", 83.6, 68.0, None, 48.1),
    "pixel": ("SimMIM 800 ep", 83.8, None, None, None),
    "ibot": ("iBOT 400 ep, multi-crop", 84.0, 79.5, 77.1, 50.0),
}
COLUMNS = ("paper setting", "paper fine-tune", "paper linear", "paper k-NN", "paper ADE20K mIoU")
SOURCE = "published ViT-B/16 ImageNet-1k numbers (papers; see DESIGN.md), not measured here"
