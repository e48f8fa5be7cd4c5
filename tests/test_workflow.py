"""The real Snakemake workflow on a small demo config: outputs, reruns, config errors, lint.

The shared run is the bare path: every Chromium hidden from PATH, as on a machine without one (the README's two
commands must end green there with report.html); the PDF is printed in its own test where a Chromium exists."""

import re

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, run_snakemake
from nodulesynth.report.pdf import find_chromium


def run_bare(work, *args, **kwargs):
    return run_snakemake(work, *args, without_chromium=True, **kwargs)


def chromium_missing() -> bool:
    try:
        find_chromium()
    except FileNotFoundError:
        return True
    return False


def small_config(tmp_path, **masks):
    """The demo config, smaller: 4 scans, 2 folds, generators trained for a handful of steps (4 scans: each fold's
    training set then holds two nodule patients, of which the positive control withholds one)."""
    config = yaml.safe_load(open(REPO / "config.yaml"))
    config["cohort"]["demo"].update(n_scans=4, image_size=96)
    config["folds"]["k"] = 2
    config["masks"].update(masks)
    config["sdm"].update(max_steps=4, checkpoint_every=2, log_every=2, sample_steps=3)
    config["spade"].update(max_steps=4, checkpoint_every=2, log_every=2)
    config["synthesis"]["max_slices_per_scan"] = 2
    config["detection"].update(epochs=1, iters_per_epoch=2, lr_steps=[1])
    config["localization"].update(epochs=1, iters_per_epoch=2, warmup_iters=1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    config = small_config(work)
    proc = run_bare(work, "--configfile", str(config))
    return work, config, proc.stdout + proc.stderr


def test_demo_writes_the_data_contract(demo_run):
    work, *_ = demo_run
    manifest = pd.read_csv(work / "results/cohort/manifest.tsv", sep="\t", dtype={"scan_id": str})
    assert list(manifest.columns) == ["scan_id", "patient_id", "series_uid", "slices", "spacing", "status"]
    assert len(manifest) == 4 and (manifest.status == "ok").all() and (manifest.slices > 20).all()
    rejected = pd.read_csv(work / "results/cohort/rejected.tsv", sep="\t")
    assert list(rejected.columns) == ["scan_id", "patient_id", "reason"] and rejected.empty
    for scan in manifest.scan_id:
        with np.load(work / f"results/slices/{scan}.npz") as data:
            n = len(data["image"])
            assert data["image"].dtype == np.uint8 and data["image"].shape == (n, 96, 96)
            assert data["label"].dtype == np.uint8 and data["label"].max() <= 5
            assert data["z"].shape == data["slice_index"].shape == data["has_nodule"].shape == (n,)
            assert np.all(np.diff(data["z"]) > 0)
        boxes = pd.read_csv(work / f"results/slices/{scan}.nodules.tsv", sep="\t")
        assert list(boxes.columns) == ["slice_index", "nodule", "x0", "y0", "x1", "y1"] and len(boxes) > 0
        qc = cv2.imread(str(work / f"results/qc/{scan}.png"))
        assert qc is not None and qc.shape[0] > 100
        assert (work / f"results/logs/masks/{scan}.log").exists()
        assert (work / f"results/benchmarks/ingest/{scan}.tsv").exists()
    folds = pd.read_csv(work / "results/folds/folds.tsv", sep="\t", dtype=str)
    assert sorted(folds.patient_id) == sorted(manifest.patient_id)
    assert not (work / "results/volumes").exists() or not list((work / "results/volumes").glob("*.npz"))


@pytest.mark.parametrize("generator", ["sdm", "spade"])
def test_generators_see_only_training_patients_and_write_the_slices_layout(demo_run, generator):
    work, *_ = demo_run
    folds = pd.read_csv(work / "results/folds/folds.tsv", sep="\t", dtype={"patient_id": str})
    for fold in ("0", "1", "holdout"):
        seen = pd.read_csv(work / f"results/generators/{generator}/{fold}/training_scans.tsv", sep="\t", dtype=str)
        expected = folds if fold == "holdout" else folds[folds.fold != int(fold)]
        assert sorted(seen.patient_id) == sorted(expected.patient_id)
        loss = pd.read_csv(work / f"results/generators/{generator}/{fold}/loss.tsv", sep="\t")
        assert loss.step.max() == 4
        synth = sorted((work / f"results/synth/{generator}/{fold}").glob("*.npz"))
        assert {p.stem for p in synth} == set(seen.scan_id)
        total = 0
        for path in synth:
            with np.load(path) as data:
                assert data["image"].dtype == np.uint8 and data["image"].shape == data["label"].shape
                # two evenly spaced maps, plus every map holding a nodule (synthesis.nodule_maps_per_scan null)
                assert data["image"].shape[0] >= 2 and data["label"].max() <= 5
                assert data["has_nodule"].sum() >= 1
                total += data["image"].shape[0]
        fidelity = pd.read_csv(work / f"results/synth/{generator}/{fold}.fidelity.tsv", sep="\t")
        assert {"left_lung", "right_lung", "body", "trachea", "nodule"} <= set(fidelity.columns)
        # train: the synthetic slices above; heldout: the fold's test-patient maps (results/synth_heldout)
        assert (fidelity.split == "train").sum() == total
        assert (fidelity.split == "heldout").any() == (fold != "holdout")


DETECTION_KEYS = {"accuracy", "precision", "recall", "specificity", "f1", "auc", "n_train", "n_test"}
LOCALIZATION_KEYS = {"ap50", "ap60", "ar50", "ar60", "ar70", "cpm", "froc_0.125", "froc_8", "n_train", "n_test"}


def test_downstream_study_runs_every_arm_and_fold_after_a_passing_audit(demo_run):
    import json

    work, *_ = demo_run
    leakage = pd.read_csv(work / "results/audit/leakage.tsv", sep="\t")
    assert {"arm", "fold", "check", "status", "detail"} <= set(leakage.columns)
    assert set(zip(leakage.arm, leakage.fold)) == {(a, f) for a in "ABCPN" for f in (0, 1)}
    assert (leakage.status == "pass").all(), leakage[leakage.status != "pass"]
    counts = {}
    for task, keys in (("detection", DETECTION_KEYS), ("localization", LOCALIZATION_KEYS)):
        for arm in "ABCPN":
            for fold in (0, 1):
                out = work / f"results/downstream/{task}/{arm}/fold{fold}"
                metrics = json.loads((out / "metrics.json").read_text())
                assert keys <= set(metrics), keys - set(metrics)
                predictions = pd.read_csv(out / "predictions.tsv", sep="\t")
                assert (out / "model.pth").stat().st_size > 0
                assert len(pd.read_csv(out / "loss.tsv", sep="\t")) >= 1
                if task == "detection":
                    assert len(predictions) == metrics["n_test"] and predictions.score.between(0, 1).all()
                counts[task, arm, fold] = (metrics["n_train"], metrics["n_test"], metrics["n_train_synthetic"])
    for fold in (0, 1):
        # Paired arms: one test set per fold; B and C add the same number of synthetic slices to A's.
        a, b, c, p, n = (counts["detection", arm, fold] for arm in "ABCPN")
        assert a[1] == b[1] == c[1] == p[1] == n[1] and a[2] == 0 and b[2] == c[2] > 0 and b[0] == c[0] == a[0] + b[2]
        # The controls: P holds fewer real slices and nothing added; N adds relabelled slices to A's.
        assert p[0] < a[0] and p[2] == 0 and n[2] > 0 and n[0] == a[0] + n[2]
        realism = json.loads((work / f"results/downstream/realism/fold{fold}.json").read_text())
        # class-matched: nodule slices against nodule slices, every set drawn to one count
        distances = ("fd_nodule_real_train", "fd_nodule_spade", "fd_nodule_sdm")
        assert set(distances) | {"n_nodule"} <= set(realism)
        if realism["n_nodule"] >= 2:  # else no Gaussian fits: null distances
            assert all(np.isfinite(realism[k]) and realism[k] >= 0 for k in distances)
        else:
            assert all(realism[k] is None for k in distances)


def test_statistics_and_report_close_the_dag(demo_run):
    work, *_ = demo_run
    summary = pd.read_csv(work / "results/stats/detection_summary.tsv", sep="\t")
    assert set(summary.arm) == set("ABC")  # the controls have their own table
    tests = pd.read_csv(work / "results/stats/localization_tests.tsv", sep="\t")
    assert set(zip(tests.arm, tests.baseline)) == {("B", "A"), ("C", "A"), ("C", "B")}
    assert (tests.n == 2).all()  # one value per fold, never repeated
    controls = pd.read_csv(work / "results/stats/controls.tsv", sep="\t")
    assert set(zip(controls.task, controls.control)) == {(t, c) for t in ("detection", "localization")
                                                         for c in ("positive", "negative")}
    assert controls.detected.isin([True, False]).all() and (controls.ci_low <= controls.ci_high).all()
    html = (work / "results/report/report.html").read_text()
    for text in ("Detection", "Localization", "AP50", "Leakage audit"):
        assert text in html, text
    assert "<img" in html and "src=\"data:image/png;base64," in html  # self-contained


def test_without_chromium_the_run_ends_green_with_the_html_and_one_warning(demo_run):
    work, _, output = demo_run
    assert (work / "results/report/report.html").is_file()
    assert not (work / "results/report/report.pdf").exists()
    assert output.count("report.pdf = auto and no Chromium found") == 1, output[-3000:]
    assert "apt-get install chromium" in output


def test_report_pdf_true_without_chromium_fails_before_any_job_naming_the_fix(demo_run, tmp_path):
    work, *_ = demo_run
    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["report"]["pdf"] = True
    path = tmp_path / "pdf.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_bare(work, "--configfile", str(path), "-n", check=False)
    assert proc.returncode != 0
    assert "report.pdf = True: no Chromium found" in proc.stdout + proc.stderr
    assert "apt-get install chromium" in proc.stdout + proc.stderr


@pytest.mark.skipif(chromium_missing(), reason="no Chromium to print the PDF (apt-get install chromium)")
def test_where_chromium_is_found_the_pdf_is_printed(demo_run):
    work, config, _ = demo_run
    dry = run_snakemake(work, "--configfile", str(config), "-n")
    assert "report_pdf" in dry.stdout + dry.stderr  # report.pdf: auto prints where a Chromium is found
    run_snakemake(work, "--configfile", str(config))
    assert (work / "results/report/report.pdf").read_bytes()[:5] == b"%PDF-"


def test_snakemakes_own_report_has_a_caption_on_every_item(demo_run, tmp_path):
    work, config, _ = demo_run
    rules = "".join(path.read_text() for path in sorted((REPO / "rules").glob("*.smk")))
    items = re.findall(r"report\((.*?)\)", rules, re.S)
    assert items and all("caption=" in item for item in items), [i for i in items if "caption=" not in i]
    out = tmp_path / "snakemake-report.html"
    run_bare(work, "--configfile", str(config), "--report", str(out))
    html = out.read_text()
    for caption in sorted((REPO / "rules" / "captions").glob("*.rst")):
        first_words = " ".join(caption.read_text().split()[:5])
        assert first_words in html, (caption.name, first_words)


def test_second_run_has_nothing_to_do(demo_run):
    work, config, _ = demo_run
    proc = run_bare(work, "--configfile", str(config), "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def dry_run_jobs(work, config):
    proc = run_bare(work, "--configfile", str(config), "-n")
    stats = (proc.stdout + proc.stderr).split("Job stats:")[-1].split("Reasons:")[0]
    return {line.split()[0] for line in stats.splitlines()[3:] if line.strip() and not line.startswith("total")}


def test_a_changed_value_reruns_only_what_uses_it(demo_run, tmp_path):
    work, *_ = demo_run
    qc = small_config(tmp_path)
    config = yaml.safe_load(qc.read_text())
    config["report"]["qc_slices"] = 6
    qc.write_text(yaml.safe_dump(config))
    assert dry_run_jobs(work, qc) == {"qc", "report", "all"}  # the report records the config as run

    config["report"]["qc_slices"] = 12
    config["sdm"]["guidance_scale"] = 2.0  # a sampling value: sampling reruns, training does not
    qc.write_text(yaml.safe_dump(config))
    # ... and what uses the SDM's slices: arm C's data, audit, models and the realism table; not arm A or B.
    assert dry_run_jobs(work, qc) == {"sample_generator", "sample_generator_heldout", "fidelity", "downstream_dataset",
                                      "audit", "leakage", "downstream_model", "realism", "stats", "report", "all"}
    dry = run_bare(work, "--configfile", str(qc), "-n")
    arms = set(re.findall(r"wildcards: [^\n]*\barm=([ABCPN])", dry.stdout + dry.stderr))
    assert arms == {"C"}, arms
    generators = set(re.findall(r"wildcards: [^\n]*\bgenerator=(\w+)", dry.stdout + dry.stderr))
    assert generators == {"sdm"}, generators  # SPADE's samples are not redrawn

    # Keys a step does not read leave it alone: downstream.threads (the model jobs' CPUs, no param of theirs) and
    # downstream.controls (which arms run) rebuild no arm's data, audit nothing again and retrain no model.
    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["downstream"]["threads"] += 1
    qc.write_text(yaml.safe_dump(config))
    assert dry_run_jobs(work, qc) == {"report", "all"}
    config["downstream"]["controls"] = False
    qc.write_text(yaml.safe_dump(config))
    assert dry_run_jobs(work, qc) == {"leakage", "stats", "report", "all"}

    # An arm's data reads only its own keys (DownstreamOptions.dataset_keys): a changed synthetic_ratio rebuilds
    # and retrains the arms that add slices (B, C and N), not A or P.
    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["downstream"]["synthetic_ratio"] = 0.5
    qc.write_text(yaml.safe_dump(config))
    dry = run_bare(work, "--configfile", str(qc), "-n")
    arms = set(re.findall(r"wildcards: [^\n]*\barm=([ABCPN])", dry.stdout + dry.stderr))
    assert arms == {"B", "C", "N"}, arms

    masks = small_config(tmp_path, min_lung_area_mm2=150)
    jobs = dry_run_jobs(work, masks)
    assert {"ingest", "masks", "manifest"} <= jobs and "cohort" not in jobs

    # The HU window: everything from the lesion maps on (ingestion too: its HU volumes are temp() files, deleted
    # once the maps are made), not the cohort.
    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["window"]["max_hu"] = 500
    qc.write_text(yaml.safe_dump(config))
    jobs = dry_run_jobs(work, qc)
    assert {"ingest", "masks", "manifest", "folds", "train_generator", "sample_generator", "downstream_model", "stats",
            "report"} <= jobs
    assert "cohort" not in jobs


def test_a_replaced_file_a_config_key_names_reruns_the_step_that_reads_it(demo_run, tmp_path):
    """The files the config names (source dicom's annotations.csv, a downstream model's load_from, SPADE's VGG19
    weights) are inputs of the steps that read them: a corrected annotations.csv re-reads the cohort, as an edited
    value would, where only its path used to be a param."""
    import os
    import shutil

    work, *_ = demo_run
    export = tmp_path / "export"
    shutil.copytree(work / "results" / "demo", export)  # the demo's DICOM and LUNA16-style annotations.csv
    annotations = export / "annotations.csv"
    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["cohort"].update(source="dicom", dicom_root=str(export / "dicom"), annotations=str(annotations))
    path = tmp_path / "dicom.yaml"
    path.write_text(yaml.safe_dump(config))
    study = tmp_path / "study"
    study.mkdir()
    run_bare(study, "results/cohort/scans.tsv", "--configfile", str(path))  # --configfile takes several files
    assert "cohort" not in dry_run_jobs(study, path)
    rows = annotations.read_text().splitlines(keepends=True)
    annotations.write_text("".join(rows[:-1]))  # a nodule row removed
    later = annotations.stat().st_mtime_ns + 2 * 10**9  # past any file-system timestamp resolution
    os.utime(annotations, ns=(later, later))
    assert "cohort" in dry_run_jobs(study, path)

    weights = tmp_path / "start.pth"
    weights.write_bytes(b"")  # a dry run reads no weights
    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["detection"]["load_from"] = str(weights)
    path.write_text(yaml.safe_dump(config))
    dry = run_bare(work, "--configfile", str(path), "-n")
    jobs = (dry.stdout + dry.stderr).split("rule downstream_model:")[1:]
    # every detection model reruns (its params changed) with the file among its inputs; localization does not
    assert jobs and all("task=detection" in job for job in jobs), [job.split("output:")[0] for job in jobs]
    assert all(str(weights) in job.split("output:")[0] for job in jobs)


def test_config_error_fails_before_any_job_naming_the_key(tmp_path):
    config = yaml.safe_load(open(REPO / "config.yaml"))
    config["masks"]["body_treshold"] = 127  # misspelt
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_bare(tmp_path, "--configfile", str(path), check=False)
    assert proc.returncode != 0
    assert "body_treshold" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_lint_is_clean(tmp_path):
    proc = run_snakemake(REPO, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt_check_is_clean():
    import subprocess
    import sys
    from pathlib import Path

    # snakefmt reads its line length from pyproject.toml's [tool.snakefmt]
    snakefmt = Path(sys.executable).parent / "snakefmt"
    proc = subprocess.run([str(snakefmt), "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_rules_read_the_sdm_sampling_keys_from_the_package_without_torch():
    """rules/common.smk imports SDMOptions.SAMPLING_KEYS (no copy to keep equal): the options module, and the
    package modules the rules import, load without torch, so the Snakefile parses fast and anywhere."""
    import subprocess
    import sys

    code = ("import sys; import nodulesynth.models.sdm.options, nodulesynth.data.folds, nodulesynth.downstream.datasets, "
            "nodulesynth.report.pdf, nodulesynth.models.distributed; assert 'torch' not in sys.modules, 'torch imported'; "
            "from nodulesynth.models.sdm import SDMOptions, train_sdm; print(SDMOptions.SAMPLING_KEYS, callable(train_sdm))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "'sampler'" in proc.stdout and "True" in proc.stdout
    assert "SDM_SAMPLING_KEYS = SDMOptions.SAMPLING_KEYS" in (REPO / "rules/common.smk").read_text()


def test_a_job_killed_midway_reruns_cleanly(demo_run, tmp_path):
    """A training job killed mid-run (a node lost, an out-of-memory kill): the rule's retries (retries: 2) start
    it again in the same run, and the new attempt resumes from the killed one's last checkpoint and finishes,
    logging each step once. Last in this module: it retrains fold 0's SDM of the shared run, for longer."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    work, *_ = demo_run
    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["sdm"].update(max_steps=40, checkpoint_every=4)
    path = tmp_path / "longer.yaml"
    path.write_text(yaml.safe_dump(config))
    out = work / "results/generators/sdm/0"
    target = ["--configfile", str(path), "--cores", "1", "results/generators/sdm/0/model.pt"]

    def checkpoint_step():
        try:
            return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
        except Exception:  # absent, or being replaced at this moment
            return None

    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work), "--nocolor",
           *target]
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (checkpoint_step() or 0) >= 8:
        assert proc.poll() is None and time.time() < deadline, "the job ended before it could be killed"
        time.sleep(0.5)
    job = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "nodulesynth train-sdm"], capture_output=True,
                         text=True).stdout.split()
    assert job, "the training job's process"
    for pid in job:
        os.kill(int(pid), signal.SIGKILL)
    killed_at = checkpoint_step()  # read before the retry, starting afresh, writes its next checkpoint
    output = proc.communicate(timeout=600)[0]
    assert 8 <= killed_at < 40
    assert proc.returncode == 0, output  # the retry finished the job
    log = (work / "results/logs/train_generator/sdm/0.log").read_text()  # the last attempt's
    assert re.search(rf"resumed from \S*checkpoint.pt at step {killed_at}\b", log), log[-2000:]
    assert torch.load(out / "model.pt", map_location="cpu", weights_only=False)["step"] == 40
    loss = pd.read_csv(out / "loss.tsv", sep="\t")
    assert loss.step.is_unique and loss.step.max() == 40  # the replayed steps are not logged twice


def test_jobs_import_this_workflows_own_package(tmp_path, monkeypatch):
    """Every clone of one lock shares the project's environment, whose editable install names the clone set up
    last (here another clone's package, first on PYTHONPATH): a job still runs this workflow's src/."""
    other = tmp_path / "other-clone" / "src"
    (other / "nodulesynth").mkdir(parents=True)
    (other / "nodulesynth" / "__init__.py").write_text('raise ImportError("the package of another clone")\n')
    monkeypatch.setenv("PYTHONPATH", str(other))
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.yaml").write_text((REPO / "config.yaml").read_text())
    run_snakemake(work, "results/cohort/scans.tsv")
    assert len(pd.read_csv(work / "results/cohort/scans.tsv", sep="\t")) > 0
