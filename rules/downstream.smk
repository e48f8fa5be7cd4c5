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
        downstream=section("downstream"),
        image_size=downstream_image_size(),
    shell:
        "nodulesynth downstream-dataset --arm {wildcards.arm} --fold {wildcards.fold} --manifest {input.manifest} "
        "--folds {input.folds} --slices {input.slices} --synth {input.synth} --image-size {params.image_size} "
        "--params {params.downstream:q} --out {output} > {log} 2>&1"


rule detect:
    input:
        data="results/downstream/data/{arm}/fold{fold}.npz",
        audit="results/audit/{arm}/fold{fold}.tsv",
    output:
        metrics="results/downstream/detection/{arm}/fold{fold}/metrics.json",
        predictions="results/downstream/detection/{arm}/fold{fold}/predictions.tsv",
        model="results/downstream/detection/{arm}/fold{fold}/model.pth",
        loss="results/downstream/detection/{arm}/fold{fold}/loss.tsv",
    log:
        "results/logs/detect/{arm}_{fold}.log",
    benchmark:
        "results/benchmarks/detect/{arm}_{fold}.tsv"
    retries: 2
    conda:
        "../envs/mmlab.yaml"
    container:
        config["containers"]["mmlab"]
    threads: config["downstream"]["threads"]
    resources:
        gpu=1,
        mem_mb=lambda wildcards, input, attempt: sizing.datasets_mem_mb(input.data, attempt),
        runtime=lambda wildcards, input, threads, attempt: sizing.detect_runtime(
            config["detection"], input.data, config["downstream"]["device"], threads, attempt
        ),
    params:
        detection=section("detection"),
        device=config["downstream"]["device"],
        work_dir=subpath(output.metrics, parent=True),
    shell:
        "nodulesynth detect --data {input.data} --params {params.detection:q} --work-dir {params.work_dir} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule localize:
    input:
        data="results/downstream/data/{arm}/fold{fold}.npz",
        audit="results/audit/{arm}/fold{fold}.tsv",
    output:
        metrics="results/downstream/localization/{arm}/fold{fold}/metrics.json",
        predictions="results/downstream/localization/{arm}/fold{fold}/predictions.tsv",
        model="results/downstream/localization/{arm}/fold{fold}/model.pth",
        loss="results/downstream/localization/{arm}/fold{fold}/loss.tsv",
    log:
        "results/logs/localize/{arm}_{fold}.log",
    benchmark:
        "results/benchmarks/localize/{arm}_{fold}.tsv"
    retries: 2
    conda:
        "../envs/mmlab.yaml"
    container:
        config["containers"]["mmlab"]
    threads: config["downstream"]["threads"]
    resources:
        gpu=1,
        mem_mb=lambda wildcards, input, attempt: sizing.datasets_mem_mb(input.data, attempt),
        runtime=lambda wildcards, input, threads, attempt: sizing.localize_runtime(
            config["localization"], input.data, config["downstream"]["device"], threads, attempt
        ),
    params:
        localization=section("localization"),
        device=config["downstream"]["device"],
        work_dir=subpath(output.metrics, parent=True),
    shell:
        "nodulesynth localize --data {input.data} --params {params.localization:q} --work-dir {params.work_dir} "
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
