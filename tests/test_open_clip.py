"""The open_clip drop-in (`smooth_infonce.integrations.open_clip.SmoothClipLoss`): at smoothing 0 it
is open_clip's ClipLoss in value and in the gradients of both towers, of logit_scale and of
logit_bias, in float64, in one process and on 2 gloo processes for every local_loss x
gather_with_grad; with smoothing each direction is the written-out loss with its own neighbours;
it trains a tiny open_clip model built here without pretrained weights."""

from __future__ import annotations

import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from smooth_infonce import SmoothingSchedule, smooth_infonce
from smooth_infonce.integrations.open_clip import SmoothClipLoss
from smooth_infonce.integrations.open_clip.loss import CLIP_LOSS_USES_BIAS

from integration_helpers import free_port
from oracles import two_tower_oracle

WORLD, BATCH, WIDTH = 2, 5, 8
COMBINATIONS = [(local, grad) for local in (False, True) for grad in (False, True)]


def features(rows=2 * BATCH, width=WIDTH, seed=0):
    """Unit image and text features (as open_clip's models return them) and a logit scale, float64."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(rows, width, generator=g, dtype=torch.float64), dim=1)
    texts = F.normalize(torch.randn(rows, width, generator=g, dtype=torch.float64), dim=1)
    return images, texts, torch.tensor(14.3, dtype=torch.float64)


def loss_and_grads(criterion, images, texts, logit_scale, logit_bias=None):
    leaves = [x.clone().requires_grad_() for x in (images, texts, logit_scale)]
    bias = None if logit_bias is None else logit_bias.clone().requires_grad_()
    loss = criterion(*leaves, logit_bias=bias)
    loss.backward()
    grads = [leaf.grad for leaf in leaves] + ([] if bias is None else [bias.grad])
    return loss.detach(), grads


def assert_same(got, expected):
    (loss, grads), (expected_loss, expected_grads) = got, expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(expected_grads)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


# --- one process -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:a row has only")  # 1 or 2 rows: fewer negatives than k, as intended
@pytest.mark.parametrize("rows", [1, 2, 7])
@pytest.mark.parametrize("neighbors", [None, 3])
def test_smoothing_zero_is_clip_loss(rows, neighbors):
    images, texts, scale = features(rows)
    got = loss_and_grads(SmoothClipLoss(neighbors=neighbors), images, texts, scale)
    assert_same(got, loss_and_grads(ClipLoss(), images, texts, scale))


def test_logit_bias_and_a_one_element_scale_as_clip_loss():
    """open_clip's models with init_logit_bias pass a bias; nonscalar_logit_scale a (1,) scale."""
    images, texts, scale = features()
    bias = torch.tensor([-2.5], dtype=torch.float64)
    got = loss_and_grads(SmoothClipLoss(), images, texts, scale.reshape(1), bias)
    expected = loss_and_grads(ClipLoss(), images, texts, scale.reshape(1), bias)
    assert_same(got, expected)
    if CLIP_LOSS_USES_BIAS:  # open_clip >= 3.0: a zero gradient, not None (2.x: None, as ClipLoss's)
        assert got[1][3] is not None and float(got[1][3].abs()) == 0.0
    smoothed = loss_and_grads(SmoothClipLoss(smoothing=0.2, neighbors=2), images, texts, scale, bias)
    plain = loss_and_grads(SmoothClipLoss(smoothing=0.2, neighbors=2), images, texts, scale)
    assert_same((smoothed[0], smoothed[1][:3]), plain)  # the bias changes nothing, smoothed or not


def test_output_dict_and_float_scale():
    images, texts, scale = features()
    out = SmoothClipLoss()(images, texts, scale, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], ClipLoss()(images, texts, scale))
    torch.testing.assert_close(SmoothClipLoss()(images, texts, 14.3), out["contrastive_loss"])
    assert isinstance(SmoothClipLoss(), ClipLoss)


@pytest.mark.parametrize("neighbors", [None, 1, 3])
def test_smoothing_acts_in_both_directions_with_their_own_neighbours(neighbors):
    """The loss is the mean of the image-to-text and text-to-image losses written out row by row
    (tests/oracles.py), each direction choosing its neighbours among its own candidates, and the
    features are not normalised again; the scale's gradient flows."""
    images, texts, scale = features(7)
    images = images * 1.7  # off the unit sphere: the drop-in must not renormalise (normalize=False)
    criterion = SmoothClipLoss(smoothing=0.3, neighbors=neighbors)
    loss, grads = loss_and_grads(criterion, images, texts, scale)
    tau = 1 / float(scale)
    kw = dict(temperature=tau, smoothing=0.3, neighbors=neighbors, normalize=False)
    expected = (two_tower_oracle(images, texts, **kw).mean() + two_tower_oracle(texts, images, **kw).mean()) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert not torch.isclose(loss, ClipLoss()(images, texts, scale))
    # the same through the core's two one-direction calls, gradients included
    one_way = dict(smoothing=0.3, neighbors=neighbors, normalize=False, few_negatives="use_all")

    def core(images, texts, scale):
        return (smooth_infonce(images, texts, logit_scale=scale, **one_way)
                + smooth_infonce(texts, images, logit_scale=scale, **one_way)) / 2

    leaves = [x.clone().requires_grad_() for x in (images, texts, scale)]
    core(*leaves).backward()
    for grad, leaf in zip(grads, leaves):
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-10, atol=1e-12)


def test_the_directions_choose_different_neighbours():
    """A case built so that image 0's nearest other text differs from text 0's nearest other image:
    with k = 1 the smoothed loss matches the per-direction oracle and not one shared choice."""
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8]], dtype=torch.float64)
    texts = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    texts = F.normalize(texts, dim=1)
    nearest_text = (images[0] @ texts[1:].T).argmax() + 1  # of image 0: text 1
    nearest_image = (texts[0] @ images[1:].T).argmax() + 1  # of text 0: image 2
    assert int(nearest_text) != int(nearest_image)
    scale = torch.tensor(5.0, dtype=torch.float64)
    loss = SmoothClipLoss(smoothing=0.4, neighbors=1)(images, texts, scale)
    kw = dict(temperature=0.2, smoothing=0.4, neighbors=1, normalize=False)
    expected = (two_tower_oracle(images, texts, **kw).mean() + two_tower_oracle(texts, images, **kw).mean()) / 2
    torch.testing.assert_close(loss, expected)


def test_schedule_and_set_epoch():
    criterion = SmoothClipLoss(neighbors=2, schedule=SmoothingSchedule(0.2, "warmup", warmup_epochs=1))
    images, texts, scale = features()
    assert criterion.smoothing == 0.0
    torch.testing.assert_close(criterion(images, texts, scale), ClipLoss()(images, texts, scale))
    assert criterion.set_epoch(1) == 0.2
    expected = SmoothClipLoss(smoothing=0.2, neighbors=2)(images, texts, scale)
    torch.testing.assert_close(criterion(images, texts, scale), expected)
    with pytest.raises(RuntimeError, match="set_epoch needs a schedule"):
        SmoothClipLoss().set_epoch(1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(smoothing=1.0), ValueError, "smoothing must be in"),
    (dict(neighbors=0), ValueError, "neighbors must be"),
    (dict(few_negatives="skip"), ValueError, "few_negatives must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(local_loss=1), TypeError, "local_loss must be a bool"),
    (dict(world_size=0), ValueError, "world_size must be an int >= 1"),
    (dict(rank=2, world_size=2), ValueError, "rank must be below world_size"),
])
def test_constructor_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        SmoothClipLoss(**kwargs)


def test_call_errors_name_the_argument():
    images, texts, scale = features()
    criterion = SmoothClipLoss(smoothing=0.1)
    with pytest.raises(ValueError, match="text_features"):
        criterion(images, texts[:-1], scale)
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        criterion(images, texts, -scale)
    with pytest.raises(TypeError, match="logit_scale must be"):
        criterion(images, texts, "14")
    with pytest.raises(ValueError, match="non-finite|finite"):
        criterion(images.clone().fill_(float("nan")), texts, scale)


def test_without_open_clip_the_import_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['open_clip'] = None\n"
            "import smooth_infonce.integrations.open_clip\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode != 0 and "pip install 'smooth-infonce[open_clip]'" in done.stderr, done.stderr[-2000:]


# --- a tiny open_clip model, trained ------------------------------------------------------------

def tiny_clip():
    return open_clip.create_model(
        "ViT-B-32", pretrained=None, embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2))


def test_trains_a_tiny_open_clip_model():
    """A ViT/text-transformer CLIP of 2 layers each, built without pretrained weights, 5 AdamW steps
    on 8 made-up image-caption pairs through open_clip's forward: finite losses that go down, and
    every tower and the logit scale move."""
    torch.manual_seed(0)
    model = tiny_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    colours = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
    captions = tokenizer([f"a photo of a {c} square" for c in colours])
    images = torch.stack([torch.full((3, 32, 32), i / 8.0) + 0.1 * torch.randn(3, 32, 32) for i in range(8)])
    criterion = SmoothClipLoss(smoothing=0.1, neighbors=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        image_features, text_features, logit_scale = model(images, captions)
        loss = criterion(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    moved = {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {"visual", "transformer", "logit_scale"} <= moved


# --- two gloo processes ---------------------------------------------------------------------------

def rank_results(rank, combos, smoothing):
    """Per combination: (SmoothClipLoss's loss and grads, ClipLoss's) on this rank's slice."""
    images, texts, scale = features()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    bias = torch.tensor(-1.0, dtype=torch.float64)
    results = {}
    for local, grad in combos:
        kw = dict(local_loss=local, gather_with_grad=grad, rank=rank, world_size=WORLD)
        smooth = SmoothClipLoss(**kw, smoothing=smoothing, neighbors=3)
        results[(local, grad)] = (loss_and_grads(smooth, images[mine], texts[mine], scale, bias),
                                  loss_and_grads(ClipLoss(**kw), images[mine], texts[mine], scale, bias))
    return results


def worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {smoothing: rank_results(rank, COMBINATIONS, smoothing) for smoothing in (0.0, 0.2)}
        torch.save(results, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process run (gloo, CPU) for every combination and smoothing: each rank's results."""
    folder = tmp_path_factory.mktemp("open_clip_ranks")
    mp.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("local, grad", COMBINATIONS)
def test_two_processes_smoothing_zero_is_clip_loss(two_ranks, local, grad):
    """Each rank's loss and gradients (its image and text slices, logit_scale, logit_bias) equal
    ClipLoss's on the same rank."""
    for results in two_ranks:
        smooth, clip = results[0.0][(local, grad)]
        assert_same(smooth, clip)


@pytest.mark.slow
@pytest.mark.parametrize("local, grad", COMBINATIONS)
def test_two_processes_smoothed_against_one_process(two_ranks, local, grad):
    """With smoothing, the ranks reproduce the single-process loss L of the whole batch as ClipLoss
    does its own: global logits give L on every rank, local ones average to L; the feature gradient
    of a rank's slice is dL/dslice (global, no gathered gradient) or world_size times it (gathered
    with gradient); logit_scale's gradient averages to dL/ds (each rank's own is dL/ds globally)."""
    images, texts, scale = features()
    loss, (grad_images, grad_texts, grad_scale) = loss_and_grads(
        SmoothClipLoss(smoothing=0.2, neighbors=3), images, texts, scale)
    losses = [results[0.2][(local, grad)][0][0] for results in two_ranks]
    torch.testing.assert_close(sum(losses) / WORLD, loss)
    scale_grads = [results[0.2][(local, grad)][0][1][2] for results in two_ranks]
    torch.testing.assert_close(sum(scale_grads) / WORLD, grad_scale)
    if not local:
        for rank_loss, rank_scale_grad in zip(losses, scale_grads):
            torch.testing.assert_close(rank_loss, loss)
            torch.testing.assert_close(rank_scale_grad, grad_scale)
    if local and not grad:
        return  # only the rank's own rows carry a gradient there: not a multiple of the global one
    factor = WORLD if grad else 1
    for rank, results in enumerate(two_ranks):
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        rank_images, rank_texts = results[0.2][(local, grad)][0][1][:2]
        torch.testing.assert_close(rank_images, factor * grad_images[mine])
        torch.testing.assert_close(rank_texts, factor * grad_texts[mine])
