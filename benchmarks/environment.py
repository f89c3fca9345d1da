"""What every benchmark records about where it ran, and where its files go: the machine and versions
(`machine`), the dated default output stem under the git-ignored runs/ folder (`default_stem`) and the
JSON writer (`write_json`). The scripts import it as a sibling (their folder on sys.path)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "runs"  # git-ignored; committed runs go to results/ only with --out


def version(distribution: str):
    """The installed version of a distribution, None when it is absent."""
    try:
        return importlib.metadata.version(distribution.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_environment() -> dict:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        driver = "unknown"
    return dict(gpu=props.name, sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                driver=driver, cuda=torch.version.cuda, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version())


def machine(device: str = "cpu", packages=()) -> dict:
    """The machine and versions of a run on `device` ("cpu" or "cuda"): `device` (the name of the
    processor measured: the GPU's on cuda, else the CPU's), cpu, cores, python, torch, triton, on cuda
    the GPU's fields (`gpu_environment`), and the version of each of `packages` under its name with
    "_" for "-" (None when absent)."""
    import torch  # here, not at the top: compile_report.py --replay runs where torch may be absent

    cpu = cpu_name()
    record = dict(device=cpu, cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                  triton=version("triton"))
    if device == "cuda":
        record.update(gpu_environment())
        record["device"] = record["gpu"]
    record.update({name.replace("-", "_"): version(name) for name in packages})
    return record


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_stem(*parts: str) -> Path:
    """runs/<parts joined by "-">-<date-time>: a run without --out never overwrites committed results.
    The parts are used as given (slug a device name first)."""
    return RUNS / "-".join([*parts, f"{datetime.datetime.now():%Y%m%d-%H%M%S}"])


def write_json(report, stem: Path) -> None:
    """<stem>.json, indented; written beside and renamed, so that a run stopped while rewriting its
    JSON (they are rewritten as a run goes) leaves the previous file whole."""
    path = Path(stem).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(report, indent=1, default=float) + "\n")
    partial.replace(path)
