# The data half of the DAG: the cohort, one ingestion and one lesion-map job per scan, the manifest.
# ingest, masks and qc of a scan share a group (scan_group, rules/common.smk): a cluster executor submits
# each group, `group-components: scan=N` scans' three steps, as one job; a local run ignores groups.


checkpoint cohort:
    input:
        annotations=config_file("cohort", "annotations", source="dicom"),
    output:
        scans="results/cohort/scans.tsv",
        annotations="results/cohort/annotations.csv",
        cohort_rejected="results/cohort/cohort_rejected.tsv",
        series="results/cohort/series.tsv",
        files=directory("results/cohort/files"),
        demo=directory("results/demo"),
    log:
        "results/logs/cohort.log",
    benchmark:
        "results/benchmarks/cohort.tsv"
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 4
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        cohort=section("cohort"),
        nodules=section("nodules"),
    shell:
        "mkdir -p {output.demo} && "
        "nodulesynth cohort --params {params.cohort:q} --nodules {params.nodules:q} --demo-dir {output.demo} "
        "--scans {output.scans} --annotations {output.annotations} "
        "--cohort-rejected {output.cohort_rejected} --series {output.series} --files-dir {output.files} "
        "--workers {threads} > {log} 2>&1"


rule ingest:
    input:
        scans="results/cohort/scans.tsv",
        annotations="results/cohort/annotations.csv",
        excluded=config_file("cohort", "annotations_excluded", source="dicom"),
    output:
        temp("results/volumes/{scan}.npz"),
    log:
        "results/logs/ingest/{scan}.log",
    benchmark:
        "results/benchmarks/ingest/{scan}.tsv"
    group:
        scan_group
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        cohort=section("cohort"),
        nodules=section("nodules"),
    shell:
        "nodulesynth ingest --scans {input.scans} --scan {wildcards.scan} --annotations {input.annotations} "
        "--params {params.cohort:q} --nodules {params.nodules:q} --out {output} > {log} 2>&1"


rule masks:
    input:
        "results/volumes/{scan}.npz",
    output:
        slices="results/slices/{scan}.npz",
        nodules="results/slices/{scan}.nodules.tsv",
        dropped="results/slices/{scan}.dropped.tsv",
        excluded="results/slices/{scan}.excluded.tsv",
    log:
        "results/logs/masks/{scan}.log",
    benchmark:
        "results/benchmarks/masks/{scan}.tsv"
    group:
        scan_group
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        masks=section("masks"),
        window=section("window"),
    shell:
        "nodulesynth masks --volume {input} --params {params.masks:q} --window {params.window:q} "
        "--slices {output.slices} --nodules {output.nodules} --dropped {output.dropped} "
        "--excluded {output.excluded} > {log} 2>&1"


rule qc:
    input:
        "results/slices/{scan}.npz",
    output:
        report(
            "results/qc/{scan}.png",
            category="Lesion maps",
            subcategory="QC montages",
            labels={"scan": "{scan}"},
            caption="captions/qc.rst",
        ),
    log:
        "results/logs/qc/{scan}.log",
    benchmark:
        "results/benchmarks/qc/{scan}.tsv"
    group:
        scan_group
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        qc_slices=config["report"]["qc_slices"],
    shell:
        "nodulesynth qc --slices {input} --count {params.qc_slices} --out {output} > {log} 2>&1"


rule manifest:
    input:
        scans="results/cohort/scans.tsv",
        cohort_rejected="results/cohort/cohort_rejected.tsv",
        slices=slice_stacks,
        dropped=lambda wildcards: expand("results/slices/{scan}.dropped.tsv", scan=scan_ids()),
    output:
        manifest="results/cohort/manifest.tsv",
        rejected="results/cohort/rejected.tsv",
        dropped="results/cohort/dropped_nodules.tsv",
    log:
        "results/logs/manifest.log",
    benchmark:
        "results/benchmarks/manifest.tsv"
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "nodulesynth manifest --scans {input.scans} --cohort-rejected {input.cohort_rejected} "
        "--slices {input.slices} --dropped {input.dropped} --manifest {output.manifest} "
        "--rejected {output.rejected} --dropped-nodules {output.dropped} > {log} 2>&1"
