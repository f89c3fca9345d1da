"""The mutation harness: named, planted bugs that the test suite must catch (issue 23).

Each `Mutation` is one small edit of the source (a sign in the loss, a dropped mask, a skipped
restore, an ignored option) and the tests that claim to cover it. The harness copies the working
tree, applies one edit to the copy, runs only those tests there, and reports the mutation as

- ``caught``: the tests fail (pytest exit code 1), as they must;
- ``survived``: the tests pass with the bug in place: a test does not check what it claims;
- ``stale``: the edit no longer applies (its text is not in the file exactly once), or pytest did
  not run the tests (a collection error, no test selected, a timeout): fix the mutation.

Anything but ``caught`` fails the run. The contributor rule (docs/contributing.md): a new test names
the mutation it catches, or comes with a new entry here.

    python tests/mutations.py --list             # the names, what each plants, its tests
    python tests/mutations.py --jobs 2           # all of them (about 10 minutes on 2 cores)
    python tests/mutations.py --ci --jobs 2      # the bounded subset CI runs (tests/test_mutations.py)
    python tests/mutations.py NAME [NAME ...]    # some of them
    python tests/mutations.py --json out.json    # also write the verdicts

The copy is a plain directory of the tracked and untracked (not ignored) files, with the package
mapped the way pyproject's package-dir maps it (``smooth_infonce/integrations`` -> ``integrations``),
first on the path of every process the tests start, so the installed package is never the one tested.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = ("caught", "survived", "stale")


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (exactly one occurrence in ``path``) by ``new``; ``tests`` must then fail.

    ``tests`` are pytest arguments relative to the repository root (node ids, or a file plus
    ``-k`` expressions). ``ci``: part of the bounded subset CI runs on every build."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple
    plants: str
    ci: bool = False


M = Mutation
MUTATIONS: List[Mutation] = [
    # --- issue 23's survivors: each survived its whole test file before the fix ---------------------
    M("auto-backend-takes-triton-on-cpu", "smooth_infonce/functional.py",
      'backend = "triton" if device.type == "cuda" and triton_available() else "reference"',
      'backend = "triton" if triton_available() else "reference"',
      ("tests/test_api.py::test_backend_auto_calls_the_reference_op_for_cpu_tensors",),
      "backend='auto' sends CPU tensors to the Triton kernel", ci=True),
    M("demo-drops-chunk-size", "integrations/demo/cli.py",
      "chunk_size=config.chunk_size,", "chunk_size=None,",
      ("tests/test_demo.py::test_chunked_steps_train_moco",),
      "the demo parses --chunk-size and passes chunk_size=None to pretrain"),
    M("deterministic-flag-ignored", "smooth_infonce/ops/triton.py",
      "atomic = need_anchor_grad and not p.deterministic", "atomic = need_anchor_grad",
      ("tests/test_triton_kernel.py", "-k", "deterministic_mode_launches_no_atomics"),
      "deterministic=True still takes the atomic dA path", ci=True),
    # --- the loss: reference op (smooth_infonce/ops/) -------------------------------------------------
    M("reference-drops-self-mask", "smooth_infonce/ops/reference.py",
      'logits.diagonal(pairs.self_offset).fill_(float("-inf"))', "pass",
      ("tests/test_reference.py", "-k", "equals_lightly_ntxent"),
      "the in-batch anchor is not removed from its own row (self-similarity joins the softmax)", ci=True),
    M("reference-flips-gradient-sign", "smooth_infonce/ops/reference.py",
      "g = grad_logits * (grad_rows / ctx.temperature)[:, None]",
      "g = -grad_logits * (grad_rows / ctx.temperature)[:, None]",
      ("tests/test_reference.py", "-k", "gradcheck_in_batch"),
      "the backward returns minus the gradient", ci=True),
    M("target-weights-ignore-positive-count", "smooth_infonce/ops/__init__.py",
      "w_pos = (1.0 - alpha) / pairs.num_positives.clamp_min(1).to(dtype)", "w_pos = (1.0 - alpha)",
      ("tests/test_reference.py", "-k", "multiview_matches_loop_oracle"),
      "each positive gets 1 - alpha instead of (1 - alpha) / |P(i)| (multi-view targets no longer sum to 1)",
      ci=True),
    M("uniform-smoothing-spreads-over-k", "smooth_infonce/ops/__init__.py",
      "set_size = negatives if neighbors is None else negatives.clamp_max(int(neighbors))",
      "set_size = negatives",
      ("tests/test_reference.py", "-k", "moco_matches_loop_oracle"),
      "neighbour smoothing divides alpha by |Neg(i)| instead of min(k, |Neg(i)|)", ci=True),
    M("neighbours-ties-to-the-higher-index", "smooth_infonce/ops/reference.py",
      "column_rank = torch.arange(m, 0, -1, device=scores.device, dtype=scores.dtype)",
      "column_rank = torch.arange(1, m + 1, device=scores.device, dtype=scores.dtype)",
      ("tests/test_reference.py", "-k", "ties_go_to_the_lower_index or nearest_negatives_are_brute_force"),
      "among equal similarities the higher candidate index is selected"),
    M("moco-key-left-out-of-the-softmax", "smooth_infonce/ops/reference.py",
      "total = p.sum(dim=1) if key_p is None else p.sum(dim=1) + key_p",
      "total = p.sum(dim=1)",
      ("tests/test_reference.py", "-k", "moco_equals_lightly_memory_bank"),
      "the MoCo positive key does not join the log-sum-exp"),
    # --- the fused kernel (smooth_infonce/ops/kernels.py, triton.py) ----------------------------------
    M("kernel-online-softmax-without-rescale", "smooth_infonce/ops/kernels.py",
      "sumexp = sumexp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)",
      "sumexp = sumexp + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)",
      ("tests/test_triton_kernel.py", "-k", "larger_in_batch_case"),
      "the running sum of exponentials is not rescaled when the running max grows"),
    M("kernel-probabilities-ignore-temperature", "smooth_infonce/ops/kernels.py",
      'probs = tl.exp(tl.where(valid, sims * inv_tau, float("-inf")) - lse)',
      'probs = tl.exp(tl.where(valid, sims, float("-inf")) - lse)',
      ("tests/test_triton_kernel.py", "-k", "gradcheck_fp64 and inbatch"),
      "the backward's softmax forgets 1 / tau"),
    M("variant-two-pass-ignored", "smooth_infonce/ops/triton.py",
      'if p.neighbors and p.variants.topk == "two_pass":', "if False:",
      ("tests/test_kernel_variants.py", "-k", "each_variant_takes_its_own_launches"),
      "topk='two_pass' is ignored (the fused search runs; the values still match the reference)", ci=True),
    M("variant-one-block-ignored", "smooth_infonce/ops/triton.py",
      'one_block = grad_d == "one_block" and kernel != "forward"', "one_block = False",
      ("tests/test_kernel_variants.py", "-k", "each_variant_takes_its_own_launches"),
      "grad_d='one_block' is ignored (the gradients keep their narrow output blocks)"),
    # --- the public API: validation, layouts, options, schedule, call forms --------------------------
    M("temperature-zero-accepted", "smooth_infonce/validation.py",
      "if not math.isfinite(temperature) or temperature <= 0:", "if not math.isfinite(temperature) or temperature < 0:",
      ("tests/test_validation.py::test_bad_temperature",),
      "temperature = 0 passes validation", ci=True),
    M("non-finite-embeddings-accepted", "smooth_infonce/functional.py",
      "        check_finite(anchors=anchors, candidates=candidates, positive_keys=positive_keys)",
      "        pass",
      ("tests/test_validation.py::test_non_finite_embeddings_say_where",),
      "NaN / inf embeddings reach the loss unchecked", ci=True),
    M("inputs-normalised-in-place", "smooth_infonce/functional.py",
      "    return F.normalize(wide, dim=1).to(x.dtype)",
      "    return x.div_(x.norm(dim=1, keepdim=True)) if x.dtype == torch.float64 else "
      "F.normalize(wide, dim=1).to(x.dtype)",
      ("tests/test_api.py::test_inputs_are_never_modified",),
      "float64 inputs are normalised in place (the caller's tensor changes)", ci=True),
    M("weighted-mean-divides-by-rows", "smooth_infonce/functional.py",
      "            return weighted.sum() / weights.to(rows.dtype).sum()",
      "            return weighted.mean()",
      ("tests/test_api.py::test_per_row_weight_tensor_and_reductions",),
      "reduction='mean' with row weights divides by N instead of the sum of the weights", ci=True),
    M("logit-scale-detached", "smooth_infonce/functional.py",
      "return row_losses(_scale_rows(layout.anchors, logit_scale), layout.candidates",
      "return row_losses(_scale_rows(layout.anchors, logit_scale.detach()), layout.candidates",
      ("tests/test_logit_scale.py", "-k", "gradcheck_reference and in_batch"),
      "a learnable temperature gets no gradient (logit_scale detached before it scales the anchors)", ci=True),
    M("two-tower-ids-ignored", "smooth_infonce/layout.py",
      'kind, self_offset = ("moco" if positive_keys is not None else "two_tower"), None',
      'kind, self_offset, ids, candidate_ids = ("moco" if positive_keys is not None else "two_tower"), '
      'None, None, None',
      ("tests/test_api.py::test_own_queue_entries_are_masked_like_deleted",),
      "the ids of the MoCo and two-tower layouts are dropped (own queue entries and extra positives)"),
    M("cosine-schedule-never-warms", "smooth_infonce/schedule.py",
      "return self.smoothing * (1.0 - math.cos(math.pi * progress)) / 2.0",
      "return self.smoothing * (1.0 + math.cos(math.pi * progress)) / 2.0",
      ("tests/test_api.py::test_schedules",),
      "the cosine schedule runs from alpha down to 0 instead of 0 up to alpha", ci=True),
    M("symmetric-moco-sum-is-the-mean", "smooth_infonce/views.py",
      'return 2 * loss if combine == "sum" else loss', "return loss",
      ("tests/test_lightly_dropin.py", "-k", "symmetric_equals_the_authors_loop"),
      "symmetric MoCo's 'sum' returns the mean of the two directions"),
    M("gather-backward-without-allreduce", "smooth_infonce/distributed.py",
      "        dist.all_reduce(grad, op=dist.ReduceOp.SUM)\n", "",
      ("tests/test_distributed.py::test_gather_equals_single_process",),
      "the gathered embeddings' gradient is not summed over ranks"),
    # --- lightly drop-ins (integrations/lightly*.py, multicrop.py) -----------------------------------
    M("bank-ids-not-stored", "integrations/lightly/loss.py",
      "        self.bank_ids[ptr:ptr + written] = ids[:written].to(self.bank_ids.device)\n", "",
      ("tests/test_lightly_dropin.py", "-k", "masking_own_image_entries or ids_are_stored_beside"),
      "the memory bank forgets the sample ids of the keys it stores"),
    M("dino-pair-weights-swap-lambdas", "integrations/recipes/multicrop.py",
      "per_global, per_local = lambda_gg / total / global_pairs, lambda_gl / total / local_pairs",
      "per_global, per_local = lambda_gl / total / global_pairs, lambda_gg / total / local_pairs",
      ("tests/test_multicrop.py", "-k", "pair_weights_at_sslight_lambdas or fifth_on_each_global_pair"),
      "SSLight's lambda_gg and lambda_gl are swapped"),
    # --- Lightning harness, cached steps, optimisers -------------------------------------------------
    M("dropin-codes-from-the-queue-rows", "integrations/lightly/multicrop.py",
      "        return codes[: scores.shape[0]]", "        return codes[-scores.shape[0]:]",
      ("tests/test_multicrop.py", "-k", "swav_with_lambdas"),
      "SwAV's codes are read off the queue's rows instead of the batch's"),
    M("moco-key-encoder-frozen", "integrations/lightly/models.py",
      "        update_momentum(self.backbone, self.backbone_momentum, m)\n", "",
      ("tests/test_lightly_models.py", "-k", "lightly_moco_trains"),
      "the MoCo key backbone never follows the query backbone's EMA"),
    M("light-moco-temperature", "integrations/recipes/light_moco.py",
      'loss=LossSpec(temperature=0.07, smoothing=DEFAULT_SMOOTHING, mode="neighbors",',
      'loss=LossSpec(temperature=0.2, smoothing=DEFAULT_SMOOTHING, mode="neighbors",',
      ("tests/test_recipes.py::test_light_moco_and_its_baseline_follow_the_recipe_facts",),
      "the light_moco preset uses MoCo v2's tau 0.2 instead of the paper's 0.07", ci=True),
    M("backbone-trusts-timms-reported-width", "integrations/recipes/backbones.py",
      "self.num_features = num_features if num_features is not None else measure_output_width(net)",
      "self.num_features = num_features or getattr(net, 'num_features', None) or measure_output_width(net)",
      ("tests/test_backbones.py", "-k", "true_width or reported_width"),
      "heads are sized from timm's num_features (960 for MobileNetV3-Large) instead of the measured output"),
    M("module-ignores-a-changed-smoothing", "smooth_infonce/loss.py",
      "smoothing=check_smoothing(self.smoothing)", "smoothing=self.options.smoothing",
      ("tests/test_api.py::test_schedule_drives_the_module",),
      "SmoothInfoNCELoss keeps its constructor's alpha when a schedule sets .smoothing", ci=True),
    M("options-skip-the-neighbours-check", "smooth_infonce/options.py",
      '        set_(self, "neighbors", check_neighbors(self.neighbors))\n', "",
      ("tests/test_validation.py::test_bad_neighbors",),
      "neighbors=0, -1 or 2.5 reach the loss unchecked", ci=True),
    M("knn-scores-the-second-guess", "integrations/demo/evaluation.py",
      "return float((predicted[:, 0] == test_labels).float().mean())",
      "return float((predicted[:, -1] == test_labels).float().mean())",
      ("tests/test_fashion_mnist.py::test_the_demo_trains_on_fashion_mnist",),
      "kNN accuracy is scored on the least likely class instead of the most likely"),
    M("lightning-resume-skips-the-rng-restore", "integrations/lightning/module.py",
      "            set_rng_state(states[rank], device)", "            pass",
      ("tests/test_lightning.py::test_rng_checkpoint_per_rank_other_world_size_and_old_format",),
      "a resumed run keeps the fresh seed's random streams instead of the checkpoint's"),
    M("cached-step-skips-the-buffer-restore", "smooth_infonce/cached_step.py",
      "    finally:\n        restore_buffers(saved)\n", "    finally:\n        pass\n",
      ("tests/test_cached_step.py", "-k", "running_statistics_match"),
      "batch-norm running statistics move in both passes of a cached step"),
    M("lars-decays-depthwise-kernels", "integrations/recipes/optim.py",
      "    if spec.exclude_depthwise:", "    if False:",
      ("tests/test_optim.py", "-k", "decay_exemptions_match_the_groups or depthwise_kernels_bias_and_norm"),
      "exclude_depthwise is ignored: depthwise kernels get weight decay", ci=True),
    # --- the first-use self-check and the doctor (smooth_infonce/self_check.py, doctor.py) -------------
    M("self-check-trusts-every-probe", "smooth_infonce/self_check.py",
      "ok = loss_error <= loss_tol and grad_error <= grad_tol  # False for NaN", "ok = True",
      ("tests/test_self_check.py", "-k", "perturbed_gradient or nan_is_caught"),
      "the probe's verdict ignores its errors: a wrong kernel is trusted"),
    M("self-check-ranks-never-agree", "smooth_infonce/self_check.py",
      "if agree and _agree_across_ranks(verdict.ok, device) != verdict.ok:", "if False:",
      ("tests/test_self_check.py", "-k", "one_failing_rank"),
      "under torch.distributed a rank whose probe passed keeps the kernel while another falls back"),
    M("self-check-cache-key-drops-fields", "smooth_infonce/self_check.py",
      "digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]",
      'digest = hashlib.sha256(json.dumps(env["gpu"]).encode()).hexdigest()[:16]',
      ("tests/test_self_check.py", "-k", "new_version_of_any_field"),
      "one cache file per GPU name: a new driver / torch / triton / version shares the old file"),
    M("fallback-backward-runs-the-kernel", "smooth_infonce/ops/triton.py",
      "da, dc, dk = self_check.reference_backward(r, x)", "da, dc, dk = _kernel_backward(r, x)",
      ("tests/test_self_check.py", "-k", "warns_once_and_then_computes_the_reference"),
      "a kind that failed its probe still takes the kernel's gradients"),
    M("probe-ignores-the-head-width", "smooth_infonce/self_check.py",
      "drawn, width=kind.width,", "drawn, width=drawn,",
      ("tests/test_self_check.py", "-k", "fault_at_wide_heads"),
      "every kind's probe runs at 32 features, whatever head width (tile configuration) the kind names",
      ci=True),
    M("kind-ignores-backward-mode", "smooth_infonce/ops/triton.py",
      "_VARIANTS_TEXT, bool(x.deterministic), padded_dim", "_VARIANTS_TEXT, False, padded_dim",
      ("tests/test_self_check.py", "-k", "kind_of_a_call"),
      "the deterministic backward shares the atomic backward's verdict"),
    M("doctor-exit-code-ignores-fallbacks", "smooth_infonce/doctor.py",
      "code = 1 if falls_back or bad_reference else 0", "code = 1 if bad_reference else 0",
      ("tests/test_doctor.py", "-k", "falls_back_exits_1"),
      "the doctor exits 0 when a kind falls back"),
    # --- the docs' figures against the committed results ----------------------------------------------
    M("docs-figure-drifts", "docs/large-batches.md",
      "takes 0.82-1.02x lightly's `NTXentLoss` step", "takes 0.86-1.02x lightly's `NTXentLoss` step",
      ("tests/test_doc_figures.py",),
      "a figure of the docs no longer matches the result file it cites", ci=True),
    # --- data, evaluation, solo glue ------------------------------------------------------------------
    M("idx-header-dimensions-unchecked", "integrations/data/fashion_mnist.py",
      "    if expected_shape is not None and tuple(shape) != tuple(expected_shape):",
      "    if False:",
      ("tests/test_fashion_mnist.py", "-k", "dimensions_are_checked"),
      "an IDX file of the wrong dimensions is read as if it were right", ci=True),
    M("stratified-subset-is-the-first-images", "integrations/data/digits.py",
      "    chosen, _ = train_test_split(np.arange(len(labels)), train_size=count, random_state=seed, stratify=labels)",
      "    chosen = np.arange(count)",
      ("tests/test_fashion_mnist.py", "-k", "stratified_subset"),
      "the 'stratified' subset takes the first images whatever their classes"),
    M("open-clip-renormalises-features", "integrations/open_clip/loss.py",
      "schedule=schedule, normalize=False,", "schedule=schedule, normalize=True,",
      ("tests/test_open_clip.py", "-m", "not slow", "-k", "smoothing_zero_is_clip_loss"),
      "SmoothClipLoss normalises open_clip's unit features again (the radial gradient differs from ClipLoss's)",
      ci=True),
    M("open-clip-local-loss-without-rank-offset", "integrations/open_clip/loss.py",
      "ids = torch.arange(self.rank * batch, (self.rank + 1) * batch, device=images.device)",
      "ids = torch.arange(batch, device=images.device)",
      ("tests/test_open_clip.py", "-k", "two_processes_smoothing_zero"),
      "local_loss on rank r pairs its rows with rank 0's columns"),
    M("mnrl-symmetric-sums-the-directions", "integrations/sentence_transformers/losses.py",
      "        return (loss + backward) / 2\n", "        return loss + backward\n",
      ("tests/test_sentence_transformers.py", "-m", "not slow", "-k", "smoothing_zero_is_the_library_loss"),
      "the symmetric MNRL adds its two directions instead of averaging them", ci=True),
    M("mnrl-hard-negatives-as-positives", "integrations/sentence_transformers/losses.py",
      "torch.full((world_batch * (len(docs) - 1),), NO_ID, dtype=torch.long,",
      "torch.zeros((world_batch * (len(docs) - 1),), dtype=torch.long,",
      ("tests/test_sentence_transformers.py", "-m", "not slow", "-k", "smoothing_zero_is_the_library_loss"),
      "hard-negative columns get id 0 (a positive of anchor 0) instead of 'never a positive'"),
    M("cached-mnrl-drops-the-part-weight", "integrations/sentence_transformers/losses.py",
      "part = self._rows_loss(batch, slice(begin, end)) * ((end - begin) / rows)",
      "part = self._rows_loss(batch, slice(begin, end))",
      ("tests/test_sentence_transformers.py", "-m", "not slow", "-k", "cached"),
      "the cached MNRL sums its mini-batches' means instead of weighting them by their rows"),
    M("solo-devices-ids-counted-as-a-count", "integrations/solo/optimizer_cfg.py",
      '            return len([part for part in text.split(",") if part.strip()])',
      '            return int(text.split(",")[0])',
      ("tests/test_solo_devices.py",),
      "solo's devices '0,1' is read as the count 0 instead of two ids", ci=True),
]
del M

# ----------------------------------------------------------------------------------------------------
# Running them
# ----------------------------------------------------------------------------------------------------


def select(names: Sequence[str] = (), ci: bool = False) -> List[Mutation]:
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; --list shows the names")
    chosen = [by_name[n] for n in names] if names else list(MUTATIONS)
    return [m for m in chosen if m.ci] if ci else chosen


def apply(mutation: Mutation, tree: Path) -> Optional[str]:
    """Plant the mutation in ``tree``; the reason it cannot be planted, or None."""
    target = tree / mutation.path
    if not target.is_file():
        return f"{mutation.path} does not exist"
    text = target.read_text()
    count = text.count(mutation.old)
    if count != 1:
        return f"the text to replace occurs {count} times in {mutation.path}, not once: {mutation.old!r}"
    target.write_text(text.replace(mutation.old, mutation.new))
    return None


def copy_tree(destination: Path, source: Path = ROOT) -> Path:
    """The working tree's tracked and untracked, not ignored, files, as they are on disk now, with
    ``smooth_infonce/integrations`` linked to ``integrations`` (pyproject's package-dir)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=source, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = source / name
        if src.is_file():
            dst = destination / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    link = destination / "smooth_infonce" / "integrations"
    if not link.exists():
        link.symlink_to(Path("..") / "integrations", target_is_directory=True)
    return destination


def run_tests(tree: Path, tests: Sequence[str], timeout: float) -> tuple:
    """pytest's exit code (None on a timeout) and the tail of its output, run inside ``tree``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONDONTWRITEBYTECODE="1", SMOOTH_INFONCE_TEST_HEARTBEAT="0")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return None, out[-2000:]
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def check(mutation: Mutation, timeout: float = 900.0, workdir: Optional[Path] = None) -> Dict[str, object]:
    """Plant one mutation in a fresh copy and run its tests: the verdict and how it was reached."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-", dir=workdir) as tmp:
        tree = copy_tree(Path(tmp))
        problem = apply(mutation, tree)
        if problem is not None:
            verdict, detail = "stale", problem
        else:
            code, output = run_tests(tree, mutation.tests, timeout)
            if code == 1:
                verdict, detail = "caught", _last_failure(output)
            elif code == 0:
                verdict, detail = "survived", "every test passed with the mutation planted"
            else:
                reason = "timed out" if code is None else f"pytest exit code {code}"
                verdict, detail = "stale", f"{reason}: {output[-600:]}"
    return {"name": mutation.name, "path": mutation.path, "plants": mutation.plants, "tests": list(mutation.tests),
            "verdict": verdict, "detail": detail, "seconds": round(time.perf_counter() - start, 1)}


def _last_failure(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return lines[-1][:300] if lines else output.strip().splitlines()[-1][:300]


def run_record(argv, seconds: float, jobs: int) -> dict:
    """When, on what and from which tree the verdicts were reached, for a committed result."""
    import platform
    from datetime import datetime, timezone

    import torch
    import triton

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' machine record names the CPU the same way
    from environment import cpu_name

    def git(*command):
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " + uncommitted changes" if git("status", "--porcelain") else ""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git("rev-parse", "--short", "HEAD") + dirty,
            "command": "python tests/mutations.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{os.cpu_count()} cores, {cpu_name()}",
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "jobs": jobs, "wall_seconds": round(seconds, 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all, or the CI subset with --ci)")
    parser.add_argument("--ci", action="store_true", help="only the bounded subset CI runs")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--json", type=Path, help="write the verdicts to this file")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's tests")
    parser.add_argument("--jobs", type=int, default=1, help="mutations tested at once (one pytest process each)")
    args = parser.parse_args(argv)
    chosen = select(args.names, ci=args.ci)
    if args.list:
        for m in chosen:
            print(f"{m.name}{'  [ci]' if m.ci else ''}\n    {m.path}: {m.plants}\n    tests: {' '.join(m.tests)}")
        return 0
    results, started = [], time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each mutation's pytest is its own process
        for number, result in enumerate(pool.map(lambda m: check(m, timeout=args.timeout), chosen), 1):
            results.append(result)
            print(f"[{number}/{len(chosen)}] {result['verdict']:8s} {result['name']} ({result['seconds']} s): "
                  f"{result['detail']}", flush=True)
    counts = {v: sum(r["verdict"] == v for r in results) for v in VERDICTS}
    print("  ".join(f"{v}: {n}" for v, n in counts.items()))
    if args.json:
        record = {"counts": counts, **run_record(argv, time.perf_counter() - started, args.jobs), "mutations": results}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if counts["caught"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
