# Generators: one SDM and one SPADE per fold, trained on that fold's training patients only
# ("holdout": on all patients; its losses and mask fidelity are reported), then sampled on the same lesion
# maps. Each fold's generators also sample its test patients' maps (sample_generator_heldout): held-out fidelity
# and the report's Figure 1. One rule per step for both generators (wildcard generator: sdm, spade).
# GPU jobs: `gpu=1` asks SLURM for a GPU; without one they run on the CPU. The SDM's training asks for sdm.gpus
# GPUs of one node and runs a process on each (torchrun, nodulesynth.models.distributed).


rule train_generator:
    input:
        stacks=training_stacks,
        vgg_weights=spade_vgg_weights,
    output:
        model="results/generators/{generator}/{fold}/model.pt",
        scans="results/generators/{generator}/{fold}/training_scans.tsv",
        loss=report(
            "results/generators/{generator}/{fold}/loss.tsv",
            category="Generators",
            subcategory="{generator}",
            labels={"generator": "{generator}", "fold": "{fold}"},
            caption="captions/generator_loss.rst",
        ),
    log:
        "results/logs/train_generator/{generator}/{fold}.log",
    benchmark:
        "results/benchmarks/train_generator/{generator}/{fold}.tsv"
    retries: 2
    conda:
        "../envs/generators.yaml"
    container:
        config["containers"]["generators"]
    threads: config["generators"]["threads"]
    resources:
        # the SDM on sdm.gpus GPUs of one node: torchrun runs a process on each (params.launch); SLURM keeps the
        # GPUs on one node (--nodes), which torchrun --standalone needs
        gpu=generator_gpus,
        nodes=1,
        mem_mb=lambda wildcards, attempt: sizing.generator_mem_mb(attempt),
        runtime=lambda wildcards, threads, attempt: sizing.train_generator_runtime(
            wildcards.generator, config, config["generators"]["device"], threads, attempt
        ),
        # the training slices staged as uint8 memory maps under $TMPDIR (--tmp on SLURM)
        disk_mb=lambda wildcards, input: sizing.staging_disk_mb(input.stacks, config[wildcards.generator]["image_size"]),
    params:
        options=generator_training_params,
        launch=generator_launcher,
        out_dir=subpath(output.model, parent=True),
        device=config["generators"]["device"],
    shell:
        "{params.launch} nodulesynth train-{wildcards.generator} --slices {input.stacks} --params {params.options:q} "
        "--out-dir {params.out_dir} --device {params.device} --threads {threads} > {log} 2>&1"


rule sample_generator:
    input:
        model="results/generators/{generator}/{fold}/model.pt",
        stacks=training_stacks,
    output:
        directory("results/synth/{generator}/{fold}"),
    log:
        "results/logs/sample_generator/{generator}/{fold}.log",
    benchmark:
        "results/benchmarks/sample_generator/{generator}/{fold}.tsv"
    retries: 2
    conda:
        "../envs/generators.yaml"
    container:
        config["containers"]["generators"]
    threads: config["generators"]["threads"]
    resources:
        gpu=1,
        mem_mb=lambda wildcards, attempt: sizing.generator_mem_mb(attempt),
        runtime=lambda wildcards, input, threads, attempt: sizing.sample_generator_runtime(
            wildcards.generator, config, input.stacks, config["generators"]["device"], threads, attempt
        ),
    params:
        sampling=generator_sampling_args,
        synthesis=section("synthesis"),
        device=config["generators"]["device"],
    shell:
        "nodulesynth sample-{wildcards.generator} --model {input.model} --fold {wildcards.fold} "
        "--slices {input.stacks} {params.sampling} --synthesis {params.synthesis:q} --out-dir {output} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


# The fold's generators on its test patients' maps: evaluation only (held-out mask fidelity, the report's
# Figure 1). Written outside results/synth/, which the downstream arms draw on, so nothing sampled here
# reaches a training set.
use rule sample_generator as sample_generator_heldout with:
    input:
        model="results/generators/{generator}/{fold}/model.pt",
        stacks=heldout_stacks,
    output:
        directory("results/synth_heldout/{generator}/{fold}"),
    log:
        "results/logs/sample_generator_heldout/{generator}/{fold}.log",
    benchmark:
        "results/benchmarks/sample_generator_heldout/{generator}/{fold}.tsv"
    wildcard_constraints:
        fold=r"\d+",


rule fidelity:
    # Per synthetic slice, split train (the fold's training maps) and heldout (its test patients' maps;
    # the holdout generator has none), segmented with the run's window and masks settings.
    input:
        synth="results/synth/{generator}/{fold}",
        heldout=heldout_samples,
        slices=lambda wc: training_stacks(wc) + heldout_stacks(wc),
    output:
        report(
            "results/synth/{generator}/{fold}.fidelity.tsv",
            category="Generators",
            subcategory="Mask fidelity",
            labels={"generator": "{generator}", "fold": "{fold}"},
            caption="captions/fidelity.rst",
        ),
    log:
        "results/logs/fidelity/{generator}_{fold}.log",
    benchmark:
        "results/benchmarks/fidelity/{generator}_{fold}.tsv"
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        window=section("window"),
        masks=section("masks"),
    shell:
        "nodulesynth fidelity --synth {input.synth} --heldout {input.heldout} --slices {input.slices} "
        "--params {params.masks:q} --window {params.window:q} --generator {wildcards.generator} "
        "--fold {wildcards.fold} --out {output} > {log} 2>&1"
