"""The leakage audit: run before any downstream training, it fails the DAG when a test patient's data
could reach a model that is evaluated on that patient.

`audit(...)` returns one row per check and scope (arm and fold, or generator and fold) with columns
`check`, `status` ("pass" or "fail") and `detail` (for a fail: the file, patients and slices at fault);
`write_audit` writes it as `results/audit/leakage.tsv`, `assert_clean` raises `LeakageError` on a fail.

Checks:
1. `patients_disjoint`, `series_disjoint`, `split_follows_folds` (per arm dataset): no patient and no
   series UID on both sides; test patients are the fold's patients in folds.tsv, training patients
   (real and the source patients of synthetic slices) are not.
2. `generator_training` (per generator): its training_scans.tsv holds only the fold's training patients.
3. `synthetic_sources` (per synthetic directory): every synthetic stack's source map is a training
   patient's; `synthetic_generator` (per synthetic directory): every stack records that it was made by
   that generator and fold, with the sha256 of its model.pt; `synthetic_provenance` (per arm dataset):
   every synthetic slice is the slice of that fold's own generator that its scan and slice index name.
4. `near_duplicates` (per arm dataset): no training image is a near-copy of a test image of its fold
   (see `image_features` for the measure).
"""

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from nodulesynth.data.folds import read_folds
from nodulesynth.data.slices import PROVENANCE, load_slice_info, load_slices
from nodulesynth.downstream.datasets import ARMS, CONTROLS, RELABELLED, load_dataset, study_arms
from nodulesynth.io import file_sha256, read_table, read_tsv, write_tsv

HOLDOUT = "holdout"
CHUNK = 4096        # rows per block of the correlation matrix: a block is at most CHUNK^2 float32 (64 MiB)
LISTED = 8          # items named in a detail before "... and N more"
BLUR_FRACTION = 1 / 16  # high-pass blur sigma as a fraction of the compared size (2 px at 32 x 32)


class LeakageError(RuntimeError):
    """The audit found a violation; the message names the failing checks and the audit file."""


# ----------------------------------------------------------------------------- inputs

def _read_table(path, columns) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    frame = read_tsv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return frame


def fold_of_patient(path) -> dict:
    """patient_id -> fold (as a string, to match the generators' fold names), from folds.tsv."""
    frame = read_folds(path)
    return dict(zip(frame.patient_id.astype(str), frame.fold.astype(str)))


def read_manifest(path) -> pd.DataFrame:
    """The manifest indexed by scan_id (patient_id, series_uid)."""
    return read_table(path, "manifest").set_index("scan_id")


def _stack_slice_index(path) -> np.ndarray:
    """A stack's slice indices without decompressing its images (npz members are read lazily)."""
    with np.load(path, allow_pickle=False) as data:
        if "slice_index" in data.files:
            return np.asarray(data["slice_index"])
    return np.arange(load_slice_info(path)["slices"])


# ----------------------------------------------------------------------------- image measure

def image_features(images: np.ndarray, size: int = 32) -> np.ndarray:
    """[N, size*size] float32 rows of unit norm whose dot products are the near-duplicate measure.

    Each image is reduced to size x size (cv2.INTER_AREA, which averages light noise away and makes a
    resized copy nearly equal to its original), a Gaussian-blurred copy of itself (sigma size/16 px) is
    subtracted, and the rest is normalised to zero mean and unit norm. Why the high-pass: the demo phantoms
    share one template (body ellipse, spine, ribs, table), so plain correlation at 32 x 32 between slices
    of different patients reaches 0.9945 on the six-phantom test cohort (0.9992 on the twelve of the demo
    config) and cannot tell an honest split from a copy; what tells patients apart is where edges and
    small structures lie, which the high-pass keeps while the shared smooth shading goes. Measured on the
    six phantoms, datasets at 64 px: honest cross-patient maximum 0.9745; copies of every slice resized
    128 -> 64 -> 128 at least 0.996, noised with sd 4 / 8 grey levels at least 0.998 / 0.994, resized
    through 48 px 0.990; only a copy squeezed through 32 px (the compared size itself) gets near 0.98.
    An image with no structure (constant) gets a zero row: it matches nothing.
    """
    out = np.zeros((len(images), size * size), np.float32)
    sigma = max(size * BLUR_FRACTION, 0.5)
    for i, image in enumerate(images):
        small = cv2.resize(image.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        small = small - cv2.GaussianBlur(small, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        small -= small.mean()
        norm = float(np.linalg.norm(small))
        if norm > 1e-3:
            out[i] = small.ravel() / norm
    return out


def _image_hash(image: np.ndarray) -> bytes:
    """Content key of an image: the same slice in several datasets is reduced once (hashlib, no library
    offers a keyed cache of array features)."""
    image = np.ascontiguousarray(image)
    return hashlib.blake2b(repr(image.shape).encode() + image.tobytes(), digest_size=16).digest()


class FeatureBank:
    """Features of distinct images (by content hash), so that images shared by several datasets of a
    fold (the real training and test slices of arms A, B and C) are reduced and compared once."""

    def __init__(self, size):
        self.size = size
        self.index = {}
        self.rows = []

    def add(self, images) -> np.ndarray:
        """Indices of the given images in the bank, computing features only for new ones."""
        ids = np.empty(len(images), np.int64)
        new = []
        for i, image in enumerate(images):
            key = _image_hash(image)
            if key not in self.index:
                self.index[key] = len(self.index)
                new.append(image)
            ids[i] = self.index[key]
        if new:
            self.rows.append(image_features(new, self.size))
        return ids

    def matrix(self) -> np.ndarray:
        if len(self.rows) > 1:
            self.rows = [np.concatenate(self.rows)]
        return self.rows[0] if self.rows else np.zeros((0, self.size * self.size), np.float32)


def best_matches(train: np.ndarray, test: np.ndarray, threshold: float, chunk: int = CHUNK):
    """For each train row: (highest correlation with any test row, its test row, count of test rows
    above `threshold`). One matrix product per block of chunk x chunk rows bounds the memory."""
    best = np.full(len(train), -np.inf, np.float32)
    arg = np.full(len(train), -1, np.int64)
    above = np.zeros(len(train), np.int64)
    for a in range(0, len(train), chunk):
        block = train[a:a + chunk]
        for b in range(0, len(test), chunk):
            corr = block @ test[b:b + chunk].T
            j = corr.argmax(1)
            value = corr[np.arange(len(block)), j]
            better = value > best[a:a + chunk]
            best[a:a + chunk][better] = value[better]
            arg[a:a + chunk][better] = j[better] + b
            above[a:a + chunk] += (corr > threshold).sum(1)
    return best, arg, above


# ----------------------------------------------------------------------------- details

def _listing(items, limit=LISTED) -> str:
    items = [str(x) for x in items]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _capped(problems, limit=LISTED):
    """At most `limit` problems, then a count of the rest."""
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def _slices_of(scan_ids, slice_index, rows, limit=4) -> str:
    """'scan:slice' of a few rows."""
    return _listing([f"{scan_ids[r]}:{int(slice_index[r])}" for r in rows], limit)


def _row(check, scope, problems, ok_detail):
    name = f"{check} ({scope})"
    if problems:
        return dict(check=name, status="fail", detail="; ".join(problems))
    return dict(check=name, status="pass", detail=ok_detail)


# ----------------------------------------------------------------------------- checks

def _fold_patients(folds: dict, fold: str):
    test = {p for p, f in folds.items() if f == fold}
    return test, set(folds) - test


def check_generator(model, fold, directory, folds, manifest):
    """Check 2: the generator's training_scans.tsv holds only training patients of its fold."""
    path = Path(directory) / "training_scans.tsv"
    scope = f"{model}, fold {fold}"
    if not path.is_file():
        return _row("generator_training", scope, [f"{path}: missing"], "")
    scans = _read_table(path, ["scan_id", "patient_id"])
    if fold == HOLDOUT:
        return _row("generator_training", scope, [],
                    f"{path}: {scans.patient_id.nunique()} patients; the holdout generator sees all and feeds no arm")
    if fold not in set(folds.values()):
        return _row("generator_training", scope, [f"{path}: fold {fold} is not in folds.tsv"], "")
    test, _ = _fold_patients(folds, fold)
    problems = []
    for scan_id, patient in zip(scans.scan_id.astype(str), scans.patient_id.astype(str)):
        patients = {patient}
        if scan_id in manifest.index:
            patients.add(str(manifest.at[scan_id, "patient_id"]))
        for p in sorted(patients):
            if p in test:
                problems.append(f"scan {scan_id} of test patient {p}")
            elif p not in folds:
                problems.append(f"scan {scan_id} of patient {p}, not in folds.tsv")
    if problems:
        return _row("generator_training", scope, [f"{path}: {_listing(problems)}"], "")
    return _row("generator_training", scope, [],
                f"{path}: {len(scans)} scans of {scans.patient_id.nunique()} training patients")


def check_synthetic_dir(model, fold, directory, folds, manifest):
    """Check 3a: every synthetic stack's source map (its scan and patient) is a training patient's."""
    directory = Path(directory)
    scope = f"{model}, fold {fold}"
    if not directory.is_dir():
        return _row("synthetic_sources", scope, [f"{directory}: missing"], "")
    paths = sorted(directory.glob("*.npz"))
    if fold == HOLDOUT:
        return _row("synthetic_sources", scope, [], f"{directory}: {len(paths)} stacks; holdout feeds no arm")
    test, _ = _fold_patients(folds, fold)
    problems, slices = [], 0
    for path in paths:
        info = load_slice_info(path)
        if not info["slices"]:
            continue
        slices += info["slices"]
        patients = {info["patient_id"]}
        if info["scan_id"] in manifest.index:
            patients.add(str(manifest.at[info["scan_id"], "patient_id"]))
        bad = sorted(p for p in patients if p in test or p not in folds)
        if bad:
            index = _stack_slice_index(path)
            why = ", ".join(f"{p} ({'test patient' if p in test else 'not in folds.tsv'})" for p in bad)
            problems.append(f"{path}: scan {info['scan_id']}, patient {why}, "
                            f"{info['slices']} slices ({_listing(index.tolist(), 6)})")
    return _row("synthetic_sources", scope, _capped(problems),
                f"{directory}: {slices} slices in {len(paths)} stacks, all from training patients")


def check_synthetic_generator(model, fold, directory, generator_dir):
    """Check 3c: every synthetic stack records (models.synthesis.generator_provenance) that it was made by this
    generator and fold, with the sha256 of `generator_dir`/model.pt: a stack of the holdout generator (trained
    on every patient, the fold's test patients included) or of another fold copied into the folder fails."""
    directory = Path(directory)
    scope = f"{model}, fold {fold}"
    if not directory.is_dir():
        return _row("synthetic_generator", scope, [f"{directory}: missing"], "")
    if generator_dir is None:
        return _row("synthetic_generator", scope, [f"{directory}: no generator directory of {model} fold {fold} "
                                                   "given, so its stacks' provenance cannot be checked"], "")
    model_path = Path(generator_dir) / "model.pt"
    if not model_path.is_file():
        return _row("synthetic_generator", scope, [f"{model_path}: missing"], "")
    digest = file_sha256(model_path)
    problems, stacks = [], 0
    for path in sorted(directory.glob("*.npz")):
        info = load_slice_info(path)
        if not info["slices"]:
            continue
        stacks += 1
        record = {key: str(info["extra"][key]) for key in PROVENANCE if key in info["extra"]}
        missing = [key for key in PROVENANCE if key not in record]
        if missing:
            problems.append(f"{path}: records no {', '.join(missing)} (sampled without provenance)")
            continue
        if (record["generator"], record["generator_fold"]) != (model, fold):
            problems.append(f"{path}: made by {record['generator']} fold {record['generator_fold']}, "
                            f"not {model} fold {fold}")
        elif record["model_sha256"] != digest:
            problems.append(f"{path}: made by a model with sha256 {record['model_sha256'][:12]}..., "
                            f"not {model_path} ({digest[:12]}...)")
    return _row("synthetic_generator", scope, _capped(problems),
                f"{directory}: {stacks} stacks, each made by {model} fold {fold} ({model_path}, sha256 {digest[:12]}...)")


def check_split(path, arm, fold, dataset, folds, manifest):
    """Check 1: patients and series disjoint; the test side is the fold, the training side is not."""
    scope = f"arm {arm}, fold {fold}"
    train, test = dataset.train, dataset.test
    rows = []

    both = sorted(set(train.patient_id.astype(str)) & set(test.patient_id.astype(str)))
    problems = []
    for p in both:
        tr, te = np.flatnonzero(train.patient_id == p), np.flatnonzero(test.patient_id == p)
        problems.append(f"patient {p}: {len(tr)} train slices ({_slices_of(train.scan_id, train.slice_index, tr)}), "
                        f"{len(te)} test slices ({_slices_of(test.scan_id, test.slice_index, te)})")
    rows.append(_row("patients_disjoint", scope, [f"{path}: {_listing(problems)}"] if problems else [],
                     f"{path}: {len(set(train.patient_id))} train and {len(set(test.patient_id))} test patients"))

    unknown = sorted({str(s) for s in np.concatenate([train.scan_id, test.scan_id]) if str(s) not in manifest.index})
    series = manifest["series_uid"].to_dict()
    train_series = {series[s] for s in set(train.scan_id.astype(str)) if s in series}
    test_series = {series[s] for s in set(test.scan_id.astype(str)) if s in series}
    problems = []
    if unknown:
        problems.append(f"{path}: scans not in the manifest: {_listing(unknown)}")
    for uid in sorted(train_series & test_series):
        scans = sorted(manifest.index[manifest.series_uid == uid])
        problems.append(f"{path}: series {uid} (scans {_listing(scans)}) on both sides")
    rows.append(_row("series_disjoint", scope, problems,
                     f"{path}: {len(train_series)} train and {len(test_series)} test series"))

    problems = []
    owner = manifest["patient_id"].astype(str).to_dict()
    if str(dataset.fold) != fold or dataset.arm != arm:
        problems.append(f"{path}: holds arm {dataset.arm} fold {dataset.fold}, expected arm {arm} fold {fold}")
    if fold not in set(folds.values()):
        problems.append(f"{path}: fold {fold} is not in folds.tsv")
    for side, s in (("test", test), ("train", train)):
        for p in sorted(set(s.patient_id.astype(str))):
            where = folds.get(p)
            wrong = where != fold if side == "test" else (where is None or where == fold)
            if wrong:
                rows_p = np.flatnonzero(s.patient_id == p)
                sources = ", ".join(sorted(set(s.source[rows_p].astype(str))))
                told = "not in folds.tsv" if where is None else f"in fold {where}"
                problems.append(f"{path}: {side} patient {p} is {told} ({len(rows_p)} {sources} slices: "
                                f"{_slices_of(s.scan_id, s.slice_index, rows_p)})")
        pairs = {(str(sc), str(p)) for sc, p in zip(s.scan_id, s.patient_id)}
        for scan_id, p in sorted(pairs):
            if scan_id in owner and owner[scan_id] != p:
                problems.append(f"{path}: {side} scan {scan_id} labelled patient {p}, "
                                f"the manifest says {owner[scan_id]}")
    rows.append(_row("split_follows_folds", scope, _capped(problems, 2 * LISTED),
                     f"{path}: test patients are fold {fold}'s, training patients other folds'"))
    return rows


class SyntheticIndex:
    """The synthetic stacks of one generator and fold: (scan_id, slice_index) -> bank rows of their
    images, loaded once and only when a dataset draws slices from them."""

    def __init__(self, directory, bank):
        self.directory = Path(directory)
        self.bank = bank
        self._lookup = None

    def lookup(self) -> dict:
        if self._lookup is None:
            self._lookup = {}
            for path in sorted(self.directory.glob("*.npz")) if self.directory.is_dir() else []:
                stack = load_slices(path)
                if not len(stack):
                    continue
                ids = self.bank.add(stack.image)
                for k, i in zip(np.asarray(stack.slice_index).tolist(), ids):
                    self._lookup.setdefault((stack.scan_id, int(k)), []).append(int(i))
        return self._lookup


def check_provenance(path, arm, fold, dataset, train_ids, synthetic, bank, threshold):
    """Check 3b: each synthetic training slice is the image its generator made for that scan and slice."""
    scope = f"arm {arm}, fold {fold}"
    train = dataset.train
    model = ARMS.get(arm)
    source = train.source.astype(str)
    # The negative control's relabelled slices are real training slices (their patients are checked as any
    # real slice's); only arm N may hold them.
    rows = np.flatnonzero(~np.isin(source, ["real", RELABELLED]))
    problems = []
    relabelled = np.flatnonzero(source == RELABELLED)
    if len(relabelled) and arm != "N":
        problems.append(f"{path}: {len(relabelled)} relabelled slices in arm {arm} (only the negative control N "
                        f"adds them): {_slices_of(train.scan_id, train.slice_index, relabelled)}")
    wrong = [r for r in rows if str(train.source[r]) != model]
    if wrong:
        kinds = ", ".join(sorted({str(train.source[r]) for r in wrong}))
        problems.append(f"{path}: {len(wrong)} slices of source {kinds} in arm {arm} (which adds "
                        f"{model or 'no synthetic slices'}): {_slices_of(train.scan_id, train.slice_index, wrong)}")
    ours = [r for r in rows if str(train.source[r]) == model]
    if ours:
        index = synthetic.get((model, fold))
        if index is None:
            problems.append(f"{path}: {len(ours)} {model} slices but no {model} synthetic directory for fold {fold}")
        else:
            lookup = index.lookup()
            features = bank.matrix()
            missing, differ = [], []
            for r in ours:
                candidates = lookup.get((str(train.scan_id[r]), int(train.slice_index[r])), [])
                if not candidates:
                    missing.append(r)
                elif train_ids[r] not in candidates and \
                        not (features[candidates] @ features[train_ids[r]] > threshold).any():
                    differ.append(r)
            if missing:
                problems.append(f"{path}: {len(missing)} {model} slices not in {index.directory}: "
                                f"{_slices_of(train.scan_id, train.slice_index, missing)}")
            if differ:
                problems.append(f"{path}: {len(differ)} {model} slices differ from the image in {index.directory} "
                                f"for that scan and slice: {_slices_of(train.scan_id, train.slice_index, differ)}")
    ok = (f"{path}: {len(ours)} {model} slices, each the image of fold {fold}'s {model} stack for its scan and slice"
          if model else f"{path}: no synthetic slices")
    return _row("synthetic_provenance", scope, problems, ok)


def check_near_duplicates(path, arm, fold, dataset, train_ids, test_ids, features, threshold):
    """Check 4: no training image correlates above `threshold` with a test image (see image_features)."""
    scope = f"arm {arm}, fold {fold}"
    train, test = dataset.train, dataset.test  # images already dropped: the bank holds their features
    if not len(train_ids) or not len(test_ids):
        return _row("near_duplicates", scope, [],
                    f"{path}: nothing to compare ({len(train_ids)} train, {len(test_ids)} test slices)")
    unique_train, train_rows = np.unique(train_ids, return_inverse=True)
    unique_test = np.unique(test_ids)
    best, arg, above = best_matches(features[unique_train], features[unique_test], threshold)
    best, arg, above = best[train_rows], unique_test[arg[train_rows]], above[train_rows]
    first_test_row = {}
    for row, i in enumerate(test_ids):
        first_test_row.setdefault(int(i), row)
    flagged = np.flatnonzero(best > threshold)
    flagged = flagged[np.argsort(-best[flagged], kind="stable")]
    problems = []
    for r in flagged[:LISTED]:
        t = first_test_row[int(arg[r])]
        problems.append(f"train row {r} (scan {train.scan_id[r]}, slice {int(train.slice_index[r])}, "
                        f"source {train.source[r]}) ~ test row {t} (scan {test.scan_id[t]}, "
                        f"slice {int(test.slice_index[t])}): r={best[r]:.4f}"
                        + (f", {above[r]} test slices above {threshold}" if above[r] > 1 else ""))
    if len(flagged) > LISTED:
        problems.append(f"... and {len(flagged) - LISTED} more train slices")
    worst = int(np.argmax(best))
    t = first_test_row[int(arg[worst])]
    return _row("near_duplicates", scope, [f"{path}: " + "; ".join(problems)] if problems else [],
                f"{path}: highest train-test correlation {best[worst]:.4f} (train scan {train.scan_id[worst]} "
                f"slice {int(train.slice_index[worst])}, source {train.source[worst]}; test scan {test.scan_id[t]} "
                f"slice {int(test.slice_index[t])}), threshold {threshold}")


# ----------------------------------------------------------------------------- the audit

def audit(folds_tsv, manifest_tsv, generator_dirs, synth_dirs, dataset_paths, size=32, threshold=0.98) -> pd.DataFrame:
    """Run every check; returns the table (check, status, detail), one row per check and scope.

    generator_dirs, synth_dirs: {(model, fold): directory}; dataset_paths: {(arm, fold): path}; folds are
    matched as strings ("0".."k-1", or "holdout" for the generators, which feed no arm).
    """
    folds = fold_of_patient(folds_tsv)
    manifest = read_manifest(manifest_tsv)
    rows = []
    for (model, fold), directory in sorted(generator_dirs.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        rows.append(check_generator(model, str(fold), directory, folds, manifest))
    generator_of = {(model, str(fold)): directory for (model, fold), directory in generator_dirs.items()}
    for (model, fold), directory in sorted(synth_dirs.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        rows.append(check_synthetic_dir(model, str(fold), directory, folds, manifest))
        rows.append(check_synthetic_generator(model, str(fold), directory, generator_of.get((model, str(fold)))))

    by_fold = {}
    for (arm, fold), path in dataset_paths.items():
        if arm not in ARMS and arm not in CONTROLS:
            raise KeyError(f"{path}: unknown arm {arm!r} (arms: {', '.join(study_arms(controls=True))})")
        by_fold.setdefault(str(fold), []).append((arm, Path(path)))
    for fold in sorted(by_fold):
        # One bank per fold: the arms' shared real slices are reduced once; nothing crosses folds.
        bank = FeatureBank(size)
        synthetic = {(m, fold): SyntheticIndex(d, bank) for (m, f), d in synth_dirs.items() if str(f) == fold}
        compared = []
        for arm, path in sorted(by_fold[fold]):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file (dataset of arm {arm}, fold {fold})")
            dataset = load_dataset(path)
            train_ids, test_ids = bank.add(dataset.train.image), bank.add(dataset.test.image)
            rows.extend(check_split(path, arm, fold, dataset, folds, manifest))
            rows.append(check_provenance(path, arm, fold, dataset, train_ids, synthetic, bank, threshold))
            dataset.train.image = dataset.train.label = dataset.test.image = dataset.test.label = None  # free
            compared.append((path, arm, dataset, train_ids, test_ids))
        features = bank.matrix()
        for path, arm, dataset, train_ids, test_ids in compared:
            rows.append(check_near_duplicates(path, arm, fold, dataset, train_ids, test_ids, features, threshold))
    return pd.DataFrame(rows, columns=["check", "status", "detail"])


def write_audit(table: pd.DataFrame, path):
    write_tsv(table[["check", "status", "detail"]], path)


def assert_clean(table: pd.DataFrame, path):
    """Raise LeakageError naming each failing check and the audit file; do nothing when all pass."""
    failed = table[table.status != "pass"]
    if len(failed):
        lines = "\n".join(f"- {c}: {d}" for c, d in zip(failed.check, failed.detail))
        raise LeakageError(f"leakage audit failed ({len(failed)} of {len(table)} checks, see {path}):\n{lines}")
