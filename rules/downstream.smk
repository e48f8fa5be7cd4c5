# The downstream study: per fold and arm (A real, B + SPADE, C + SDM, controls P, N) the slices at the study's
# size (downstream.image_size, else the generators'), then nodule detection (mmpretrain SE-ResNet-101) and localization (mmdet Faster R-CNN X101),
# trained only after the leakage audit passed. GPU jobs (`gpu=1`) run on the CPU where there is none.


rule downstream_dataset:
    input:
        manifest="results/cohort/manifest.tsv",
        folds="results/folds/folds.tsv",
        slices=fold_stacks,
        synth=arm_synthetic,
    output:
        "results/downstream/data/{arm}/fold{fold}.npz",
    log:
        "results/logs/downstream_dataset/{arm}_{fold}.log",
    benchmark:
        "results/benchmarks/downstream_dataset/{arm}_{fold}.tsv"
    retries: 1
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 1
    resources:
        mem_mb=lambda wildcards, input, attempt: sizing.downstream_dataset_mem_mb(
            input.slices, input.synth, downstream_image_size(), attempt
        ),
        runtime=lambda wildcards, input, attempt: sizing.downstream_dataset_runtime(input.slices, input.synth, attempt),
    params:
        downstream=lambda wildcards: section("downstream", DownstreamOptions.dataset_keys(wildcards.arm)),
        image_size=downstream_image_size(),
    shell:
        "nodulesynth downstream-dataset --arm {wildcards.arm} --fold {wildcards.fold} --manifest {input.manifest} "
        "--folds {input.folds} --slices {input.slices} --synth {input.synth} --image-size {params.image_size} "
        "--params {params.downstream:q} --out {output} > {log} 2>&1"


rule downstream_model:
    # Both tasks, one rule (wildcard task): detection (`nodulesynth detect`, mmpretrain SE-ResNet-101) and
    # localization (`nodulesynth localize`, mmdet Faster R-CNN) take the same inputs and write the same files.
    input:
        data="results/downstream/data/{arm}/fold{fold}.npz",
        audit="results/audit/{arm}/fold{fold}.tsv",
        load_from=task_load_from,
    output:
        metrics="results/downstream/{task}/{arm}/fold{fold}/metrics.json",
        predictions="results/downstream/{task}/{arm}/fold{fold}/predictions.tsv",
        model="results/downstream/{task}/{arm}/fold{fold}/model.pth",
        loss="results/downstream/{task}/{arm}/fold{fold}/loss.tsv",
    log:
        "results/logs/downstream_model/{task}/{arm}_{fold}.log",
    benchmark:
        "results/benchmarks/downstream_model/{task}/{arm}_{fold}.tsv"
    retries: 2
    conda:
        "../envs/mmlab.yaml"
    container:
        config["containers"]["mmlab"]
    threads: config["downstream"]["threads"]
    resources:
        gpu=1,
        mem_mb=lambda wildcards, input, attempt: sizing.datasets_mem_mb(input.data, attempt),
        runtime=lambda wildcards, input, threads, attempt: sizing.task_runtime(
            wildcards.task, config[wildcards.task], input.data, config["downstream"]["device"], threads, attempt
        ),
    params:
        command=lambda wildcards: TASK_COMMANDS[wildcards.task],
        options=lambda wildcards: section(wildcards.task),
        device=config["downstream"]["device"],
        work_dir=subpath(output.metrics, parent=True),
    shell:
        "nodulesynth {params.command} --data {input.data} --params {params.options:q} --work-dir {params.work_dir} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule realism:
    input:
        model="results/downstream/detection/A/fold{fold}/model.pth",
        data=expand("results/downstream/data/{arm}/fold{{fold}}.npz", arm=list(ARMS)),
    output:
        "results/downstream/realism/fold{fold}.json",
    log:
        "results/logs/realism/{fold}.log",
    benchmark:
        "results/benchmarks/realism/{fold}.tsv"
    retries: 2
    conda:
        "../envs/mmlab.yaml"
    container:
        config["containers"]["mmlab"]
    threads: config["downstream"]["threads"]
    resources:
        gpu=1,
        mem_mb=lambda wildcards, input, attempt: sizing.datasets_mem_mb(input.data, attempt),
        runtime=lambda wildcards, input, threads, attempt: sizing.realism_runtime(
            config["detection"], input.data, config["downstream"]["device"], threads, attempt
        ),
    params:
        detection=section("detection"),
        device=config["downstream"]["device"],
    shell:
        "nodulesynth realism --model {input.model} --data {input.data} --params {params.detection:q} "
        "--device {params.device} --threads {threads} --out {output} > {log} 2>&1"
