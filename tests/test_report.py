"""The report as a reader sees it: built from a small results tree written by the real writers, opened in real
headless Chromium (Selenium + Debian's chromium-driver), and printed to a PDF whose pages are rendered with
pdftoppm. Also: the tables' numbers and best-value marks, optional inputs reported as "not available", and
clear errors for missing required inputs or a missing Chromium."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from nodulesynth.data.slices import SliceStack, save_slices
from nodulesynth.downstream.datasets import ARMS, ArmDataset, SliceSet, save_dataset
from nodulesynth.downstream.metrics import detection_metrics, froc
from nodulesynth.io import write_tsv
from nodulesynth.labels import PALETTE
from nodulesynth.models.records import LossCurve, write_options_file
from nodulesynth.models.spade.losses import perceptual_loss_status
from nodulesynth.models.spade.options import SPADEOptions
from nodulesynth.report import build_report
from nodulesynth.report.html import (FROC_GRID, HEADLINE, froc_curves, localization_panels, render_html, report_context,
                                     study_table)
from nodulesynth.report.inputs import grid_slices, read_realism, read_stats
from nodulesynth.report.pdf import find_chromium, html_to_pdf, pdf_wanted
from nodulesynth.stats.tables import StatsOptions, run_stats

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
_MISSING = [package for package, tool in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER),
                                          ("poppler-utils", shutil.which("pdftoppm"))) if tool is None]
needs_chromium = pytest.mark.skipif(bool(_MISSING), reason=f"the browser test needs {', '.join(_MISSING)} "
                                                           f"(apt-get install {' '.join(_MISSING)})")
S = 32
FOLDS = (0, 1)
CONFIG = {"folds": {"k": 2}, "report": {"score_threshold": 0.5, "examples": 2}}


# ---------------------------------------------------------------- a small results tree

def lesion_map(nodule_at=None):
    label = np.full((S, S), 4, np.uint8)  # body
    label[:2], label[-2:] = 0, 0
    label[6:26, 4:15], label[6:26, 17:28] = 2, 1  # right lung on the image's left, left lung on its right
    label[4:7, 15:17] = 3
    if nodule_at is not None:
        y, x = nodule_at
        label[y:y + 4, x:x + 4] = 5
    return label


def ct_from(label, rng):
    image = np.choose(label, [0, 40, 40, 20, 150, 200]).astype(float) + rng.normal(0, 8, label.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_test_set(rng):
    """Four real test slices: rows 0 and 1 hold a nodule (box drawn around it), rows 2 and 3 none."""
    labels = np.stack([lesion_map((8, 8)), lesion_map((18, 20)), lesion_map(), lesion_map()])
    boxes = np.array([[0, 8, 8, 12, 12], [1, 20, 18, 24, 22]], np.float32)
    return SliceSet(np.stack([ct_from(lab, rng) for lab in labels]), labels, np.array([1, 1, 0, 0], bool), boxes,
                    np.array(["s1", "s2", "s1", "s2"]), np.array(["p1", "p2", "p1", "p2"]),
                    np.array([3, 5, 7, 9]), np.array(["real"] * 4), box_nodule=np.array([0, 0]))


def localization_predictions(arm, fold, test):
    """Arm A finds the first nodule and misses the second (a false positive beside it); B finds both; C varies."""
    boxes = {"A": [(0, 8, 8, 12, 12, 0.9), (1, 2, 2, 6, 6, 0.8), (2, 10, 10, 14, 14, 0.3)],
             "B": [(0, 8, 9, 12, 12, 0.95), (1, 20, 18, 24, 23, 0.7), (3, 3, 3, 7, 7, 0.2)],
             "C": [(0, 8, 8, 13, 12, 0.6 + 0.2 * fold), (1, 4, 4, 8, 8, 0.55), (1, 19, 18, 24, 22, 0.5)]}[arm]
    return pd.DataFrame([{"scan_id": test.scan_id[r], "patient_id": test.patient_id[r],
                          "slice_index": int(test.slice_index[r]), "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                          "score": s} for r, x0, y0, x1, y1, s in boxes])


def write_stats(results):
    """The stats tables, written by the stats stage itself from the tree's metrics.json (no detection predictions
    here: no bootstrap); returns the summaries as the report reads them."""
    paths = sorted((results / "downstream").glob("*/*/fold*/metrics.json"))
    run_stats(paths, results / "stats", StatsOptions(n_boot=0))
    return {task: read_stats(results, task)[0] for task in ("detection", "localization")}


def write_required(results, rng):
    """metrics.json (3 arms x 2 folds x 2 tasks), the localization predictions, the arms' datasets and the stats
    tables; returns the summaries."""
    metrics = {task: {arm: [] for arm in ARMS} for task in ("detection", "localization")}
    for fold in FOLDS:
        test = make_test_set(rng)
        for arm in ARMS:
            save_dataset(results / "downstream" / "data" / arm / f"fold{fold}.npz",
                         ArmDataset(arm, fold, test.subset([2, 3]), test, {"n_test": len(test)}))
            scores = np.clip(test.has_nodule * 0.3 + rng.uniform(0, 0.7, len(test)), 0, 1)
            det = detection_metrics(test.has_nodule, scores)
            det.update(n_train=2, n_test=len(test), n_train_real=2, n_train_real_positive=0,
                       n_train_synthetic=0 if arm == "A" else 1, n_test_positive=2, n_test_negative=2,
                       n_train_patients=2, n_test_patients=2)
            predictions = localization_predictions(arm, fold, test)
            loc = froc(test.nodule_rows(),
                       [(p.scan_id, p.slice_index, p.x0, p.y0, p.x1, p.y1, p.score) for p in predictions.itertuples()],
                       set(test.scan_id.tolist()), test.excluded_rows())
            loc.update(zip(("ap50", "ap60", "ar50", "ar60", "ar70"), rng.uniform(0.2, 0.9, 5).tolist()))
            loc.update(n_train=2, n_test=len(test))
            for task, values in (("detection", det), ("localization", loc)):
                folder = results / "downstream" / task / arm / f"fold{fold}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "metrics.json").write_text(json.dumps(values))
                metrics[task][arm].append(values)
            write_tsv(predictions, results / "downstream" / "localization" / arm / f"fold{fold}" / "predictions.tsv")
    return write_stats(results)


def write_optional(results, rng):
    """Generators' output and provenance files, each through its writer where the project has one."""
    maps = np.stack([lesion_map(), lesion_map((10, 8)), lesion_map((12, 20)), lesion_map()])
    save_slices(results / "slices" / "s1.npz", SliceStack(
        np.stack([ct_from(m, rng) for m in maps]), maps, np.arange(4) * 2.5, np.arange(10, 14),
        (maps == 5).any((1, 2)), "s1", "p1"))
    write_tsv(pd.DataFrame({"patient_id": ["p1", "p2"], "fold": [0, 1]}), results / "folds" / "folds.tsv")
    for generator in ("sdm", "spade"):
        rows = np.array([0, 1, 3])  # the maps behind the synthetic slices (source_index into s1's stack)
        # fold 0's generators on the maps of fold 0's test patient p1 (Figure 1)
        save_slices(results / "synth_heldout" / generator / "0" / "s1.npz", SliceStack(
            np.stack([ct_from(maps[r], rng) for r in rows]), maps[rows], np.zeros(3), rows,
            (maps[rows] == 5).any((1, 2)), "s1", "p1", extra={"source_index": rows}))
        for fold in ("0", "holdout"):
            curve = LossCurve()
            for step in range(0, 101, 25):
                if generator == "sdm":
                    curve.append(step, loss=1 / (step + 1), mse=0.5 / (step + 1), vb=0.01, images_per_s=30.0)
                else:
                    curve.append(step, g_gan=1.0, g_feat=0.5, g_vgg=0.0, g_total=1.5 - step / 200, d_real=0.6,
                                 d_fake=0.7, images_per_s=40.0)
            curve.write(results / "generators" / generator / fold / "loss.tsv")
            if generator == "spade" and fold == "0":  # the trainer's options record; "holdout" has none
                options = SPADEOptions(image_size=32, vgg_weights="/models/vgg19.pth")
                write_options_file(results / "generators" / generator / fold / "options.yaml",
                                   {"model": "spade", "options": options.to_dict(),
                                    "perceptual_loss": perceptual_loss_status(options)})
            write_tsv(pd.DataFrame({"generator": generator, "fold": fold, "scan_id": "s1", "slice_index": rows,
                                    "left_lung": [0.9, 0.8, 0.85], "right_lung": 0.9, "trachea": 0.5, "body": 0.95,
                                    "nodule": [np.nan, 0.6, np.nan], "nodule_contrast_hu": [np.nan, 420.0, np.nan]}),
                      results / "synth" / generator / f"{fold}.fidelity.tsv")
    for fold in FOLDS:
        (results / "downstream" / "realism").mkdir(parents=True, exist_ok=True)
        (results / "downstream" / "realism" / f"fold{fold}.json").write_text(
            json.dumps({"n_nodule": 6, "n_nodule_available_real_test": 6, "n_nodule_available_real_train": 9,
                        "n_nodule_available_spade": 9, "n_nodule_available_sdm": 9,
                        "fd_nodule_real_train": 1.5 + fold, "fd_nodule_spade": 12.25, "fd_nodule_sdm": 7.125}))
    write_tsv(pd.DataFrame({"scan_id": ["s1", "s2", "s3"], "patient_id": ["p1", "p2", "p3"],
                            "series_uid": ["1.2.1", "1.2.2", "1.2.3"], "slices": [4, 4, 0], "spacing": "0.7,0.7,2.5",
                            "status": ["ok", "ok", "rejected"]}), results / "cohort" / "manifest.tsv")
    write_tsv(pd.DataFrame({"scan_id": ["s3"], "patient_id": ["p3"], "reason": ["slice gap 7.5 mm"]}),
              results / "cohort" / "rejected.tsv")
    write_tsv(pd.DataFrame({"check": ["patients disjoint", "near duplicates"], "status": ["pass", "pass"],
                            "detail": ["0 shared", "max correlation 0.41"]}), results / "audit" / "leakage.tsv")
    for rule, job, seconds in (("train_sdm", "0", 12.5), ("localize", "A_fold0", 30.25)):
        path = results / "benchmarks" / rule / f"{job}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                        f"{seconds}\t0:00:{int(seconds):02d}\t100.1\t200.2\t90.0\t95.0\t0.1\t0.2\t80.0\t10.0\n")


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "results"
    summaries = write_required(root, rng)
    write_optional(root, rng)
    return root, summaries


def expected_bold(root, task):
    """Texts of the cells the primary test supports: B or C beating A on a primary endpoint, Holm p < 0.05."""
    summary, tests = read_stats(root, task)
    won = tests[(tests["baseline"] == "A") & (tests["endpoint"] == "primary") & (tests["p_holm"] < 0.05)
                & (tests["mean_diff"] > 0)]
    return sorted(summary.set_index(["arm", "metric"]).loc[list(zip(won["arm"], won["metric"])), "text"])


# ---------------------------------------------------------------- in the browser, and printed

def open_in_chromium(html_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(html_path.resolve().as_uri())
    return driver


@needs_chromium
def test_report_as_a_reader_sees_it(results, tmp_path):
    root, summaries = results
    html_path, pdf_path = tmp_path / "report" / "report.html", tmp_path / "report" / "report.pdf"
    build_report(root, CONFIG, html_path)
    html_to_pdf(html_path, pdf_path)
    html = html_path.read_text()
    # inlined data and links within the page only
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", html), "the report must not load side files"
    assert 'href="#controls"' in html and 'id="controls"' in html

    driver = open_in_chromium(html_path)
    try:
        for task, summary in summaries.items():
            table = driver.find_element("id", f"table-{task}")
            text = table.text
            for label in (label for _, label in HEADLINE[task]):
                assert label in text
            for arm in ARMS:
                for metric, _ in HEADLINE[task]:
                    cell = summary[(summary.arm == arm) & (summary.metric == metric)]["text"].item()
                    assert cell in text, f"{task}: {arm} {metric} {cell!r} missing"
            assert text.count("W p=") == 2 * len(HEADLINE[task])  # B and C against A, every column
            bold = driver.execute_script(
                "return [...arguments[0].querySelectorAll('td .value')].filter("
                "e => parseInt(getComputedStyle(e).fontWeight) >= 700).map(e => e.textContent)", table)
            assert sorted(bold) == expected_bold(root, task)

        images = driver.execute_script(
            "return [...document.images].map(i => [i.closest('figure').id, i.complete, i.naturalWidth])")
        assert {i[0] for i in images} == {"figure-grid", "figure-examples", "figure-froc", "figure-folds_detection",
                                          "figure-folds_localization", "figure-loss"}
        assert all(complete and width > 0 for _, complete, width in images), images
        body = driver.find_element("tag name", "body").text
        for expected in ("slice gap 7.5 mm", "max correlation 0.41", "12.25", "localize", "score_threshold"):
            assert expected in body
        vgg = driver.find_element("id", "table-vgg").text
        assert "0 with VGG loss (options.yaml: on (lambda_vgg 10" in vgg
        assert "holdout without VGG loss (loss.tsv: g_vgg all zero)" in vgg
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1200, min(height + 100, 12000))
        assert driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert (tmp_path / "report.png").stat().st_size > 10_000

    # the image grid shows the lesion map in the study's colours, nodule included
    from PIL import Image

    grid_src = re.search(r'<figure id="figure-grid"><img src="data:image/png;base64,([^"]+)"', html).group(1)
    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(grid_src))).convert("RGB")).reshape(-1, 3)
    for colour in PALETTE[1:]:
        assert (np.abs(grid.astype(int) - colour).max(1) <= 3).any(), f"colour {colour} not in the image grid"

    pages = int(re.search(r"Pages:\s+(\d+)", subprocess.run(["pdfinfo", pdf_path], capture_output=True,
                                                               text=True, check=True).stdout).group(1))
    subprocess.run(["pdftoppm", "-r", "40", "-png", pdf_path, tmp_path / "page"], check=True)
    pngs = sorted(tmp_path.glob("page*.png"))
    assert pages >= 3 and len(pngs) == pages
    for png in pngs:
        pixels = np.asarray(Image.open(png).convert("L"), float)
        assert pixels.std() > 0, f"{png.name} is blank"

    # the PDF keeps every column of the wide tables (Chromium clips what overflows the page's edge): each
    # headline label, and each comparison's Holm p (C - B's is the rightmost)
    text = subprocess.run(["pdftotext", "-raw", pdf_path, "-"], capture_output=True, text=True, check=True).stdout
    words = re.sub(r"\s+", " ", text)
    for task in summaries:
        for _, label in HEADLINE[task]:
            assert label in words, f"{label!r} of the {task} table is missing from the PDF"
    assert words.count("exploratory") == html.count("exploratory") > html.count(">exploratory<") > 0


# ---------------------------------------------------------------- contents, without a browser

def test_missing_optional_inputs_are_reported_not_available(tmp_path):
    root = tmp_path / "results"
    write_required(root, np.random.default_rng(1))
    for task in ("localization",):
        for path in (root / "downstream" / task).rglob("predictions.tsv"):
            path.unlink()
    shutil.rmtree(root / "downstream" / "data")
    html = render_html(report_context(root, CONFIG))
    for missing in ("Figure 1.", "Figure 2.", "Figure 6.", "Mask fidelity", "Feature-space realism",
                    "Cohort manifest", "Rejected scans", "Leakage audit", "Benchmarks"):
        assert re.search(re.escape(missing) + r"[^<]*: not available", html), missing
    assert html.count("<img") == 3  # FROC from the metrics' operating points, and the two per-fold plots
    assert "table-detection" in html and "table-localization" in html


def test_froc_figure_draws_the_per_nodule_curve_of_the_predictions(results):
    """The report's FROC curves come from predictions.tsv through the per-nodule FROC (FP per scan), read at
    LUNA16's rates as the metrics are: arm B finds both nodules before its one false positive (sensitivity 1 from
    the start), arm A one of two (0.5), so neither curve is empty."""
    root, _ = results
    curves = froc_curves(root, FOLDS)
    assert set(curves) == set(ARMS)
    grid, mean_b, _ = curves["B"]
    np.testing.assert_allclose(grid, FROC_GRID)
    np.testing.assert_allclose(mean_b, 1.0)
    np.testing.assert_allclose(curves["A"][1], 0.5)
    for arm in ARMS:  # the curve at LUNA16's rates is the metrics' froc_<rate>, fold by fold averaged
        metrics = [json.loads((root / "downstream" / "localization" / arm / f"fold{k}" / "metrics.json").read_text())
                   for k in FOLDS]
        at_rates = np.interp([0.125, 0.25, 0.5, 1, 2, 4, 8], FROC_GRID, curves[arm][1])
        expected = [np.mean([m[f"froc_{r:g}"] for m in metrics]) for r in (0.125, 0.25, 0.5, 1, 2, 4, 8)]
        np.testing.assert_allclose(at_rates, expected, atol=0.02)
    context = report_context(root, CONFIG)
    assert context["froc_from_predictions"] == sorted(ARMS) and context["figures"]["froc"].startswith("data:image/png")


def test_missing_required_inputs_fail_naming_the_file(tmp_path):
    root = tmp_path / "results"
    write_required(root, np.random.default_rng(2))
    tests_path = root / "stats" / "localization_tests.tsv"
    pd.read_csv(tests_path, sep="\t").drop(columns="wilcoxon_p").to_csv(tests_path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"localization_tests\.tsv: missing column\(s\) \['wilcoxon_p'\]"):
        report_context(root, CONFIG)
    shutil.rmtree(root / "downstream" / "detection" / "B")
    with pytest.raises(FileNotFoundError, match=r"detection/B.*metrics\.json"):
        report_context(root, CONFIG)
    shutil.rmtree(root / "downstream" / "detection")
    (root / "stats" / "detection_summary.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"detection"):
        report_context(root, CONFIG)


def test_stats_texts_are_read_verbatim(tmp_path):
    """'75.00' (one fold: no sd) and 'n/a' stay as the stats stage wrote them, not 75.0 and NaN."""
    write_tsv(pd.DataFrame({"arm": ["A", "B"], "metric": "auc", "mean": [75.0, np.nan], "sd": np.nan,
                            "text": ["75.00", "n/a"]}), tmp_path / "stats" / "detection_summary.tsv")
    write_tsv(pd.DataFrame({"arm": ["B"], "baseline": "A", "metric": "auc", "n": 1, "mean_diff": np.nan,
                            "ci_low": np.nan, "ci_high": np.nan, "wilcoxon_p": np.nan, "ttest_p": np.nan,
                            "nb_ttest_p": np.nan, "endpoint": "primary", "p_holm": np.nan}),
              tmp_path / "stats" / "detection_tests.tsv")
    summary, tests = read_stats(tmp_path, "detection")
    assert summary["text"].tolist() == ["75.00", "n/a"]
    assert np.isnan(summary["mean"][1]) and np.isnan(tests["wilcoxon_p"][0])


def test_arms_must_share_their_folds(tmp_path):
    root = tmp_path / "results"
    write_required(root, np.random.default_rng(3))
    shutil.rmtree(root / "downstream" / "localization" / "C" / "fold1")
    with pytest.raises(ValueError, match=r"arm C has folds \[0\], arm A has \[0, 1\]"):
        report_context(root, CONFIG)


def test_study_table_bolds_only_what_the_primary_test_supports():
    """Bold is no longer the best mean: only B or C beating A on a primary endpoint with Holm-adjusted p < 0.05."""
    metrics = HEADLINE["detection"]
    # the threshold-free metrics lead, the study's own columns at the cut follow
    assert [m for m, _ in metrics][:3] == ["auc", "average_precision", "balanced_accuracy"]
    # C has the best mean everywhere, B the second best
    summary = pd.DataFrame([{"arm": arm, "metric": m, "mean": mean, "sd": 1.0, "text": f"{arm}{m}"}
                            for m, _ in metrics for arm, mean in zip(ARMS, (70.0, 80.0, 85.0))])
    primary = {"auc", "average_precision", "recall"}
    holm_p = {("B", "auc"): 0.01, ("C", "auc"): 0.2, ("B", "average_precision"): 0.04,
              ("C", "average_precision"): 0.049, ("B", "recall"): 0.001, ("C", "recall"): 0.06}
    rows = []
    for m, _ in metrics:
        for arm, baseline in (("B", "A"), ("C", "A"), ("C", "B")):
            is_primary = m in primary
            rows.append({"arm": arm, "baseline": baseline, "metric": m, "n": 5,
                         "mean_diff": -2.0 if (arm, m) == ("B", "recall") else 5.0, "ci_low": 1.0, "ci_high": 9.0,
                         "wilcoxon_p": 0.0625, "ttest_p": 0.0004, "nb_ttest_p": 0.002,
                         "endpoint": "primary" if is_primary else "exploratory",
                         "p_holm": (holm_p.get((arm, m), 0.5) if baseline == "A" else 0.5) if is_primary else np.nan})
    table = study_table("detection", summary, pd.DataFrame(rows))
    best = {(row["arm"], m): cell["best"] for row in table["rows"] for (m, _), cell in zip(metrics, row["cells"])}
    # B's AUC and AP (p_holm .01, .04) and C's AP (.049); not C's AUC (.2, whatever its mean), not B's recall
    # (significant, but worse than A), nor any exploratory metric (tiny unadjusted p), nor arm A
    assert {key for key, is_best in best.items() if is_best} == {("B", "auc"), ("B", "average_precision"),
                                                                 ("C", "average_precision")}
    b_cell = table["rows"][1]["cells"][[m for m, _ in metrics].index("accuracy")]  # accuracy: exploratory
    assert (b_cell["wilcoxon_p"], b_cell["ttest_p"], b_cell["nb_ttest_p"]) == ("0.0625", "<0.001", "0.002")
    assert b_cell["p_holm"] is None
    auc_column = [label for m, label in metrics].index("AUC")
    assert table["rows"][1]["cells"][auc_column]["p_holm"] == "0.01"
    assert "wilcoxon_p" not in table["rows"][0]["cells"][0]
    assert table["wilcoxon_floor"] == {5: "0.0625"}
    assert table["compared"] == ["B − A", "C − A", "C − B"]
    assert set(table["primary"]) == {"AUC", "AP", "Recall"}
    auc_row = next(d for d in table["differences"] if d["metric"] == "AUC")
    assert auc_row["primary"] and [a["p_holm"] for a in auc_row["arms"]] == ["0.01", "0.2", "0.5"]
    accuracy_row = next(d for d in table["differences"] if d["metric"] == "Accuracy")
    assert not accuracy_row["primary"] and {a["p_holm"] for a in accuracy_row["arms"]} == {"exploratory"}
    with pytest.raises(KeyError, match=r"my_summary.tsv: expected one row for arm C, metric auc; found 0"):
        study_table("detection", summary[~((summary.arm == "C") & (summary.metric == "auc"))], pd.DataFrame(rows),
                    "my_summary.tsv")


def test_controls_counts_and_tests_explained_in_the_report(tmp_path):
    """The control arms' metrics beside A's: the stats stage writes controls.tsv, the report shows it with what each
    control means; the counts per arm; the C − B comparison; which test is which."""
    root = tmp_path / "results"
    write_required(root, np.random.default_rng(4))
    html = render_html(report_context(root, CONFIG))
    assert "Controls table: not available" in html  # no control arms yet
    for task in ("detection", "localization"):
        for fold in FOLDS:
            a = json.loads((root / "downstream" / task / "A" / f"fold{fold}" / "metrics.json").read_text())
            for arm, change in (("P", -0.3), ("N", 0.0)):
                values = {k: (min(1.0, max(0.0, v + change + 0.01 * fold)) if k in ("auc", "average_precision", "cpm",
                                                                                    "ap50") else v)
                          for k, v in a.items()}
                folder = root / "downstream" / task / arm / f"fold{fold}"
                folder.mkdir(parents=True)
                (folder / "metrics.json").write_text(json.dumps(values))
    write_stats(root)
    controls = pd.read_csv(root / "stats" / "controls.tsv", sep="\t")
    assert set(controls["control"]) == {"positive", "negative"}
    html = render_html(report_context(root, CONFIG))
    section = html[html.index('id="table-controls"'):]
    section = section[:section.index("</table>")]
    assert section.count("<tr>") == 1 + len(controls)
    for text in ("positive", "negative", "&gt; 0", "&lt; 0", "t interval over 2 folds"):
        assert text in section, text
    positive_auc = controls[(controls["control"] == "positive") & (controls["metric"] == "auc")].iloc[0]
    assert f"{positive_auc['difference']:.3g} pp [" in section
    assert re.search(r"<td[^>]*>(yes|no)</td>", section)
    assert "withholds 50% of A" in html and "relabelled" in html  # the schema's default share
    config = {**CONFIG, "downstream": {**CONFIG.get("downstream", {}), "positive_control_withheld": 0.7}}
    assert "withholds 70% of A" in render_html(report_context(root, config))
    counts = html[html.index('id="table-counts"'):]
    counts = counts[:counts.index("</table>")]
    for text in ("A: real", "B: real + SPADE", "P: positive control", "N: negative control", "real training slices",
                 "test patients"):
        assert text in counts, text
    differences = html[html.index('id="differences-detection"'):]
    assert "C − B" in differences[:differences.index("</table>")]
    assert "AUC <b>(primary)</b>" in differences
    explained = html[html.index('id="tests-explained"'):]
    explained = explained[:explained.index("</p>")]
    for text in ("Wilcoxon signed-rank", "paired t-test", "Nadeau–Bengio", "Holm-adjusted", "exploratory",
                 "detection: AUC", "localization: CPM"):
        assert text in explained, text



def test_results_an_earlier_run_left_are_not_shown(tmp_path):
    """Snakemake deletes no file a run stops producing: after downstream.controls was turned off, the earlier run's
    controls.tsv and P/N metrics stay; after folds.k was lowered, its fold2 (another patient split) stays. The
    report shows only the run's folds and arms, as its statistics use them."""
    root = tmp_path / "results"
    write_required(root, np.random.default_rng(4))  # arms A, B, C; folds 0 and 1
    for task in ("detection", "localization"):
        for arm in ("A", "B", "C", "P", "N"):
            source = root / "downstream" / task / "A" / "fold1"
            for fold in (0, 1, 2) if arm in "PN" else (2,):
                target = root / "downstream" / task / arm / f"fold{fold}"
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(source / "metrics.json", target / "metrics.json")
    earlier = sorted((root / "downstream").glob("*/*/fold*/metrics.json"))  # folds.k 3, controls on
    run_stats(earlier, root / "stats", StatsOptions(n_boot=0))
    assert (root / "stats" / "controls.tsv").is_file()
    (root / "downstream" / "realism").mkdir(parents=True)
    for fold in (0, 1, 2):
        (root / "downstream" / "realism" / f"fold{fold}.json").write_text(json.dumps(
            {"n_nodule": 6, "fd_nodule_real_train": 1.5, "fd_nodule_spade": 12.25, "fd_nodule_sdm": 7.125}))
    # This run: folds.k 2, controls off; its stats step read only its own folds and arms.
    current = [p for p in earlier if p.parent.parent.name in "ABC" and p.parent.name in ("fold0", "fold1")]
    run_stats(current, root / "stats", StatsOptions(n_boot=0))
    config = {**CONFIG, "folds": {"k": 2}, "downstream": {"controls": False}}
    context = report_context(root, config)
    assert context["folds"] == [0, 1] and context["controls"] is None
    assert [row[0]["text"] for row in context["realism"]["rows"]] == ["0", "1", "mean ± sd"]
    html = render_html(context)
    assert "Controls table: not available" in html
    counts = html[html.index('id="table-counts"'):]
    counts = counts[:counts.index("</table>")]
    assert "A: real" in counts and "P: positive control" not in counts and "N: negative control" not in counts
    # The earlier run's own config still reads everything it made.
    earlier_run = report_context(root, {**CONFIG, "folds": {"k": 3}, "downstream": {"controls": True}})
    assert earlier_run["folds"] == [0, 1, 2] and earlier_run["controls"] is not None

def write_synthetic_stack(path, maps, images, scan_id, patient_id):
    """A generator's stack in the layout write_synthetic gives it: every map of a real stack, in order."""
    rows = np.arange(len(maps))
    save_slices(path, SliceStack(images, maps, np.zeros(len(maps)), rows, (maps == 5).any((1, 2)), scan_id,
                                 patient_id, extra={"source_index": rows}))


def test_figure_one_shows_a_test_patient_of_the_fold_with_that_folds_generators(tmp_path):
    """Figure 1's slices are a test patient's of fold k, and its SDM and SPADE images are those fold k's generators
    made from that patient's maps (results/synth_heldout/{generator}/{k}), not the holdout generators' or the
    fold generators' on their own training patients (results/synth/...), which saw those scans."""
    root = tmp_path / "results"
    rng = np.random.default_rng(4)
    maps = np.stack([lesion_map(), lesion_map((10, 8)), lesion_map((12, 20)), lesion_map()])
    patients = {"s1": "p1", "s2": "p2"}
    write_tsv(pd.DataFrame({"patient_id": ["p1", "p2"], "fold": [1, 0]}), root / "folds" / "folds.tsv")
    for scan, patient in patients.items():
        save_slices(root / "slices" / f"{scan}.npz", SliceStack(
            np.stack([ct_from(m, rng) for m in maps]), maps, np.arange(4) * 2.5, np.arange(20, 24),
            (maps == 5).any((1, 2)), scan, patient))
    made = {}
    for generator in ("sdm", "spade"):
        # what the generators saw: every patient (holdout), p1 for fold 0's generators, p2 for fold 1's
        for fold, scans in (("holdout", ("s1", "s2")), ("0", ("s1",)), ("1", ("s2",))):
            for scan in scans:
                write_synthetic_stack(root / "synth" / generator / fold / f"{scan}.npz", maps,
                                      np.full(maps.shape, 255, np.uint8), scan, patients[scan])
        # and each fold's generators on its own test patient: p2 for fold 0, p1 for fold 1
        for fold, scan in (("0", "s2"), ("1", "s1")):
            made[generator, fold] = rng.integers(0, 200, maps.shape).astype(np.uint8)
            write_synthetic_stack(root / "synth_heldout" / generator / fold / f"{scan}.npz", maps,
                                  made[generator, fold], scan, patients[scan])

    rows = grid_slices(root)
    assert [row["kind"] for row in rows] == ["nodule slice", "nodule-free slice"]
    folds = pd.read_csv(root / "folds" / "folds.tsv", sep="\t", dtype={"patient_id": str})
    for row in rows:
        assert row["fold"] == 0 and (row["scan_id"], row["patient_id"]) == ("s2", "p2")
        assert folds.set_index("patient_id").loc[row["patient_id"], "fold"] == row["fold"]  # a test patient of it
        index = row["slice_index"] - 20  # the row of s2's stack (slice indices 20..23)
        assert np.array_equal(row["ct"], np.load(root / "slices" / "s2.npz")["image"][index])
        assert np.array_equal(row["label"], maps[index])
        for generator in ("sdm", "spade"):  # fold 0's generators, on this patient's map
            assert np.array_equal(row[generator], made[generator, "0"][index])

    write_required(root, rng)
    html = render_html(report_context(root, CONFIG))
    assert "Figure 1. A nodule slice and a nodule-free slice of a test patient of fold 0:" in html
    assert "by the fold&#39;s own generators, which never saw this patient" in html

    # results of another fold plan (p2 now in fold 1): fold 0's heldout samples are stale, and said so
    write_tsv(pd.DataFrame({"patient_id": ["p1", "p2"], "fold": [0, 1]}), root / "folds" / "folds.tsv")
    with pytest.raises(ValueError, match=r"synth_heldout/sdm/0/s2\.npz: patient p2 is not a test patient of fold 0"):
        grid_slices(root)


def test_realism_table_reads_the_class_matched_keys(results):
    root, _ = results
    realism = read_realism(root)
    assert realism["fold"].tolist() == [0, 1]
    assert realism["nodule slices per set"].tolist() == [6, 6]
    assert realism["nodule: real train (floor)"].tolist() == [1.5, 2.5]
    assert realism["nodule: SDM / floor"].tolist() == pytest.approx([7.125 / 1.5, 7.125 / 2.5])
    assert not any(c.startswith("nodule-free") for c in realism.columns)  # no generator set held nodule-free slices
    path = root / "downstream" / "realism" / "fold1.json"
    values = json.loads(path.read_text())
    values.update(n_nodule_free=4, fd_nodule_free_real_train=2.0, fd_nodule_free_sdm=3.0, fd_nodule_sdm=None)
    path.write_text(json.dumps(values))
    realism = read_realism(root)
    assert realism["nodule-free: SDM / floor"].tolist()[1] == 1.5 and np.isnan(realism["nodule-free: SDM"][0])
    assert np.isnan(realism["nodule: SDM"][1])  # too few slices to fit a Gaussian: no distance
    # the summary row over the folds that have a distance, saying how many; never "nan"
    context = report_context(root, CONFIG)
    summary = {c: cell["text"] for c, cell in zip(context["realism"]["columns"], context["realism"]["rows"][-1])}
    assert summary["nodule: SDM"] == "7.125 (1 of 2 folds)" and summary["nodule: SPADE"] == "12.250 ± 0.000"
    html = render_html(context)
    assert "Class-matched" in html and "nodule-free: SPADE" not in html
    path.write_text(json.dumps({"fd_real_train": 1.0, "fd_spade": 2.0, "fd_sdm": 3.0}))  # the old, class-blind keys
    with pytest.raises(KeyError, match=r"fold1\.json: missing key\(s\) \['n_nodule'"):
        read_realism(root)


def test_localization_examples_show_finds_and_misses(results):
    root, _ = results
    panels, fold = localization_panels(root, list(FOLDS), threshold=0.5, n_examples=2)
    assert fold == 0 and len(panels) == 3
    titles = [[p["title"].splitlines()[1] for p in row] for row in panels]
    assert titles[0] == ["1 found, 0 missed, 0 FP", "0 found, 1 missed, 1 FP"]  # arm A
    assert titles[1] == ["1 found, 0 missed, 0 FP", "1 found, 0 missed, 0 FP"]  # arm B: both found
    assert all(len(p["pred"]) == 0 or min(s for *_, s in p["pred"]) >= 0.5 for row in panels for p in row)


def test_missing_chromium_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"report.chromium = '/nonexistent/chromium': no such executable"):
        find_chromium("/nonexistent/chromium")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("NODULESYNTH_CHROMIUM", raising=False)
    with pytest.raises(FileNotFoundError, match=r"apt-get install chromium"):
        find_chromium()
    (tmp_path / "r.html").write_text("<p>report</p>")
    with pytest.raises(FileNotFoundError, match=r"no Chromium found"):
        html_to_pdf(tmp_path / "r.html", tmp_path / "r.pdf")
    assert not (tmp_path / "r.pdf").exists()


def test_report_pdf_setting_decides_the_pdf(tmp_path, monkeypatch):
    """report.pdf: auto prints where a Chromium is found or in containers, else warns how to get it; true makes a
    missing Chromium an error; false never prints; an explicit report.chromium must exist unless false."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("NODULESYNTH_CHROMIUM", raising=False)
    wanted, warning = pdf_wanted("auto")
    assert not wanted and "apt-get install chromium" in warning and "report.html only" in warning
    assert pdf_wanted("auto", in_containers=True) == (True, None)  # the report image carries one
    assert pdf_wanted(False) == (False, None)
    assert pdf_wanted(False, "/nonexistent/chromium") == (False, None)
    with pytest.raises(FileNotFoundError, match=r"report.pdf = True: no Chromium found.*apt-get install chromium"):
        pdf_wanted(True)
    with pytest.raises(FileNotFoundError, match=r"report.chromium = '/nonexistent/chromium': no such executable"):
        pdf_wanted("auto", "/nonexistent/chromium")
    with pytest.raises(ValueError, match=r"report.pdf = 'yes': expected one of auto, true, false"):
        pdf_wanted("yes")
    with pytest.raises(ValueError, match=r"report.pdf = 1"):
        pdf_wanted(1)

    # A Chromium on PATH (an executable of that name; pdf_wanted only looks it up): auto and true print.
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\nexit 0\n")
    chromium.chmod(0o755)
    assert pdf_wanted("auto") == (True, None) and pdf_wanted(True) == (True, None)
