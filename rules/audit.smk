# The leakage audit: before a downstream model of an arm and fold trains, prove that no test patient's
# data reached its training set (patients and series, the generator's training list, the sources of
# its synthetic slices, near-duplicate images). A violation fails the job and so that arm's training.
# One audit per arm and fold, so that resampling one generator reruns only the arm that uses it.


rule audit:
    input:
        manifest="results/cohort/manifest.tsv",
        folds="results/folds/folds.tsv",
        generators=arm_generator_files,
        synth=arm_synthetic,
        data="results/downstream/data/{arm}/fold{fold}.npz",
    output:
        audit="results/audit/{arm}/fold{fold}.tsv",
        # per synthetic slice: nearest-neighbour score to the generator's training patients and to the fold's
        # test patients (the report's memorisation figure); the header only for arms without synthetic slices
        memorisation="results/audit/{arm}/fold{fold}.memorisation.tsv",
    log:
        "results/logs/audit/{arm}_{fold}.log",
    benchmark:
        "results/benchmarks/audit/{arm}_{fold}.tsv"
    retries: 1
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    # The near-duplicate scores are float32 matrix products (BLAS, threaded): about 1.2 s per million train x
    # test pairs on one core (18 views of each test image); threads, runtime and memory follow the dataset's
    # counts (one thread for an audit of under a minute, which would otherwise wait for 4 free cores).
    threads: lambda wildcards, input: sizing.audit_threads(input.data, input.synth, 4)
    resources:
        mem_mb=lambda wildcards, input, attempt: sizing.audit_mem_mb(
            input.data, input.synth, config["downstream"]["near_duplicate_size"], attempt
        ),
        runtime=lambda wildcards, input, threads, attempt: sizing.audit_runtime(
            input.data, input.synth, threads, attempt
        ),
    params:
        downstream=section("downstream", DownstreamOptions.AUDIT_KEYS),
    shell:
        "nodulesynth audit --manifest {input.manifest} --folds {input.folds} --generators {input.generators} "
        "--synth {input.synth} --data {input.data} --params {params.downstream:q} --out {output.audit} "
        "--memorisation {output.memorisation} > {log} 2>&1"


rule leakage:
    input:
        expand("results/audit/{arm}/fold{fold}.tsv", arm=ARM_NAMES, fold=downstream_folds()),
    output:
        report("results/audit/leakage.tsv", category="Leakage audit", caption="captions/leakage.rst"),
    log:
        "results/logs/leakage.log",
    benchmark:
        "results/benchmarks/leakage.tsv"
    conda:
        "../envs/data.yaml"
    container:
        config["containers"]["data"]
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "nodulesynth leakage --audits {input} --out {output} > {log} 2>&1"
