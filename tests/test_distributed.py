"""gather_distributed for real: 2 CPU processes on gloo against one process on the whole batch.

Each rank averages over its own rows, so the mean of the rank losses is the global loss, and each
rank's gradient is world_size times the global gradient of its slice (DDP's averaging then gives
the global gradient exactly).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smooth_infonce import SmoothInfoNCELoss, smooth_infonce

from integration_helpers import free_port

WORLD, BATCH, WIDTH = 2, 5, 8
pytestmark = pytest.mark.slow


def make_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "out0": torch.randn(WORLD * BATCH, WIDTH, generator=g, dtype=torch.float64),
        "out1": torch.randn(WORLD * BATCH, WIDTH, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, 3, (WORLD * BATCH,), generator=g),
    }


def losses_and_grads(case, out0, out1, labels, gather):
    out0, out1 = out0.clone().requires_grad_(), out1.clone().requires_grad_()
    if case == "simclr":
        loss = SmoothInfoNCELoss(0.2, 0.1, 3, gather_distributed=gather)(out0, out1)
    elif case == "supervised":
        loss = SmoothInfoNCELoss(0.2, 0.2, None, gather_distributed=gather)(out0, out1, labels=labels)
    else:  # two-tower, symmetric, positional ids
        loss = smooth_infonce(out0, out1, temperature=0.2, smoothing=0.1, neighbors=2, symmetric="mean",
                              gather_distributed=gather)
    loss.backward()
    return loss.detach(), out0.grad, out1.grad


def worker(rank, port, case, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        inputs = make_inputs()
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        result = losses_and_grads(case, inputs["out0"][mine], inputs["out1"][mine], inputs["labels"][mine], True)
        torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["simclr", "supervised", "two_tower"])
def test_gather_equals_single_process(case, tmp_path):
    mp.spawn(worker, args=(free_port(), case, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    inputs = make_inputs()
    loss, grad0, grad1 = losses_and_grads(case, inputs["out0"], inputs["out1"], inputs["labels"], False)

    torch.testing.assert_close(sum(r[0] for r in ranks) / WORLD, loss)
    for rank, (_, rank_grad0, rank_grad1) in enumerate(ranks):
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        torch.testing.assert_close(rank_grad0 / WORLD, grad0[mine])
        torch.testing.assert_close(rank_grad1 / WORLD, grad1[mine])


def test_gather_is_a_no_op_in_one_process():
    inputs = make_inputs()
    a = losses_and_grads("simclr", inputs["out0"], inputs["out1"], inputs["labels"], True)
    b = losses_and_grads("simclr", inputs["out0"], inputs["out1"], inputs["labels"], False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
