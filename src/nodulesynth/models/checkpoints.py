"""Checkpoints: written atomically, and resumed only by a run with the same options on the same data."""

import torch

from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path


def save_checkpoint(path, state: dict):
    """torch.save to a temporary sibling, then rename: a kill never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu") -> dict:
    # Our own files, holding options and optimiser state besides tensors.
    return torch.load(path, map_location=map_location, weights_only=False)


def changed_options(saved: dict, current: dict, ignore=()) -> list:
    """Option keys whose values differ between a checkpoint and this run, `ignore` aside.

    A checkpoint is resumed only when nothing else changed (a job restarted after a kill); a
    rerun after a config change trains from scratch, as Snakemake expects of a changed param.
    """
    return sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))


def data_change(saved: dict | None, current: dict) -> str | None:
    """Why a checkpoint's training-data record differs from this run's, in words; None when equal."""
    if not saved:
        return "it records no training data (written by an older version)"
    if saved["sha256"] == current["sha256"]:
        return None
    old = {s["scan_id"]: s["sha256"] for s in saved["stacks"]}
    new = {s["scan_id"]: s["sha256"] for s in current["stacks"]}
    differences = {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
                   "changed": sorted(k for k in set(old) & set(new) if old[k] != new[k])}
    words = [f"{len(ids)} scans {what} ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
             for what, ids in differences.items() if ids]
    return "it was trained on other data: " + ("; ".join(words) or "other stacks of the same scans")


def resume_refusal(state: dict, options: dict, data: dict, resumable=(), section: str = "") -> str | None:
    """Why this run must not resume the checkpoint `state`, in words; None when it may.

    It may only when the checkpoint was trained on exactly this data (`load_training_data`'s record)
    with these options, the keys in `resumable` aside. Otherwise a rerun after a change of the
    training data (another fold, cohort or mask setting) would continue, and write out as its model,
    a generator trained on other patients. Nor is a checkpoint past this run's `max_steps` (a shorter run
    after a longer one): its weights are not what a fresh run of this length gives.
    """
    changed = changed_options(state["options"], options, resumable)
    if changed:
        return "it was trained with other " + ", ".join(f"{section}.{key}" for key in changed)
    step, max_steps = state.get("step"), options.get("max_steps")
    if step is not None and max_steps is not None and int(step) > int(max_steps):
        return f"its step {step} is past {section}.max_steps {max_steps}"
    return data_change(state.get("data"), data)


def check_network(state: dict, fmt: str, options, what: str):
    """A checkpoint `state` of format `fmt` whose network (options.MODEL_KEYS) is the one `options` build: else an
    InputError naming the keys that differ. `what` names the model in the message ("an SDM", "a SPADE")."""
    if state.get("format") != fmt:
        raise InputError(f"not {what} checkpoint (format {state.get('format')!r})")
    saved = type(options).from_config(state["options"])
    changed = [f"{options.SECTION}.{key}" for key in options.MODEL_KEYS if getattr(saved, key) != getattr(options, key)]
    if changed:
        raise InputError(f"checkpoint was trained with other {', '.join(changed)}: delete it to start over")
