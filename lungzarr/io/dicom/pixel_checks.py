"""Checking a chosen stack's pixel data before its volume is decoded: a decoder for every transfer syntax,
a plausible RescaleSlope/Intercept, damaged slices (dropped at the stack's ends, refused inside), and
values that are HU (:func:`lungzarr.io.plausible.check_hu_sample`, the rule every reader shares)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io.dicom.decode import _decode_one, decode_slices_to_hu
from lungzarr.io.dicom.headers import _NATIVE_SYNTAXES, STAGE, SliceHeader, _listed
from lungzarr.io.plausible import check_hu_sample


#: Plausible RescaleSlope range (0028,1053). CT stores HU as ``slope * stored + intercept`` with slope 1
#: (rarely 0.5 or 2): a slope outside [1e-3, 100] multiplies 16-bit stored values out of int16 HU or into a
#: handful of grey levels, so it is a damaged header, not a scanner choice; NaN/inf would flatten slices.
#: These header ranges refuse what no scanner writes before any pixel is read; the values a header within
#: them gives are judged after the decode by :mod:`lungzarr.io.plausible` (int16 range, -500 HU), which
#: every reader shares: a slope of 20 passes here and is refused there when its HU leave int16.
RESCALE_SLOPE_RANGE = (1e-3, 100.0)

#: Plausible RescaleIntercept range (0028,1052): CT intercepts are -1024, -1000 or 0; beyond +-10000 the
#: converted values leave the range any tissue or metal has (and int16 HU). An intercept of 0 on unsigned
#: stored values is within it and refused by the -500 HU rule (the rescale is missing).
RESCALE_INTERCEPT_RANGE = (-10000.0, 10000.0)

_DECODER_PACKAGES = {
    # transfer syntax prefix -> what to install
    "1.2.840.10008.1.2.4.5": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline / lossless (4.50, 4.51, 4.57, 4.70)
    "1.2.840.10008.1.2.4.7": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.8": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS
    "1.2.840.10008.1.2.4.9": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.2": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE (pydicom's numpy RLE decoder also works)
}


def _damage_message(h: SliceHeader, damage: str) -> str:
    return (f"cannot decode the pixel data: {damage}; the file is truncated or damaged: replace it from the "
            f"archive or remove it")


def _decode_damage(h: SliceHeader) -> str | None:
    """Decode one compressed slice now; why it fails, or None."""
    try:
        _decode_one(h.path, h)
    except PatientError as exc:
        return exc.reason
    return None


def _drop_broken_edges(headers, patient, *, strict: bool):
    """Drop damaged slices at either end of the sorted stack; a damaged slice inside is an error.

    Native syntaxes are judged from the header and the file size
    (:attr:`SliceHeader.damage`); compressed edge slices are decoded once.
    Returns the kept headers and ``[{"file", "reason"}]`` of the dropped ones.
    """
    cache: dict[int, str | None] = {}

    def broken(i):
        if i not in cache:
            h = headers[i]
            if h.damage is not None:
                cache[i] = _damage_message(h, h.damage)
            elif h.transfer_syntax in _NATIVE_SYNTAXES:
                cache[i] = None
            else:
                cache[i] = _decode_damage(h)
        return cache[i]

    lo, hi = 0, len(headers) - 1
    while lo <= hi and broken(lo):
        lo += 1
    while hi >= lo and broken(hi):
        hi -= 1
    # Native slices are all judged from headers; compressed ones only where decoded (the edges).
    judged = [i for i in range(len(headers)) if i in cache or headers[i].damage is not None]
    first = next((i for i in judged if broken(i)), None)
    if strict and first is not None:
        raise PatientError(f"{cache[first]} (--strict: every damaged file is an error)", patient=patient,
                           stage=STAGE, file=headers[first].path)
    if lo > hi:
        raise PatientError(cache[0], patient=patient, stage=STAGE, file=headers[0].path)
    inside = next((i for i in range(lo, hi + 1) if headers[i].damage is not None), None)
    if inside is not None:
        raise PatientError(_damage_message(headers[inside], headers[inside].damage), patient=patient,
                           stage=STAGE, file=headers[inside].path)
    dropped = [{"file": headers[i].path,
                "reason": f"damaged slice at the {'lower' if i < lo else 'upper'} end of the stack "
                          f"(z={headers[i].position[2]:g} mm) dropped: {cache[i]}"}
               for i in [*range(lo), *range(hi + 1, len(headers))]]
    kept = headers[lo:hi + 1]
    if len(kept) < 2:
        raise PatientError(f"only one usable axial slice ({Path(kept[0].path).name!r}) once the damaged edge "
                           f"slice(s) are dropped; replace the damaged files from the archive",
                           patient=patient, stage=STAGE, file=dropped[0]["file"])
    return kept, dropped


def _check_rescale(headers, patient):
    """Refuse RescaleSlope/Intercept no CT scanner writes (a NaN slope would flatten slices to -1024 HU)."""
    (slo, shi), (ilo, ihi) = RESCALE_SLOPE_RANGE, RESCALE_INTERCEPT_RANGE
    for h in headers:
        if not (np.isfinite(h.slope) and slo <= h.slope <= shi):
            raise PatientError(f"RescaleSlope (0028,1053) is {h.slope!r}; a CT slope must be finite and within "
                               f"[{slo:g}, {shi:g}]: the header is damaged, fix it or remove the file",
                               patient=patient, stage=STAGE, file=h.path)
        if not (np.isfinite(h.intercept) and ilo <= h.intercept <= ihi):
            raise PatientError(f"RescaleIntercept (0028,1052) is {h.intercept!r}; a CT intercept must be finite "
                               f"and within [{ilo:g}, {ihi:g}]: the header is damaged, fix it or remove the file",
                               patient=patient, stage=STAGE, file=h.path)


def _check_values_are_hu(headers, patient):
    """Refuse a series whose values are not HU (:func:`lungzarr.io.plausible.check_hu_sample`).

    "No value below -500 HU" is a property of the whole series, but the decode runs a z-chunk per dask
    task, and a reduction over the ingest write would fail the patient only after its volume was written.
    The first, middle and last slices decide it here instead, before any chunk is decoded, with the
    ingest's own decode (so their int16 range is checked too): every slice through a chest holds air, so
    a real CT passes on its middle slice alone, and stored values without the rescale are >= 0 in every
    slice. Three slices per patient, read where the headers are read (a worker, when prefetched), never the
    whole volume twice. The rescale values are named in the message: they are what is missing.
    """
    picks = sorted({0, len(headers) // 2, len(headers) - 1})
    chosen = [headers[k] for k in picks]
    hu = decode_slices_to_hu([h.path for h in chosen], [h.slope for h in chosen], [h.intercept for h in chosen],
                             patient=patient, layouts=[h.pixels for h in chosen])
    slopes = sorted({h.slope for h in headers})
    intercepts = sorted({h.intercept for h in headers})
    check_hu_sample(int(hu.min()), where=f"slices {picks!r} of {len(headers)}", patient=patient,
                    file=chosen[len(chosen) // 2].path,
                    fix=f"the series' RescaleIntercept (0028,1052) is {_listed(intercepts)} and RescaleSlope "
                        f"(0028,1053) {_listed(slopes)}; set them to what the scanner wrote (CT: intercept "
                        f"-1024 or -1000, slope 1) or replace the files from the archive")


def _check_decodable(h: SliceHeader, patient):
    """Fail before any pixel is read when the transfer syntax has no decoder here."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(h.transfer_syntax)
    except NotImplementedError:
        raise PatientError(f"transfer syntax {h.transfer_syntax} is not supported by pydicom; convert the series "
                           f"to an uncompressed syntax (e.g. `gdcmconv --raw`)",
                           patient=patient, stage=STAGE, file=h.path) from None
    if not decoder.is_available:
        package = next((pkg for prefix, pkg in _DECODER_PACKAGES.items() if h.transfer_syntax.startswith(prefix)),
                       "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        raise PatientError(f"pixel data is compressed ({decoder.UID.name}, {h.transfer_syntax}) and no decoder "
                           f"is installed: run `pip install {package}` (or python-gdcm)",
                           patient=patient, stage=STAGE, file=h.path)
