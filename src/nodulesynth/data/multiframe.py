"""Enhanced and Legacy Converted Enhanced CT: one multi-frame file per series, read as the single-frame slices
it holds. Each frame's position, orientation, pixel spacing, thickness and rescale come from its functional
groups (per-frame first, then shared: DICOM PS3.3 C.7.6.16), so the series goes through the same checks and
the same HU conversion as a classic one-file-per-slice series."""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian,
                         LegacyConvertedEnhancedCTImageStorage)

MULTIFRAME_CT_CLASSES = frozenset({EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})
CT_IMAGE_CLASSES = frozenset({CTImageStorage, *MULTIFRAME_CT_CLASSES})
# Attributes a classic CT slice carries at the top level and an enhanced one in its functional groups.
GEOMETRY_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                     "RescaleSlope", "RescaleIntercept")
# Copied from the multi-frame file onto each frame's slice dataset.
SERIES_KEYWORDS = ("SOPClassUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                   "FrameOfReferenceUID", "SeriesNumber", "ImageType", "Rows", "Columns", "ConvolutionKernel")


def is_multiframe(ds) -> bool:
    """True for a dataset whose geometry lives in functional groups (Enhanced / Legacy Converted CT)."""
    return str(ds.get("SOPClassUID", "")) in MULTIFRAME_CT_CLASSES or "PerFrameFunctionalGroupsSequence" in ds


def frame_count(ds) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _groups(ds, index):
    """The functional-group items that describe frame `index`: its per-frame item, then the shared one."""
    items = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        items.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    return items


def frame_value(ds, index, keyword, default=None):
    """`keyword` of frame `index`: from the macro that holds it in the per-frame groups, then the shared ones,
    then the top level (ConvolutionKernel, for one, may sit in any of the three)."""
    for group in _groups(ds, index):
        for element in group:
            if element.VR == "SQ" and len(element.value):
                item = element.value[0]
                if keyword in item:
                    return item[keyword].value
    return ds.get(keyword, default)


def frame_geometry(ds) -> list:
    """Per frame, {keyword: value} of GEOMETRY_KEYWORDS (None where absent)."""
    return [{key: frame_value(ds, i, key) for key in GEOMETRY_KEYWORDS} for i in range(frame_count(ds))]


def split_frames(path, ds) -> list:
    """[(name, slice dataset)] of a multi-frame file: one classic-looking dataset per frame, its pixel data the
    frame's stored values (uncompressed), so the single-frame reading path checks and converts it unchanged.
    The name is the file's with the frame number, for the reasons a bad frame is rejected with."""
    path = Path(path)
    pixels = None
    if "PixelData" in ds:
        pixels = np.asarray(ds.pixel_array)
        pixels = pixels.reshape(frame_count(ds), *pixels.shape[-2:])
    frames = []
    for i, geometry in enumerate(frame_geometry(ds)):
        frame = Dataset()
        frame.file_meta = FileMetaDataset()
        frame.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for key in SERIES_KEYWORDS:
            if key in ds:
                setattr(frame, key, ds[key].value)
        for key, value in geometry.items():
            if value is not None:
                setattr(frame, key, value)
        if pixels is not None:
            stored = pixels[i]
            frame.SamplesPerPixel, frame.PhotometricInterpretation = 1, "MONOCHROME2"
            frame.BitsAllocated = frame.BitsStored = 8 * stored.dtype.itemsize
            frame.HighBit = frame.BitsStored - 1
            frame.PixelRepresentation = int(stored.dtype.kind == "i")
            frame.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()
        frames.append((path.with_name(f"{path.name} frame {i + 1}"), frame))
    return frames
