"""The config reference, schemas/README.md, generated from schemas/config.schema.yaml: every key, its default
(the paper's study), the demo's value where config.yaml sets another, and its meaning, one table per section. The schema is the one place these are written;
tests/test_options.py checks that the page is up to date.

  python scripts/config_reference.py > schemas/README.md
"""

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"
DEMO = ROOT / "config.yaml"


def value_text(value) -> str:
    if value is None:
        return "null"
    return "`" + (json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)) + "`"


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def default_text(spec: dict) -> str:
    if "default" not in spec or spec["default"] == {}:
        return ""
    return value_text(spec["default"])


def meaning(spec: dict) -> str:
    text = " ".join(str(spec.get("description", "")).split())
    if "enum" in spec:
        choices = ", ".join(f"`{v}`" for v in spec["enum"])
        text = f"{text} (one of {choices})" if text else f"one of {choices}"
    return text.replace("|", "\\|")


def rows(properties: dict, prefix: str, demo: dict):
    for key, spec in properties.items():
        name = prefix + key
        if spec.get("type") == "object" and "properties" in spec:
            if spec.get("description"):
                yield name, "", "", meaning(spec)
            yield from rows(spec["properties"], name + ".", demo)
        else:
            default = default_text(spec)
            shown = value_text(demo[name]) if name in demo else ""
            yield name, default, shown if shown != default else "", meaning(spec)


def render(schema: dict, demo_config: dict) -> str:
    demo = flatten(demo_config)
    out = ["# Config keys", "",
           "Generated from `config.schema.yaml` and `config.yaml` by `scripts/config_reference.py`; edit those, not",
           "this page. A key left out of a config takes its default: the paper's study. The demo column is what",
           "`config.yaml` (the demo) sets instead; `snakemake --configfile my.yaml` replaces it, so a key your file",
           "leaves out takes the default again. A misspelt or mistyped key fails before any job runs, naming the key.",
           ""]
    for section, spec in schema["properties"].items():
        out += [f"## `{section}`", ""]
        if spec.get("description"):
            out += [meaning(spec), ""]
        out += ["| key | default | demo | meaning |", "|---|---|---|---|"]
        out += [f"| `{name}` | {default} | {shown} | {text} |"
                for name, default, shown, text in rows(spec.get("properties", {}), section + ".", demo)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render(yaml.safe_load(SCHEMA.read_text()), yaml.safe_load(DEMO.read_text())))
