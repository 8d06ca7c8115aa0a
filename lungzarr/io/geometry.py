"""One geometry rule for every reader: where each voxel centre really is, and the grid that stores it.

The store keeps one axis-aligned grid per patient in patient LPS millimetres
(:class:`lungzarr.volume.Grid`: arrays (z, y, x), one mm value per index along
each axis). The readers (DICOM slices, NIfTI and MetaImage affines) describe
their voxels otherwise: each DICOM slice by its own ImagePositionPatient (IPP),
ImageOrientationPatient (IOP) and PixelSpacing, a volume file by one affine.
This module, plain numpy, turns either into

1. per slice, the exact flips/transpose (:class:`Reorientation`) that lay its
   pixels out as the stack's stored slices (rows along y, columns along x, each
   with the stack's sign), so a slice stored mirrored or transposed is placed
   exactly, by index permutation only, never interpolated;
2. the axis-aligned :class:`Grid` of the stack and, for every voxel centre, the
   distance per patient axis between where its headers put it and where that
   grid puts it (:func:`place_stack`).

The rule (:data:`TOLERANCE_VOXELS`): every voxel centre anywhere in the volume
lies within half a voxel of its header position along each axis (half that
axis' spacing), or the input is refused with what its geometry is (gantry tilt,
in-plane rotation, oblique, sheared stack, slices that disagree, with the
angle) and the fix. Nothing is approximated in silence: an accepted deviation is
recorded with its size.

The mapping of a slice's pixel indices to millimetres is affine, so the largest
distance over a slice is reached at one of its four corner pixels: the corners
of every slice are what is checked.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from lungzarr.volume import Grid

__all__ = [
    "TOLERANCE_VOXELS",
    "ORTHONORMAL_TOL",
    "Reorientation",
    "Placement",
    "orientation_problem",
    "normal_axis",
    "stack_signs",
    "orient_slice",
    "place_stack",
]

#: A voxel centre may lie at most this many voxels (of each axis' spacing) from where the stored
#: axis-aligned grid puts it: half a voxel, i.e. nearest-voxel exact.
TOLERANCE_VOXELS = 0.5
#: An IOP's cosines must have unit length and be orthogonal within this (DICOM writes them with
#: ~6 decimals); beyond it the header is damaged, not rounded.
ORTHONORMAL_TOL = 1e-3
#: Angles (degrees) below this are the rounding of written headers: not named as a deviation.
_ANGLE_EPS_DEG = 1e-4
_PLANES = {0: "sagittal", 1: "coronal", 2: "axial"}


@dataclass(frozen=True)
class Reorientation:
    """How one slice's decoded pixels become a stored slice: transpose, then flip rows, then flip columns.

    Exact (an index permutation). The identity for a slice stored as the stack is.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The stored slice of a decoded 2-D slice (a view where no change is needed)."""
        if self.transpose:
            array = array.T
        if self.flip_rows:
            array = array[::-1]
        if self.flip_cols:
            array = array[:, ::-1]
        return array

    def describe(self) -> str:
        parts = [name for on, name in ((self.transpose, "transposed"), (self.flip_rows, "rows flipped"),
                                       (self.flip_cols, "columns flipped")) if on]
        return ", ".join(parts) or "as stored"


def orientation_problem(row, col) -> str | None:
    """Why a row/column cosine pair (an IOP) cannot orient a slice, or None.

    Not finite, not unit length or not orthogonal (within :data:`ORTHONORMAL_TOL`).
    """
    row, col = np.asarray(row, dtype=np.float64), np.asarray(col, dtype=np.float64)
    if row.shape != (3,) or col.shape != (3,) or not (np.all(np.isfinite(row)) and np.all(np.isfinite(col))):
        return "its cosines are not six finite numbers"
    if abs(np.linalg.norm(row) - 1) > ORTHONORMAL_TOL or abs(np.linalg.norm(col) - 1) > ORTHONORMAL_TOL:
        return (f"its row/column cosines have lengths {np.linalg.norm(row):.4g}/{np.linalg.norm(col):.4g}, "
                f"not 1")
    if abs(float(row @ col)) > ORTHONORMAL_TOL:
        return f"its row and column cosines are not orthogonal (dot product {float(row @ col):.4g})"
    return None


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def normal_axis(row, col) -> tuple[int, str]:
    """The patient axis (0 x, 1 y, 2 z) nearest the slice normal ``row x col``, and the plane's name.

    2 ("axial") for every slice lungzarr stacks; a sagittal or coronal image in an axial
    series is a localizer or a reformat.
    """
    normal = np.abs(np.cross(_unit(row), _unit(col)))
    axis = int(np.argmax(normal))
    return axis, _PLANES[axis]


def _is_transposed(row, col) -> bool:
    """True when the slice's rows run along y and its columns along x (the stored layout transposed)."""
    return abs(row[1]) + abs(col[0]) > abs(row[0]) + abs(col[1])


def _natural_signs(row, col) -> tuple[int, int]:
    """(x sign, y sign) of the pixel index directions of an axial slice as stored."""
    x_vec, y_vec = (col, row) if _is_transposed(row, col) else (row, col)
    return (1 if x_vec[0] >= 0 else -1), (1 if y_vec[1] >= 0 else -1)


def stack_signs(orientations) -> tuple[int, int]:
    """The stored (x, y) index signs of a stack: those most of its slices have (ties: +x, +y, LPS).

    ``orientations``: each slice's (row cosines, column cosines). A single slice stored mirrored,
    the first one included, is then reoriented to the others, never the stack to it.
    """
    counts = Counter(_natural_signs(np.asarray(r, float), np.asarray(c, float)) for r, c in orientations)
    best = max(counts.values())
    tied = [signs for signs, n in counts.items() if n == best]
    return (1, 1) if (1, 1) in tied else sorted(tied, reverse=True)[0]


def orient_slice(position, row, col, spacing, shape, signs):
    """Lay one axial slice out as the stack stores it.

    Parameters
    ----------
    position : (3,) float
        Patient (x, y, z) mm of the slice's first pixel (DICOM IPP).
    row, col : (3,) float
        Direction cosines of a row (the direction of increasing column index) and of a column
        (increasing row index): DICOM IOP[:3], IOP[3:].
    spacing : (float, float)
        Distance between rows, between columns (DICOM PixelSpacing).
    shape : (int, int)
        Rows, columns.
    signs : (int, int)
        The stack's stored (x, y) index signs (:func:`stack_signs`).

    Returns
    -------
    reorientation : Reorientation
    origin : (3,) ndarray
        Patient mm of stored pixel (0, 0).
    row_step, col_step : (3,) ndarray
        Patient mm moved per stored row index (along y) and per stored column index (along x).
    stored_shape : (int, int)
    """
    row, col = _unit(row), _unit(col)
    # Array axis 0 (row index) moves along the column cosines, axis 1 (column index) along the row cosines.
    axes = [(col * float(spacing[0]), int(shape[0])), (row * float(spacing[1]), int(shape[1]))]
    transpose = _is_transposed(row, col)
    if transpose:
        axes = axes[::-1]
    origin = np.asarray(position, dtype=np.float64).copy()
    steps, flips = [], []
    for (vec, n), patient_axis, sign in zip(axes, (1, 0), (signs[1], signs[0])):
        flip = (1 if vec[patient_axis] >= 0 else -1) != sign
        if flip:
            origin = origin + (n - 1) * vec
            vec = -vec
        steps.append(vec)
        flips.append(flip)
    return (Reorientation(transpose, flips[0], flips[1]), origin, steps[0], steps[1],
            (axes[0][1], axes[1][1]))


def _angle(u, v) -> float:
    """Degrees between two directions."""
    return float(np.degrees(np.arccos(np.clip(abs(float(_unit(u) @ _unit(v))), 0.0, 1.0))))


def _fmt(deg: float) -> str:
    return f"{deg:.1f}" if deg >= 0.05 else f"{deg:.2g}"


@dataclass(frozen=True)
class Placement:
    """A stack on its stored axis-aligned grid, and how far its voxel centres are from their headers.

    Attributes
    ----------
    grid : Grid
        The stored grid: origin at the first slice's stored pixel (0, 0), steps along each axis
        the first slice's (z: the mean step from the first to the last slice).
    offset_mm : (float, float, float)
        Largest distance (z, y, x), over every voxel centre, between its header position and its
        position on ``grid``.
    limit_mm : (float, float, float)
        Half a voxel along (z, y, x): the most ``offset_mm`` may be.
    deviations : tuple of (str, float)
        What the geometry is, where not axis-aligned: ``("gantry tilt", deg)``, ``("oblique", deg)``,
        ``("sheared stack", deg)``, ``("in-plane rotation", deg)``, ``("slices disagree", deg)``.
    worst_slice : int
        For ``"slices disagree"``: the slice whose orientation is furthest from the first one's.
    in_slice_offset_mm : (float, float, float)
        As ``offset_mm`` with each slice's grid z taken at its own ImagePositionPatient z instead of
        the grid's regular steps: what the slices' orientation and drift cost, whatever the slice
        spacing. Equal to ``offset_mm`` in x and y; it judges the geometry of a stack whose spacing
        is irregular (a gap, two spacings), so that a refusal names every defect.
    """

    grid: Grid
    offset_mm: tuple[float, float, float]
    limit_mm: tuple[float, float, float]
    deviations: tuple[tuple[str, float], ...] = ()
    worst_slice: int = 0
    in_slice_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def ok(self) -> bool:
        """True when every voxel centre is within half a voxel of its header position (per axis)."""
        return all(o <= lim for o, lim in zip(self.offset_mm, self.limit_mm))

    @property
    def in_slice_ok(self) -> bool:
        """True when every voxel centre is within half a voxel of its header position (per axis), each slice
        taken at its own z: the geometry is axis-aligned whatever the slice spacing (``in_slice_offset_mm``)."""
        return all(o <= lim for o, lim in zip(self.in_slice_offset_mm, self.limit_mm))

    def _worst(self, offset) -> int:
        """The store axis (0 z, 1 y, 2 x) whose ``offset`` is largest relative to its half voxel."""
        return int(np.argmax(np.asarray(offset) / np.asarray(self.limit_mm)))

    def what(self) -> str:
        """The geometry in words: ``"gantry tilt of 5.0 deg"``, ``"axis-aligned"``..."""
        if not self.deviations:
            return "axis-aligned"
        words = {"gantry tilt": "gantry tilt of {} deg (slices tilted against the table axis)",
                 "oblique": "oblique by {} deg (the whole stack rotated)",
                 "sheared stack": "sheared stack (slice positions step {} deg off the slice normal)",
                 "in-plane rotation": "in-plane rotation of {} deg",
                 "slices disagree": "slice orientations that differ by up to {} deg"}
        return "; ".join(words[kind].format(_fmt(deg)) for kind, deg in self.deviations)

    def offset_text(self, *, in_slice: bool = False) -> str:
        """``"3.2 mm in y (half a voxel: 0.35 mm)"`` for the worst axis (``in_slice``: of
        ``in_slice_offset_mm``)."""
        offset = self.in_slice_offset_mm if in_slice else self.offset_mm
        a = self._worst(offset)
        return (f"{offset[a]:.3g} mm in {'zyx'[a]} (half a voxel: {self.limit_mm[a]:.3g} mm)")

    def refusal(self, detail: str = "") -> str:
        """The first sentences of a refusal: what the geometry is (``detail``: the reader's words on it) and
        how far its voxels are; the reader adds the fix."""
        return (f"{self.what()}{detail}. Voxel centres lie up to {self.offset_text()} from where the stored "
                f"axis-aligned LPS grid would put them, more than the half voxel lungzarr allows (it never "
                f"approximates geometry)")

    def record(self) -> dict:
        """JSON-serialisable provenance: the rule, the offsets and what the geometry is."""
        return {"rule": "every voxel centre within half a voxel (per axis) of its header position",
                "max_offset_mm": {axis: round(float(v), 6) for axis, v in zip("zyx", self.offset_mm)},
                "half_voxel_mm": {axis: round(float(v), 6) for axis, v in zip("zyx", self.limit_mm)},
                "geometry": self.what(),
                "deviations_deg": {kind: round(float(deg), 6) for kind, deg in self.deviations}}


def place_stack(origins, row_steps, col_steps, shape) -> Placement:
    """The axis-aligned grid of a stack of (reoriented) slices and each voxel centre's offset from it.

    Parameters
    ----------
    origins : (n, 3) array
        Patient (x, y, z) mm of each slice's stored pixel (0, 0), slices in ascending z.
    row_steps, col_steps : (n, 3) arrays
        Patient mm moved per stored row index (≈ along y) and per stored column index (≈ along x),
        per slice (:func:`orient_slice`).
    shape : (int, int, int)
        Stored (slices, rows, columns).

    Returns
    -------
    Placement
    """
    origins = np.asarray(origins, dtype=np.float64).reshape(-1, 3)
    row_steps = np.asarray(row_steps, dtype=np.float64).reshape(-1, 3)
    col_steps = np.asarray(col_steps, dtype=np.float64).reshape(-1, 3)
    n, rows, cols = (int(v) for v in shape)
    if n < 2 or len(origins) != n or len(row_steps) != n or len(col_steps) != n:
        raise ValueError(f"place_stack needs one origin and step pair per slice of at least two slices, got "
                         f"shape {tuple(shape)!r} and {len(origins)} origins")
    dz = float(origins[-1, 2] - origins[0, 2]) / (n - 1)
    dy, dx = float(row_steps[0, 1]), float(col_steps[0, 0])
    grid = Grid((n, rows, cols), (float(origins[0, 2]), float(origins[0, 1]), float(origins[0, 0])), (dz, dy, dx))
    # Corners of every slice: true = origin + i * row_step + j * col_step; stored = grid's (x, y, z).
    ii = np.array([0, 0, rows - 1, rows - 1], dtype=np.float64)
    jj = np.array([0, cols - 1, 0, cols - 1], dtype=np.float64)
    true = origins[:, None, :] + ii[None, :, None] * row_steps[:, None, :] + jj[None, :, None] * col_steps[:, None, :]
    k = np.arange(n, dtype=np.float64)[:, None]
    stored = np.stack([np.broadcast_to(grid.origin[2] + jj * dx, (n, 4)),
                       np.broadcast_to(grid.origin[1] + ii * dy, (n, 4)),
                       np.broadcast_to(grid.origin[0] + k * dz, (n, 4))], axis=-1)
    off_xyz = np.abs(true - stored).max(axis=(0, 1))
    offset = (float(off_xyz[2]), float(off_xyz[1]), float(off_xyz[0]))
    # Each slice at its own z: the slice spacing left out (a gap or two spacings is judged apart).
    stored[..., 2] = origins[:, None, 2]
    off_in_slice = np.abs(true - stored).max(axis=(0, 1))
    in_slice = (float(off_in_slice[2]), float(off_in_slice[1]), float(off_in_slice[0]))
    limit = tuple(TOLERANCE_VOXELS * abs(s) for s in grid.step)
    deviations, worst = _deviations(origins, row_steps, col_steps)
    return Placement(grid, offset, limit, deviations, worst, in_slice)


def _deviations(origins, row_steps, col_steps):
    """What keeps the stack from its axis-aligned grid, with the angles in degrees (see :class:`Placement`)."""
    out = []
    # Slices that disagree: each slice's row/column directions against the first slice's.
    disagree = [max(_angle(r, row_steps[0]), _angle(c, col_steps[0])) for r, c in zip(row_steps, col_steps)]
    worst = int(np.argmax(disagree))
    if disagree[worst] > _ANGLE_EPS_DEG:
        out.append(("slices disagree", disagree[worst]))
    x_dir = _unit(col_steps.mean(axis=0))
    y_dir = _unit(row_steps.mean(axis=0))
    normal = _unit(np.cross(x_dir, y_dir))
    stack = origins[-1] - origins[0]
    z = np.array([0.0, 0.0, 1.0])
    tilt = _angle(normal, z)
    shear = _angle(stack, normal) if np.linalg.norm(stack) > 0 else 0.0
    stack_vs_z = _angle(stack, z) if np.linalg.norm(stack) > 0 else 0.0
    if tilt > _ANGLE_EPS_DEG:
        if stack_vs_z <= max(_ANGLE_EPS_DEG, 0.1 * tilt):
            out.append(("gantry tilt", tilt))  # tilted planes stacked along the table (z): a sheared stack
        elif shear <= max(_ANGLE_EPS_DEG, 0.1 * tilt):
            out.append(("oblique", tilt))
        else:
            out.append(("oblique", tilt))
            out.append(("sheared stack", shear))
    elif shear > _ANGLE_EPS_DEG:
        out.append(("sheared stack", shear))
    # In-plane rotation: the x index direction's angle about z (after any tilt).
    inplane = float(np.degrees(np.arctan2(abs(x_dir[1]), abs(x_dir[0]))))
    if inplane > _ANGLE_EPS_DEG:
        out.append(("in-plane rotation", inplane))
    out.sort(key=lambda item: -item[1])
    return tuple(out), worst
