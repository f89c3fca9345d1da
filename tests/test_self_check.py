"""The fused kernel's first-use self-check (issue 24, `smooth_infonce.self_check`), under the interpreter.

A kernel made wrong on purpose is planted through the test hook the module documents: the two
functions the custom op's bodies call, `ops.triton._kernel_forward` and `_kernel_backward`, replaced
(monkeypatch) by wrappers that perturb a gradient, write a NaN or raise, for some kinds only. Each
test has its own cache directory and starts with no in-process verdict (`self_check.reset`).
"""

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from smooth_infonce import self_check, smooth_infonce
from smooth_infonce.layout import dense_masks, make_pairs
from smooth_infonce.ops import row_target_weights
from smooth_infonce.ops import triton as host
from smooth_infonce.self_check import KernelFallbackWarning, Kind
from smooth_infonce.testing import make_problem

from integration_helpers import free_port

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("isolated_self_check")]
CPU = torch.device("cpu")




def kinds(width=32, **fixed):
    """Every default-variant, non-deterministic interpreter kind at ``width`` whose fields equal ``fixed``."""
    every = self_check.all_kinds("interpreter", width, deterministic=(False,))
    return [k for k in every if all(getattr(k, name) == value for name, value in fixed.items())]


def plant(monkeypatch, which, affects, how):
    """Replace the op's forward or backward launch function by a wrong one for the calls where
    ``affects(x)``; returns the list of (kind text) the wrong function was called for."""
    original = getattr(host, which)
    calls = []

    def wrong(*args):
        x = args[-1]
        out = original(*args)
        if not affects(x):
            return out
        calls.append(host.kind_of(x).text())
        return how(out)

    monkeypatch.setattr(host, which, wrong)
    return calls


def perturb_candidate_grad(out):
    da, dc, dk = out
    return da, None if dc is None else dc * 1.01, dk  # a 1% error in one gradient


def nan_loss(out):
    losses, lse, cols = out
    losses = losses.clone()
    losses[3] = float("nan")
    return losses, lse, cols


def raise_at_launch(out):
    raise RuntimeError("planted launch failure: out of resources")


def failing(kind_list):
    return {k for k in kind_list if not self_check.probe(k, CPU).ok}


# --- the probe catches exactly the kinds a planted bug affects --------------------------------------

def test_a_correct_kernel_passes_every_layout_and_smoothing_mode():
    assert failing(kinds(dtype="float32")) == set()


def test_a_perturbed_gradient_is_caught_for_exactly_the_neighbour_kinds(monkeypatch):
    plant(monkeypatch, "_kernel_backward", lambda x: x.neighbors > 0, perturb_candidate_grad)
    every = kinds(dtype="float32")
    assert failing(every) == {k for k in every if k.smoothing == "neighbors"}
    verdict = self_check.probe(Kind("interpreter", "float32", "two_tower", "neighbors", "default", False, 32), CPU)
    assert verdict.worst.startswith("gradient of candidates: error 0.01") and "> 0.001" in verdict.worst


def test_a_nan_is_caught_for_exactly_the_dtype_it_appears_in(monkeypatch):
    plant(monkeypatch, "_kernel_forward", lambda x: x.anchors.dtype == torch.bfloat16, nan_loss)
    every = kinds(layout="in_batch", smoothing="uniform")
    assert failing(every) == {k for k in every if k.dtype == "bfloat16"}
    verdict = self_check.probe(kinds(layout="in_batch", smoothing="uniform", dtype="bfloat16")[0], CPU)
    assert verdict.worst == "loss: error inf > 0.001"


def test_a_fault_at_wide_heads_is_caught_for_exactly_the_widths_it_affects(monkeypatch):
    """A kernel wrong only from 128 features on (another tile configuration): the probe runs at the
    kind's width, so the wide kinds fail and the narrow ones pass; through the public API a 24-wide
    call keeps the kernel while a 100-wide one (padded to 128) gets the reference op's numbers."""
    plant(monkeypatch, "_kernel_backward", lambda x: x.anchors.shape[1] >= 128, perturb_candidate_grad)
    narrow, wide = kinds(32, dtype="float32", layout="two_tower"), kinds(128, dtype="float32", layout="two_tower")
    assert failing(narrow + wide) == set(wide)
    gen = torch.Generator().manual_seed(5)
    a, c = (torch.randn(rows, 100, generator=gen).requires_grad_() for rows in (8, 24))

    def call(backend):
        loss = smooth_infonce(a, c, temperature=0.2, smoothing=0.1, neighbors=3, backend=backend)
        return (loss.detach(), *torch.autograd.grad(loss, (a, c)))

    with pytest.warns(KernelFallbackWarning, match="width=128"):
        got = call("triton")
    assert_reference(got, call("reference"))
    narrow_call = smooth_infonce(a[:, :24], c[:, :24], temperature=0.2, smoothing=0.1, backend="triton")
    assert torch.isfinite(narrow_call) and not any(
        not verdict.ok for kind, verdict in self_check.verdicts().items() if kind.width == 32)


def test_an_exception_at_launch_is_caught_for_exactly_the_layout_it_affects(monkeypatch):
    plant(monkeypatch, "_kernel_forward", lambda x: x.ids_exclude, raise_at_launch)
    every = kinds(dtype="float32")
    assert failing(every) == {k for k in every if k.layout == "moco_ids"}
    verdict = self_check.probe(kinds(dtype="float32", layout="moco_ids")[0], CPU)
    assert verdict.worst == "the probe raised RuntimeError: planted launch failure: out of resources"
    assert verdict.loss_error is None and verdict.seconds > 0


@pytest.mark.parametrize("width", [16, 32, 64, 128, 256, 1024])
def test_the_probe_problems_have_no_near_ties_at_the_kth_neighbour(width):
    """TF32 rounding moves a similarity of unit vectors by at most 2^-10: a gap of more than twice
    that between each row's k-th and (k+1)-th negative keeps the kernel's neighbours the reference's,
    at every head width the probe is mapped into."""
    k = self_check.PROBE["neighbors"]
    for kind in kinds(width, smoothing="neighbors"):
        problem, _, _ = self_check.probe_problem(kind, CPU)
        assert problem.dim == width
        if kind.dtype == "float64":  # the isometry keeps every similarity of the drawn problem
            drawn = min(32, width)
            base = make_problem(problem.layout, 16, 48, drawn, seed=self_check.PROBE["seeds"][drawn])
            torch.testing.assert_close(problem.anchors.detach() @ problem.candidates.detach().T,
                                       base.anchors.detach() @ base.candidates.detach().T, rtol=0, atol=1e-12)
        sims = problem.anchors.detach().double() @ problem.candidates.detach().double().T
        valid, positive = dense_masks(problem.pairs, problem.n, problem.m, CPU)
        if problem.keys is not None:
            valid, positive = valid[:, 1:], positive[:, 1:]
        ranked = sims.masked_fill(~(valid & ~positive), float("-inf")).sort(dim=1, descending=True).values
        assert float((ranked[:, k - 1] - ranked[:, k]).min()) > 2 * 2.0 ** -10, kind.text()


# --- the public API: warn once, then the reference op ------------------------------------------------

def in_batch_call(dtype=torch.float32, backend="triton", neighbors=2, seed=0):
    """smooth_infonce on two views of 8 images: (loss, gradient of the views)."""
    gen = torch.Generator().manual_seed(seed)
    views = torch.randn(16, 24, generator=gen).to(dtype).requires_grad_()
    loss = smooth_infonce(views, ids=torch.arange(8).repeat(2), temperature=0.2, smoothing=0.1,
                          neighbors=neighbors, backend=backend)
    return loss.detach(), torch.autograd.grad(loss, views)[0]


def moco_call(backend="triton", seed=0):
    """MoCo with sample ids: (loss, gradients of the queries and of the keys)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(8, 24, generator=gen).requires_grad_()
    keys = torch.randn(8, 24, generator=gen).requires_grad_()
    queue = F.normalize(torch.randn(40, 24, generator=gen), dim=1)
    ids, queue_ids = torch.arange(8), torch.cat([torch.arange(4), torch.full((36,), -1)])
    loss = smooth_infonce(queries, queue, positive_keys=keys, ids=ids, candidate_ids=queue_ids, temperature=0.2,
                          smoothing=0.1, neighbors=3, backend=backend)
    return (loss.detach(), *torch.autograd.grad(loss, (queries, keys)))


def assert_reference(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def fallback_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, KernelFallbackWarning)]


def test_a_failing_kind_warns_once_and_then_computes_the_reference(monkeypatch):
    calls = plant(monkeypatch, "_kernel_backward", lambda x: x.neighbors > 0, perturb_candidate_grad)
    with pytest.warns(KernelFallbackWarning) as caught:
        got = in_batch_call()
    fallbacks = [w for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallbacks) == 1  # older stacks add numpy DeprecationWarnings from the interpreter around it
    message = str(fallbacks[0].message)
    kind = Kind("interpreter", "float32", "in_batch", "neighbors", "default", False, 32)
    env = self_check.environment(CPU)
    for text in (kind.text(), env["gpu"], f"torch {torch.__version__}", f"triton {env['triton']}",
                 f"smooth-infonce {env['smooth_infonce']}", "gradient of candidates: error", "smooth-infonce-doctor",
                 "reference op"):
        assert text in message, (text, message)
    assert calls == [kind.text()]  # only the probe met the wrong kernel: the call itself took the reference
    assert_reference(got, in_batch_call(backend="reference"))

    again, warned = fallback_warnings(in_batch_call)  # the same kind: no second warning, still the reference
    assert warned == [] and calls == [kind.text()]
    assert_reference(again, in_batch_call(backend="reference"))

    (loss, grad), warned = fallback_warnings(lambda: in_batch_call(neighbors=None))  # another kind: the kernel
    assert warned == []
    assert self_check.verdicts()[kind._replace(smoothing="uniform")].ok
    assert_reference((loss, grad), in_batch_call(neighbors=None, backend="reference"))


def test_an_exception_falls_back_in_forward_and_backward(monkeypatch):
    plant(monkeypatch, "_kernel_forward", lambda x: x.ids_exclude, raise_at_launch)
    with pytest.warns(KernelFallbackWarning, match="planted launch failure"):
        got = moco_call()
    assert_reference(got, moco_call(backend="reference"))


def test_fp16_fallback_returns_the_reference_loss_and_gradients(monkeypatch):
    plant(monkeypatch, "_kernel_forward", lambda x: x.anchors.dtype == torch.float16, nan_loss)
    with pytest.warns(KernelFallbackWarning, match="float16"):
        loss, grad = in_batch_call(dtype=torch.float16)
    assert grad.dtype == torch.float16
    expected = in_batch_call(dtype=torch.float16, backend="reference")
    assert_reference((loss, grad), expected)


def test_the_kind_of_a_call():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 16, generator=gen, dtype=torch.bfloat16)
    c = torch.randn(10, 16, generator=gen)
    pairs = make_pairs(6, 10, anchor_ids=torch.arange(6), candidate_ids=torch.arange(10))

    def kind(anchors, candidates, keys=None, pairs=pairs, **options):
        options = dict(dict(temperature=0.2, smoothing=0.1, neighbors=None), **options)
        return host.kind_of(host.row_loss_inputs(anchors, candidates, keys, pairs, **options))

    assert kind(a, c) == Kind("interpreter", "float32", "two_tower", "uniform", "default", False, 16)  # mixed: fp32
    assert kind(a, a[:4].repeat(2, 1), smoothing=0.0, neighbors=3).dtype == "bfloat16"
    assert kind(a, c.double(), smoothing=0.0, neighbors=3)[1:4] == ("float64", "two_tower", "none")
    assert kind(c, c, allow_tf32=True, deterministic=True, neighbors=2, pairs=make_pairs(
        10, 10, anchor_ids=torch.arange(10) % 5, candidate_ids=torch.arange(10) % 5, self_offset=0)) == Kind(
        "interpreter", "float32-tf32", "in_batch", "neighbors", "default", True, 16)
    moco = make_pairs(6, 10, has_positive_key=True)
    assert kind(a.float(), c, a.float(), pairs=moco).layout == "moco"
    with_ids = make_pairs(6, 10, anchor_ids=torch.arange(6), candidate_ids=torch.arange(10) - 4,
                          has_positive_key=True, ids_exclude=True)
    assert kind(a.float(), c, a.float(), pairs=with_ids).layout == "moco_ids"
    with host.kernel_variants(topk="two_pass"):
        assert kind(a, c).variants == "topk=two_pass"
    with pytest.raises(TypeError, match="anchors must be float16, bfloat16, float32 or float64, got torch.int64"):
        kind(a.long(), c)


# --- the cache on disk ---------------------------------------------------------------------------------

def count_probes(monkeypatch):
    probed = []
    original = self_check.probe

    def counting(kind, device):
        probed.append(kind.text())
        return original(kind, device)

    monkeypatch.setattr(self_check, "probe", counting)
    return probed


KIND = Kind("interpreter", "float32", "in_batch", "neighbors", "default", False, 32)


def test_the_cache_is_written_and_read_by_a_later_process(monkeypatch):
    probed = count_probes(monkeypatch)
    in_batch_call()
    assert probed == [KIND.text()]
    env = self_check.environment(CPU)
    path = self_check.cache_path(env)
    assert path.parent == self_check.cache_dir() and path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    stored = self_check.read_cache(env)[KIND.text()]
    assert stored.ok and stored.loss_error < 1e-4 and stored.seconds > 0 and stored.source == "cache"

    self_check.reset()  # a later process: the verdict comes from the cache, even for a now-wrong kernel
    plant(monkeypatch, "_kernel_backward", lambda x: True, perturb_candidate_grad)
    _, warned = fallback_warnings(in_batch_call)
    assert probed == [KIND.text()] and warned == []
    assert self_check.verdicts()[KIND].source == "cache"


@pytest.mark.parametrize("field", ["gpu", "capability", "driver", "torch", "triton", "smooth_infonce"])
def test_a_new_version_of_any_field_checks_again(monkeypatch, field):
    probed = count_probes(monkeypatch)
    in_batch_call()
    base = dict(self_check.environment(CPU))
    changed = dict(base, **{field: base[field] + "-new"})
    assert self_check.cache_path(changed) != self_check.cache_path(base)
    assert self_check.read_cache(changed) == {} and KIND.text() in self_check.read_cache(base)

    self_check.reset()
    monkeypatch.setattr(self_check, "environment", lambda device: changed)
    in_batch_call()
    assert probed == [KIND.text()] * 2
    assert KIND.text() in self_check.read_cache(changed)


def test_the_environment_names_the_sources_of_the_kernel(monkeypatch, tmp_path):
    version = self_check.package_version()
    assert version.startswith("0.1.0+") and len(version) == len("0.1.0+") + 12
    monkeypatch.setattr(self_check, "_SOURCES", self_check._SOURCES[:-1])  # other sources, another digest
    assert self_check.package_version() != version


def test_a_corrupt_cache_file_is_ignored_and_replaced(monkeypatch):
    probed = count_probes(monkeypatch)
    path = self_check.cache_path(self_check.environment(CPU))
    for garbage in ("{not json", '{"environment": 3, "kinds": []}', '{"kinds": {"x": {"ok": "yes"}}}'):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(garbage)
        assert self_check.read_cache(self_check.environment(CPU)) == {}
    in_batch_call()
    assert probed == [KIND.text()]
    assert self_check.read_cache(self_check.environment(CPU))[KIND.text()].ok


def test_an_unwritable_cache_costs_only_a_probe(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(self_check.CACHE_ENV, str(blocker / "cache"))  # a folder below a file: cannot exist
    probed = count_probes(monkeypatch)
    in_batch_call()
    self_check.reset()
    in_batch_call()
    assert probed == [KIND.text()] * 2


def test_the_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(self_check.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert self_check.cache_dir() == tmp_path / "xdg" / "smooth_infonce"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert self_check.cache_dir() == tmp_path / "home" / ".cache" / "smooth_infonce"
    monkeypatch.setenv(self_check.CACHE_ENV, str(tmp_path / "mine"))
    assert self_check.cache_dir() == tmp_path / "mine"


# --- SMOOTH_INFONCE_SELF_CHECK ---------------------------------------------------------------------------

def test_mode_0_trusts_the_kernel(monkeypatch):
    monkeypatch.setenv(self_check.MODE_ENV, "0")
    probed = count_probes(monkeypatch)
    calls = plant(monkeypatch, "_kernel_forward", lambda x: True, nan_loss)
    (loss, _), warned = fallback_warnings(in_batch_call)
    assert probed == [] and warned == [] and calls == [KIND.text()]
    assert torch.isnan(loss)  # the (planted) kernel ran: nothing checked it
    assert self_check.verdicts()[KIND].source == "trusted"
    assert not self_check.cache_dir().exists()


def test_mode_always_probes_despite_the_cache_and_mode_1_reads_it(monkeypatch):
    probed = count_probes(monkeypatch)
    in_batch_call()  # mode "1": probed, cached ok
    self_check.reset()
    plant(monkeypatch, "_kernel_backward", lambda x: True, perturb_candidate_grad)
    _, warned = fallback_warnings(in_batch_call)  # mode "1" again: the cached verdict, no probe
    assert probed == [KIND.text()] and warned == []

    self_check.reset()
    monkeypatch.setenv(self_check.MODE_ENV, "always")
    with pytest.warns(KernelFallbackWarning):
        got = in_batch_call()
    assert probed == [KIND.text()] * 2
    assert_reference(got, in_batch_call(backend="reference"))
    assert not self_check.read_cache(self_check.environment(CPU))[KIND.text()].ok  # the fresh verdict is kept


@pytest.mark.parametrize("value", ["yes", "2", "", "ALWAYS"])
def test_a_bad_mode_names_the_variable_and_the_allowed_values(monkeypatch, value):
    monkeypatch.setenv(self_check.MODE_ENV, value)
    with pytest.raises(ValueError, match=rf"SMOOTH_INFONCE_SELF_CHECK='{value}' is not one of the allowed values "
                       r"\('1': .*; '0': .*; 'always': .*\)"):
        in_batch_call()


def test_reset_and_suspended(monkeypatch):
    probed = count_probes(monkeypatch)
    calls = plant(monkeypatch, "_kernel_forward", lambda x: True, nan_loss)
    with self_check.suspended():  # the launch recorders' mode: the kernel runs, nothing is decided
        loss, _ = in_batch_call()
    assert torch.isnan(loss) and probed == [] and self_check.verdicts() == {} and calls == [KIND.text()]
    with pytest.warns(KernelFallbackWarning):
        in_batch_call()
    assert list(self_check.verdicts()) == [KIND]
    self_check.reset()
    assert self_check.verdicts() == {}


# --- torch.compile(fullgraph=True) with the check on --------------------------------------------------

@pytest.mark.parametrize("planted", [False, True], ids=["kernel", "fallback"])
def test_fullgraph_compile_takes_the_verdict_at_run_time(monkeypatch, planted):
    if planted:
        plant(monkeypatch, "_kernel_backward", lambda x: True, perturb_candidate_grad)
    ids = torch.arange(8).repeat(2)
    queue = F.normalize(torch.randn(24, 16, generator=torch.Generator().manual_seed(1)), dim=1)

    def losses(x0, x1, backend):
        options = dict(temperature=0.1, smoothing=0.2, backend=backend, validate=False)
        return torch.stack([smooth_infonce(torch.cat([x0, x1]), ids=ids, neighbors=2, **options),
                            smooth_infonce(x0, queue, positive_keys=x1, **options)])

    def values_and_grads(fn, backend):
        gen = torch.Generator().manual_seed(0)
        x0, x1 = (torch.randn(8, 16, generator=gen).requires_grad_() for _ in range(2))
        out = fn(x0, x1, backend)
        return (out.detach(), *torch.autograd.grad((out * torch.tensor([1.0, 2.0])).sum(), (x0, x1)))

    torch._dynamo.reset()
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = values_and_grads(compiled, "triton")
    warned = [w for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(warned) == (2 if planted else 0)  # one per kind: in-batch and MoCo
    assert {k.layout for k, v in self_check.verdicts().items() if v.ok != planted} == {"in_batch", "moco"}
    for g, e in zip(got, values_and_grads(losses, "reference")):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# --- torch.distributed: every rank takes the same decision --------------------------------------------

WORLD = 2


def ddp_worker(rank, port, failing_rank, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      **{self_check.CACHE_ENV: os.path.join(result_dir, f"cache{rank}")})
    os.environ.pop(self_check.MODE_ENV, None)
    # a collective that one rank never joins fails in a minute instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        if rank == failing_rank:  # this rank's GPU gives a NaN for in-batch problems
            original = host._kernel_forward
            host._kernel_forward = lambda x: nan_loss(original(x)) if x.self_offset is not None else original(x)
        if rank == 0:  # an evaluation on rank 0 alone, of a kind not met before: decided without the others
            with torch.no_grad():
                moco_call_without_grad()
        (loss, grad), warned = fallback_warnings(lambda: in_batch_call(seed=rank))
        expected = in_batch_call(seed=rank, backend="reference")
        verdicts = {k.text(): (v.ok, v.source) for k, v in self_check.verdicts().items()}
        torch.save(dict(loss=loss, grad=grad, expected=expected, verdicts=verdicts,
                        warned=[str(w.message) for w in warned]), os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def moco_call_without_grad():
    gen = torch.Generator().manual_seed(5)
    queries, keys, queue = (torch.randn(rows, 24, generator=gen) for rows in (8, 8, 40))
    return smooth_infonce(queries, queue, positive_keys=keys, temperature=0.2, backend="triton")


@pytest.mark.slow
def test_one_failing_rank_sends_every_rank_to_the_reference(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), 1, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    moco = KIND._replace(layout="moco", smoothing="none").text()
    assert ranks[0]["verdicts"] == {KIND.text(): (False, "another rank"), moco: (True, "probe")}
    assert ranks[1]["verdicts"] == {KIND.text(): (False, "probe")}
    assert "another rank" in ranks[0]["warned"][0] and len(ranks[0]["warned"]) == 1
    assert "loss: error inf" in ranks[1]["warned"][0] and len(ranks[1]["warned"]) == 1
    for result in ranks:
        assert_reference((result["loss"], result["grad"]), result["expected"])
    # each rank caches what its own probe found: rank 0's GPU passed
    for rank, ok in ((0, True), (1, False)):
        files = list((tmp_path / f"cache{rank}").glob("self-check-*.json"))
        assert len(files) == 1 and f'"ok": {str(ok).lower()}' in files[0].read_text()


def test_fallback_forward_equals_the_reference_bitwise():
    """The fallback computes the reference op from the fused op's own targets: the same numbers."""
    prob_pairs = make_pairs(6, 10, anchor_ids=torch.arange(6), candidate_ids=torch.arange(10))
    gen = torch.Generator().manual_seed(3)
    a, c = torch.randn(6, 16, generator=gen), torch.randn(10, 16, generator=gen)
    for smoothing, k in ((0.0, None), (0.1, None), (0.1, 3)):
        x = host.row_loss_inputs(a, c, None, prob_pairs, temperature=0.2, smoothing=smoothing, neighbors=k)
        losses, _, cols = self_check.reference_forward(x)
        from smooth_infonce.ops.reference import reference_row_losses

        assert torch.equal(losses, reference_row_losses(a, c, None, prob_pairs, temperature=0.2,
                                                        smoothing=smoothing, neighbors=k))
        assert cols.shape == (6, x.neighbors)
        w_pos, _ = row_target_weights(prob_pairs, smoothing, k, torch.float32)
        assert torch.equal(x.w_pos, w_pos)
