"""The cached-gradient step (`smooth_infonce/cached_step.py`) is exact, in float64, with the real
lightly models of the project and the lightly drop-in loss.

- Without batch norm (GroupNorm), dropout off: a chunked step equals today's single pass
  (`model.training_loss` + backward): loss, every parameter gradient, buffers, queue.
- With dropout: a chunked step equals the plain step over the same chunk-by-chunk forward (one
  graph, one backward, the same dropout masks): the reference a second pass must reproduce.
- Train-mode batch norm: equals the plain step of the same model where each chunk is normalised on
  its own, running statistics included (moved once per chunk).
- Breaking the RNG restore or the buffer restore makes these comparisons fail.

Layouts: SimCLR, SimCLR multi-crop with weights, MoCo with a queue and ids, SSLight multi-crop MoCo
with weights, symmetric MoCo; chunk sizes that divide the batch of 12 and that do not.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from smooth_infonce import cached_step as cs
from smooth_infonce.cached_step import cached_step, chunk_slices
from smooth_infonce.integrations.lightly import SmoothNTXentLoss
from smooth_infonce.integrations.lightly.models import MoCoModel, SimCLRModel
from smooth_infonce.integrations.lightly.steps import cached_training_loss, lightly_step_parts
from smooth_infonce.integrations.lightning.module import lightning_hooks
from smooth_infonce.integrations.recipes.backbones import Backbone, build_backbone

BATCH, DIM, TOL = 12, 16, 1e-10
LAYOUTS = ["simclr", "simclr_multicrop", "moco_ids", "sslight_moco", "symmetric_moco"]


def group_norm_backbone(dropout: float) -> Backbone:
    """A small conv net with GroupNorm (no batch statistics) and dropout."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
    )
    return Backbone(net, "test_group_norm", num_features=16)


def batch_norm_backbone(dropout: float) -> Backbone:
    """The registered tiny CNN (conv-BN-ReLU, train-mode batch norm) followed by dropout."""
    tiny = build_backbone("tiny_cnn", width=4)
    return Backbone(nn.Sequential(tiny, nn.Dropout(dropout)), "tiny_cnn_dropout", num_features=tiny.num_features)


def make_case(layout: str, norm: str, dropout: float):
    """(model, criterion, views, call keywords), float64, seeded; MoCo banks hold earlier keys of
    the same images, so the ids mask something."""
    torch.manual_seed(0)
    backbone = (group_norm_backbone if norm == "group" else batch_norm_backbone)(dropout)
    head_bn = norm == "batch"
    size = dict(hidden_dim=24, output_dim=DIM)
    g = torch.Generator().manual_seed(1)

    def images(n, px=8):
        return torch.randn(n, 3, px, px, generator=g, dtype=torch.float64)

    if layout.startswith("simclr"):
        model = SimCLRModel(backbone, batch_norm=head_bn, **size)
        criterion = SmoothNTXentLoss(0.2, smoothing=0.1, neighbors=3, gather_distributed=True)
        if layout == "simclr":
            views, kwargs = [images(BATCH), images(BATCH)], {}
        else:  # 2 globals + 2 smaller locals, one weight per view
            views = [images(BATCH), images(BATCH), images(BATCH, 6), images(BATCH, 6)]
            kwargs = {"weights": (0.3, 0.3, 0.2, 0.2)}
        return model.double(), criterion.double(), views, kwargs
    symmetric = "sum" if layout == "symmetric_moco" else None
    model = MoCoModel(backbone, batch_norm=head_bn, key_momentum=0.9, symmetric=symmetric, **size).double()
    criterion = SmoothNTXentLoss(0.2, memory_bank_size=(64, DIM), smoothing=0.1, neighbors=3,
                                 wait_for_full_bank=False).double()
    ids = torch.arange(BATCH) + 100
    if layout == "sslight_moco":  # key = global 1; queries: global 2 and two smaller locals
        views = [images(BATCH), images(BATCH), images(BATCH, 6), images(BATCH, 6)]
        kwargs = {"weights": (0.4, 0.3, 0.3), "ids": ids}
    else:
        views, kwargs = [images(BATCH), images(BATCH)], {"ids": ids}
    with torch.no_grad():  # earlier keys of these images in the bank (the ids mask them)
        criterion._enqueue(model.forward_key(views[0]), ids)
        criterion._enqueue(torch.randn(BATCH, DIM, generator=g, dtype=torch.float64), None)
    return model, criterion, views, kwargs


def state(model: nn.Module, criterion: nn.Module) -> dict:
    """Everything a step changes: parameter gradients, buffers (running statistics, the momentum
    encoder's), the memory bank, its pointer, ids and count."""
    out = {f"grad.{name}": p.grad for name, p in model.named_parameters() if p.requires_grad}
    out.update({f"buffer.{name}": b for name, b in model.named_buffers()})
    out.update({f"loss.{name}": b for name, b in criterion.named_buffers()})
    return out


def assert_same(a: dict, b: dict, tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] is not None and b[name] is not None, name
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def run_cached(case, chunk_size):
    model, criterion, views, kwargs = copy.deepcopy(case)
    torch.manual_seed(7)
    if isinstance(model, MoCoModel):
        model.update_key_encoder()
    loss = cached_training_loss(model, views, criterion, chunk_size, **kwargs)
    return loss, state(model, criterion), torch.get_rng_state()


def run_chunkwise_reference(case, chunk_size):
    """The plain step over the chunk-by-chunk forward: one graph, one backward. Its dropout masks
    and batch-norm batches are the chunks', so it is what the cached step must reproduce."""
    model, criterion, views, kwargs = copy.deepcopy(case)
    torch.manual_seed(7)
    if isinstance(model, MoCoModel):
        model.update_key_encoder()
    parts = lightly_step_parts(model, views, criterion, key_chunk_size=chunk_size, **kwargs)
    outputs = [parts.embed([x[rows] for x in parts.inputs]) for rows in chunk_slices(BATCH, chunk_size)]
    loss = parts.loss_of([torch.cat(per_chunk) for per_chunk in zip(*outputs)])
    loss.backward()
    return loss.detach(), state(model, criterion), torch.get_rng_state()


def run_single_pass(case):
    """Today's step: the model's own ``training_loss`` on the whole batch, then backward."""
    model, criterion, views, kwargs = copy.deepcopy(case)
    torch.manual_seed(7)
    if isinstance(model, MoCoModel):
        model.update_key_encoder()
    loss = model.training_loss(views, criterion, **kwargs)
    loss.backward()
    return loss.detach(), state(model, criterion)


# --- (a) no batch norm -------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [4, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_equals_single_pass_without_batch_norm(layout, chunk_size):
    case = make_case(layout, "group", dropout=0.0)
    loss, chunked, _ = run_cached(case, chunk_size)
    ref_loss, single = run_single_pass(case)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL)
    assert_same(chunked, single)
    if layout not in ("simclr", "simclr_multicrop"):  # the queue was read once and the batch's keys enqueued once
        enqueued = 2 * BATCH if layout == "symmetric_moco" else BATCH
        assert int(chunked["loss.bank_enqueued"]) == int(case[1].bank_enqueued) + enqueued


@pytest.mark.parametrize("chunk_size", [4, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_with_dropout_equals_the_plain_step_over_the_same_forward(layout, chunk_size):
    case = make_case(layout, "group", dropout=0.3)
    loss, chunked, rng = run_cached(case, chunk_size)
    ref_loss, reference, ref_rng = run_chunkwise_reference(case, chunk_size)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL)
    assert_same(chunked, reference)
    assert torch.equal(rng, ref_rng)  # the random stream continues as after one forward per chunk


def test_one_chunk_with_dropout_equals_the_single_pass():
    """chunk_size >= batch: one chunk, the same draws as the single pass."""
    case = make_case("moco_ids", "group", dropout=0.3)
    loss, chunked, _ = run_cached(case, BATCH)
    ref_loss, single = run_single_pass(case)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL)
    assert_same(chunked, single)


def test_chunk_size_none_is_the_single_pass():
    case = make_case("sslight_moco", "batch", dropout=0.3)
    loss, chunked, _ = run_cached(case, None)
    ref_loss, single = run_single_pass(case)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL)
    assert_same(chunked, single)


# --- (b) train-mode batch norm --------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [4, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_mode_batch_norm_is_per_chunk_and_running_statistics_match(layout, chunk_size):
    case = make_case(layout, "batch", dropout=0.2)
    loss, chunked, _ = run_cached(case, chunk_size)
    ref_loss, reference, _ = run_chunkwise_reference(case, chunk_size)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL)
    assert_same(chunked, reference)
    # the statistics moved once per chunk of the step (twice the views' groups: each group is one forward)
    before = dict(case[0].named_buffers())
    counters = {n: int(chunked[f"buffer.{n}"] - before[n]) for n in before if n.endswith("num_batches_tracked")}
    chunks = len(chunk_slices(BATCH, chunk_size))
    forwards_per_chunk = {"simclr": 1, "simclr_multicrop": 2, "moco_ids": 1, "sslight_moco": 2, "symmetric_moco": 2}
    query_bn = [n for n in counters if "momentum" not in n]
    assert query_bn and all(counters[n] == chunks * forwards_per_chunk[layout] for n in query_bn), counters


def test_batch_norm_chunked_differs_from_whole_batch_normalisation():
    """What the documentation warns about: with train-mode batch norm the chunk is the batch-norm
    batch, so the result is not the whole-batch step's."""
    case = make_case("simclr", "batch", dropout=0.0)
    loss, _, _ = run_cached(case, 4)
    ref_loss, _ = run_single_pass(case)
    assert abs(float(loss - ref_loss)) > 1e-6


# --- the tests can fail ------------------------------------------------------------------------------

def test_without_the_rng_restore_dropout_masks_differ(monkeypatch):
    monkeypatch.setattr(cs.RNGState, "restore", lambda self: None)
    case = make_case("moco_ids", "group", dropout=0.3)
    _, chunked, _ = run_cached(case, 4)
    _, reference, _ = run_chunkwise_reference(case, 4)
    with pytest.raises(AssertionError):
        assert_same(chunked, reference)


def test_without_the_buffer_restore_running_statistics_move_twice(monkeypatch):
    monkeypatch.setattr(cs, "restore_buffers", lambda saved: None)
    case = make_case("simclr", "batch", dropout=0.0)
    _, chunked, _ = run_cached(case, 4)
    _, reference, _ = run_chunkwise_reference(case, 4)
    with pytest.raises(AssertionError, match="running_"):
        assert_same(chunked, reference)


# --- API --------------------------------------------------------------------------------------------

def test_plain_loop_api_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8)).double()
    views = [torch.randn(10, 3, 2, 2, dtype=torch.float64) for _ in range(2)]
    criterion = SmoothNTXentLoss(0.2, smoothing=0.1)
    loss = cached_step(lambda chunk: [model(v) for v in chunk], views, lambda z: criterion(*z), 3, modules=model)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = criterion(model(views[0]), model(views[1]))
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=TOL, atol=TOL)
    for grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=TOL, atol=TOL)
    with pytest.raises(TypeError, match="modules="):
        cached_step(lambda chunk: [model(v) for v in chunk], views, lambda z: criterion(*z), 3)
    first_view = lambda chunk: model(chunk[0])  # noqa: E731
    with pytest.raises(ValueError, match="chunk_size"):
        cached_step(first_view, views[:1], lambda z: z[0].sum(), 0, modules=model)
    with pytest.raises(ValueError, match="same images"):
        cached_step(first_view, [views[0], views[1][:4]], lambda z: z[0].sum(), 2, modules=model)
    with pytest.raises(ValueError, match="scalar"):
        cached_step(first_view, views[:1], lambda z: z[0], 2, modules=model)
    assert chunk_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


class FixedViews(torch.utils.data.Dataset):
    """12 images, two fixed views each, as `PretrainDataModule`'s items: (views, target, sample id)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.views = torch.randn(12, 2, 3, 8, 8, generator=g)

    def __len__(self):
        return len(self.views)

    def __getitem__(self, index):
        return [self.views[index, 0], self.views[index, 1]], 0, index


def simclr_module(chunk_size):
    """The real `PretrainModule` of a small SimCLR recipe, with a GroupNorm backbone: no batch norm,
    whose per-chunk batch statistics differ from the whole batch's by design."""
    from smooth_infonce.integrations.lightning import PretrainModule
    from smooth_infonce.integrations.recipes import get_preset

    recipe = get_preset("light_moco", framework="simclr", backbone__name="tiny_cnn", backbone__kwargs={"width": 4},
                        head__hidden_dim=16, head__output_dim=8, head__batch_norm=False, loss__smoothing=0.1,
                        loss__schedule="constant", loss__warmup_epochs=0, views__local_crops=None)
    module = PretrainModule(recipe, chunk_size=chunk_size, backend="reference", seed=0)
    module.model.backbone = group_norm_backbone(0.0)
    return module


def fit_one_step(module, **trainer_options):
    """One training step of ``module`` on `FixedViews` (one batch of 12) with Lightning's Trainer: one
    epoch of one batch, so a step that never reaches its optimiser does not keep the run going."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_options)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(FixedViews(), batch_size=12))
    return trainer


@contextlib.contextmanager
def one_process_ddp():
    """Lightning's DDP strategy in this process (world size 1, gloo): the Trainer wraps the model in
    a real DistributedDataParallel. Afterwards the process group is destroyed and the environment
    variables Lightning set (MASTER_ADDR, MASTER_PORT, ...) are restored."""
    saved = dict(os.environ)
    try:
        yield "ddp"
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def test_lightning_hooks_sync_only_the_last_chunk(monkeypatch):
    """`PretrainModule(chunk_size=5)` under Lightning's real DDP strategy: the chunks of 5, 5 and 2
    images are back-propagated through ``manual_backward``, the first two inside the strategy's
    ``block_backward_sync`` (DDP's ``no_sync``: the gradients are not all-reduced), the last one
    synchronised."""
    module = simclr_module(chunk_size=5)
    synchronised = []
    manual_backward = module.manual_backward

    def recording_backward(loss, *args, **kwargs):
        ddp = module.trainer.strategy.model
        assert isinstance(ddp, nn.parallel.DistributedDataParallel)
        synchronised.append(ddp.require_backward_grad_sync)
        return manual_backward(loss, *args, **kwargs)

    monkeypatch.setattr(module, "manual_backward", recording_backward)
    with one_process_ddp() as strategy:
        fit_one_step(module, strategy=strategy)
    assert synchronised == [False, False, True]


def test_lightning_hooks_use_the_real_strategys_block_backward_sync():
    """The names `lightning_hooks` reads of Lightning, pinned on real objects: a DDP trainer's
    strategy has ``block_backward_sync`` and the hooks use it; a single-device strategy has none
    (nothing to block); the module has ``manual_backward``."""
    import lightning as L

    from smooth_infonce.integrations.lightning import PretrainModule

    assert callable(PretrainModule.manual_backward)
    for strategy, has_block in (("ddp", True), ("auto", False)):
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        module = simclr_module(chunk_size=5)
        module.trainer = trainer
        assert hasattr(trainer.strategy, "block_backward_sync") == has_block, type(trainer.strategy).__name__
        no_sync = lightning_hooks(module)["no_sync"]
        if has_block:
            assert no_sync == trainer.strategy.block_backward_sync
        else:
            assert no_sync is contextlib.nullcontext


# --- DDP: 2 gloo processes, chunked, against one process unchunked on the global batch ---------------

WORLD = 2


def _ddp_case():
    torch.manual_seed(0)
    model = SimCLRModel(group_norm_backbone(0.0), hidden_dim=24, output_dim=DIM, batch_norm=False).double()
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(WORLD * BATCH, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    return model, views


def _ddp_worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, views = _ddp_case()
        ddp = nn.parallel.DistributedDataParallel(model)
        allreduces = []

        def counting_hook(_, bucket):
            allreduces.append(bucket.index())
            work = dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, counting_hook)
        mine = [v[rank * BATCH:(rank + 1) * BATCH] for v in views]
        criterion = SmoothNTXentLoss(0.2, smoothing=0.1, neighbors=3, gather_distributed=True)
        loss = cached_step(lambda chunk: [ddp(v) for v in chunk], mine, lambda z: criterion(*z), 5,
                           modules=model, no_sync=ddp.no_sync)
        torch.save({"loss": loss, "allreduces": allreduces,
                    "grads": {n: p.grad for n, p in model.named_parameters()}},
                   os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_chunked_equals_one_process_unchunked_with_one_allreduce_per_bucket(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    model, views = _ddp_case()
    loss = SmoothNTXentLoss(0.2, smoothing=0.1, neighbors=3)(model(views[0]), model(views[1]))
    loss.backward()
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss.detach(), rtol=TOL, atol=TOL)
    for r in ranks:
        # one step: each gradient bucket all-reduced once (three chunks, one synchronised backward)
        assert sorted(r["allreduces"]) == sorted(set(r["allreduces"])), r["allreduces"]
        for name, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-9, atol=1e-12)


# --- Lightning: the wiring proposed for PretrainModule(chunk_size=...), under manual optimisation -------

def test_lightning_manual_optimisation_wiring_equals_the_automatic_step(monkeypatch):
    """One SimCLR step of the real `PretrainModule` (no batch norm) through Lightning: with
    ``chunk_size=5`` its cached step under manual optimisation (`lightning_hooks`) gives the
    automatic single pass's gradients, and that step really went through the cached step."""
    import lightning as L

    from smooth_infonce.integrations.lightning import module as lightning_integration

    class GradientRecorder(L.Callback):
        recorded = None  # the gradients the optimiser step saw

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.recorded = torch.cat([p.grad.flatten() for p in pl_module.model.parameters() if p.grad is not None])

    chunked_steps = []
    cached = lightning_integration.cached_training_loss

    def recording_cached(model, views, criterion, chunk_size, **kwargs):
        chunked_steps.append(chunk_size)
        return cached(model, views, criterion, chunk_size, **kwargs)

    monkeypatch.setattr(lightning_integration, "cached_training_loss", recording_cached)
    grads = {}
    for chunk_size in (None, 5):
        L.seed_everything(0)
        module, recorder = simclr_module(chunk_size), GradientRecorder()
        fit_one_step(module, callbacks=[recorder])
        assert module.automatic_optimization == (chunk_size is None) and recorder.recorded is not None
        grads[chunk_size] = recorder.recorded
    assert chunked_steps == [5]  # the chunked run's one step, none in the automatic run
    torch.testing.assert_close(grads[5], grads[None], rtol=1e-5, atol=1e-6)
