"""The GPU settings, exercised on the CPU: bf16 autocast and torch.compile for every registered
method (parametrised over the registry: a new method is tested when it is registered).

- bf16: one training step under CPU bf16 autocast matches fp32 within a stated tolerance, and
  the loss, the gradients, the parameters and AdamW's moments stay fp32 (autocast casts the
  matmuls' inputs, never the master weights).
- torch.compile: the compiled step gives eager's loss on fresh batches and is compiled once:
  dynamo may not recompile from one step to the next (`error_on_recompile`). The backend is
  `aot_eager` (dynamo's tracing and AOT autograd, where graph breaks and recompiles come
  from, without inductor's C++ code generation: 1-2 minutes per method on 2 CPU cores, which
  `make gpu-check` pays instead). The graph breaks each method has today are pinned, so a new
  one (a `.item()` in a forward, a data-dependent shape) shows up here; iBOT recompiles once
  (its masked-patch count varies) and then never.
"""
import copy

import pytest
import torch
import torch._dynamo as dynamo

from conftest import micro_overrides
from test_methods import TRAINING_METHODS, fixed_batch
from methods.base import Horizon
from methods import build_method

# bf16 keeps 8 bits of mantissa: a micro ViT's loss moves by well under 2% (measured: <= 1.7%
# for iBOT, whose two softmax temperatures amplify logit noise; <= 0.1% for the others)
BF16_LOSS_RTOL = 0.03
# per-tensor cosine between the bf16 and fp32 gradients: the same direction
BF16_GRAD_COSINE = 0.9

# dynamo's graph-break counter after the first compiled forward, today, and the kind of break:
# a change here is a new break (or one fixed) - update it knowingly. On a GPU every one of these
# is also a host-device sync (the host needs a tensor's data or a data-dependent size).
GRAPH_BREAKS = {     # none: the masked positions and the visible count come from the host mask
    "beit": 0,       # (Batch.masked / Batch.visible): no boolean indexing, no host read of a count
    "ibot": 0,
    "mae": 0,
    "pixel": 0,
}
# Methods whose graph takes a tensor of the batch's masked-patch count, which varies from batch
# to batch: dynamo recompiles once with that size dynamic ("automatic dynamic shapes"), then
# never again. Every other method compiles exactly once.
RECOMPILE_ONCE = {"ibot"}


def one_step(method, batch, autocast_dtype=None):
    """Forward (under autocast when given), backward and an AdamW step; (loss, grads, optimizer)."""
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    torch.manual_seed(1)                                # drop path and any other torch draw
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss, _ = method(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    optimizer.step()
    return loss, grads, optimizer


@pytest.mark.parametrize("name", TRAINING_METHODS)
def test_a_bf16_autocast_step_matches_fp32_and_keeps_loss_gradients_and_optimizer_state_fp32(name):
    torch.manual_seed(0)
    fp32 = build_method(name, **micro_overrides())
    bf16 = copy.deepcopy(fp32)
    batch = fixed_batch(fp32)
    loss32, grads32, _ = one_step(fp32, batch)
    loss16, grads16, optimizer = one_step(bf16, batch, torch.bfloat16)

    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=BF16_LOSS_RTOL)
    assert grads16.keys() == grads32.keys()
    for n, g in grads16.items():
        assert g.dtype == torch.float32, n
        if grads32[n].norm() > 1e-6:
            cosine = torch.nn.functional.cosine_similarity(g.flatten(), grads32[n].flatten(), dim=0)
            assert cosine > BF16_GRAD_COSINE, (n, float(cosine))
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k.startswith("exp_avg")]
    assert moments and all(t.dtype == torch.float32 for t in moments)


@pytest.fixture
def fresh_dynamo(monkeypatch):
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield dynamo.utils.counters
    dynamo.reset()


@pytest.mark.parametrize("name", TRAINING_METHODS)
def test_a_compiled_step_gives_eager_loss_on_fresh_batches_and_never_recompiles(name, fresh_dynamo):
    torch.manual_seed(0)
    eager = build_method(name, **micro_overrides())
    compiled_method = copy.deepcopy(eager)
    compiled = torch.compile(compiled_method, backend="aot_eager")

    def step(s: int) -> None:
        batch = fixed_batch(eager, seed=s)         # fresh data of the same shapes, as in training
        losses = []
        for module, step_fn in ((eager, eager), (compiled_method, compiled)):
            torch.manual_seed(s)
            loss, _ = step_fn(batch)
            loss.backward()
            module.after_step(s, Horizon(10))              # EMA teachers, temperature schedules
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5), s

    step(0)                                        # every frame is compiled here ...
    breaks = sum(fresh_dynamo["graph_break"].values())
    assert breaks == GRAPH_BREAKS[name], dict(fresh_dynamo["graph_break"])
    if name in RECOMPILE_ONCE:
        step(1)
    with torch.compiler.set_stance("fail_on_recompile"):
        for s in range(1 + (name in RECOMPILE_ONCE), 4):
            step(s)                                # ... so a compilation here is a recompile


# ---- host-device syncs in the training step -----------------------------------------------------
# Calls that read a tensor's data on the host (a sync on a GPU), made by the project's code in a
# training step that does not flush its logs, by (file, function): none. The non-finite guard
# reads the loss at flush points (engine.trainer.NonFiniteWatch); MAE's visible-patch count and
# BEiT's and iBOT's masked positions come from the host mask (Batch.visible, Batch.masked), not
# from boolean indexing or nonzero on the device. A new one fails this test.
# (torch's own optimizer reads its CPU-held step counters with .item(): not a device sync.)
KNOWN_SYNCS: dict = {}
# mask drawing reads its own CPU generator's draws, and a batch counts its host mask before it
# moves to the device: not the device's tensors
CPU_ONLY = {("masking.py", "block_mask"), ("masking.py", "block_mask_per_image"), ("base.py", "of_views")}
SYNCING = ("item", "cpu", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "__getitem__")


def reads_the_host(attr: str, args: tuple) -> bool:
    """Whether a call of Tensor.`attr` with `args` reads device data on the host: indexing does
    only with a boolean mask (its output size is the mask's count), the others always."""
    if attr != "__getitem__":
        return True
    index = args[0] if isinstance(args[0], tuple) else (args[0],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


@pytest.mark.parametrize("name", TRAINING_METHODS)
def test_the_training_step_reads_no_tensor_on_the_host_beyond_the_known_syncs(name, tmp_path, monkeypatch):
    import traceback
    from collections import Counter
    from pathlib import Path

    from engine.data import synthetic_splits
    from engine.trainer import Trainer, TrainConfig
    from engine.views import pretraining

    root = Path(__file__).resolve().parents[1]
    calls, inside = Counter(), [False]
    for attr in SYNCING:
        original = getattr(torch.Tensor, attr)

        def counted(self, *args, _original=original, _attr=attr, **kwargs):
            if inside[0] and reads_the_host(_attr, args):
                caller = traceback.extract_stack(limit=2)[0]
                path = Path(caller.filename).resolve()
                if root in path.parents and "site-packages" not in path.parts:
                    calls[(path.name, caller.name)] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, attr, counted)

    torch.manual_seed(0)
    method = build_method(name, **micro_overrides())
    images = synthetic_splits(img_size=16, train_per_class=32).train.images          # 320: 10 steps
    cfg = TrainConfig(epochs=1, batch_size=32, blr=1e-3, checkpoint_every=100, log_every=100)
    trainer = Trainer(method, *pretraining(method, images, cfg, seed=0), tmp_path, seed=0, config_hash="t",
                      progress=False)
    step = trainer._step

    def counted_step(*args):
        inside[0] = True
        try:
            return step(*args)
        finally:
            inside[0] = False
    monkeypatch.setattr(trainer, "_step", counted_step)
    trainer.fit()
    steps = trainer.total_steps
    per_step = {site: n / steps for site, n in calls.items() if site not in CPU_ONLY}
    assert per_step == KNOWN_SYNCS, per_step


def test_the_run_record_states_precision_device_and_cuda_versions(tmp_path):
    from engine.data import synthetic_splits
    from engine.trainer import Trainer, TrainConfig, precision_name
    from engine.views import pretraining
    from runs.execute import provenance

    assert precision_name(torch.device("cpu")) == "fp32"                       # auto: fp32 on the CPU
    assert precision_name(torch.device("cuda")) == "bf16 autocast"             # ... bf16 on CUDA
    assert precision_name(torch.device("cpu"), "fp16") == "fp16 autocast"
    images = synthetic_splits(img_size=16, train_per_class=8).train.images
    cfg = TrainConfig(epochs=1, batch_size=16, blr=1e-3, precision="bf16")
    method = build_method("mae", **micro_overrides())
    stats = Trainer(method, *pretraining(method, images, cfg, seed=0), tmp_path, seed=0, config_hash="t",
                    progress=False).fit()
    assert (stats["precision"], stats["device"]) == ("bf16 autocast", "cpu")
    assert {"device", "cuda", "cudnn", "torch"} <= set(provenance())
