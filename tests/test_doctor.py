"""smooth-infonce-doctor (issue 24, `smooth_infonce.doctor`): its report, its JSON and its exit codes.

In this process the interpreter is on (tests/conftest.py), so the doctor probes here; the command-line
test runs it as users do on a machine without CUDA, where it starts the interpreter probe in a child
process of its own.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smooth_infonce import doctor, self_check
from smooth_infonce.ops import triton as host

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("isolated_self_check")
cpu_report = pytest.mark.skipif(torch.cuda.is_available(), reason="the doctor's report without CUDA (CUDA is here)")




EXPECTED_KINDS = [f"interpreter {dtype} {layout} width=32 smoothing={smoothing} variants=default "
                  f"{'deterministic' if det else 'atomic'}"
                  for dtype, layout, smoothing, det in doctor.INTERPRETER_KINDS]


@cpu_report
@pytest.mark.interpreter
def test_a_clean_report_exits_0(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert doctor.main(["--json", str(out), "--timing-seconds", "3"]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA device" in printed and f"report written to {out} (exit code 0)" in printed
    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["gpus"] == [] and env["driver"] == "none"
    assert set(env["optional"]) == {"lightly", "lightning", "pytorch-lightning", "solo-learn"}
    assert env["smooth_infonce"] == self_check.package_version()
    assert len(report["reference_checks"]) == 12 and all(c["ok"] for c in report["reference_checks"])
    assert [row["kind"] for row in report["self_check_kinds"]] == EXPECTED_KINDS
    for row in report["self_check_kinds"]:
        assert row["verdict"] == "ok" and row["grad_error"] <= row["tolerance"][1] and row["probe_s"] > 0
    assert report["falls_back"] == [] and report["exit_code"] == 0
    assert report["tolerances"] == {k: list(v) for k, v in self_check.TOLERANCES.items()}
    timing = report["timing"]
    assert [row["batch"] for row in timing] == list(doctor.CPU_TIMING_BATCHES)
    assert timing[0]["kernel"].startswith("not timed: no CUDA") and isinstance(timing[0]["reference"], float)
    # the doctor's verdicts are in the cache: a later process skips these probes
    cached = self_check.read_cache(self_check.environment(torch.device("cpu")))
    assert set(cached) == set(EXPECTED_KINDS)


@cpu_report
@pytest.mark.interpreter
def test_a_kind_that_falls_back_exits_1(tmp_path, monkeypatch, capsys):
    original = host._kernel_forward

    def wrong(x):  # MoCo without ids: a wrong loss
        losses, lse, cols = original(x)
        return (losses + 1 if x.positive_keys is not None and not x.ids_exclude else losses), lse, cols

    monkeypatch.setattr(host, "_kernel_forward", wrong)
    out = tmp_path / "report.json"
    assert doctor.main(["--json", str(out), "--timing-seconds", "0"]) == 1
    report = json.loads(out.read_text())
    expected = [kind for kind in EXPECTED_KINDS if " moco " in kind]
    assert report["falls_back"] == expected and len(expected) == 3 and report["exit_code"] == 1
    rows = {row["kind"]: row for row in report["self_check_kinds"]}
    assert rows[expected[0]]["worst"].startswith("loss: error") and report["timing"] == []
    printed = capsys.readouterr().out
    assert "3 kind(s) fall back to the reference op" in printed and "(exit code 1)" in printed
    assert f"please report them on the project's issue tracker with this output and {out}" in printed


def test_usage_errors_exit_2(capsys, monkeypatch):
    for argv in (["--budget", "0"], ["--timing-seconds", "-1"], ["--bogus"], ["--widths", "128,x"], ["--widths", "0"]):
        with pytest.raises(SystemExit) as stopped:
            doctor.main(argv)
        assert stopped.value.code == 2
    errors = capsys.readouterr().err
    assert "--budget must be > 0 seconds" in errors and "--widths must be positive integers" in errors
    monkeypatch.setenv(self_check.MODE_ENV, "on")
    with pytest.raises(SystemExit) as stopped:
        doctor.main([])
    assert stopped.value.code == 2 and "SMOOTH_INFONCE_SELF_CHECK='on' is not one of" in capsys.readouterr().err


def test_the_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["smooth-infonce-doctor"] == "smooth_infonce.doctor:main"


@pytest.mark.slow
def test_the_command_line_without_cuda_probes_in_a_child_interpreter(tmp_path):
    """As a user runs it on a CPU machine: TRITON_INTERPRET unset, CUDA hidden. The interpreter probe
    runs in the doctor's own child process; the exit code is 0."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               **{self_check.CACHE_ENV: str(tmp_path / "cache")})
    done = subprocess.run([sys.executable, "-m", "smooth_infonce.doctor", "--timing-seconds", "0"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no CUDA device" in done.stdout and "16 kinds: 16 ok, 0 fall back, 0 not checked" in done.stdout
    written = list(tmp_path.glob("smooth-infonce-doctor-cpu-*.json"))
    assert len(written) == 1 and re.fullmatch(r"smooth-infonce-doctor-cpu-\d{4}-\d\d-\d\d\.json", written[0].name)
    report = json.loads(written[0].read_text())
    assert [row["kind"] for row in report["self_check_kinds"]] == EXPECTED_KINDS and report["exit_code"] == 0


def test_the_gpu_check_runs_the_doctor_first():
    """benchmarks/gpu_check.sh: the doctor is the first stage after the versions, its JSON among the
    results, so the first GPU run records the verdicts even if a later stage fails."""
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    stages = re.search(r'^STAGES="([^"]+)"', text, re.M).group(1).split()
    assert stages[0].startswith("doctor:")
    body = re.search(r"doctor_stage\(\) \{(.*?)\n\}", text, re.S).group(1)
    assert "-m smooth_infonce.doctor" in body and '--json "$OUT-doctor.json"' in body and "--budget" in body
    runs = [line for line in text.splitlines() if re.match(r"^run_stage \w+$", line)]
    assert runs[0] == "run_stage doctor"
