"""The SLURM recipe of docs/user-guide/clusters.md, run on a real SLURM cluster (issue 29, item 5).

``docs/recipes/slurm_dask.py`` is the file the page includes. Here it runs as a
reader runs it: ``python slurm_dask.py --jobs N --cores 1 ... -- run INPUT STORE``
on a one-node cluster of Debian's slurmctld, slurmd and munged started by a
fixture (``tests/slurm_cluster.py``). Its workers are SLURM jobs (``squeue``
shows them RUNNING while ``lungzarr run`` works), the store they write
equals the one a run on the default local cluster writes, and stopping the
recipe stops lungzarr cleanly and cancels every job.

Without ``slurm-wlm``/``munge`` or dask-jobqueue the slow test is skipped with
the install command, under ``CI=true`` too: CI's run deselects slow tests and
installs no system packages.

``LUNGZARR_SLURM_RECORD=benchmarks/results/slurm_run.json`` also writes the
run's record there (job script, ``squeue`` while it ran, the comparison).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "docs" / "recipes" / "slurm_dask.py"
#: The page that includes the recipe and shows its example command line.
PAGE = REPO / "docs" / "user-guide" / "clusters.md"
PY = sys.executable
#: The cohort: two small phantom chests (40 slices of 128 x 128), one nodule each (centre mm, diameter mm).
PATIENTS = {"SLURM-A": ((-50.0, 0.0, 45.0), 12.0, 11), "SLURM-B": ((-40.0, -10.0, -42.0), 10.0, 12)}


def _env() -> dict:
    """This process's environment with the checkout first on the import path (the recipe, lungzarr, the jobs)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}


def _recipe(*args, cwd, timeout=120):
    return subprocess.run([PY, str(RECIPE), *args], capture_output=True, text=True, cwd=cwd, env=_env(),
                          timeout=timeout)


def _page_example() -> list[str]:
    """The arguments of the page's example command line (its bash block that runs slurm_dask.py)."""
    text = PAGE.read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M) if "python slurm_dask.py" in b)
    argv = shlex.split(block.replace("\\\n", " "), comments=True)
    assert argv[:2] == ["python", "slurm_dask.py"], argv
    return argv[2:]


def test_recipe_renders_the_cpu_and_gpu_job_scripts_without_submitting(tmp_path):
    """--dry-run of the page's example: one single-threaded worker per core in the CPU jobs and a GPU job (its
    --gres directive and its own prologue line) whose one worker says GPU=1, both on the recipe's scheduler.
    (No GPU here: the GPU job is rendered, never submitted.)"""
    pytest.importorskip("dask_jobqueue", reason="pip install 'lungzarr[slurm]' (dask-jobqueue)")
    r = _recipe("--dry-run", *_page_example(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cpu, gpu = (tmp_path / "slurm-logs" / f"lungzarr-{kind}.sh" for kind in ("cpu", "gpu"))
    cpu_text, gpu_text = cpu.read_text(), gpu.read_text()
    assert cpu_text in r.stdout and gpu_text in r.stdout
    for directive in ("-J lungzarr-cpu", "-p cpu", "-A my_account", "--cpus-per-task=16", "-t 12:00:00"):
        assert f"#SBATCH {directive}\n" in cpu_text
    for directive in ("-J lungzarr-gpu", "-p gpu", "--cpus-per-task=4", "--gres=gpu:1"):
        assert f"#SBATCH {directive}\n" in gpu_text
    cpu_worker, gpu_worker = cpu_text.splitlines()[-1], gpu_text.splitlines()[-1]
    assert cpu_text.splitlines()[-2] == "source $HOME/lungzarr-venv/bin/activate"
    assert gpu_text.splitlines()[-3:-1] == ["source $HOME/lungzarr-venv/bin/activate", "export KERAS_BACKEND=torch"]
    assert "KERAS_BACKEND" not in cpu_text
    assert cpu_worker.startswith(f"{PY} -m distributed.cli.dask_worker tcp://")
    assert "--nthreads 1 " in cpu_worker and "--nworkers 16 " in cpu_worker
    assert gpu_worker.endswith("--resources GPU=1") and "--nworkers" not in gpu_worker
    assert cpu_worker.split()[3] == gpu_worker.split()[3]          # one scheduler for both kinds of job


def test_recipe_without_a_command_says_what_to_give(tmp_path):
    pytest.importorskip("dask_jobqueue", reason="pip install 'lungzarr[slurm]' (dask-jobqueue)")
    r = _recipe("--jobs", "1", "--cores", "1", "--memory", "1GB", cwd=tmp_path)
    assert r.returncode == 2 and "give the lungzarr command after --, e.g. -- run INPUT STORE" in r.stderr


# ---------------------------------------------------------------------- the recipe on a real SLURM cluster

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster (munged, slurmctld, slurmd) in a folder of its own; stopped after the module."""
    from slurm_cluster import missing_programs, slurm_cluster

    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    pytest.importorskip("dask_jobqueue", reason="pip install 'lungzarr[slurm]' (dask-jobqueue)")
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from lungzarr.algorithms.phantom import PhantomNodule, chest_phantom
    from lungzarr.io.dicom import write_series

    root = tmp_path_factory.mktemp("cohort") / "input"
    shape, spacing = (40, 128, 128), (2.5, 1.8, 1.8)
    for pid, (centre, diameter, seed) in PATIENTS.items():
        hu, origin = chest_phantom(shape=shape, spacing=spacing, nodules=(PhantomNodule(*centre, diameter),),
                                   seed=seed)
        write_series(hu, root / pid, spacing=spacing, origin=origin, patient_id=pid, slice_thickness=spacing[0])
    return root


#: What lungzarr's progress lines begin with ("detect SLURM-A done 22.0 s").
STAGE_NAMES = ("ingest", "segment", "lungs3d", "detect", "nodules", "features")


def _progress_lines(lines) -> int:
    """lungzarr's lines "STAGE PATIENT done ..." among ``lines``."""
    words = [line.split() for line in list(lines)]
    return sum(1 for w in words if len(w) >= 3 and w[0] in STAGE_NAMES and w[2] == "done")


class _Watch:
    """The recipe's output, line by line, and the queue every half second while it runs."""

    def __init__(self, proc, cluster):
        self.proc, self.cluster = proc, cluster
        self.lines: list[str] = []
        self.snapshots: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def run(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.terminate()             # the recipe cancels its jobs on SIGTERM
                self.proc.wait(60)
                raise AssertionError(f"the recipe ran past {timeout:g} s:\n" + "\n".join(self.lines[-40:]))
            t = round(time.monotonic() - t0, 1)
            queue, jobs = self.cluster.squeue(), self.cluster.jobs()
            # lungzarr's lines "STAGE PATIENT done" read after the queue: a later one means it was running then.
            self.snapshots.append({"t_s": t, "progress_lines": _progress_lines(self.lines), "squeue": queue,
                                   "jobs": jobs})
            time.sleep(0.5)
        self._reader.join(30)
        return self.proc.returncode


def _machine() -> dict:
    """The machine's CPU, ISA and load, as benchmarks/results record it (``{measured-on}`` reads cpu_model)."""
    flags, model = set(), platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    return {"cpu_model": model, "cpus": os.cpu_count(),
            "isa": "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2",
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


@pytest.mark.slow  # ~3-5 min on 2 loaded cores: the whole pipeline on 2 small patients, locally and on SLURM
def test_recipe_runs_lungzarr_on_slurm_jobs_and_gives_the_local_runs_store(slurm, cohort, tmp_path):
    """`python slurm_dask.py --jobs 2 --cores 1 ... -- run INPUT STORE` on the real cluster: the workers are
    the RUNNING jobs of `squeue` while the run works, every job is gone after, and the nodule and patient
    tables equal the default local run's exactly (every column; the same INPUT folder, so no column differs
    by design), as do every stored array, stage marker (less its time and ids) and attribute."""
    import pandas.testing as pdt
    from conftest import assert_same_patients

    import dask_jobqueue

    import lungzarr

    machine_before = _machine()
    jobs = min(2, int(slurm.node["CPUs"]))
    local, on_slurm = tmp_path / "local.zarr", tmp_path / "slurm.zarr"
    t0 = time.perf_counter()
    r = subprocess.run([PY, "-m", "lungzarr.cli", "run", str(cohort), str(local)], capture_output=True, text=True,
                       cwd=tmp_path, env=_env(), timeout=900)
    t_local = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr

    # The recipe as the page shows it; on loopback (--interface lo), each job one core, one worker.
    args = ["--jobs", str(jobs), "--cores", "1", "--memory", "5GB", "--walltime", "00:30:00", "--interface", "lo",
            "--log-directory", str(tmp_path / "slurm-logs"), "--", "run", str(cohort), str(on_slurm)]
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, str(RECIPE), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=_env())
    watch = _Watch(proc, slurm)
    rc = watch.run(timeout=900)
    t_slurm = time.perf_counter() - t0
    output = "\n".join(watch.lines)
    assert rc == 0, output + "\n" + slurm.logs()

    # The workers the recipe saw were SLURM jobs: "worker ADDRESS in SLURM job ID".
    worker_jobs = {line.split()[-1] for line in watch.lines if line.startswith("  worker ")}
    assert len(worker_jobs) == jobs and "None" not in worker_jobs, output     # None: no SLURM_JOB_ID
    scheduler = next(line.split()[1].rstrip(":") for line in watch.lines if line.startswith("scheduler "))
    assert f"dask scheduler {scheduler}: {jobs} worker(s)" in output
    # While lungzarr worked those jobs were RUNNING: every snapshot after its first "STAGE PATIENT done" line
    # and before its last one (lungzarr went on, on the cluster's workers, after it was taken).
    last = _progress_lines(watch.lines)
    during = [s for s in watch.snapshots if 0 < s["progress_lines"] < last]
    assert during, output
    for snap in during:
        assert {job for job, (name, state) in snap["jobs"].items() if name == "lungzarr-cpu"
                and state == "RUNNING"} == worker_jobs, snap["squeue"]
    # Every job cancelled when the recipe ended (COMPLETING jobs leave the queue within seconds).
    deadline = time.monotonic() + 60
    while slurm.jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm.jobs() == {}, slurm.squeue()
    job_script = (tmp_path / "slurm-logs" / "lungzarr-cpu.sh").read_text()
    assert "#SBATCH -J lungzarr-cpu\n" in job_script and "#SBATCH --cpus-per-task=1\n" in job_script
    assert f"{PY} -m distributed.cli.dask_worker {scheduler} " in job_script
    for job in worker_jobs:        # each job's worker log: it joined the recipe's scheduler
        log = (tmp_path / "slurm-logs" / f"lungzarr-cpu-{job}.err").read_text()
        assert "Registered to:" in log and scheduler in log, log

    nodules_local, nodules_slurm = lungzarr.read_nodules(local), lungzarr.read_nodules(on_slurm)
    assert set(nodules_local.patient) == set(PATIENTS)
    pdt.assert_frame_equal(nodules_slurm, nodules_local, check_exact=True)
    patients_local, patients_slurm = lungzarr.read_patients(local), lungzarr.read_patients(on_slurm)
    pdt.assert_frame_equal(patients_slurm, patients_local, check_exact=True)
    assert_same_patients(on_slurm, local)
    for pid, (centre, diameter, _) in PATIENTS.items():   # the phantom's nodule is found, in mm
        found = nodules_local[(nodules_local.patient == pid) & np.isclose(nodules_local.threshold, 0.5)]
        assert np.linalg.norm(found[["z_mm", "y_mm", "x_mm"]].to_numpy() - centre, axis=1).min() < 3, pid

    snapshot = during[len(during) // 2]
    joined = next(line for line in watch.lines if " worker(s) joined in " in line)

    def public(text):          # the test's folders by name
        return text.replace(str(tmp_path), "$TMP").replace(str(cohort), "$INPUT")

    record = {
        "date": time.strftime("%Y-%m-%d"),
        "what": "docs/recipes/slurm_dask.py on a one-node SLURM cluster (tests/test_slurm.py): lungzarr run of 2 "
                "phantom patients on SLURM jobs vs the default local cluster",
        "command": public(f"python docs/recipes/slurm_dask.py {' '.join(args)}"),
        "slurm": slurm.command("sinfo", "--version").strip(), "dask_jobqueue": dask_jobqueue.__version__,
        "machine": machine_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "job_script": public(job_script),
        "job_script_note": "as the recipe wrote it (SLURMCluster.job_script()); dask-jobqueue puts each job's worker "
                           "name in place of dummy-name when it submits the job",
        "squeue_while_running": {"t_s": snapshot["t_s"], "lungzarr_progress_lines_so_far": snapshot["progress_lines"],
                                 "text": snapshot["squeue"]},
        "squeue_snapshots_while_running": len(during),
        "workers": [line.strip() for line in watch.lines if line.startswith("  worker ")],
        "seconds": {"local_run": round(t_local, 1), "slurm_recipe": round(t_slurm, 1),
                    "workers_joined": float(joined.split(" joined in ")[1].split()[0]),
                    "note": "not a speed comparison: the local run, first, also filled the test session's "
                            "empty LUNGZARR_CACHE (engine calibration, exported graph); the recipe's run (its jobs "
                            "inherit the variable) found them there. slurm_recipe: jobs submitted, workers joined, "
                            "lungzarr run, jobs cancelled"},
        "local_output": [public(line) for line in (r.stdout + r.stderr).splitlines()],
        "recipe_output": [public(line) for line in watch.lines],
        "comparison": {
            "nodules": {"rows": len(nodules_local), "columns": len(nodules_local.columns),
                        "equal": "exact, every column (pandas assert_frame_equal check_exact)"},
            "patients": {"rows": len(patients_local), "columns": len(patients_local.columns),
                         "equal": "exact, every column"},
            "arrays": "every stored array of every patient equal (numpy assert_array_equal), stage markers "
                      "less completed/id/depends_on and patient attrs equal (conftest.assert_same_patients)",
            "nodules_at_0.5": nodules_local[np.isclose(nodules_local.threshold, 0.5)][
                ["patient", "z_mm", "y_mm", "x_mm", "diameter_mm", "prob_max"]].round(3).to_dict("records"),
        },
    }
    (tmp_path / "slurm_run.json").write_text(json.dumps(record, indent=1) + "\n")
    target = os.environ.get("LUNGZARR_SLURM_RECORD")
    if target:
        Path(target).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nSLURM recipe: {jobs} jobs; local run {t_local:.0f} s, recipe on SLURM {t_slurm:.0f} s; "
          f"squeue while running:\n{snapshot['squeue']}")


@pytest.mark.slow  # ~30-60 s: two jobs start, lungzarr begins, the recipe is stopped
def test_recipe_stopped_with_sigterm_stops_lungzarr_cleanly_and_cancels_its_jobs(slurm, cohort, tmp_path):
    """SIGTERM to the recipe while lungzarr works (a batch system's stop, `kill`): lungzarr gets one SIGINT and
    stops cleanly (its sentence, exit 130), and every job the recipe submitted leaves the queue."""
    args = ["--jobs", "1", "--cores", "1", "--memory", "5GB", "--walltime", "00:30:00", "--interface", "lo",
            "--log-directory", str(tmp_path / "slurm-logs"), "--", "run", str(cohort), str(tmp_path / "s.zarr")]
    proc = subprocess.Popen([PY, str(RECIPE), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=_env())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while _progress_lines(lines) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _progress_lines(lines) > 0, "\n".join(lines)
    running = {job for job, (name, state) in slurm.jobs().items() if name == "lungzarr-cpu" and state == "RUNNING"}
    assert len(running) == 1, slurm.squeue()
    proc.terminate()
    assert proc.wait(120) == 130
    reader.join(30)
    output = "\n".join(lines)
    assert "interrupted (SIGINT) after" in output and "interrupted again" not in output, output
    deadline = time.monotonic() + 60
    while slurm.jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm.jobs() == {}, slurm.squeue()
