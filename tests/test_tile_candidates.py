"""The tile-candidate stage of the GPU check (benchmarks/kernel_throughput.py --tile-candidates),
without a GPU: the candidate generator, the in-process TILE_TABLE override (it changes what the
host launches and is undone afterwards), the suggestion printer, and one small problem through an
overridden tile under the interpreter, equal to the reference."""

import sys
from pathlib import Path

import pytest
import torch
import triton  # noqa: E402,F401  # a core dependency on Linux: a broken install fails, never skips

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import studies as kt  # noqa: E402  (the stage's plan, behind kernel_throughput.py)

from smooth_infonce.ops import triton as host  # noqa: E402
from smooth_infonce.ops.reference import reference_row_losses  # noqa: E402
from smooth_infonce.testing import make_problem  # noqa: E402

KEY = ("sm90", "16bit", 128)


def test_candidates_start_with_the_table_entry_and_are_valid():
    for key, entry in host.TILE_TABLE.items():
        for kernel, tile in entry.items():
            cands = kt.tile_candidates(tile)
            assert cands[0] == tile
            assert len(cands) == len({kt.tile_text(c) for c in cands})  # no duplicates
            for c in cands:
                for size in (c["rows"], c["cols"]) + tuple(x for x in (c["chunk"], c["out"]) if x is not None):
                    assert size >= 16 and size & (size - 1) == 0, (key, kernel, c)
                assert c["warps"] in (4, 8) and 1 <= c["stages"] <= 4
                assert c["rows"] * c["cols"] <= 128 * 128
                # a neighbour: one field changed
                assert sum(c[f] != tile[f] for f in tile) <= 1
            assert len(kt.tile_candidates(tile, limit=2)) <= 3
    # an entry with one stage has no 0-stage neighbour; 16 columns have no 8-column one
    small = dict(rows=16, cols=16, warps=4, stages=1, chunk=16, out=64)
    assert all(c["stages"] >= 1 and c["cols"] >= 16 and c["rows"] >= 16 for c in kt.tile_candidates(small))


def test_jobs_cover_s1_and_s3_kernels_current_first():
    jobs = kt.tile_jobs(90)
    kernels = {(j["shape"], j["kernel"]) for j in jobs}
    assert kernels == {("S1", "forward"), ("S1", "candidate_grad"), ("S3", "forward"), ("S3", "anchor_grad")}
    for shape, kernel in kernels:
        mine = [j for j in jobs if (j["shape"], j["kernel"]) == (shape, kernel)]
        assert mine[0]["current"] and not any(j["current"] for j in mine[1:])
        assert mine[0]["tile"] == host.TILE_TABLE[tuple(mine[0]["key"])][kernel]
    assert kt.table_key(128, torch.bfloat16, arch=90) == KEY
    assert kt.table_key(100, torch.float16, arch=80) == ("sm80", "16bit", 128)


def test_override_changes_the_chosen_tiles_and_is_undone():
    before = host.choose_tiles("forward", 128, torch.bfloat16, arch=90)
    grad_before = host.choose_tiles("candidate_grad", 128, torch.bfloat16, arch=90)
    saved = dict(host.TILE_TABLE[KEY]["forward"])
    new = dict(saved, rows=64, stages=2)
    with kt.tile_override({(KEY, "forward"): new}):
        inside = host.choose_tiles("forward", 128, torch.bfloat16, arch=90)
        assert (inside.rows, inside.num_stages) == (64, 2)
        assert host.choose_tiles("candidate_grad", 128, torch.bfloat16, arch=90) == grad_before  # untouched
    assert host.choose_tiles("forward", 128, torch.bfloat16, arch=90) == before
    assert host.TILE_TABLE[KEY]["forward"] == saved
    with pytest.raises(RuntimeError), kt.tile_override({(KEY, "forward"): new}):
        raise RuntimeError("undone on an exception too")
    assert host.TILE_TABLE[KEY]["forward"] == saved


def _fake_rows():
    cur_f, cur_g = dict(host.TILE_TABLE[KEY]["forward"]), dict(host.TILE_TABLE[KEY]["candidate_grad"])
    fast_f = dict(cur_f, stages=4)
    slow_g = dict(cur_g, cols=128)
    rows = []
    for shape, ms_cur, ms_fast in (("S1", 10.0, 8.0), ("S3", 1.0, 0.9)):
        rows += [dict(shape=shape, key=list(KEY), kernel="forward", tile=cur_f, current=True, status="ok",
                      fwdbwd_ms=ms_cur),
                 dict(shape=shape, key=list(KEY), kernel="forward", tile=fast_f, current=False, status="ok",
                      fwdbwd_ms=ms_fast)]
    rows += [dict(shape="S1", key=list(KEY), kernel="candidate_grad", tile=cur_g, current=True, status="ok",
                  fwdbwd_ms=10.0),
             dict(shape="S1", key=list(KEY), kernel="candidate_grad", tile=slow_g, current=False, status="ok",
                  fwdbwd_ms=12.0),
             dict(shape="S1", key=list(KEY), kernel="candidate_grad", tile=dict(cur_g, rows=64), current=False,
                  status="skipped", note="spills")]
    return rows, cur_f, fast_f, cur_g


def test_suggestion_prints_the_table_diff():
    rows, cur_f, fast_f, cur_g = _fake_rows()
    fastest = kt.fastest_tiles(rows)
    by_kernel = {f["kernel"]: f for f in fastest}
    f = by_kernel["forward"]
    assert f["fastest"] == fast_f and f["speedup"] == pytest.approx((1.25 * (1.0 / 0.9)) ** 0.5)
    assert f["speedup_per_shape"] == pytest.approx({"S1": 1.25, "S3": 1.0 / 0.9})
    assert by_kernel["candidate_grad"]["fastest"] == cur_g
    text = kt.tile_suggestion(fastest)
    line = next(x for x in text.splitlines() if "'forward'" in x)
    assert line.startswith("- TILE_TABLE['sm90', '16bit', 128]['forward']: ")
    assert f"{kt.tile_text(cur_f)} -> {kt.tile_text(fast_f)}" in line and "1.18x" in line and "S1 1.25x" in line
    keep = next(x for x in text.splitlines() if "'candidate_grad'" in x)
    assert f"keep {kt.tile_text(cur_g)}" in keep and "1 candidates timed" in keep
    assert kt.tile_text(dict(rows=64, cols=64, warps=8, stages=1, chunk=64, out=128)) == \
        "_t(64, 64, 8, 1, chunk=64, out=128)"
    # below the noise threshold: no change suggested
    assert "->" not in kt.tile_suggestion(fastest, min_speedup=2.0)
    assert kt.tile_suggestion([]) == "tile candidates: nothing timed"


@pytest.mark.interpreter
def test_overridden_tiles_launch_and_match_the_reference(monkeypatch):
    """A small S1-like problem (in-batch, self masked, ids) planned as for sm_90 from the table,
    with forward and dC + atomic dA tiles overridden: the launches take them, and the loss and
    gradients equal the reference op's."""
    assert host.INTERPRET
    # plan from TILE_TABLE as for an H100 (the interpreter target ignores the table), run under the interpreter
    monkeypatch.setattr(host, "_target", lambda device: host.Target(90, 4))
    recorded = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                recorded.append((self.fn.__name__, kwargs["BLOCK_N"], kwargs["BLOCK_M"], kwargs["BLOCK_K"]))
                return self.fn[grid](*args, **kwargs)
            return launch

    class Kernels:
        forward_kernel = Recorder(host._kernels.forward_kernel)
        anchor_grad_kernel = Recorder(host._kernels.anchor_grad_kernel)
        candidate_grad_kernel = Recorder(host._kernels.candidate_grad_kernel)

    monkeypatch.setattr(host, "_kernels", Kernels)
    p = make_problem("inbatch", 48, 48, 24, dtype=torch.float32, seed=3, shuffle=False)
    key = kt.table_key(24, torch.float32, "ieee", 90)
    overrides = {(key, "forward"): dict(rows=16, cols=32, chunk=16),
                 (key, "candidate_grad"): dict(rows=32, cols=16, chunk=16, out=32)}
    options = dict(temperature=0.1, smoothing=0.1, neighbors=None, allow_tf32=False)
    with kt.tile_override(overrides):
        loss = p.row_losses(host.triton_row_losses, **options).sum()
        grads = torch.autograd.grad(loss, p.leaves)
    assert ("forward_kernel", 16, 32, 16) in recorded
    assert ("candidate_grad_kernel", 32, 16, 16) in recorded
    table = host.TILE_TABLE[key]["forward"]
    assert not any(r[0] == "forward_kernel" and r[1:3] == (table["rows"], table["cols"]) for r in recorded)

    ref = p.cast(torch.float64)
    ref_loss = ref.row_losses(reference_row_losses, temperature=0.1, smoothing=0.1, neighbors=None).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref.leaves)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)

    recorded.clear()  # undone: the table's tiles again
    p.row_losses(host.triton_row_losses, **options).sum()
    assert all(r[1:3] == (table["rows"], table["cols"]) for r in recorded if r[0] == "forward_kernel")
