"""One reading of a config section for every stage's options (nodulesynth.options.from_section)."""

import pytest

from nodulesynth.data.cohort import CohortOptions, NoduleOptions
from nodulesynth.data.folds import FoldOptions
from nodulesynth.data.window import WindowOptions, window_from_config
from nodulesynth.downstream.datasets import DownstreamOptions
from nodulesynth.downstream.detection import DetectionOptions
from nodulesynth.downstream.localization import LocalizationOptions
from nodulesynth.masks.segment import MaskOptions
from nodulesynth.models.sdm import SDMOptions
from nodulesynth.models.spade.options import SPADEOptions
from nodulesynth.models.synthesis import SynthesisOptions


@pytest.mark.parametrize("cls, name", [(SDMOptions, "sdm"), (SPADEOptions, "spade"), (DetectionOptions, "detection"),
                                       (LocalizationOptions, "localization"), (MaskOptions, "masks"),
                                       (FoldOptions, "folds"), (SynthesisOptions, "synthesis"),
                                       (DownstreamOptions, "downstream"), (CohortOptions, "cohort"),
                                       (NoduleOptions, "nodules")])
def test_unknown_key_names_the_section_and_key(cls, name):
    with pytest.raises(KeyError, match=rf"unknown option {name}\.no_such_key"):
        cls.from_config({"no_such_key": 1})


def test_yaml_strings_become_the_fields_types():
    # PyYAML reads 1e-4 as a string; JSON params bring lists where the options keep tuples
    sdm = SDMOptions.from_config({"lr": "1e-4", "channel_mult": [1, 2], "max_steps": "30000", "bf16": "false"})
    assert (sdm.lr, sdm.channel_mult, sdm.max_steps, sdm.bf16) == (1e-4, (1, 2), 30000, False)
    spade = SPADEOptions.from_config({"num_upsampling": "3", "vgg_weights": None, "lr_g": "2e-4"})
    assert (spade.num_upsampling, spade.vgg_weights, spade.lr_g) == (3, None, 2e-4)
    loc = LocalizationOptions.from_config({"anchor_scales": "1, 2", "clip_grad": None, "weight_decay": "1e-4"})
    assert (loc.anchor_scales, loc.clip_grad, loc.weight_decay) == ((1.0, 2.0), None, 1e-4)
    assert DetectionOptions.from_config({"lr_steps": [3, "4"]}).lr_steps == [3, 4]


def test_a_value_that_cannot_be_read_names_the_key():
    with pytest.raises(ValueError, match="sdm.max_steps: cannot read '1.5'"):
        SDMOptions.from_config({"max_steps": "1.5"})
    with pytest.raises(ValueError, match="masks.body_threshold"):
        MaskOptions.from_config({"body_threshold": "high"})


@pytest.mark.parametrize("cls, name", [(FoldOptions, "folds"), (SynthesisOptions, "synthesis"),
                                       (DownstreamOptions, "downstream"), (WindowOptions, "window"),
                                       (CohortOptions, "cohort"), (NoduleOptions, "nodules")])
def test_the_sections_options_default_to_the_schemas_study(cls, name):
    """Every section is read by one options class (no dict with its own defaults and wording beside it), and the
    class's defaults are the schema's, so a command run by hand does what the workflow does."""
    from dataclasses import fields

    import yaml

    from conftest import REPO

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())["properties"][name]["properties"]
    assert {f.name for f in fields(cls)} == set(schema)
    for f in fields(cls):
        assert getattr(cls(), f.name) == schema[f.name].get("default"), f.name


def test_the_window_is_read_as_every_other_section():
    assert window_from_config({"min_hu": "-1200", "max_hu": 600}) == (-1200.0, 600.0)
    with pytest.raises(KeyError, match=r"unknown option window\.width"):
        window_from_config({"width": 1400})
    with pytest.raises(ValueError, match="window.min_hu .* must be below"):
        window_from_config({"min_hu": 400, "max_hu": -1000})


def test_config_reference_page_is_generated_from_the_schema_and_the_demo_config():
    """schemas/README.md (the config keys the README points to) is what scripts/config_reference.py makes of the
    schema and config.yaml now: a key added, a default or a description changed without regenerating it fails."""
    import yaml

    from conftest import REPO, load_script

    reference = load_script("config_reference")
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    page = reference.render(schema, demo)
    assert (REPO / "schemas" / "README.md").read_text() == page, (
        "schemas/README.md is out of date: python scripts/config_reference.py > schemas/README.md")
    # Every leaf key of the schema has its row, with the demo's value beside the default where they differ.
    assert "| `sdm.image_size` | `256` | `64` |" in page
    assert "| `folds.k` | `5` |  |" in page
    assert page.count("\n| `") == sum(len(list(reference.rows(spec.get("properties", {}), f"{name}.", {})))
                                      for name, spec in schema["properties"].items())


@pytest.mark.parametrize("key, value, message", [
    ("source", "pacs", "cohort.source must be demo, lidc or dicom, not 'pacs'"),
    ("patient_id", "PatientName", "cohort.patient_id must be one of PatientID, StudyInstanceUID, folder"),
    ("tilted", "skip", "cohort.tilted must be one of reject, resample, not 'skip'"),
    ("variable_spacing", "fill", "cohort.variable_spacing must be one of reject, resample, not 'fill'")])
def test_a_cohort_choice_outside_the_schemas_names_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        CohortOptions.from_config({key: value})


def test_the_cohort_section_as_the_rules_pass_it():
    cohort = CohortOptions.from_config({"source": "dicom", "dicom_root": "/data/ct", "annotations": "a.csv",
                                        "lidc_root": None, "demo": {"n_scans": 4}, "tilted": "resample"})
    assert (cohort.source, cohort.dicom_root, cohort.lidc_root, cohort.demo, cohort.tilted) == (
        "dicom", "/data/ct", None, {"n_scans": 4}, "resample")
    assert NoduleOptions.from_config({"min_readers": "2", "min_diameter_mm": 4}) == NoduleOptions(2, 4.0)
