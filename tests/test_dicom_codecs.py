"""Compressed CT decodes as every viewer does: a phantom series rewritten in each transfer syntax that
hospitals export gives lesion maps identical to its uncompressed copy.

RLE, JPEG-LS and JPEG 2000 (lossless) are encoded by pydicom with the decoder plugins (pylibjpeg-rle,
pyjpegls, pylibjpeg-openjpeg), deflated by pydicom's writer. Nothing installed encodes JPEG Lossless
(process 14): pydicom has no encoder for it and pylibjpeg-libjpeg only decodes, so a short encoder below
writes it, and pydicom's bundled process-14 file (written by GDCM) checks the decoder against a third party.
"""

import struct

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import uid
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from conftest import process_scan
from nodulesynth.data.phantom import Nodule, PhantomGeometry, render, write_dicom_series

SYNTAXES = [uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.RLELossless,
            uid.DeflatedExplicitVRLittleEndian]


def encode_jpeg_lossless(pixels) -> bytes:
    """A 16-bit single-component frame as a JPEG Lossless (process 14, first-order prediction) bitstream.

    One Huffman table gives each of the 17 difference categories a 5-bit code: simple rather than small.
    """
    raw = np.asarray(pixels).astype(np.uint16).astype(np.int64)  # the stored bits, as DICOM keeps signed data
    rows, cols = raw.shape
    predicted = np.empty_like(raw)
    predicted[0, 0] = 1 << 15
    predicted[0, 1:] = raw[0, :-1]                    # first row: the pixel to the left
    predicted[1:, 0] = raw[:-1, 0]                    # first column: the pixel above
    predicted[1:, 1:] = raw[1:, :-1]                  # elsewhere: selection value 1, the pixel to the left
    diff = (raw - predicted) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)
    category = np.where(diff == -32768, 16, np.ceil(np.log2(np.abs(diff) + 1)).astype(np.int64))
    extra = np.where(diff < 0, diff - 1, diff) & ((1 << category) - 1)
    bits = []
    for c, e in zip(category.ravel().tolist(), extra.ravel().tolist()):
        bits.append(format(c, "05b"))
        if 0 < c < 16:  # category 16 (a difference of 32768) has no extra bits
            bits.append(format(e, f"0{c}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")  # byte stuffing

    def segment(marker, body):
        return struct.pack(">HH", marker, len(body) + 2) + body

    huffman = bytes([0x00, 0, 0, 0, 0, 17, *[0] * 11, *range(17)])   # DC table 0: 17 codes of length 5
    frame = struct.pack(">BHHB", 16, rows, cols, 1) + bytes([1, 0x11, 0])
    start = bytes([1, 1, 0x00, 1, 0, 0])                                 # one component, predictor 1, Pt 0
    return (b"\xff\xd8" + segment(0xFFC4, huffman) + segment(0xFFC3, frame) + segment(0xFFDA, start) + scan
            + b"\xff\xd9")


def transcode(ds, syntax):
    """Rewrite one dataset's pixel data in `syntax`, in place."""
    if syntax in (uid.JPEGLosslessSV1, uid.JPEGLossless):
        ds.PixelData = encapsulate([encode_jpeg_lossless(ds.pixel_array)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == uid.DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax  # pydicom's writer deflates the whole dataset
    else:
        ds.compress(syntax)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 64-px phantom with one nodule, uncompressed, with its annotations and its lesion maps."""
    root = tmp_path_factory.mktemp("codecs")
    geometry = PhantomGeometry(patient_id="P1", series_uid=generate_uid(), study_uid=generate_uid(),
                               z=np.arange(36) * 5.0 - 300, pixel_spacing=5.4, image_size=64,
                               nodules=[Nodule((70.0, 0.0, -180.0), 14.0)])
    hu, _ = render(geometry, seed=1)
    folder = root / "uncompressed"
    write_dicom_series(geometry, hu, folder)
    annotations = root / "annotations.csv"
    n = geometry.nodules[0]
    pd.DataFrame([dict(seriesuid=geometry.series_uid, coordX=n.center_mm[0], coordY=n.center_mm[1],
                       coordZ=n.center_mm[2], diameter_mm=n.diameter_mm)]).to_csv(annotations, index=False)
    _, stack, boxes = process_scan(folder, "P1", annotations, root / "reference")
    assert stack.status == "ok" and len(boxes), stack.reason
    return root, folder, annotations, stack, boxes


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.keyword)
def test_compressed_series_gives_identical_lesion_maps(series, syntax):
    root, folder, annotations, reference, reference_boxes = series
    out = root / syntax.keyword
    out.mkdir()
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        transcode(ds, syntax)
        ds.save_as(out / path.name, enforce_file_format=True)
    first = sorted(out.glob("*.dcm"))[0]
    assert pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert first.stat().st_size < (folder / first.name).stat().st_size  # really compressed

    _, stack, boxes = process_scan(out, "P1", annotations, root / f"{syntax.keyword}-out")
    assert stack.status == "ok", stack.reason
    np.testing.assert_array_equal(stack.image, reference.image)
    np.testing.assert_array_equal(stack.label, reference.label)
    np.testing.assert_array_equal(stack.slice_index, reference.slice_index)
    pd.testing.assert_frame_equal(boxes, reference_boxes)


def test_jpeg_lossless_written_by_another_encoder_decodes():
    """pydicom's bundled GDCM-written process-14 file equals its RLE twin (same image, another lossless codec)."""
    from pydicom.data import get_testdata_file

    jpeg = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    rle = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    assert jpeg.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    np.testing.assert_array_equal(jpeg.pixel_array, rle.pixel_array)
