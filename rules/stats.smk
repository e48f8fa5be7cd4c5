# Statistics over the folds: mean ± sd per task and arm, paired tests of B and C against A and of C against B that
# use each fold once (n = the number of folds), the primary endpoints Holm-adjusted, and, where the control arms
# P and N run (downstream.controls), the controls table.

# controls.tsv: the stats step writes it where the control arms are among its metrics, i.e. where
# downstream.controls is on (ARM_NAMES then holds P and N).
CONTROLS_TABLE = ["results/stats/controls.tsv"] if config["downstream"].get("controls", True) else []


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
        **(
            {"controls": report(CONTROLS_TABLE[0], category="Study", caption="captions/controls.rst")}
            if CONTROLS_TABLE
            else {}
        ),
        tables=expand(
            "results/stats/{task}_{table}.{ext}", task=TASKS, table=["summary", "tests"], ext=["tsv", "md", "tex"]
        ),
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
        detection=section("detection"),
        out_dir=subpath(output[0], parent=True),
    shell:
        "nodulesynth stats --metrics {input.metrics} --params {params.stats:q} --detection {params.detection:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"
