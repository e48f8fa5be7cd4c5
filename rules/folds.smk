# Patient-level folds: the generators and the downstream study split by patient, never by slice.


checkpoint folds:
    input:
        manifest="results/cohort/manifest.tsv",
        slices=slice_stacks,
    output:
        "results/folds/folds.tsv",
    log:
        "results/logs/folds.log",
    benchmark:
        "results/benchmarks/folds.tsv"
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        folds=section("folds"),
    shell:
        "nodulesynth folds --manifest {input.manifest} --slices {input.slices} --params {params.folds:q} --out {output} > {log} 2>&1"
