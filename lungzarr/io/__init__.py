"""Readers and the store: what lungzarr reads from disk and writes to it.

``dicom`` is the only package of lungzarr that imports pydicom, ``store`` the
only one that imports zarr, ``volumes`` the only package that imports SimpleITK and
nibabel (MetaImage and NIfTI volume files), ``legacy`` reads the old DSB2017 npz layout. Above
this layer, code gets volumes, headers and store groups, never file formats.
"""
