# The study as one self-contained HTML page (both tables with p-values, figures, provenance) and, where a Chromium
# prints it (report.pdf: auto | true | false, decided in nodulesynth.report.pdf.pdf_wanted), its PDF.


rule report:
    input:
        stats=rules.stats.output.tables,
        controls=CONTROLS_TABLE,
        metrics=rules.stats.input.metrics,
        predictions=rules.stats.input.predictions,
        data=expand("results/downstream/data/{arm}/fold{fold}.npz", arm=list(ARMS), fold=downstream_folds()),
        realism=expand("results/downstream/realism/fold{fold}.json", fold=downstream_folds()),
        leakage="results/audit/leakage.tsv",
        # Figure 1: each fold's generators on that fold's test patients' maps, and the folds naming them
        heldout=expand("results/synth_heldout/{generator}/{fold}", generator=GENERATORS, fold=downstream_folds()),
        folds="results/folds/folds.tsv",
        memorisation=expand(
            "results/audit/{arm}/fold{fold}.memorisation.tsv",
            arm=[arm for arm, generator in ARMS.items() if generator],
            fold=downstream_folds(),
        ),
        fidelity=expand("results/synth/{generator}/{fold}.fidelity.tsv", generator=GENERATORS, fold=generator_folds()),
        losses=expand("results/generators/{generator}/{fold}/loss.tsv", generator=GENERATORS, fold=generator_folds()),
        manifest="results/cohort/manifest.tsv",
        rejected="results/cohort/rejected.tsv",
    output:
        html=report("results/report/report.html", category="Study", caption="captions/report.rst"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    conda:
        "../envs/report.yaml"
    container:
        config["containers"]["report"]
    threads: 1
    resources:
        mem_mb=lambda wildcards, input, attempt: sizing.report_mem_mb(input.data, attempt),
        runtime=20,
    params:
        config=json.dumps(config, sort_keys=True),
    shell:
        "nodulesynth report --results results --config {params.config:q} --html {output.html} > {log} 2>&1"


rule report_pdf:
    input:
        rules.report.output.html,
    output:
        report("results/report/report.pdf", category="Study", caption="captions/report.rst"),
    log:
        "results/logs/report_pdf.log",
    benchmark:
        "results/benchmarks/report_pdf.tsv"
    conda:
        "../envs/report.yaml"
    container:
        config["containers"]["report"]
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        chromium=chromium_option(),
    shell:
        "nodulesynth report-pdf --html {input} --pdf {output} {params.chromium} > {log} 2>&1"
