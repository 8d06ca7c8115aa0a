"""A synthetic chest-CT phantom with nodules of known size and position.

Pure numpy (the volume layer): :func:`chest_phantom` returns HU and the ground
truth; :func:`lungzarr.io.dicom.write_series` turns it into real DICOM files.
The anatomy is coarse but has what the pipeline looks at: air around a body
of soft tissue and fat, a spine, two lungs at lung density with vessels, a
trachea, and spherical soft-tissue nodules inside the lungs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PhantomNodule", "chest_phantom", "DEMO_PATIENTS"]


@dataclass(frozen=True)
class PhantomNodule:
    """A spherical nodule: centre in patient mm (z, y, x), diameter in mm, density in HU."""

    z_mm: float
    y_mm: float
    x_mm: float
    diameter_mm: float
    hu: float = 40.0


def _ellipsoid(zz, yy, xx, centre, radii):
    return (((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
            + ((xx - centre[2]) / radii[2]) ** 2) <= 1.0


def chest_phantom(*, shape=(64, 256, 256), spacing=(2.5, 1.4, 1.4), origin=None, nodules=(), seed=0):
    """Build a synthetic chest CT volume in HU.

    Parameters
    ----------
    shape : (int, int, int)
        Slices, rows, columns.
    spacing : (float, float, float)
        Slice spacing and pixel spacing (mm).
    origin : (float, float, float), optional
        Patient coordinate (z, y, x) of voxel (0, 0, 0); default centres the
        volume on (0, 0, 0) in y/x with z from ``-shape[0] * spacing[0]``.
    nodules : sequence of PhantomNodule
        Placed by their millimetre centres (they should lie inside a lung).
    seed : int
        Noise and vessel layout.

    Returns
    -------
    hu : ndarray of int16, (z, y, x)
    origin : tuple of float
    """
    nz, ny, nx = shape
    dz, dy, dx = spacing
    if origin is None:
        origin = (-nz * dz, -(ny - 1) * dy / 2.0, -(nx - 1) * dx / 2.0)
    rng = np.random.default_rng(seed)
    fov_y, fov_x = ny * dy, nx * dx
    vessels = [(rng.uniform(-0.15, 0.12) * fov_y, rng.choice([-1, 1]) * rng.uniform(0.08, 0.28) * fov_x,
                rng.uniform(1.0, 2.0), rng.uniform(-0.15, 0.15)) for _ in range(14)]
    out = np.empty(shape, dtype=np.int16)
    # Slabs of 16 slices keep the float64 temporaries small for 512 x 512 x 400 volumes.
    for z0 in range(0, nz, 16):
        z1 = min(nz, z0 + 16)
        out[z0:z1] = _phantom_slab(np.arange(z0, z1), shape, spacing, origin, vessels, nodules, rng)
    return out, tuple(float(o) for o in origin)


def _phantom_slab(z_index, shape, spacing, origin, vessel_params, nodules, rng):
    nz, ny, nx = shape
    dz, dy, dx = spacing
    zz, yy, xx = np.meshgrid(origin[0] + z_index * dz, origin[1] + np.arange(ny) * dy,
                             origin[2] + np.arange(nx) * dx, indexing="ij", sparse=True)
    z_mid = origin[0] + (nz - 1) * dz / 2.0
    z_len = nz * dz
    fov_y, fov_x = ny * dy, nx * dx
    hu = np.full(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), -1000.0)
    # Body: an elliptic cylinder of fat with a soft-tissue core (muscle/mediastinum).
    body = (yy / (0.36 * fov_y)) ** 2 + (xx / (0.45 * fov_x)) ** 2 <= 1.0
    core = (yy / (0.32 * fov_y)) ** 2 + (xx / (0.41 * fov_x)) ** 2 <= 1.0
    hu = np.where(body, -90.0, hu)
    hu = np.where(core & body, 40.0, hu)
    # Lungs: two ellipsoids longer than the volume, so every slice cuts both.
    lung_r = (0.8 * z_len, 0.22 * fov_y, 0.15 * fov_x)
    lung_dx = 0.19 * fov_x
    lungs = (_ellipsoid(zz, yy, xx, (z_mid, -0.02 * fov_y, -lung_dx), lung_r)
             | _ellipsoid(zz, yy, xx, (z_mid, -0.02 * fov_y, lung_dx), lung_r))
    hu = np.where(lungs, -850.0, hu)
    # Vessels: thin soft-tissue tubes along z inside the lungs.
    vessels = np.zeros(hu.shape, dtype=bool)
    for vy, vx, r, drift in vessel_params:
        vessels |= ((yy - vy - drift * (zz - z_mid)) ** 2 + (xx - vx) ** 2) <= r * r
    hu = np.where(lungs & vessels, 20.0, hu)
    # Trachea: an air tube at the midline, in front of the spine.
    trachea = (yy + 0.12 * fov_y) ** 2 + xx ** 2 <= (0.035 * fov_x) ** 2
    hu = np.where(trachea & body, -1000.0, hu)
    # Spine: a bone disc behind the mediastinum.
    spine = (yy - 0.24 * fov_y) ** 2 + xx ** 2 <= (0.06 * fov_x) ** 2
    hu = np.where(spine, 600.0, hu)
    for n in nodules:
        ball = _ellipsoid(zz, yy, xx, (n.z_mm, n.y_mm, n.x_mm), (n.diameter_mm / 2.0,) * 3)
        hu = np.where(ball, n.hu, hu)
    hu = hu + rng.normal(0.0, 12.0, size=hu.shape)
    return np.clip(np.rint(hu), -1024, 3000).astype(np.int16)


#: The demo cohort: (patient id, nodules, seed). Nodules in patient mm for the default geometry.
DEMO_PATIENTS = (
    ("DEMO-001", (PhantomNodule(-80.0, -10.0, -55.0, 14.0), PhantomNodule(-60.0, 20.0, 60.0, 9.0)), 1),
    ("DEMO-002", (PhantomNodule(-90.0, 10.0, 50.0, 18.0),), 2),
    ("DEMO-003", (), 3),
)
