"""The speed variants of the fused kernels (issue 16, item 9; `smooth_infonce.ops.triton.KernelVariants`)
against the fp64 reference, under the Triton interpreter: forward values, dA, dC (and the MoCo key
gradient), the neighbour columns, for in-batch and MoCo (with and without ids) layouts in uniform and
neighbour mode; deterministic mode bitwise reproducible with the occupancy-aware splits; the
selection API (context manager, setter, environment string) and its errors.

What the interpreter cannot show: the `red` PTX of atomics="red" (it runs tl.atomic_add there; the
compile report shows the PTX: tests/test_compile_report.py) and the occupancy of a real binary (it
pretends one program per SM, so the variant still plans other splits than the default here).
"""

import pytest
import torch
import triton  # noqa: E402,F401  # a core dependency on Linux: a broken install fails, never skips
from test_triton_kernel import (  # noqa: E402
    LaunchSpy,
    assert_backward_path,
    assert_matches_reference,
    record_gradient_launches,
    run,
)

from smooth_infonce.layout import dense_masks  # noqa: E402
from smooth_infonce.ops import row_target_weights  # noqa: E402
from smooth_infonce.ops import triton as host  # noqa: E402
from smooth_infonce.ops.triton import (  # noqa: E402
    KernelVariants,
    RowLossInputs,
    current_kernel_variants,
    kernel_variants,
    set_kernel_variants,
    triton_row_losses,
)
from smooth_infonce.testing import make_problem  # noqa: E402

interpreter = pytest.mark.interpreter
VARIANTS = ["default", "topk=two_pass", "grad_d=one_block", "atomics=red", "splits=occupancy",
            "topk=two_pass,grad_d=one_block,atomics=red,splits=occupancy"]
# D = 72 (80 after the kernels' alignment, 128 padded): under the interpreter the default writes the
# gradients in three 32-feature output blocks, grad_d="one_block" in one


@pytest.fixture(autouse=True)
def _default_variants():
    before = current_kernel_variants()
    yield
    set_kernel_variants(before)


def neighbor_columns(prob, k, variants):
    """The op's (N, k) neighbour columns, sorted per row, and the fp64 brute force's."""
    pairs = prob.pairs
    w_pos, w_smooth = row_target_weights(pairs, 0.1, k, torch.float32)
    inputs = RowLossInputs(prob.anchors.detach(), prob.candidates.detach(),
                           None if prob.keys is None else prob.keys.detach(), pairs.anchor_ids,
                           pairs.candidate_ids, w_pos, w_smooth, pairs.self_offset, bool(pairs.ids_exclude),
                           0.1, k, False, False)
    with kernel_variants(variants):
        _, _, cols = torch.ops.smooth_infonce.triton_row_losses(*inputs)
    valid, positive = dense_masks(pairs, prob.n, prob.m, torch.device("cpu"))
    if pairs.has_positive_key:  # the key column comes first in the dense masks
        valid, positive = valid[:, 1:], positive[:, 1:]
    sims = prob.anchors.detach().double() @ prob.candidates.detach().double().T
    expected = torch.sort(sims.masked_fill(~(valid & ~positive), float("-inf")), dim=1, descending=True,
                          stable=True).indices[:, :k]
    return cols.sort(dim=1).values, expected.sort(dim=1).values


@interpreter
@pytest.mark.parametrize("neighbors", [None, 3])
@pytest.mark.parametrize("layout", ["inbatch", "moco", "moco_ids"])
@pytest.mark.parametrize("variants", VARIANTS)
def test_variant_matches_reference(variants, layout, neighbors):
    prob = make_problem(layout, 40, 40 if layout == "inbatch" else 72, 72, dtype=torch.float32, seed=3)
    with kernel_variants(variants):
        assert_matches_reference(prob, 0.2, 0.1, neighbors, torch.float32)
    if neighbors:
        got, expected = neighbor_columns(prob, neighbors, variants)
        assert torch.equal(got, expected)


@interpreter
def test_each_variant_takes_its_own_launches(monkeypatch):
    """The values cannot tell an ignored variant from the default (both equal the reference); the
    launches can. topk="two_pass": the statistics launch without the search (k 0), then a
    search-only one (STATS=False); grad_d="one_block": both gradients of D 72 (128 padded) in one
    128-wide output block instead of four 32-wide ones. atomics="red" launches as the default under
    the interpreter (its PTX is checked by tests/test_compile_report.py), splits="occupancy" by
    test_occupancy_plans_fewer_splits_than_two_per_sm."""
    from smooth_infonce.ops import kernels

    launches = []
    for name in ("forward", "candidate_grad", "anchor_grad"):
        monkeypatch.setattr(kernels, f"{name}_kernel", LaunchSpy(getattr(kernels, f"{name}_kernel"), name, launches,
                                                                 fields=("STATS", "BLOCK_D")))
    prob = make_problem("inbatch", 40, 40, 72, dtype=torch.float32, seed=3)

    def launched(variants):
        launches.clear()
        with kernel_variants(variants):
            run(triton_row_losses, prob, temperature=0.2, smoothing=0.1, neighbors=3, deterministic=True)
        return [launch for launch in launches]

    default = launched("default")
    assert default == [("forward", None, 32), ("candidate_grad", None, 32), ("anchor_grad", None, 32)], default
    assert launched("topk=two_pass") == [("forward", None, 32), ("forward", False, 32), *default[1:]]
    assert launched("grad_d=one_block") == [("forward", None, 32), ("candidate_grad", None, 128),
                                            ("anchor_grad", None, 128)]


@interpreter
@pytest.mark.parametrize("variants", ["topk=two_pass", "grad_d=one_block"])
def test_variant_matches_reference_bf16(variants):
    prob = make_problem("inbatch", 40, 40, 72, dtype=torch.bfloat16, seed=4)
    with kernel_variants(variants):
        assert_matches_reference(prob, 0.2, 0.1, 3, torch.bfloat16)


@interpreter
@pytest.mark.parametrize("layout,neighbors", [("inbatch", 3), ("moco", None)])
def test_occupancy_splits_stay_fixed_and_deterministic_mode_launches_no_atomics(layout, neighbors, monkeypatch):
    """The occupancy variant plans its splits before the first launch and reuses them; with
    deterministic=True the backward takes the launch path without atomics (the interpreter runs
    atomics in order, so bitwise equality of two runs alone cannot show this off a GPU)."""
    launches = record_gradient_launches(monkeypatch)
    prob = make_problem(layout, 40, 40 if layout == "inbatch" else 72, 72, dtype=torch.float32, seed=5)
    options = dict(temperature=0.2, smoothing=0.1, neighbors=neighbors, deterministic=True)
    host._PROGRAMS_PER_SM.clear()
    with kernel_variants(splits="occupancy", topk="two_pass"):
        first, first_grads = run(triton_row_losses, prob, **options)
        planned = dict(host._PROGRAMS_PER_SM)
        second, second_grads = run(triton_row_losses, prob, **options)
        assert host._PROGRAMS_PER_SM == planned  # fixed before the first launch, reused after
        assert_backward_path(launches[:2], deterministic=True)
        assert launches[2:] == launches[:2]
        launches.clear()
        run(triton_row_losses, prob, **{**options, "deterministic": False})
        assert_backward_path(launches, deterministic=False)
    assert planned and all(v == 1 for v in planned.values())  # the interpreter pretends one per SM
    assert torch.equal(first, second)
    for a, b in zip(first_grads, second_grads):
        assert (a is None and b is None) or torch.equal(a, b)


def test_occupancy_plans_fewer_splits_than_two_per_sm():
    target = host.Target(90, 132)
    # MoCo-like: 2 row blocks, a long queue: about per_sm * 132 programs in all
    assert host._split(2, 1024, target) == (128, 8)
    assert host._split(2, 1024, target, per_sm=1) == (64, 16)
    assert host._split(2, 1024, target, per_sm=3) == (171, 6)
    assert host._split(5000, 1024, target, per_sm=1) == (1, 1024)


def test_one_block_tiles():
    bf16 = torch.bfloat16
    for arch in (90, 80):
        default = host.choose_tiles("candidate_grad", 256, bf16, arch=arch)
        wide = host.choose_tiles("candidate_grad", 256, bf16, arch=arch, grad_d="one_block")
        assert (default.d, wide.d) == (128, 256) and not wide.one_d_block
        assert host.choose_tiles("anchor_grad", 768, bf16, arch=arch, grad_d="one_block").d == 256
        # D held in registers (D <= 128 bf16) and the forward are unchanged
        for kernel, dim in (("candidate_grad", 128), ("anchor_grad", 64), ("forward", 256)):
            assert (host.choose_tiles(kernel, dim, bf16, arch=arch)
                    == host.choose_tiles(kernel, dim, bf16, arch=arch, grad_d="one_block"))
    assert host.choose_tiles("anchor_grad", 100, torch.float32, arch=None, grad_d="one_block").d == 128


def test_selection_api_and_errors():
    assert current_kernel_variants() == KernelVariants()
    assert KernelVariants().text() == "default"
    parsed = KernelVariants.parse(" topk=two_pass , atomics=red")
    assert parsed == KernelVariants(topk="two_pass", atomics="red")
    assert KernelVariants.parse(parsed.text()) == parsed and KernelVariants.parse("default") == KernelVariants()
    with kernel_variants("splits=occupancy", grad_d="one_block") as chosen:
        assert current_kernel_variants() == chosen == KernelVariants(splits="occupancy", grad_d="one_block")
    assert current_kernel_variants() == KernelVariants()
    with pytest.raises(RuntimeError), kernel_variants(topk="two_pass"):
        raise RuntimeError("undone on an exception too")
    assert current_kernel_variants() == KernelVariants()
    with pytest.raises(ValueError, match=r"topk='fast' is not one of fused, two_pass"):
        KernelVariants(topk="fast")
    with pytest.raises(ValueError, match=r"'tile=big' is not field=value with a field among topk, grad_d"):
        KernelVariants.parse("tile=big")
    with pytest.raises(ValueError, match=r"atomics='reduce' is not one of atom, red"):
        set_kernel_variants("atomics=reduce")
    with pytest.raises(ValueError, match="not field=value"):
        KernelVariants.parse("two_pass")
    assert current_kernel_variants() == KernelVariants()


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("layout,dim,neighbors", [("inbatch", 256, 5), ("moco_ids", 128, 5)])
def test_variant_on_gpu_matches_reference_bf16(layout, dim, neighbors):
    """All four variants at once, compiled for the real device (red PTX, occupancy from the binary,
    the one-block tiles at D 256, the two-pass top-k), bf16 at a size that spans many tiles and
    splits. Two cases only: the GPU check's test stage is short; the variants stage compares each
    variant alone with the default at the benchmark shapes (loss_rel_diff, grad_rel_diff)."""
    variants = VARIANTS[-1]
    prob = make_problem(layout, 512, 512 if layout == "inbatch" else 4096, dim, dtype=torch.bfloat16, seed=6,
                        device="cuda")
    with kernel_variants(variants):
        assert_matches_reference(prob, 0.1, 0.1, neighbors, torch.bfloat16)
        first, first_grads = run(triton_row_losses, prob, temperature=0.1, smoothing=0.1, neighbors=neighbors,
                                 deterministic=True)
        second, second_grads = run(triton_row_losses, prob, temperature=0.1, smoothing=0.1, neighbors=neighbors,
                                   deterministic=True)
    assert torch.equal(first, second)
    assert all(a is None or torch.equal(a, b) for a, b in zip(first_grads, second_grads))


# --- the GPU check's variant stage (benchmarks/kernel_throughput.py --variants), without a GPU --------

def _throughput():
    """benchmarks/throughput, the package behind the command kernel_throughput.py (imported first)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import kernel_throughput  # noqa: F401
    import throughput.problems
    import throughput.studies
    import throughput.study_runs

    return throughput


def test_variant_stage_plan_covers_every_axis():
    kt = _throughput()
    assert set(kt.studies.VARIANT_AXES) == set(host.VARIANT_CHOICES)
    for axis, (alternatives, _, _) in kt.studies.VARIANT_AXES.items():
        assert set(alternatives) == set(host.VARIANT_CHOICES[axis][1:])
    jobs = dict(kt.studies.variant_jobs())
    for shape in ("S1", "S3", "S4"):
        assert "topk" in jobs[(shape, 5)] and "splits" in jobs[(shape, None)]
    assert "atomics" in jobs[("S1", None)] and ("S3", None) in jobs and "atomics" not in jobs[("S3", None)]
    assert jobs[("S2", None)] == ["grad_d"]
    assert [key[0] for key, _ in kt.studies.variant_jobs()][-1] == "S4"  # the most expensive last
    assert dict(kt.studies.variant_jobs(axes=["topk"], shapes=["S1"])) == {("S1", 5): ["topk"]}


def test_variant_stage_fastest_and_suggestion():
    kt = _throughput()
    rows = []
    for shape, default, two_pass, red in (("S1", 10.0, 8.0, 9.9), ("S4", 100.0, 90.0, 101.0)):
        for mode, k in (("uniform", None), ("k5", 5)):
            rows.append(dict(shape=shape, mode=mode, axis="default", variant="default", status="ok",
                             fwdbwd_ms=default))
            rows.append(dict(shape=shape, mode=mode, axis="atomics", variant="red", status="ok", fwdbwd_ms=red))
            if k:
                rows.append(dict(shape=shape, mode=mode, axis="topk", variant="two_pass", status="ok",
                                 fwdbwd_ms=two_pass))
    rows.append(dict(shape="S3", mode="k5", axis="topk", variant="two_pass", status="skipped"))
    fastest = {(f["shape"], f["axis"]): f for f in kt.studies.fastest_variants(rows)}
    assert fastest["S1", "topk"]["fastest"] == "two_pass" and fastest["S1", "topk"]["speedup"] == pytest.approx(1.25)
    assert fastest["S4", "atomics"]["fastest"] == "atom"  # slower at S4: the default stays the fastest
    assert fastest["S1", "atomics"]["times_ms"]["uniform"] == {"default": 10.0, "red": 9.9}
    assert ("S3", "topk") not in fastest
    assert all(f["default"] == host.VARIANT_CHOICES[axis][0] for (_, axis), f in fastest.items())
    text = kt.studies.variant_suggestion(kt.studies.fastest_variants(rows))
    assert "- topk: make 'two_pass' the default" in text and "S4 1.11x" in text
    assert "  atomics: keep 'atom'" in text
    assert kt.studies.variant_suggestion([]) == "speed variants: nothing timed"


@interpreter
def test_variant_stage_runs_end_to_end_on_tiny_shapes(monkeypatch, tmp_path):
    """run_variants as the GPU check calls it, with the GPU parts replaced (tiny shapes on CPU tensors
    under the interpreter, one untimed call instead of do_bench): rows, JSON, --record-in, suggestion."""
    import json
    from argparse import Namespace

    kt = _throughput()
    monkeypatch.setitem(kt.problems.GPU_SHAPES, "S1", ("inbatch", 40, 40, 72))
    real_build = kt.problems.build_problem
    monkeypatch.setattr(kt.study_runs, "build_problem", lambda layout, n, m, d, dtype, device, seed=0:
                        real_build(layout, n, m, d, torch.float32, "cpu", seed))
    monkeypatch.setattr(kt.study_runs, "bench_ms", lambda fn, quick: (fn(), (1.0, 1))[1])
    monkeypatch.setattr(kt.study_runs, "gpu_environment", lambda: dict(gpu="interpreter"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    main = tmp_path / "main.json"
    main.write_text(json.dumps({"results": []}))
    kt.study_runs.run_variants(Namespace(out=str(tmp_path / "v"), quick=True, shapes=["S1"],
                                         variant_axes=["topk", "atomics"], record_in=str(main)))
    report = json.loads((tmp_path / "v.json").read_text())
    rows = report["results"]
    assert not report["partial"] and all(r["status"] == "ok" for r in rows), rows
    assert [(r["mode"], r["variants"]) for r in rows] == [
        ("uniform", "default"), ("uniform", "atomics=red"),
        ("k5", "default"), ("k5", "topk=two_pass"), ("k5", "atomics=red")]
    for r in rows[1:]:
        if r["variants"] != "default":
            assert r["loss_rel_diff"] < 1e-6 and r["grad_rel_diff"] < 1e-5, r
    assert {(f["shape"], f["axis"]) for f in report["fastest"]} == {("S1", "topk"), ("S1", "atomics")}
    assert json.loads(main.read_text())["variants"]["fastest"] == report["fastest"]
    assert current_kernel_variants() == KernelVariants()
