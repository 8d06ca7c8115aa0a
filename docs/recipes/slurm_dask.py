"""Run a lungzarr command on dask workers that SLURM starts (dask-jobqueue).

Run it on the login node, in the environment where lungzarr is installed::

    python slurm_dask.py --jobs 4 --cores 16 --memory 64GB --queue cpu --account my_account \\
        -- run /shared/INPUT /shared/cohort.zarr

It starts a dask scheduler here, submits ``--jobs`` SLURM jobs of ``--cores``
single-threaded workers each (and ``--gpu-jobs`` jobs of one worker that
advertises ``GPU=1``), waits until their workers have joined, runs the
lungzarr command after ``--`` with ``--scheduler`` set to that scheduler, then
cancels every job it submitted, also when the command fails or the script is
stopped (Ctrl-C, SIGTERM). Its exit status is the command's. The job scripts
it submits are written to ``--log-directory`` beside the jobs' logs
(dask-jobqueue puts each job's worker name in place of ``dummy-name``).

Requires ``pip install 'lungzarr[slurm]'`` (dask-jobqueue) and ``sbatch`` /
``scancel`` on the PATH. ``tests/test_slurm.py`` runs this file on a real
one-node SLURM cluster (slurmctld, slurmd, munged).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] -- LUNGZARR_COMMAND ...")
    p.add_argument("--jobs", type=int, default=1, help="CPU jobs to submit (default 1)")
    p.add_argument("--cores", type=int, required=True,
                   help="cores per CPU job: one single-threaded worker process each, as lungzarr's own cluster")
    p.add_argument("--memory", required=True, help="memory per CPU job, shared by its workers (e.g. 64GB)")
    p.add_argument("--walltime", default="12:00:00", help="time limit per job (default 12:00:00)")
    p.add_argument("--queue", help="SLURM partition (-p); default: the cluster's default partition")
    p.add_argument("--account", help="SLURM account (-A)")
    p.add_argument("--python", default=sys.executable,
                   help="the python the jobs start the workers with (default this one, %(default)s)")
    p.add_argument("--prologue", action="append", default=[],
                   help="a shell line the job runs before its workers (repeat), e.g. 'source ~/venv/bin/activate'")
    p.add_argument("--interface", help="network interface of the scheduler and workers (e.g. ib0); "
                                       "default: the address the login node resolves to")
    p.add_argument("--gpu-jobs", type=int, default=0,
                   help="GPU jobs: one worker each with --resources GPU=1, which then runs the UNet (default 0)")
    p.add_argument("--gpu-cores", type=int, default=4, help="cores of a GPU job (default 4)")
    p.add_argument("--gpu-memory", default="64GB", help="memory of a GPU job (default 64GB)")
    p.add_argument("--gpu-queue", help="partition of the GPU jobs (default --queue)")
    p.add_argument("--gpu-prologue", action="append", default=[],
                   help="a shell line the GPU jobs run after --prologue (repeat), e.g. 'export KERAS_BACKEND=torch'")
    p.add_argument("--gpu-directive", action="append", default=None,
                   help="an #SBATCH option of the GPU jobs (repeat; default --gres=gpu:1)")
    p.add_argument("--log-directory", default="slurm-logs", help="the jobs' scripts and logs (default slurm-logs)")
    p.add_argument("--wait", type=float, default=600.0,
                   help="seconds the jobs have to start and their workers to join (default 600)")
    p.add_argument("--dry-run", action="store_true", help="print the job scripts, submit nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the lungzarr command, after --")
    return p


def _as_ctrl_c(signum, frame):
    """SIGTERM (a batch system's stop, ``kill``) ends this script as Ctrl-C does: every job cancelled."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.dry_run:
        _parser().error("give the lungzarr command after --, e.g. -- run INPUT STORE")
    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import SLURMJob
    from distributed import Client

    logs = Path(args.log_directory).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    common = {"walltime": args.walltime, "account": args.account, "python": args.python,
              "interface": args.interface, "log_directory": str(logs)}
    # The dashboard stays on this machine's loopback (it shows patient ids and paths): ssh -L to reach it.
    cpu = SLURMCluster(job_name="lungzarr-cpu", queue=args.queue, cores=args.cores, processes=args.cores,
                       memory=args.memory, job_script_prologue=args.prologue,
                       scheduler_options={"dashboard_address": "127.0.0.1:0"}, **common)
    gpu = SLURMJob(scheduler=cpu.scheduler_address, name="lungzarr-gpu", job_name="lungzarr-gpu",
                   queue=args.gpu_queue or args.queue, cores=args.gpu_cores, processes=1, memory=args.gpu_memory,
                   job_extra_directives=["--gres=gpu:1"] if args.gpu_directive is None else args.gpu_directive,
                   job_script_prologue=args.prologue + args.gpu_prologue, worker_extra_args=["--resources", "GPU=1"],
                   **common)
    scripts = {"lungzarr-cpu": cpu.job_script(), "lungzarr-gpu": gpu.job_script()}
    for name, script in scripts.items():
        (logs / f"{name}.sh").write_text(script)
    if args.dry_run:
        for name, script in scripts.items():
            print(f"# {logs / (name + '.sh')}\n{script}")
        cpu.close()
        return 0

    signal.signal(signal.SIGTERM, _as_ctrl_c)
    gpu_jobs = []
    try:
        cpu.scale(jobs=args.jobs)
        for _ in range(args.gpu_jobs):
            out = subprocess.run(["sbatch", "--parsable", str(logs / "lungzarr-gpu.sh")], check=True,
                                 capture_output=True, text=True).stdout
            gpu_jobs.append(out.strip().split(";")[0])
        n = args.jobs * args.cores + args.gpu_jobs
        print(f"scheduler {cpu.scheduler_address}: waiting for {n} worker(s) of {args.jobs + args.gpu_jobs} "
              f"SLURM job(s); dashboard {cpu.dashboard_link}", flush=True)
        with Client(cpu) as client:
            t0 = time.monotonic()
            client.wait_for_workers(n, timeout=args.wait)
            jobs = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
            print(f"{n} worker(s) joined in {time.monotonic() - t0:.0f} s:", flush=True)
            for address, job in sorted(jobs.items()):
                print(f"  worker {address} in SLURM job {job}", flush=True)
        # `lungzarr` of this environment (python -m: the same install the workers' --python runs).
        line = [sys.executable, "-m", "lungzarr.cli", *command, "--scheduler", cpu.scheduler_address]
        print("running:", " ".join(line), flush=True)
        # Its own session: each Ctrl-C reaches it once, through this script. lungzarr stops cleanly on the
        # first (the work in flight cancelled) and at once on a second.
        proc = subprocess.Popen(line, start_new_session=True)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
    except KeyboardInterrupt:
        print("stopped: cancelling the SLURM jobs", file=sys.stderr, flush=True)
        return 130
    finally:
        if gpu_jobs:
            subprocess.run(["scancel", *gpu_jobs])
        cpu.close()


if __name__ == "__main__":
    sys.exit(main())
