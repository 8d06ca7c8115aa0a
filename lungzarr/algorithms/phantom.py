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

__all__ = ["PhantomNodule", "chest_phantom", "chest_phantom_truth", "thorax_phantom", "DEMO_PATIENTS",
           "TRUTH_RIGHT", "TRUTH_LEFT", "TRUTH_AIRWAY", "TRUTH_BOWEL", "TRUTH_NODULE"]

#: Labels of the phantoms' truth volumes.
TRUTH_RIGHT, TRUTH_LEFT, TRUTH_AIRWAY, TRUTH_BOWEL, TRUTH_NODULE = 1, 2, 3, 4, 5


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


def _chest_anatomy(zz, yy, xx, shape, spacing, origin):
    """Right lung, left lung and trachea (before the body cut) of :func:`chest_phantom`'s geometry."""
    nz, ny, nx = shape
    dz, dy, dx = spacing
    z_mid = origin[0] + (nz - 1) * dz / 2.0
    z_len = nz * dz
    fov_y, fov_x = ny * dy, nx * dx
    # Lungs: two ellipsoids longer than the volume, so every slice cuts both. Patient LPS: the right lung
    # is the one at smaller x.
    lung_r = (0.8 * z_len, 0.22 * fov_y, 0.15 * fov_x)
    lung_dx = 0.19 * fov_x
    right = _ellipsoid(zz, yy, xx, (z_mid, -0.02 * fov_y, -lung_dx), lung_r)
    left = _ellipsoid(zz, yy, xx, (z_mid, -0.02 * fov_y, lung_dx), lung_r)
    # Trachea: an air tube at the midline, in front of the spine.
    trachea = (yy + 0.12 * fov_y) ** 2 + xx ** 2 <= (0.035 * fov_x) ** 2
    return right, left, trachea


def chest_phantom_truth(z_mm, y_mm, x_mm, *, shape=(64, 256, 256), spacing=(2.5, 1.4, 1.4), origin=None):
    """The truth of :func:`chest_phantom` at any points: lungs by side and the trachea.

    Parameters
    ----------
    z_mm, y_mm, x_mm : 1-D arrays
        Patient coordinates (mm) of a grid's axes (e.g. the 2 mm grid's ``z2, y2, x2``).
    shape, spacing, origin
        The phantom's own geometry, as given to :func:`chest_phantom`.

    Returns
    -------
    ndarray of uint8, shape (len(z_mm), len(y_mm), len(x_mm))
        :data:`TRUTH_RIGHT`, :data:`TRUTH_LEFT`, :data:`TRUTH_AIRWAY` (the
        trachea, inside the body), 0 elsewhere. Nodules and vessels lie inside
        the lungs and count as lung. Points outside the phantom's volume are 0.
    """
    nz, ny, nx = shape
    dz, dy, dx = spacing
    if origin is None:
        origin = (-nz * dz, -(ny - 1) * dy / 2.0, -(nx - 1) * dx / 2.0)
    zz, yy, xx = np.meshgrid(np.asarray(z_mm, float), np.asarray(y_mm, float), np.asarray(x_mm, float),
                             indexing="ij", sparse=True)
    fov_y, fov_x = ny * dy, nx * dx
    right, left, trachea = _chest_anatomy(zz, yy, xx, shape, spacing, origin)
    body = (yy / (0.36 * fov_y)) ** 2 + (xx / (0.45 * fov_x)) ** 2 <= 1.0
    spine = (yy - 0.24 * fov_y) ** 2 + xx ** 2 <= (0.06 * fov_x) ** 2
    out = np.zeros(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), dtype=np.uint8)
    out[np.broadcast_to(right, out.shape)] = TRUTH_RIGHT
    out[np.broadcast_to(left, out.shape)] = TRUTH_LEFT
    out[np.broadcast_to(trachea & body & ~spine, out.shape)] = TRUTH_AIRWAY
    inside = ((zz >= origin[0] - dz / 2) & (zz <= origin[0] + (nz - 0.5) * dz)
              & np.ones_like(yy, dtype=bool) & np.ones_like(xx, dtype=bool))
    out[~np.broadcast_to(inside, out.shape)] = 0
    return out


def thorax_phantom(*, shape=(88, 120, 136), spacing=(2.0, 2.0, 2.0), juxta_diameter_mm=12.0, seed=0):
    """A 2 mm thorax with what the legacy mask gets wrong: airway into the lungs, bowel gas, touching lungs.

    Built on the 2 mm grid directly (no resampling), for the 3-D lung mask's
    tests and measures: a body with a spine; two lungs with apices and a
    domed base; the left lung's anterior edge meets the right one's at the
    midline over the upper half (the anterior junction, no visible pleura);
    a trachea from the top slice to the carina and two main bronchi that open
    into the lungs; gas pockets below the diaphragm (stomach and colon), not
    connected to the lungs; vessels; a juxta-pleural nodule of
    ``juxta_diameter_mm`` touching the right lung's lateral wall from inside
    and a central nodule in the left lung.

    Parameters
    ----------
    shape : (int, int, int)
        Slices, rows, columns (z grows towards the head, +x to the patient's left).
    spacing : (float, float, float)
        Voxel size in mm (positive steps).
    juxta_diameter_mm : float
        Diameter of the juxta-pleural nodule.
    seed : int
        Noise.

    Returns
    -------
    hu : ndarray of int16
    truth : ndarray of uint8
        :data:`TRUTH_RIGHT` / :data:`TRUTH_LEFT` (lung parenchyma with its
        vessels and nodules), :data:`TRUTH_AIRWAY` (trachea and main bronchi
        outside the lungs), :data:`TRUTH_BOWEL`, 0 elsewhere.
    nodules : dict
        ``{"juxta": mask, "central": mask}`` (bool volumes of the two nodules).
    origin : tuple of float
        Patient coordinate of voxel (0, 0, 0); the grid is centred in y and x.
    """
    nz, ny, nx = shape
    dz, dy, dx = spacing
    origin = (-nz * dz, -(ny - 1) * dy / 2.0, -(nx - 1) * dx / 2.0)
    z = origin[0] + np.arange(nz) * dz
    zz, yy, xx = np.meshgrid(z, origin[1] + np.arange(ny) * dy, origin[2] + np.arange(nx) * dx,
                             indexing="ij", sparse=True)
    z0, z1 = z[0], z[-1]
    h = z1 - z0
    body = (yy / 100.0) ** 2 + (xx / 125.0) ** 2 <= 1.0
    core = (yy / 92.0) ** 2 + (xx / 117.0) ** 2 <= 1.0
    hu = np.full(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), -1000.0)
    hu = np.where(body, -90.0, hu)
    hu = np.where(core, 40.0, hu)
    # Lungs: ellipsoids from an apex 5 % of the height below the top to a domed base (the diaphragm).
    zc, rz = z0 + 0.55 * h, 0.40 * h
    dome = z0 + 0.30 * h + 0.08 * h * (1.0 - (yy / 70.0) ** 2)
    right = _ellipsoid(zz, yy, xx, (zc, 0.0, -55.0), (rz, 70.0, 40.0)) & (zz > dome)
    left = _ellipsoid(zz, yy, xx, (zc, 0.0, 55.0), (rz, 70.0, 40.0)) & (zz > dome)
    # Anterior junction: each lung's anterior medial edge reaches the midline over 22 % of the height.
    tongue = (((yy + 50.0) / 12.0) ** 2 + (xx / 40.0) ** 2 <= 1.0) & (zz > z0 + 0.5 * h) & (zz < z0 + 0.72 * h)
    right |= tongue & (xx < 0)
    left |= tongue & (xx >= 0)
    lungs = right | left
    # Heart-side notch and spine are outside the lungs.
    spine = ((yy - 70.0) / 16.0) ** 2 + (xx / 16.0) ** 2 <= 1.0
    # Airway: trachea down the midline to the carina, main bronchi down and out into each lung's hilum.
    carina = z0 + 0.62 * h
    trachea = ((yy - 15.0) ** 2 + xx ** 2 <= 8.0 ** 2) & (zz >= carina)
    bronchi = np.zeros(hu.shape, dtype=bool)
    for sign in (-1.0, 1.0):
        # A tube from the carina (x = 0) to x = 35 mm, 30 mm lower; radius 5.5 mm.
        t = np.clip((sign * xx) / 35.0, 0.0, 1.0)
        cz, cx = carina - 30.0 * t, sign * 35.0 * t
        bronchi |= ((zz - cz) ** 2 + (xx - cx) ** 2 + (yy - 15.0) ** 2 <= 5.5 ** 2) & (sign * xx >= 0)
    airway = (trachea | bronchi) & body
    # Bowel gas below the diaphragm: a stomach bubble under the left dome and two colon loops.
    bowel = (_ellipsoid(zz, yy, xx, (z0 + 0.2 * h, -10.0, 55.0), (10.0, 25.0, 22.0))
             | _ellipsoid(zz, yy, xx, (z0 + 0.08 * h, -50.0, -40.0), (6.0, 10.0, 18.0))
             | _ellipsoid(zz, yy, xx, (z0 + 0.1 * h, -45.0, 30.0), (5.0, 9.0, 14.0)))
    bowel &= ~lungs & (zz < dome - 4.0)
    hu = np.where(lungs, -850.0, hu)
    rng = np.random.default_rng(seed)
    vessels = np.zeros(hu.shape, dtype=bool)
    for _ in range(10):
        vy, vx = rng.uniform(-40, 40), rng.choice([-1, 1]) * rng.uniform(30, 70)
        vessels |= (yy - vy) ** 2 + (xx - vx) ** 2 <= rng.uniform(1.5, 2.5) ** 2
    hu = np.where(lungs & vessels, 30.0, hu)
    hu = np.where(airway, -1000.0, hu)
    hu = np.where(bowel, -1000.0, hu)
    hu = np.where(spine, 600.0, hu)
    # Nodules: the juxta-pleural one touches the right lung's lateral wall (x = -95 mm) from inside, at the
    # widest level; the central one sits in the left lung.
    r = juxta_diameter_mm / 2.0
    juxta = _ellipsoid(zz, yy, xx, (zc, 0.0, -95.0 + r), (r, r, r)) & right
    central = _ellipsoid(zz, yy, xx, (zc - 10.0, 10.0, 55.0), (4.0, 4.0, 4.0))
    hu = np.where(juxta | central, 40.0, hu)
    hu = hu + rng.normal(0.0, 12.0, size=hu.shape)
    truth = np.zeros(hu.shape, dtype=np.uint8)
    truth[right] = TRUTH_RIGHT
    truth[left] = TRUTH_LEFT
    truth[airway & ~lungs] = TRUTH_AIRWAY
    truth[bowel] = TRUTH_BOWEL
    truth[np.broadcast_to(spine, truth.shape)] = 0
    return (np.clip(np.rint(hu), -1024, 3000).astype(np.int16), truth,
            {"juxta": np.asarray(juxta), "central": np.broadcast_to(central, hu.shape).copy()},
            tuple(float(o) for o in origin))


def _phantom_slab(z_index, shape, spacing, origin, vessel_params, nodules, rng):
    nz, ny, nx = shape
    dz, dy, dx = spacing
    zz, yy, xx = np.meshgrid(origin[0] + z_index * dz, origin[1] + np.arange(ny) * dy,
                             origin[2] + np.arange(nx) * dx, indexing="ij", sparse=True)
    z_mid = origin[0] + (nz - 1) * dz / 2.0
    fov_y, fov_x = ny * dy, nx * dx
    hu = np.full(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), -1000.0)
    # Body: an elliptic cylinder of fat with a soft-tissue core (muscle/mediastinum).
    body = (yy / (0.36 * fov_y)) ** 2 + (xx / (0.45 * fov_x)) ** 2 <= 1.0
    core = (yy / (0.32 * fov_y)) ** 2 + (xx / (0.41 * fov_x)) ** 2 <= 1.0
    hu = np.where(body, -90.0, hu)
    hu = np.where(core & body, 40.0, hu)
    right, left, trachea = _chest_anatomy(zz, yy, xx, shape, spacing, origin)
    lungs = right | left
    hu = np.where(lungs, -850.0, hu)
    # Vessels: thin soft-tissue tubes along z inside the lungs.
    vessels = np.zeros(hu.shape, dtype=bool)
    for vy, vx, r, drift in vessel_params:
        vessels |= ((yy - vy - drift * (zz - z_mid)) ** 2 + (xx - vx) ** 2) <= r * r
    hu = np.where(lungs & vessels, 20.0, hu)
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
