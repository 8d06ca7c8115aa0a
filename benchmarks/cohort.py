"""Synthetic DICOM cohorts of realistic geometry, written into a temporary folder.

Each patient is a :func:`lungzarr.algorithms.phantom.chest_phantom` volume (body, two
lungs with vessels, trachea, spine, two spherical nodules) written as real
uncompressed DICOM with :func:`lungzarr.io.dicom.write_series`. Nothing here is
committed: the folders live under a ``tempfile`` directory.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

#: Realistic geometries (slices, slice spacing mm, pixel spacing mm), 512 x 512 pixels, cycled
#: over the cohort: the DSB2017 range of 1.25-2.5 mm and 120-400 slices.
REALISTIC = ((300, 1.25, 0.70), (160, 2.5, 0.74), (400, 1.25, 0.66), (120, 2.5, 0.78),
             (240, 1.5, 0.70), (200, 2.0, 0.72))
#: ``--small`` geometry: 60 slices of 2.5 mm, 256 x 256 pixels of 0.7 mm (a 180 mm field of view,
#: so the 2 mm volume is 75 x 90 x 90, about 1/11 of a real patient's UNet work).
SMALL = (60, 2.5, 0.70)


@dataclass(frozen=True)
class PatientSpec:
    patient: str
    slices: int
    slice_mm: float
    pixel_mm: float
    size: int
    seed: int

    @property
    def shape(self):
        return (self.slices, self.size, self.size)

    @property
    def spacing(self):
        return (self.slice_mm, self.pixel_mm, self.pixel_mm)

    def as_dict(self):
        return asdict(self)


def cohort_specs(n: int, *, small: bool = False, prefix: str = "SYN") -> list[PatientSpec]:
    specs = []
    for i in range(n):
        slices, dz, px = SMALL if small else REALISTIC[i % len(REALISTIC)]
        specs.append(PatientSpec(f"{prefix}-{i + 1:04d}", slices, dz, px, 256 if small else 512, 1000 + i))
    return specs


def _nodules(spec: PatientSpec, origin):
    from lungzarr.algorithms.phantom import PhantomNodule

    nz, ny, nx = spec.shape
    dz, dy, dx = spec.spacing
    z_mid = origin[0] + (nz - 1) * dz / 2.0
    fov_y, fov_x = ny * dy, nx * dx
    # Inside the phantom's lungs (centres at y = -0.02 fov, x = +-0.19 fov).
    return (PhantomNodule(z_mid - 0.1 * nz * dz, -0.02 * fov_y, -0.19 * fov_x, 12.0),
            PhantomNodule(z_mid + 0.15 * nz * dz, 0.05 * fov_y, 0.19 * fov_x, 8.0))


def write_patient(spec: PatientSpec, folder: Path) -> Path:
    """Write one synthetic series into ``folder/<patient>/``; returns that folder."""
    from lungzarr.algorithms.phantom import chest_phantom
    from lungzarr.io.dicom import write_series

    nz, ny, nx = spec.shape
    dz, dy, dx = spec.spacing
    origin = (-nz * dz, -(ny - 1) * dy / 2.0, -(nx - 1) * dx / 2.0)
    hu, origin = chest_phantom(shape=spec.shape, spacing=spec.spacing, origin=origin,
                               nodules=_nodules(spec, origin), seed=spec.seed)
    target = Path(folder) / spec.patient
    write_series(hu, target, spacing=spec.spacing, origin=origin, patient_id=spec.patient,
                 slice_thickness=spec.slice_mm)
    return target


def write_cohort(specs, folder: Path) -> dict:
    """Write every patient (skipping folders already complete); returns ``{patient: dicom_bytes}``."""
    folder = Path(folder)
    sizes = {}
    for spec in specs:
        target = folder / spec.patient
        if not (target.is_dir() and len(list(target.glob("*.dcm"))) == spec.slices):
            write_patient(spec, folder)
        sizes[spec.patient] = sum(f.stat().st_size for f in target.glob("*.dcm"))
    return sizes


def subset_folder(folder: Path, patients, target: Path) -> Path:
    """A folder of symlinks to the first patients of a cohort (one INPUT per cohort size)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for pid in patients:
        link = target / pid
        if not link.exists():
            os.symlink(Path(folder).resolve() / pid, link)
    return target


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def resampled_slices(spec: PatientSpec) -> tuple[int, int, int]:
    from lungzarr.volume import resampled_shape

    return tuple(int(n) for n in resampled_shape(spec.shape, spec.spacing, 2.0))


__all__ = ["PatientSpec", "cohort_specs", "write_cohort", "write_patient", "subset_folder", "folder_bytes",
           "resampled_slices", "REALISTIC", "SMALL"]
