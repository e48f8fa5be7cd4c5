# Statistics over the folds: mean ± sd per task and arm, and paired tests of B and C against A that use
# each fold once (n = the number of folds).


rule stats:
    input:
        metrics=expand(
            "results/downstream/{task}/{arm}/fold{fold}/metrics.json",
            task=TASKS,
            arm=ARM_NAMES,
            fold=downstream_folds(),
        ),
        predictions=expand(
            "results/downstream/{task}/{arm}/fold{fold}/predictions.tsv",
            task=TASKS,
            arm=ARM_NAMES,
            fold=downstream_folds(),
        ),
    output:
        expand("results/stats/{task}_{table}.{ext}", task=TASKS, table=["summary", "tests"], ext=["tsv", "md", "tex"]),
    log:
        "results/logs/stats.log",
    benchmark:
        "results/benchmarks/stats.tsv"
    conda:
        "../envs/report.yaml"
    container:
        config["containers"]["report"]
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        stats=section("stats"),
        out_dir=subpath(output[0], parent=True),
    shell:
        "nodulesynth stats --metrics {input.metrics} --params {params.stats:q} --out-dir {params.out_dir} > {log} 2>&1"
