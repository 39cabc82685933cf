"""How big must MAE's decoder be? Depth at the profile's width (MAE Table 1a: linear probing
rises with depth, fine-tuning is flat) and width at depth 2 (Table 1b). A question about MAE's
decoder: another method takes part only with the cells it declares
(`Method.suite_cells["ablation_mae_decoder"]`, e.g. a decoder of its own)."""
from runs.identity import RunSpec
from suites.cells import method_cells

DESCRIPTION = "MAE decoder depth and width (MAE Table 1a/1b), with the none baseline; k-NN"


def grid(profile, recipe: str = "paper", flops_per_image=None) -> list[RunSpec]:
    base = profile.method_defaults.get("mae", {})
    width = base.get("decoder_dim", 128)
    mae = [RunSpec("mae", f"depth {depth} x {width}", {"decoder_depth": depth}) for depth in (1, 2, 4, 8)]
    # widths keep 32-d heads so every width divides evenly
    mae += [RunSpec("mae", f"depth 2 x {w}", {"decoder_dim": w, "decoder_heads": max(1, w // 32)})
            for w in (width // 2, width * 2)]
    return [RunSpec("none", "random init")] + method_cells("ablation_mae_decoder", {"mae": mae}, default_cell=False)
