"""The d8 network's geometry: one place for its window, halo and crop (docs/algorithms.md §5).

Plain arithmetic (no Keras), so every layer that needs these facts — the
inference, the DSB2017 features, the pipeline's checks — imports them from here.
"""
from __future__ import annotations

__all__ = ["WINDOW", "WINDOW_CENTRE", "HALO", "MIN_SLICES_2MM", "ROW_COL_MULTIPLE", "detection_crop",
           "predicted_slices", "window_maps"]

#: Slices of one input window of the network.
WINDOW = 8
#: Window ``i`` (slices ``i … i+7``) predicts slice ``i + WINDOW_CENTRE``.
WINDOW_CENTRE = WINDOW // 2
#: Slices a prediction needs below and above its own (the map_overlap halo).
HALO = (WINDOW_CENTRE, WINDOW - 1 - WINDOW_CENTRE)
#: Fewest 2 mm slices with a prediction: windows ``i = 0 … Z-9`` (the original never uses the last
#: possible window), so one window needs ``Z >= WINDOW + 1``.
MIN_SLICES_2MM = WINDOW + 1
#: The network halves y and x twice: the detection crop keeps rows and columns in multiples of 4.
ROW_COL_MULTIPLE = 4


def detection_crop(shape) -> tuple[int, int]:
    """Rows and columns the detection crop drops from the start: ``(H mod 4, W mod 4)``.

    The original cropped the 2 mm slice to multiples of :data:`ROW_COL_MULTIPLE`
    by dropping the *first* rows and columns.
    """
    _, h, w = shape
    return h % ROW_COL_MULTIPLE, w % ROW_COL_MULTIPLE


def predicted_slices(nz: int) -> slice:
    """The slices of an ``nz``-slice volume that get a prediction.

    Windows ``i = 0 … nz-9`` predict slices ``4 … nz-5``, so the first 4 and
    the last 4 slices have none. Empty when ``nz <= 8``.
    """
    nz = int(nz)
    if nz < 0:
        raise ValueError(f"nz must be >= 0, got {nz!r}")
    return slice(WINDOW_CENTRE, max(WINDOW_CENTRE, nz - WINDOW_CENTRE))


def window_maps(prob):
    """The per-window maps of a stored probability volume: window ``i`` is slice ``i + 4``, cropped.

    ``prob[4:nz-4, H mod 4:, W mod 4:]``, the ``pmav`` of the original's features.
    """
    rows, cols = detection_crop(prob.shape)
    return prob[predicted_slices(prob.shape[0]), rows:, cols:]
