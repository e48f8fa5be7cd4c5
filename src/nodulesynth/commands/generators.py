"""`nodulesynth train-sdm | train-spade | sample-sdm | sample-spade | fidelity`: the commands of
rules/generators.smk."""

import logging
from pathlib import Path

from nodulesynth.commands import THREADS_HELP, json_section, loader_workers, torch_threads
from nodulesynth.errors import InputError

log = logging.getLogger("nodulesynth")


def _synthesis(params):
    from nodulesynth.models.synthesis import SynthesisOptions

    return SynthesisOptions.from_config(params).to_dict()


def record_training_scans(slices, out_dir):
    """training_scans.tsv beside the model: what the generator saw, for the leakage audit."""
    import pandas as pd

    from nodulesynth.data.slices import load_slice_info
    from nodulesynth.io import write_tsv

    rows = []
    for path in slices:
        info = load_slice_info(path)
        rows.append(dict(scan_id=info["scan_id"], patient_id=info["patient_id"], slices=info["slices"],
                         path=str(path)))
    write_tsv(pd.DataFrame(rows), Path(out_dir) / "training_scans.tsv")


def cmd_train_sdm(args):
    from nodulesynth.models.distributed import Ranks

    # Under torchrun (sdm.gpus > 1) this runs once per GPU: the job's threads are shared among its processes.
    ranks = Ranks.from_environ()
    args.threads = max(1, args.threads // ranks.size)
    torch_threads(args)
    from nodulesynth.models.sdm import SDMOptions
    from nodulesynth.models.sdm.train import train_sdm

    train_sdm(args.slices, args.out_dir, SDMOptions.from_config(args.params), device=args.device,
              workers=loader_workers(args))
    if ranks.main:
        record_training_scans(args.slices, args.out_dir)


def cmd_train_spade(args):
    torch_threads(args)
    from nodulesynth.models.spade import SPADEOptions
    from nodulesynth.models.spade.train import train_spade

    train_spade(args.slices, args.out_dir, SPADEOptions.from_config(args.params), device=args.device,
                workers=loader_workers(args))
    record_training_scans(args.slices, args.out_dir)


def train_parsers(sub):
    for name, func, helptext in (("train-sdm", cmd_train_sdm, "train the semantic diffusion model on given stacks"),
                                 ("train-spade", cmd_train_spade, "train the SPADE baseline on given stacks")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--slices", nargs="+", required=True, help="the training stacks (results/slices/*.npz)")
        p.add_argument("--params", type=json_section, default={}, help="the config's model section as JSON")
        p.add_argument("--out-dir", required=True, help="model.pt, loss.tsv and the resumable checkpoint.pt")
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
        p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
        p.set_defaults(func=func)


def cmd_sample_sdm(args):
    torch_threads(args)
    from nodulesynth.models.sdm import SDMOptions
    from nodulesynth.models.sdm.sample import sample_sdm

    unknown = sorted(set(args.params) - set(SDMOptions.SAMPLING_KEYS))
    if unknown:
        raise InputError(f"sample-sdm takes only the sampling keys of sdm, not sdm.{unknown[0]}")
    p = args.params
    sample_sdm(args.model, args.slices, args.out_dir, sampler=p.get("sampler"), steps=p.get("sample_steps"),
               guidance_scale=p.get("guidance_scale"), eta=p.get("ddim_eta"),
               batch_size=p.get("sample_batch_size"), device=args.device, fold=args.fold,
               **_synthesis(args.synthesis))


def cmd_sample_spade(args):
    torch_threads(args)
    from nodulesynth.models.spade.sample import sample_spade

    sample_spade(args.model, args.slices, args.out_dir, device=args.device, fold=args.fold,
                 **_synthesis(args.synthesis))


def sample_parsers(sub):
    for name, func, helptext in (("sample-sdm", cmd_sample_sdm, "synthesise slices from lesion maps with the SDM"),
                                 ("sample-spade", cmd_sample_spade, "synthesise slices from lesion maps with SPADE")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True)
        p.add_argument("--fold", required=True,
                       help="the generator's fold (0..k-1 or holdout), recorded in each stack for the leakage audit")
        p.add_argument("--slices", nargs="+", required=True, help="stacks whose lesion maps are used")
        p.add_argument("--params", type=json_section, default={}, help="sdm: the sampling keys of the sdm section")
        p.add_argument("--synthesis", type=json_section, default={}, help="the config's synthesis section as JSON")
        p.add_argument("--out-dir", required=True)
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
        p.set_defaults(func=func)


def cmd_fidelity(args):
    from nodulesynth.data.window import window_from_config
    from nodulesynth.io import write_tsv
    from nodulesynth.masks.fidelity import synthetic_fidelity
    from nodulesynth.masks.segment import MaskOptions

    window = window_from_config(args.window)
    dirs = {"train": args.synth, **({"heldout": args.heldout} if args.heldout else {})}
    table = synthetic_fidelity(dirs, args.slices, MaskOptions.from_config(args.params), window)
    table.insert(0, "generator", args.generator)
    table.insert(1, "fold", args.fold)
    write_tsv(table, args.out)
    for split, part in table.groupby("split", sort=False):
        means = part.drop(columns=["generator", "fold", "split", "scan_id", "slice_index"]).mean()
        log.info("fidelity %s fold %s, %s maps (%d slices): %s", args.generator, args.fold, split, len(part),
                 ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


def fidelity_parser(sub):
    p = sub.add_parser("fidelity", help="mask fidelity of synthetic slices: Dice of our segmentation vs their maps")
    p.add_argument("--synth", required=True, help="folder of synthetic stacks from the fold's training maps")
    # nargs "?": the rule writes `--heldout` with no folder for the holdout generator, which has no test patients.
    p.add_argument("--heldout", nargs="?", help="folder of synthetic stacks from the fold's test-patient maps "
                                                "(evaluation only; none for the holdout generator)")
    p.add_argument("--slices", nargs="+", required=True,
                   help="the real stacks whose maps were sampled (each synthetic stack's pixel size)")
    p.add_argument("--params", type=json_section, default={}, help="the config's masks section as JSON")
    p.add_argument("--window", type=json_section, default={}, help="the config's window section as JSON")
    p.add_argument("--generator", required=True)
    p.add_argument("--fold", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_fidelity)


# in the order the rules run; nodulesynth.cli registers them
PARSERS = (train_parsers, sample_parsers, fidelity_parser)
