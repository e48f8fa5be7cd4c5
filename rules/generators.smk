# Generators: one SDM and one SPADE per fold, trained on that fold's training patients only
# ("holdout": on all patients; its losses and mask fidelity are reported), then sampled on the same lesion
# maps. Each fold's generators also sample its test patients' maps (sample_*_heldout): held-out fidelity and
# the report's Figure 1.
# GPU jobs: `gpu=1` asks SLURM for a GPU; without one they run on the CPU. train_sdm asks for sdm.gpus GPUs of one
# node and runs a process on each (torchrun, nodulesynth.models.distributed).


rule train_sdm:
    input:
        training_stacks,
    output:
        model="results/generators/sdm/{fold}/model.pt",
        scans="results/generators/sdm/{fold}/training_scans.tsv",
        loss=report(
            "results/generators/sdm/{fold}/loss.tsv",
            category="Generators",
            subcategory="SDM",
            labels={"generator": "sdm", "fold": "{fold}"},
            caption="captions/generator_loss.rst",
        ),
    log:
        "results/logs/train_sdm/{fold}.log",
    benchmark:
        "results/benchmarks/train_sdm/{fold}.tsv"
    retries: 2
    conda:
        "../envs/generators.yaml"
    container:
        config["containers"]["generators"]
    threads: config["generators"]["threads"]
    resources:
        # sdm.gpus GPUs of one node: torchrun runs a process on each (params.launch), nothing for one GPU.
        gpu=config["sdm"]["gpus"],
        mem_mb=16000,
        runtime=lambda wildcards, threads, attempt: sizing.train_sdm_runtime(
            config["sdm"], config["generators"]["device"], threads, attempt
        ),
        # the training slices staged as uint8 memory maps under $TMPDIR (--tmp on SLURM)
        disk_mb=lambda wildcards, input: sizing.staging_disk_mb(input, config["sdm"]["image_size"]),
    params:
        sdm=sdm_training_params(),
        launch=sdm_launcher(),
        out_dir=subpath(output.model, parent=True),
        device=config["generators"]["device"],
    shell:
        "{params.launch} nodulesynth train-sdm --slices {input} --params {params.sdm:q} --out-dir {params.out_dir} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule sample_sdm:
    input:
        model="results/generators/sdm/{fold}/model.pt",
        stacks=training_stacks,
    output:
        directory("results/synth/sdm/{fold}"),
    log:
        "results/logs/sample_sdm/{fold}.log",
    benchmark:
        "results/benchmarks/sample_sdm/{fold}.tsv"
    retries: 2
    conda:
        "../envs/generators.yaml"
    container:
        config["containers"]["generators"]
    threads: config["generators"]["threads"]
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=lambda wildcards, input, threads, attempt: sizing.sample_sdm_runtime(
            config["sdm"], config["synthesis"], input.stacks, config["generators"]["device"], threads, attempt
        ),
    params:
        sampling=sdm_sampling_params(),
        synthesis=section("synthesis"),
        device=config["generators"]["device"],
    shell:
        "nodulesynth sample-sdm --model {input.model} --fold {wildcards.fold} --slices {input.stacks} "
        "--params {params.sampling:q} "
        "--synthesis {params.synthesis:q} --out-dir {output} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule train_spade:
    input:
        training_stacks,
    output:
        model="results/generators/spade/{fold}/model.pt",
        scans="results/generators/spade/{fold}/training_scans.tsv",
        loss=report(
            "results/generators/spade/{fold}/loss.tsv",
            category="Generators",
            subcategory="SPADE",
            labels={"generator": "spade", "fold": "{fold}"},
            caption="captions/generator_loss.rst",
        ),
    log:
        "results/logs/train_spade/{fold}.log",
    benchmark:
        "results/benchmarks/train_spade/{fold}.tsv"
    retries: 2
    conda:
        "../envs/generators.yaml"
    container:
        config["containers"]["generators"]
    threads: config["generators"]["threads"]
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=lambda wildcards, threads, attempt: sizing.train_spade_runtime(
            config["spade"], config["generators"]["device"], threads, attempt
        ),
        disk_mb=lambda wildcards, input: sizing.staging_disk_mb(input, config["spade"]["image_size"]),
    params:
        spade=section("spade"),
        out_dir=subpath(output.model, parent=True),
        device=config["generators"]["device"],
    shell:
        "nodulesynth train-spade --slices {input} --params {params.spade:q} --out-dir {params.out_dir} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule sample_spade:
    input:
        model="results/generators/spade/{fold}/model.pt",
        stacks=training_stacks,
    output:
        directory("results/synth/spade/{fold}"),
    log:
        "results/logs/sample_spade/{fold}.log",
    benchmark:
        "results/benchmarks/sample_spade/{fold}.tsv"
    retries: 2
    conda:
        "../envs/generators.yaml"
    container:
        config["containers"]["generators"]
    threads: config["generators"]["threads"]
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=lambda wildcards, input, threads, attempt: sizing.sample_spade_runtime(
            config["spade"], config["synthesis"], input.stacks, config["generators"]["device"], threads, attempt
        ),
    params:
        synthesis=section("synthesis"),
        device=config["generators"]["device"],
    shell:
        "nodulesynth sample-spade --model {input.model} --fold {wildcards.fold} --slices {input.stacks} "
        "--synthesis {params.synthesis:q} --out-dir {output} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


# The fold's generators on its test patients' maps: evaluation only (held-out mask fidelity, the report's
# Figure 1). Written outside results/synth/, which the downstream arms draw on, so nothing sampled here
# reaches a training set.
use rule sample_sdm as sample_sdm_heldout with:
    input:
        model="results/generators/sdm/{fold}/model.pt",
        stacks=heldout_stacks,
    output:
        directory("results/synth_heldout/sdm/{fold}"),
    log:
        "results/logs/sample_sdm_heldout/{fold}.log",
    benchmark:
        "results/benchmarks/sample_sdm_heldout/{fold}.tsv"
    wildcard_constraints:
        fold=r"\d+",


use rule sample_spade as sample_spade_heldout with:
    input:
        model="results/generators/spade/{fold}/model.pt",
        stacks=heldout_stacks,
    output:
        directory("results/synth_heldout/spade/{fold}"),
    log:
        "results/logs/sample_spade_heldout/{fold}.log",
    benchmark:
        "results/benchmarks/sample_spade_heldout/{fold}.tsv"
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
