"""Quality-control picture of a patient: mid-planes with the lung mask outlined.

Only the three mid-planes are read (from numpy, dask or xarray inputs), so a
QC picture of a stored patient costs three slices, not the volume. matplotlib
is imported when a picture is drawn, with the non-interactive Agg canvas and
no pyplot state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["qc_figure", "mid_planes", "LEGEND"]

#: Grey window (HU) of the pictures: lung to soft tissue.
HU_WINDOW = (-1200, 400)
_PLANES = ("axial", "coronal", "sagittal")
_NODULE_COLUMNS = ("z_index", "y_index", "x_index", "diameter_mm")
#: Marker colours: detections (yellow circles) and true nodules (cyan squares).
DETECTION_COLOUR, TRUTH_COLOUR = "yellow", "cyan"
#: Outline colours of the 3-D mask's sides (lung_labels 1 = right, 2 = left); not the truth's cyan.
SIDE_COLOURS = {1: "orange", 2: "lime"}
#: What the pictures draw, (kind, colour, line style, meaning): the PNG's legend and the report's.
LEGEND = (
    ("line", "red", "-", "lung mask outline (legacy, per slice)"),
    ("side", SIDE_COLOURS[1], "-", "right lung (3-D mask)"),
    ("side", SIDE_COLOURS[2], "-", "left lung (3-D mask)"),
    ("circle", DETECTION_COLOUR, "-", "detection (p > 0.5, DSB filter) cutting this plane"),
    ("circle", DETECTION_COLOUR, "--", "detection off this plane (projected)"),
    ("square", TRUTH_COLOUR, "-", "true nodule cutting this plane"),
    ("square", TRUTH_COLOUR, ":", "true nodule off this plane (projected)"),
)


def _plain(arr):
    """numpy or dask array under ``arr`` (an xarray.DataArray gives its data)."""
    if type(arr).__module__.startswith("xarray") and hasattr(arr, "variable"):
        return arr.data
    return arr


def mid_planes(volume, *, centre=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial (y, x), coronal (z, x) and sagittal (z, y) planes through ``centre``.

    Parameters
    ----------
    volume : (z, y, x) numpy, dask or xarray array
    centre : (int, int, int), optional
        Voxel index the planes go through; default the middle voxel.
    """
    data = _plain(volume)
    if getattr(data, "ndim", None) != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {getattr(data, 'shape', None)!r}")
    if centre is None:
        centre = tuple(n // 2 for n in data.shape)
    kz, ky, kx = centre
    planes = (data[kz, :, :], data[:, ky, :], data[:, :, kx])
    # One compute per plane: computed together, the planes share their source
    # chunks and dask reads those whole instead of fusing each slice into the read.
    return tuple(np.asarray(p.compute() if hasattr(p, "dask") else p) for p in planes)


def _check_nodules(nodules):
    missing = [c for c in _NODULE_COLUMNS if c not in nodules.columns]
    if missing:
        raise ValueError(f"nodules lacks columns {missing!r}; it needs {list(_NODULE_COLUMNS)!r} "
                         f"(voxel indices on the 2 mm grid and the diameter in mm)")


def _legend(fig, *, truth: bool, sides: bool = False) -> None:
    """The figure's legend from :data:`LEGEND`: circles and squares with their line styles."""
    from matplotlib.legend_handler import HandlerPatch
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, Rectangle

    def circle(legend, orig_handle, xdescent, ydescent, width, height, fontsize):
        return Circle((width / 2 - xdescent, height / 2 - ydescent), 0.5 * height)

    def square(legend, orig_handle, xdescent, ydescent, width, height, fontsize):
        return Rectangle((width / 2 - xdescent - 0.45 * height, 0.05 * height - ydescent), 0.9 * height,
                         0.9 * height)

    handles = []
    for kind, colour, style, meaning in LEGEND:
        if kind == "line":
            handles.append(Line2D([], [], color=colour, linestyle=style, label=meaning))
        elif kind == "side":
            if sides:
                handles.append(Line2D([], [], color=colour, linestyle=style, label=meaning))
        elif truth or kind != "square":
            style_kw = dict(fill=False, edgecolor=colour, linestyle=style, linewidth=1.2, label=meaning)
            handles.append(Circle((0, 0), 1, **style_kw) if kind == "circle" else Rectangle((0, 0), 1, 1, **style_kw))
    # "outside": the constrained layout sets the legend below the planes and gives it its own rows, so no
    # line of it can lie over a picture however many rows it takes.
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize=9, handleheight=1.6,
               handlelength=1.6, columnspacing=1.2,
               handler_map={Circle: HandlerPatch(patch_func=circle), Rectangle: HandlerPatch(patch_func=square)})


def qc_figure(hu_2mm, lungs, *, path, nodules=None, spacing=(2.0, 2.0, 2.0), title=None,
              centre=None, truth=None, grid=None, lung_labels=None) -> Path:
    """Write a PNG with the axial, coronal and sagittal mid-planes.

    Parameters
    ----------
    hu_2mm : (z, y, x) int16 array (numpy, dask or xarray)
        The 2 mm volume in HU.
    lungs : (z, y, x) bool array (numpy, dask or xarray)
        The lung mask; its outline is drawn in red.
    path : str or Path
        Where the PNG goes (parent folders are created).
    nodules : pandas.DataFrame, optional
        One row per nodule with ``z_index, y_index, x_index`` (voxels of the
        2 mm grid) and ``diameter_mm``; drawn as yellow circles, solid when
        the nodule cuts the plane and dashed when only its projection does.
    spacing : (float, float, float), optional
        Voxel size in mm (z, y, x), for the aspect ratio and nodule radii.
    title : str, optional
        Figure title, e.g. the patient id.
    centre : (int, int, int), optional
        Voxel the three planes go through (e.g. the largest nodule); default
        the middle of the volume.
    truth : pandas.DataFrame, optional
        True nodules (same columns as ``nodules``), drawn as cyan squares,
        solid when the nodule cuts the plane and dotted otherwise.
    grid : lungzarr.volume.Grid, optional
        The volume's grid: plane positions in the titles are patient mm
        (``grid.to_mm``) and ``spacing`` is ``grid.spacing``. Without it the
        positions are mm from the first voxel.
    lung_labels : (z, y, x) uint8 array (numpy, dask or xarray), optional
        The 3-D mask of stage ``lungs3d``: its right lung (1) is outlined in
        orange and its left lung (2) in green, over the legacy mask's red.

    Returns
    -------
    Path of the written PNG.
    """
    if tuple(np.shape(_plain(hu_2mm))) != tuple(np.shape(_plain(lungs))):
        raise ValueError(f"hu_2mm shape {np.shape(_plain(hu_2mm))!r} and lungs shape "
                         f"{np.shape(_plain(lungs))!r} differ; pass the mask of this volume")
    for table in (nodules, truth):
        if table is not None:
            _check_nodules(table)
    if lung_labels is not None and tuple(np.shape(_plain(lung_labels))) != tuple(np.shape(_plain(hu_2mm))):
        raise ValueError(f"lung_labels shape {np.shape(_plain(lung_labels))!r} and hu_2mm shape "
                         f"{np.shape(_plain(hu_2mm))!r} differ; pass the lungs3d mask of this volume")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Rectangle

    if grid is not None:
        spacing = grid.spacing

    shape = np.shape(_plain(hu_2mm))
    centre = tuple(n // 2 for n in shape) if centre is None else tuple(int(c) for c in centre)
    hu_planes = mid_planes(hu_2mm, centre=centre)
    mask_planes = mid_planes(lungs, centre=centre)
    label_planes = mid_planes(lung_labels, centre=centre) if lung_labels is not None else (None,) * 3
    sz, sy, sx = (float(s) for s in spacing)
    # (plane, its (row, col) axes in the volume, aspect = row step / col step)
    layout = [("axial", (1, 2), sy / sx), ("coronal", (0, 2), sz / sx), ("sagittal", (0, 1), sz / sy)]

    fig = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (name, (row_axis, col_axis), aspect), image, mask, sides in zip(axes, layout, hu_planes, mask_planes,
                                                                         label_planes):
        # z grows towards the head (slices sorted by ImagePositionPatient z),
        # so coronal and sagittal planes put z = 0 at the bottom.
        ax.imshow(image, cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], aspect=aspect,
                  interpolation="nearest", origin="upper" if name == "axial" else "lower")
        if mask.any() and not mask.all():
            # Data coordinates (x = column, y = row) match imshow whatever its origin.
            ax.contour(mask.astype(np.uint8), levels=[0.5], colors="red", linewidths=0.8)
        if sides is not None:
            for side, colour in SIDE_COLOURS.items():
                part = sides == side
                if part.any() and not part.all():
                    ax.contour(part.astype(np.uint8), levels=[0.5], colors=colour, linewidths=0.8)
        cut_axis = ({0, 1, 2} - {row_axis, col_axis}).pop()
        position = (grid.to_mm(centre)[cut_axis] if grid is not None
                    else centre[cut_axis] * (sz, sy, sx)[cut_axis])
        pixel_mm2 = (sz, sy, sx)[row_axis] * (sz, sy, sx)[col_axis]
        ax.set_title(f"{name} {'zyx'[cut_axis]} = {position:.1f} mm, lungs {mask.sum() * pixel_mm2 / 100:.0f} cm²")
        ax.set_axis_off()
        if nodules is not None:
            steps = (sz, sy, sx)
            for row in nodules.itertuples(index=False):
                index = (row.z_index, row.y_index, row.x_index)
                radius_mm = float(row.diameter_mm) / 2.0
                offset_mm = abs(index[cut_axis] - centre[cut_axis]) * steps[cut_axis]
                on_plane = offset_mm <= radius_mm
                # matplotlib's circle is round in data units, so the radius is
                # in column voxels; the aspect stretches rows to match.
                ax.add_patch(Circle((index[col_axis], index[row_axis]),
                                    max(radius_mm / steps[col_axis], 1.0) + 2.0, fill=False,
                                    edgecolor="yellow", linewidth=1.2,
                                    linestyle="-" if on_plane else "--"))
        if truth is not None:
            steps = (sz, sy, sx)
            for row in truth.itertuples(index=False):
                index = (row.z_index, row.y_index, row.x_index)
                radius_mm = float(row.diameter_mm) / 2.0
                on_plane = abs(index[cut_axis] - centre[cut_axis]) * steps[cut_axis] <= radius_mm
                # A square a little outside the detection's circle, in mm on both axes.
                half_col = max(radius_mm / steps[col_axis], 1.0) + 4.0
                half_row = half_col * steps[col_axis] / steps[row_axis]
                ax.add_patch(Rectangle((index[col_axis] - half_col, index[row_axis] - half_row), 2 * half_col,
                                       2 * half_row, fill=False, edgecolor=TRUTH_COLOUR, linewidth=1.2,
                                       linestyle="-" if on_plane else ":"))
    if title:
        fig.suptitle(title)
    _legend(fig, truth=truth is not None, sides=lung_labels is not None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
