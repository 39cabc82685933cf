"""Segmentation through mmsegmentation: the ViT as a registered backbone, UperNet built from
mmseg's registry, layer decay, and the ADE20K path on a fixture built on the fly, on the
mmcv-lite that `make setup` installs (no compiled op)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mmseg", reason="mmsegmentation is installed by scripts/setup.sh")

# eval.mmseg_vit first: its guard lets mmseg import on mmcv-lite
from eval import segmentation  # noqa: E402
from eval.mmcv_ops import MissingCompiledOps  # noqa: E402
from eval.mmseg_vit import MimbenchViT, build_model, default_out_indices  # noqa: E402

import mmcv  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402

from core.config import ConfigError  # noqa: E402
from engine.trainer import NonFiniteLoss  # noqa: E402
from eval.registry import EvalContext, get_evaluation  # noqa: E402
from eval.segmentation import SegmentationConfig  # noqa: E402
from methods.vit import ViT, ViTConfig  # noqa: E402

# read from the installed files, not from the guard: mmcv-lite ships no compiled extension
MMCV_LITE = not any(Path(mmcv.__file__).parent.glob("_ext*"))
on_mmcv_lite = pytest.mark.skipif(not MMCV_LITE, reason="a full mmcv (compiled ops) is installed")

TINY = dict(scale=(64, 48), crop_size=32, iterations=1, batch_size=2, channels=16, aux_channels=16,
            warmup_iters=0, checkpoint_every=1)


def context(work_dir):
    return EvalContext(work_dir=work_dir, features_dir=work_dir / "features", progress=False)


def micro_vit():
    torch.manual_seed(0)
    return ViT(ViTConfig(size="micro", img_size=16, patch_size=4))


# Smoke values, CPU fp32, seed 0, the same before segmentation moved onto the one trainer (mmseg
# rounds them to 2 decimals): a change here changes segmentation's numbers. One iteration on three
# random ADE20K-layout images gets no pixel right; three on CamVid get some.
PINNED_ADE20K = {"seg_miou": 0.0, "seg_macc": 0.0, "seg_aacc": 0.0}
PINNED_CAMVID_3_ITERATIONS = {"seg_miou": 2.56, "seg_macc": 11.52, "seg_aacc": 15.04}


def test_out_indices_are_the_blocks_at_a_third_a_half_three_quarters_and_the_end():
    assert default_out_indices(12) == [3, 5, 8, 11]
    assert default_out_indices(6) == [1, 2, 4, 5]
    assert default_out_indices(24) == [7, 11, 17, 23]


def test_the_backbone_is_named_in_mmseg_configs_and_gives_strides_4_to_32():
    for patch_size in (16, 4):       # 16: deconv x2 / deconv / identity / pool; 4: identity / pools
        backbone = MODELS.build(dict(type="MimbenchViT", encoder=dict(size="micro", img_size=32,
                                                                      patch_size=patch_size)))
        assert isinstance(backbone, MimbenchViT)
        maps = backbone(torch.randn(1, 3, 64, 96))
        assert [m.shape[-2:] for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_segmentor_builds_from_the_registry_and_trains_on_camvid_sized_input():
    vit = ViT(ViTConfig(size="micro", img_size=32, patch_size=16))
    cfg = SegmentationConfig(dataset="camvid", crop_size=360, channels=16, aux_channels=16, layer_decay=0.5)
    model = segmentation.build_segmentor(vit, cfg)
    assert [type(m).__name__ for m in (model, model.backbone, model.decode_head, model.auxiliary_head)] == \
        ["EncoderDecoder", "MimbenchViT", "UPerHead", "FCNHead"]

    labels = torch.randint(0, 12, (2, 1, 360, 480))                  # 11 = void
    samples = []
    for label in labels:
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(dict(img_shape=(360, 480), ori_shape=(360, 480), pad_shape=(360, 480)))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=list(torch.randint(0, 256, (2, 3, 360, 480), dtype=torch.uint8)),
                                        data_samples=samples), training=True)
    losses = model.loss(data["inputs"], data["data_samples"])
    assert set(losses) >= {"decode.loss_ce", "aux.loss_ce"}
    total, _ = model.parse_losses(losses)
    total.backward()
    assert model.backbone.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.backbone.encoder.patch_embed.proj.weight.grad.abs().sum() > 0

    groups = segmentation.layer_decay_param_groups(model, cfg)
    scale_of = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    depth = vit.cfg.depth
    assert scale_of[id(model.backbone.encoder.patch_embed.proj.weight)] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert scale_of[id(model.backbone.encoder.blocks[i].attn.qkv.weight)] == 0.5 ** (depth - i)
    assert scale_of[id(model.decode_head.conv_seg.weight)] == 1.0
    assert scale_of[id(model.backbone.adapters[0][0].weight)] == 1.0
    assert len(scale_of) == sum(1 for p in model.parameters() if p.requires_grad)


def make_ade20k_fixture(root, per_split=3, size=(64, 48)):
    """ADEChallengeData2016 layout: images/{training,validation}/*.jpg, annotations/*.png
    with labels 0..150 (0 = "other")."""
    gen = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(per_split):
            name = f"ADE_{split[:3]}_{i:08d}"
            Image.fromarray(gen.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / split / f"{name}.jpg")
            label = np.zeros((size[1], size[0]), dtype=np.uint8)
            label[:, size[0] // 2:] = gen.integers(1, 151)       # left half "other", right half a class
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")


def test_ade20k_fixture_trains_one_iteration_evaluates_and_names_the_mmcv_that_ran(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    make_ade20k_fixture(root)
    cfg = SegmentationConfig(dataset="ade20k", data_root=str(root), **TINY)
    result = get_evaluation("segmentation").run(micro_vit(), None, cfg, context(tmp_path / "work"))

    assert result.metrics == pytest.approx(PINNED_ADE20K, rel=1e-6)
    assert result.details["train"]["iterations"] == 1 and result.details["train"]["steps"] == 1
    assert result.details["eval_images"] == 3
    # the record names the mmcv that ran
    assert (result.details["mmcv"], result.details["mmcv_ops"]) == \
        (mmcv.__version__, "none (mmcv-lite)" if MMCV_LITE else "compiled")
    # reduce_zero_label: ADE20K's "other" (0) is ignored (255), class k becomes k - 1
    sample = segmentation.build_dataset(cfg, "test", segmentation.pipelines(cfg)[1])[0]["data_samples"]
    labels = sample.gt_sem_seg.data
    assert (labels[..., :32] == 255).all() and (labels[..., 32:] < 150).all()
    assert (tmp_path / "work" / "checkpoints" / "ckpt-00000001.pt").exists()


def test_a_killed_segmentation_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = SegmentationConfig(dataset="camvid", eval_images=1, **{**TINY, "iterations": 3, "checkpoint_every": 2})
    straight = segmentation.run(micro_vit(), None, cfg, context(tmp_path / "straight"))
    assert straight.metrics == pytest.approx(PINNED_CAMVID_3_ITERATIONS, rel=1e-6)
    assert straight.metrics["seg_miou"] <= straight.metrics["seg_macc"]     # IoU <= accuracy, class by class

    real = segmentation.sample_indices

    def killed_at_iteration_2(seed, first, count, size):
        if first == 2 * cfg.batch_size:
            raise KeyboardInterrupt("killed")
        return real(seed, first, count, size)

    monkeypatch.setattr(segmentation, "sample_indices", killed_at_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        segmentation.run(micro_vit(), None, cfg, context(tmp_path / "killed"))
    monkeypatch.setattr(segmentation, "sample_indices", real)
    resumed = segmentation.run(micro_vit(), None, cfg, context(tmp_path / "killed"))
    assert resumed.details["train"]["resumed_at"] == 2
    assert resumed.metrics == straight.metrics

    final = [torch.load(tmp_path / d / "checkpoints" / "ckpt-00000003.pt", weights_only=True)["model"]
             for d in ("straight", "killed")]
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name


def test_a_nonfinite_segmentation_loss_stops_with_the_trainers_message(tmp_path, monkeypatch):
    cfg = SegmentationConfig(dataset="camvid", eval_images=1, **{**TINY, "iterations": 4, "checkpoint_every": 2})
    real_batch, real_forward = segmentation.SegBatches.batch_for_step, segmentation.Segmentor.forward
    current = []

    def batch_for_step(self, step):
        current.append(step)
        return real_batch(self, step)

    def nan_at_step_3(self, batch):
        loss, logs = real_forward(self, batch)
        return (loss * float("nan") if current[-1] == 3 else loss), logs

    monkeypatch.setattr(segmentation.SegBatches, "batch_for_step", batch_for_step)
    monkeypatch.setattr(segmentation.Segmentor, "forward", nan_at_step_3)
    with pytest.raises(NonFiniteLoss, match=r"^loss is nan at step 3 \(fp32\); last good checkpoint: .*ckpt-00000002\.pt\. "
                                            r"Lower the learning rate or raise max_bad_steps"):
        segmentation.run(micro_vit(), None, cfg, context(tmp_path))
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2                           # steps 0 and 1, flushed with the checkpoint at 2
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_check_inputs_names_a_missing_dataset_folder_before_any_work(tmp_path):
    cfg = SegmentationConfig(dataset="ade20k", data_root=str(tmp_path / "nowhere"))
    with pytest.raises(Exception, match=r"nowhere has no (images|annotations)/(training|validation)/; expected"):
        get_evaluation("segmentation").check_inputs(cfg)


def test_sliding_window_inference_runs_through_mmseg_and_keeps_the_whole_image_identity(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    make_ade20k_fixture(root, size=(96, 64))
    whole = SegmentationConfig(dataset="ade20k", data_root=str(root), **TINY)
    slide = SegmentationConfig(dataset="ade20k", data_root=str(root), test_mode="slide", **TINY)
    from core.config import identity_record
    # a late field: whole-image configs keep the identity (and the finished evaluations) they had
    assert "test_mode" not in identity_record(whole) and identity_record(slide)["test_mode"] == "slide"
    assert slide.config_hash() != whole.config_hash()
    assert slide.slide_stride == 21 and SegmentationConfig().slide_stride == 341     # BEiT's 512 / 341
    model = segmentation.build_segmentor(micro_vit(), slide)
    assert (model.test_cfg.mode, model.test_cfg.crop_size, model.test_cfg.stride) == ("slide", (32, 32), (21, 21))
    windows = []
    encode = model.encode_decode
    model.encode_decode = lambda inputs, metas: windows.append(inputs.shape[-2:]) or encode(inputs, metas)
    dataset = segmentation.build_dataset(slide, "test", segmentation.pipelines(slide)[1], indices=1)
    scores = segmentation.evaluate(model, dataset, 255, progress=False)
    # the 96 x 64 image resized within (64, 48): 64 x 43, padded to 64 x 64 (size_divisor 32): 3 x 3 windows
    assert len(windows) == 9 and set(windows) == {(32, 32)}
    assert 0 <= scores["mIoU"] <= 100
    with pytest.raises(ConfigError, match="test_mode 'tiles' is not one of whole, slide"):
        SegmentationConfig(test_mode="tiles").validate()


@on_mmcv_lite
def test_upernet_runs_the_ade20k_pipeline_slide_inference_and_iou_metric_without_compiled_ops(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    make_ade20k_fixture(root, size=(96, 64))
    cfg = SegmentationConfig(dataset="ade20k", data_root=str(root), test_mode="slide", **TINY)
    result = get_evaluation("segmentation").run(micro_vit(), None, cfg, context(tmp_path / "work"))
    # every mmcv op is the stand-in's: one compiled op called anywhere would have raised
    assert isinstance(sys.modules["mmcv._ext"], MissingCompiledOps)
    assert result.details["mmcv_ops"] == "none (mmcv-lite)" and result.details["eval_images"] == 3
    assert set(result.metrics) == {"seg_miou", "seg_macc", "seg_aacc"}
    assert 0 <= result.metrics["seg_miou"] <= result.metrics["seg_macc"] <= 100


FULL_MMCV_FIX = "install full mmcv with compiled ops: bash scripts/setup.sh --full-mmcv"


@on_mmcv_lite
def test_on_mmcv_lite_a_head_that_needs_compiled_ops_fails_in_one_line_naming_full_mmcv():
    cfg = SegmentationConfig(dataset="camvid", crop_size=32, channels=16, aux_channels=16)
    upernet = segmentation.model_config(micro_vit(), cfg, num_classes=11, ignore_index=11)
    psanet = dict(upernet, decode_head=dict(type="PSAHead", in_channels=64, channels=16, num_classes=11,
                                            mask_size=(9, 9)))
    with pytest.raises(ConfigError) as err:
        build_model(psanet)
    assert str(err.value) == f"PSAHead needs mmcv's compiled PSAMask, which mmcv-lite lacks; {FULL_MMCV_FIX}"
    deformable = dict(upernet, auxiliary_head=dict(upernet["auxiliary_head"], conv_cfg=dict(type="DCNv2")))
    with pytest.raises(ConfigError, match=r"^DCNv2 needs mmcv's compiled ModulatedDeformConv2d, which mmcv-lite "
                                          r"lacks; install full mmcv"):
        build_model(deformable)
    assert type(build_model(upernet).decode_head).__name__ == "UPerHead"      # UperNet itself builds

    # an op reached some other way fails when called, naming the op and the same fix
    from mmcv.ops import PSAMask
    with pytest.raises(RuntimeError) as err:
        PSAMask("collect", (3, 3))(torch.zeros(1, 9, 4, 4))
    assert str(err.value) == f"mmcv op 'psamask_forward' is compiled, and this mmcv (mmcv-lite) has no " \
                             f"compiled ops; {FULL_MMCV_FIX}"
