"""benchmarks/cost.py: the study's GPU-hours from FLOPs counted on the real networks.

A tiny config (the demo's generators) and a tiny cohort go through the same code as the defaults; the counts are
checked against hand counts, the sampling count against the sampling plans' rules, and the last line's format.
"""

import importlib.util
import json
import re

import pytest
import torch
import yaml

from conftest import REPO

TINY_COHORT = dict(scans=10, slices=1000, nodule_fraction=0.05)


@pytest.fixture(scope="module")
def cost():
    spec = importlib.util.spec_from_file_location("cost", REPO / "benchmarks" / "cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """The demo's tiny generators; everything else the paper's (the downstream networks are the study's)."""
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    path = tmp_path_factory.mktemp("cost") / "tiny.yaml"
    path.write_text(yaml.safe_dump({"sdm": {**demo["sdm"], "sampler": "dpmpp_2m_sde", "sample_steps": 25},
                                    "spade": demo["spade"]}))
    return path


def by_name(stages):
    return {stage.name: stage for stage in stages}


def test_roi_head_and_training_counts_match_hand_counts(cost):
    from nodulesynth.cost import localization_flops
    from nodulesynth.downstream.localization import LocalizationOptions
    from nodulesynth.models.sdm.options import SDMOptions

    # Faster R-CNN's Shared2FCBBoxHead: 256x7x7 -> 1024 -> 1024, then 2 classes (nodule, background) and 4 box
    # deltas; 2 FLOPs a multiply-add.
    loc = localization_flops(LocalizationOptions(), 64)
    assert loc["per_roi"] == 2 * (256 * 7 * 7 * 1024 + 1024 * 1024 + 1024 * 2 + 1024 * 4)
    assert loc["train"] == loc["dense"] + 512 * loc["per_roi"]

    # A network of convolutions: backward costs two forwards (input and weight gradients; the first layer's
    # input gradient is not needed), so training is a bit under 3 forwards; recomputing the residual blocks in
    # the backward pass (grad_checkpoint) adds nearly one forward more.
    tiny = SDMOptions(image_size=32, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(16,), num_head_channels=16, spade_hidden=16)
    plain = cost.sdm_flops(tiny.replace(grad_checkpoint=False))
    recomputed = cost.sdm_flops(tiny.replace(grad_checkpoint=True))
    assert plain["forward"] == recomputed["forward"] > 0
    assert 2.7 < plain["train"] / plain["forward"] <= 3.0
    assert 3.5 < recomputed["train"] / recomputed["forward"] <= 4.0


def test_sampled_maps_follow_the_sampling_plans(cost):
    cohort = cost.Cohort(scans=10, slices=1000, nodule_fraction=0.05)  # 100 slices, 5 with a nodule, a scan
    config = {"synthesis": {"mask_source": "real", "max_slices_per_scan": 4, "nodule_maps_per_scan": None}}
    # 4 evenly spaced + all 5 nodule maps, less the evenly spaced ones that hold a nodule (5 % of 4)
    assert cost.maps_per_scan(config["synthesis"], cohort) == pytest.approx(4 + 5 - 0.2)
    # every fold generator samples its training and its test scans, i.e. every scan once
    assert cost.sampled_maps(config, cohort) == pytest.approx(10 * 8.8)
    every = {**config["synthesis"], "max_slices_per_scan": None}
    assert cost.maps_per_scan(every, cohort) == 100


def test_paper_sampler_costs_forty_times_the_study_sampler(cost, tiny_config):
    from nodulesynth.models.sdm.options import SDMOptions

    config = cost.study_config(tiny_config)
    cohort = cost.Cohort(**TINY_COHORT)
    study = SDMOptions.from_config(config["sdm"])
    assert (study.sampler, study.sample_steps) == ("dpmpp_2m_sde", 25)
    ours = by_name(cost.study_stages(config, cohort, study))
    paper = by_name(cost.study_stages(config, cohort, study.replace(sampler="ddpm", sample_steps=1000)))
    assert paper["sample SDM"].flops / ours["sample SDM"].flops == pytest.approx(40)
    assert all(paper[name].flops == ours[name].flops for name in ours if name != "sample SDM")
    # 5 folds + holdout generators; 5 arms (controls on, the default) x 5 folds per task
    assert ours["train SDM"].count == ours["train SPADE"].count == 6
    assert ours["detection"].count == ours["localization"].count == 25


def test_last_line_and_measured_throughput(cost, tiny_config, tmp_path, capsys):
    from nodulesynth.models.sdm.options import SDMOptions

    args = ["--config", str(tiny_config), "--scans", "10", "--slices", "1000"]
    total = cost.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"total: ([\d,.]+) GPU-hours \((H100 SXM), (.+)\)", lines[-1])
    assert match, lines[-1]
    assert float(match.group(1).replace(",", "")) == pytest.approx(total, abs=0.5)
    assert "346 bf16 TFLOP/s" in match.group(3)
    assert any(line.startswith("with the paper's sampler (ddpm 1000) on every lung slice") for line in lines)
    assert not any(line.startswith("above the target") for line in lines)

    # Over the target: the dominant stage is named, and the total is still the last line
    cost.main(args + ["--target", "1e-9"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(re.match(r"above the target of 1e-09 GPU-hours: .+ takes \d+ %", line) for line in lines)
    assert lines[-1].startswith("total: ")

    # Measured SDM rates replace the assumption for the SDM stages: 6 generators x 40 steps x 8 images at
    # 320 images/s is 6 s; sampling 0.5 s an image over 10 guided steps is 0.05 s an evaluation.
    options = SDMOptions.from_config(cost.study_config(tiny_config)["sdm"])
    record = {"device": "NVIDIA H100 80GB HBM3", "options": json.loads(json.dumps(options.to_dict())),
              "train_images_per_s": 320.0,
              "sampling": {"sampler": "dpmpp_2m", "steps": 10, "guidance_scale": 1.5, "seconds_per_image": 0.5}}
    measured = tmp_path / "sdm.json"
    measured.write_text(json.dumps(record))
    cost.main(args + ["--measured", str(measured)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("train SDM"))
    assert float(row.split()[4]) == pytest.approx(6 * 40 * 8 / 320 / 3600, abs=0.05)
    assert "[measured]" in row
    assert out.strip().splitlines()[-1].startswith("total: ")
    assert "SDM measured on NVIDIA H100 80GB HBM3" in out.strip().splitlines()[-1]

    # ... but not those of another network
    record["options"]["model_channels"] = 256
    measured.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="model_channels"):
        cost.main(args + ["--measured", str(measured)])


def test_throughput_file_of_the_sdm_benchmark_is_read_by_cost(cost, tmp_path):
    """benchmarks/sdm.py --write-throughput writes what cost.py --measured reads."""
    spec = importlib.util.spec_from_file_location("sdm_benchmark", REPO / "benchmarks" / "sdm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    options = bench.SDMOptions(**bench.SMALL)
    path = tmp_path / "throughput.json"
    bench.write_throughput(path, torch.device("cpu"), options, 12.5, 0.2, 25, 4)
    record = cost.read_measured(path, options)
    assert record["train_images_per_s"] == 12.5 and record["sampling"]["steps"] == 25
