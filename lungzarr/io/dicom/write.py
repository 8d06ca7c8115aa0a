"""Writing an HU volume as an axial CT series of real DICOM files (synthetic phantoms, test inputs, the demo)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_series(volume_hu, folder, *, spacing, origin=(0.0, 0.0, 0.0), patient_id="PHANTOM",
                 series_uid=None, study_uid=None, acquisition=1, slice_thickness=None,
                 filename="{index:04d}.dcm") -> list[Path]:
    """Write an int16 HU volume (z, y, x) as an axial CT series of real DICOM files.

    Pixels are stored as unsigned 16-bit with RescaleIntercept -1024, the common
    CT convention.

    Parameters
    ----------
    volume_hu : ndarray
        HU values, (z, y, x), in [-1024, 64511].
    folder : path
        Created if needed.
    spacing : (float, float, float)
        Slice spacing and PixelSpacing (row, column), in mm.
    origin : (float, float, float)
        Patient coordinate (z, y, x) of the first voxel.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3:
        raise ValueError(f"volume_hu must be 3-D (z, y, x), got shape {volume_hu.shape!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    stored = np.clip(np.rint(volume_hu.astype(np.float64)) + 1024, 0, 65535).astype(np.uint16)
    paths = []
    for k in range(volume_hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = _CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = acquisition
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        z = origin[0] + k * spacing[0]
        ds.ImagePositionPatient = [f"{origin[2]:.6f}", f"{origin[1]:.6f}", f"{z:.6f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z:.6f}"
        ds.SliceThickness = f"{slice_thickness or spacing[0]:.6f}"
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[2]:.6f}"]
        ds.Rows, ds.Columns = volume_hu.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = stored[k].tobytes()
        path = folder / filename.format(index=k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
