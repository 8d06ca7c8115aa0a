"""The 3-D lung mask (stage ``lungs3d``) against the legacy per-slice one, per patient, in one run.

For each patient (the RICORD and LIDC fixtures, 2 mm, and the demo phantom
DEMO-001), in a fresh child process each so that peak memory is its own:

* ``legacy``: :func:`lungzarr.algorithms.segment.segment_lung_slices` on the
  whole 2 mm volume (the segment stage's algorithm);
* ``lungs3d``: :func:`lungzarr.algorithms.lungs3d.lung_labels_numpy` (the
  lungs3d stage's algorithm, all five steps in one process).

CPU-seconds (``time.process_time``) and the peak RSS increase over the RSS
after the volume is loaded (``VmHWM``). Then, in the parent, the volumes:
legacy and new (right, left), and where the legacy mask's extra voxels lie:
the airway (tracked, dilated), gas apart from the lung fields (bowel, stomach,
air pockets), the outline rim (voxels of the legacy mask's border band that
are not air: the legacy closing's pleural rim) and the rest.

Writes ``benchmarks/results/lungs3d.json`` (and, with ``--pictures DIR``, PNGs
of the removed voxels). Run from the repository root::

    python benchmarks/bench_lungs3d.py [--pictures /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "lungs3d.json"
sys.path.insert(0, str(REPO))  # this worktree's lungzarr, also in the parent process
FIXTURES = REPO.parent / "shared" / "fixtures"
PATIENTS = {"RICORD-1A": "ricord/RICORD-1A-chest", "LIDC-IDRI-0001": "lidc/LIDC-IDRI-0001", "DEMO-001": None}


def load_2mm(patient: str):
    """The patient's 2 mm HU volume and grid (the ingest stage's resampling)."""
    from lungzarr.algorithms.resample import resample_to_2mm_numpy

    if PATIENTS[patient] is None:
        from lungzarr.algorithms.phantom import DEMO_PATIENTS, chest_phantom
        from lungzarr.demo import DEMO_SHAPE, DEMO_SPACING
        from lungzarr.volume import Grid

        _, nodules, seed = DEMO_PATIENTS[0]
        hu, origin = chest_phantom(shape=DEMO_SHAPE, spacing=DEMO_SPACING, nodules=nodules, seed=seed)
        return resample_to_2mm_numpy(hu, Grid(shape=hu.shape, origin=origin, step=DEMO_SPACING))
    from lungzarr.io.dicom import load_hu

    folder = Path(os.environ.get("LUNGZARR_FIXTURES", FIXTURES)) / PATIENTS[patient]
    hu, grid = load_hu(folder)
    return resample_to_2mm_numpy(hu, grid)


def _rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it does not carry the parent's peak
    over the exec of a child process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(patient: str, mode: str, out: Path) -> dict:
    """One measurement in this (fresh) process; the mask goes to ``out`` (.npy).

    The 2 mm volume is read from the ``.hu.npy`` / ``.grid.json`` files the parent wrote beside
    ``out``, so the resampling's memory does not hide the algorithm's in the peak RSS.
    """
    import tracemalloc

    from lungzarr.algorithms.lungs3d import lung_labels_numpy
    from lungzarr.algorithms.segment import segment_lung_slices
    from lungzarr.volume import Grid

    hu = np.load(out.with_suffix(".hu.npy"))
    grid = Grid(**json.loads(out.with_suffix(".grid.json").read_text()))
    # Warm the code paths on a tiny volume so the RSS increase is the algorithm's, not imports'.
    segment_lung_slices(hu[:1])
    lung_labels_numpy(np.full((4, 32, 32), -1000, np.int16), spacing=grid.spacing, x_step=grid.step[2])
    base = _rss_mb()
    cpu, wall = time.process_time(), time.perf_counter()
    if mode == "legacy":
        mask = segment_lung_slices(hu)[0].astype(np.uint8)
    else:
        mask = lung_labels_numpy(hu, spacing=grid.spacing, x_step=grid.step[2])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak_rss = _rss_mb()
    np.save(out, mask)
    del mask
    # Once more under tracemalloc (numpy reports its buffers to it): the largest simultaneous allocation.
    tracemalloc.start()
    if mode == "legacy":
        segment_lung_slices(hu)
    else:
        lung_labels_numpy(hu, spacing=grid.spacing, x_step=grid.step[2])
    traced_peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return {"patient": patient, "mode": mode, "shape_2mm": list(hu.shape), "cpu_seconds": cpu,
            "wall_seconds": wall, "rss_before_mb": base, "peak_rss_mb": peak_rss,
            "peak_rss_increase_mb": peak_rss - base, "traced_peak_mb": traced_peak}


def where_removed(patient: str, legacy, labels) -> dict:
    """Volumes (ml) of both masks and where the legacy mask's extra voxels lie."""
    from scipy import ndimage as ndi

    from lungzarr.algorithms.lungs3d import (
        AIR_HU,
        air_in_body,
        lung_fields,
        split_lungs,
        track_airway,
    )

    hu, grid = load_2mm(patient)
    ml = float(np.prod(grid.spacing)) / 1000.0
    air = air_in_body(hu)
    fields = lung_fields(air)
    airway = track_airway(hu, fields, spacing=grid.spacing)
    airway_dilated = split_lungs(fields, airway, spacing=grid.spacing, x_step=grid.step[2]) == 3
    legacy = legacy.astype(bool)
    new = labels > 0
    removed = legacy & ~new
    # Gas apart from the lungs: whole 3-D components of the legacy mask that hold no voxel of the new one
    # (bowel and stomach gas with the legacy outline's rim around it), and air apart from the lung fields.
    comp, _ = ndi.label(legacy)
    shared = np.unique(comp[new & legacy])
    apart = legacy & ~np.isin(comp, shared)
    parts = {
        "airway": removed & airway_dilated,
        "gas_apart_from_lungs": removed & ~airway_dilated & (apart | (air & ~fields)),
    }
    rest = removed & ~parts["airway"] & ~parts["gas_apart_from_lungs"]
    border = legacy & ~ndi.binary_erosion(legacy, iterations=2)
    parts["outline_rim_not_air"] = rest & border & (hu >= AIR_HU)
    parts["other"] = rest & ~parts["outline_rim_not_air"]
    return {
        "legacy_ml": legacy.sum() * ml,
        "legacy_ml_in_-990_-400_hu": (legacy & (hu >= -990) & (hu < -400)).sum() * ml,
        "new_ml": new.sum() * ml, "new_right_ml": (labels == 1).sum() * ml, "new_left_ml": (labels == 2).sum() * ml,
        "removed_ml": removed.sum() * ml, "added_ml": (new & ~legacy).sum() * ml,
        "removed_by_place_ml": {k: v.sum() * ml for k, v in parts.items()},
        "airway_tracked_ml": airway.sum() * ml,
        "airway_slices": [int(k) for k in np.flatnonzero(airway.any(axis=(1, 2)))[[0, -1]]] if airway.any() else [],
    }, hu, parts


def picture(patient, hu, legacy, labels, parts, path):
    """Coronal, sagittal and axial views with both outlines and the removed voxels by place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    removed_any = sum(p.astype(int) for p in parts.values()) > 0
    by_z = removed_any.sum(axis=(1, 2))
    airway_z = parts["airway"].sum(axis=(1, 2))
    gas_z = parts["gas_apart_from_lungs"].sum(axis=(1, 2))
    ky = int(np.argmax((labels > 0).sum(axis=(0, 2)))) if labels.any() else hu.shape[1] // 2
    zs = [int(np.argmax(airway_z)) if airway_z.any() else hu.shape[0] - 1,
          int(np.argmax(gas_z)) if gas_z.any() else 0, int(np.argmax(by_z)), hu.shape[0] // 2]
    views = [("coronal y=%d" % ky, hu[:, ky], legacy[:, ky], labels[:, ky], {k: v[:, ky] for k, v in parts.items()},
              True)]
    views += [("sagittal x=%d" % (hu.shape[2] // 2), hu[:, :, hu.shape[2] // 2], legacy[:, :, hu.shape[2] // 2],
               labels[:, :, hu.shape[2] // 2], {k: v[:, :, hu.shape[2] // 2] for k, v in parts.items()}, True)]
    views += [("axial z=%d" % k, hu[k], legacy[k], labels[k], {n: v[k] for n, v in parts.items()}, False) for k in zs]
    colours = {"airway": "magenta", "gas_apart_from_lungs": "orange", "outline_rim_not_air": "yellow",
               "other": "white"}
    for ax in axes.ravel()[len(views):-1]:
        ax.set_axis_off()
    for ax, (title, img, leg, lab, prt, lower) in zip(axes.ravel(), views):
        ax.imshow(img, cmap="gray", vmin=-1200, vmax=400, origin="lower" if lower else "upper")
        from matplotlib.colors import to_rgba

        overlay = np.zeros(img.shape + (4,))
        for name, m in prt.items():
            overlay[m] = to_rgba(colours[name], 0.9)
        ax.imshow(overlay, origin="lower" if lower else "upper", interpolation="nearest")
        if leg.any():
            ax.contour(leg.astype(np.uint8), levels=[0.5], colors="red", linewidths=0.6)
        for side, c in ((1, "cyan"), (2, "lime")):
            if (lab == side).any():
                ax.contour((lab == side).astype(np.uint8), levels=[0.5], colors=c, linewidths=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    ax = axes.ravel()[-1]
    ax.plot(airway_z, label="airway")
    ax.plot(gas_z, label="gas apart from lungs")
    ax.plot(parts["outline_rim_not_air"].sum(axis=(1, 2)), label="outline rim")
    ax.set_xlabel("slice (z, feet → head)")
    ax.set_ylabel("removed voxels")
    ax.legend(fontsize=8)
    fig.suptitle(f"{patient}: legacy mask red; new right cyan, left green; removed: airway magenta, "
                 "gas orange, rim yellow, other white")
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", default=",".join(PATIENTS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--pictures", type=Path, default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        patient, mode, out = args.child
        print(json.dumps(child(patient, mode, Path(out))))
        return {}
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    load_before = os.getloadavg()
    per_patient = []
    with tempfile.TemporaryDirectory() as tmp:
        for patient in args.patients.split(","):
            runs = {}
            hu, grid = load_2mm(patient)
            for mode in ("legacy", "lungs3d"):
                out = Path(tmp) / f"{patient}-{mode}.npy"
                np.save(out.with_suffix(".hu.npy"), hu)
                out.with_suffix(".grid.json").write_text(json.dumps(
                    {"shape": list(grid.shape), "origin": list(grid.origin), "step": list(grid.step)}))
                proc = subprocess.run([sys.executable, __file__, "--child", patient, mode, str(out)],
                                      capture_output=True, text=True, env=env, check=True)
                runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[mode]["mask"] = np.load(out)
            legacy, labels = runs["legacy"].pop("mask"), runs["lungs3d"].pop("mask")
            volumes, hu, parts = where_removed(patient, legacy, labels)
            if args.pictures is not None:
                picture(patient, hu, legacy.astype(bool), labels, parts, args.pictures / f"lungs3d_{patient}.png")
            row = {"patient": patient, "runs": runs, "volumes": volumes,
                   "cpu_ratio_lungs3d_over_legacy": runs["lungs3d"]["cpu_seconds"] / runs["legacy"]["cpu_seconds"]}
            per_patient.append(row)
            print(f"{patient}: legacy {runs['legacy']['cpu_seconds']:.2f} CPU-s +{runs['legacy']['peak_rss_increase_mb']:.0f} MB RSS "
                  f"({runs['legacy']['traced_peak_mb']:.0f} MB traced), lungs3d {runs['lungs3d']['cpu_seconds']:.2f} CPU-s "
                  f"+{runs['lungs3d']['peak_rss_increase_mb']:.0f} MB RSS ({runs['lungs3d']['traced_peak_mb']:.0f} MB traced); "
                  f"volumes {json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in volumes.items() if k != 'removed_by_place_ml'})} "
                  f"removed by place {json.dumps({k: round(v, 1) for k, v in volumes['removed_by_place_ml'].items()})}")
    import scipy
    import skimage

    result = {
        "benchmark": "3-D lung mask (stage lungs3d) vs the legacy per-slice mask (stage segment), per patient",
        "notes": ("One process per (patient, mode); cpu_seconds = process_time of the mask computation on the "
                  "in-memory 2 mm volume; peak_rss_increase_mb over the RSS after loading the volume (from .npy) and a "
                  "warm-up; traced_peak_mb: the largest simultaneous allocation (tracemalloc, a second run). "
                  "removed_by_place_ml splits the legacy mask's voxels the new mask lacks: the tracked airway "
                  "(dilated by one voxel), gas apart from the lungs (legacy components without a voxel of the new mask: "
                  "bowel/stomach gas with the rim the legacy outline puts around it, and air apart from the lung "
                  "fields), the "
                  "legacy outline's border band (2 voxels) that is not air (>= -400 HU: pleura, vessels at the "
                  "hilum the legacy closing takes in), and the rest."),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                    "scikit-image": skimage.__version__},
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "patients": per_patient,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
