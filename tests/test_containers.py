"""Containers and conda environments: one per step group, every pin from requirements.lock.

The workflow runs under `--use-singularity` with a recording stand-in for `apptainer` (tests/standins/apptainer;
no Apptainer can be installed here and Snakemake refuses the flag without one): the real Snakemake builds the
real `apptainer exec` command lines, the stand-in records them and runs each job's command on this host.
"""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO, load_script, run_snakemake

STANDINS = REPO / "tests" / "standins"
# The step group of every rule: a new rule chooses one here (its `container:` and `conda:` must agree).
RULES = {
    "data": ["cohort", "ingest", "masks", "qc", "manifest", "folds", "fidelity", "downstream_dataset", "audit",
             "leakage"],
    "generators": ["train_generator", "sample_generator", "sample_generator_heldout"],
    "mmlab": ["downstream_model", "realism"],
    "report": ["stats", "report", "report_pdf"],
}
GPU_RULES = {"train_generator", "sample_generator", "sample_generator_heldout", "downstream_model", "realism"}


lockreq = load_script("lock_requirements")
LOCK = lockreq.read_lock(REPO / "requirements.lock")


# --- the rules and their images -------------------------------------------------------------------------------

def rule_blocks():
    """rule name -> its text, for every rule and checkpoint of rules/*.smk. A rule made with `use rule PARENT as
    NAME with:` gets its own text followed by its parent's, so a directive it overrides is found first and one
    it inherits after."""
    blocks, derived = {}, {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        heads = r"^(?:(?:rule|checkpoint) (\w+)|use rule (\w+) as (\w+) with):\n"
        parts = re.split(heads, path.read_text(), flags=re.M)
        for name, parent, child, text in zip(parts[1::4], parts[2::4], parts[3::4], parts[4::4]):
            if name:
                blocks[name] = text
            else:
                derived[child] = (parent, text)
    for child, (parent, text) in derived.items():
        blocks[child] = text + blocks[parent]
    return blocks


def directive(block, name, pattern):
    match = re.search(rf"^    {name}:\n        {pattern}\n", block, re.M)
    return match and match.group(1)


def test_every_rule_runs_in_its_step_groups_image_and_env():
    blocks = rule_blocks()
    expected = {rule: group for group, rules in RULES.items() for rule in rules}
    assert set(blocks) == set(expected), "rules/*.smk and RULES here disagree: give a new rule its step group"
    for rule, block in blocks.items():
        container = directive(block, "container", r'config\["containers"\]\["(\w+)"\]')
        conda = directive(block, "conda", r'"\.\./envs/(\w+)\.yaml"')
        assert (container, conda) == (expected[rule],) * 2, f"rule {rule}: container {container}, conda {conda}"
        # train_generator asks for sdm.gpus GPUs for the SDM (generator_gpus), every other GPU rule for one
        gpu = re.search(r'^        gpu=(1|generator_gpus),$', block, re.M) is not None
        assert gpu == (rule in GPU_RULES), f"rule {rule}: gpu=1 {'declared' if gpu else 'missing'}"


def test_config_maps_every_step_group_to_an_image():
    config = yaml.safe_load((REPO / "config.yaml").read_text())["containers"]
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())["properties"]["containers"]
    assert set(config) == set(schema["properties"]) == set(lockreq.GROUPS)
    assert all(config[group] == f"containers/{group}.sif" for group in lockreq.GROUPS)


# --- one source of truth for the pins --------------------------------------------------------------------------

PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\s*={2,3}\s*\d")


def def_sections(text):
    """section name ('post', 'files from build', ...) -> list of its bodies, comments dropped."""
    sections, current = {}, None
    for line in text.splitlines():
        if line.startswith("%"):
            current = line[1:].strip()
            sections.setdefault(current, []).append([])
        elif current and not line.lstrip().startswith("#"):
            sections[current][-1].append(line)
    return {name: ["\n".join(body) for body in bodies] for name, bodies in sections.items()}


@pytest.mark.parametrize("group", sorted(lockreq.GROUPS))
def test_image_definition_installs_from_the_lock_and_names_no_version(group):
    text = (REPO / "containers" / f"{group}.def").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not PIN.search(code), f"containers/{group}.def pins a version itself: {PIN.search(code).group()}"
    sections = def_sections(text)
    final_files, final_post = sections["files"][-1], sections["post"][-1]
    assert "requirements.lock /opt/nodulesynth/requirements.lock" in final_files
    assert "scripts/lock_requirements.py /opt/nodulesynth/scripts/lock_requirements.py" in final_files
    assert "src /opt/nodulesynth/src" in final_files
    assert f"lock_requirements.py requirements {group} > /tmp/requirements.txt" in final_post
    assert re.search(r"pip install [^\n]*-c requirements\.lock[^\n]*(\n[^\n]*)?-r /tmp/requirements\.txt", final_post)
    assert "lock_requirements.py check" in final_post and "lock_requirements.py check" in sections["test"][-1]
    assert f"org.nodulesynth.step-group {group}" in sections["labels"][-1]


def test_mmlab_image_builds_mmcv_against_cuda_torch():
    sections = def_sections((REPO / "containers" / "mmlab.def").read_text())
    build = sections["post"][0]
    assert "pin torch" in build and "FORCE_CUDA=1" in build and "--no-build-isolation" in build
    assert "pin mmcv" in build and "-w /opt/wheels" in build
    # The kernels for every GPU the pinned torch supports (up to 12.0 for torch 2.13), from torch's own list.
    assert "mmcv_build.arch_list(torch.cuda.get_arch_list())" in build and 'TORCH_CUDA_ARCH_LIST="$archs"' in build
    assert "scripts/mmcv_build.py /opt/nodulesynth/scripts/mmcv_build.py" in sections["files"][0]
    assert "/opt/wheels /opt/wheels" in sections["files from build"][0]
    assert "--find-links /opt/wheels --only-binary mmcv" in sections["post"][1]
    assert "get_compiling_cuda_version() != 'not available'" in sections["test"][0]


@pytest.mark.parametrize("group", sorted(lockreq.GROUPS))
def test_a_new_lock_makes_new_conda_environments(group):
    """Snakemake names a conda environment from its file's text: a lock moving only mmcv (built after the yaml's
    pins) or a dependency pulled in (in the yaml through the lock as constraints) must change every env file."""
    for key in ("mmcv", "pillow"):
        name, op, version = LOCK[key]
        moved = {**LOCK, key: (name, op, version + ".post1")}
        assert lockreq.conda_env(group, moved) != lockreq.conda_env(group, LOCK), key


def test_report_image_has_chromium():
    post = def_sections((REPO / "containers" / "report.def").read_text())["post"][0]
    assert re.search(r"apt-get install [^\n]*\bchromium\b", post)


@pytest.mark.parametrize("group", sorted(lockreq.GROUPS))
def test_conda_env_equals_what_the_lock_gives(group):
    text = (REPO / "envs" / f"{group}.yaml").read_text()
    assert text == lockreq.conda_env(group, LOCK), (
        f"envs/{group}.yaml differs from the lock: python scripts/lock_requirements.py conda-env {group} "
        f"> envs/{group}.yaml")
    pip = yaml.safe_load(text)["dependencies"][-1]["pip"]
    pins = [Requirement(line) for line in pip if not line.startswith("-")]
    assert pins and all(str(req.specifier).lstrip("=") == LOCK[lockreq.normalize(req.name)][2] for req in pins)
    assert "-c ${NODULESYNTH_ROOT}/requirements.lock" in pip and "-e ${NODULESYNTH_ROOT}" in pip


def test_mmlab_env_builds_mmcv_after_torch_from_the_lock():
    pip = yaml.safe_load((REPO / "envs" / "mmlab.yaml").read_text())["dependencies"][-1]["pip"]
    assert "torch" in {Requirement(line).name for line in pip if not line.startswith("-")}
    assert not any(line.startswith("mmcv") for line in pip)
    deploy = (REPO / "envs" / "mmlab.post-deploy.sh").read_text()
    assert 'pip install --no-cache-dir --no-build-isolation -c "$NODULESYNTH_ROOT/requirements.lock" mmcv' in deploy
    assert "mmcv_build.py\" plan" in deploy and "mmcv_build.py\" check --cuda-ops" in deploy
    assert not PIN.search(deploy)


def test_pyproject_pins_agree_with_the_lock():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = project["project"]["dependencies"] + [
        line for extra in project["project"]["optional-dependencies"].values() for line in extra]
    requirements += project["build-system"]["requires"]
    for req in map(Requirement, requirements):
        key = lockreq.normalize(req.name)
        assert key in LOCK, f"pyproject.toml needs {req.name}, which requirements.lock does not pin"
        assert SpecifierSet(str(req.specifier)).contains(LOCK[key][2], prereleases=True), (
            f"pyproject.toml asks {req}, requirements.lock pins {LOCK[key][2]}")


def test_group_lists_are_pinned_and_their_dependencies_too():
    """Everything an image installs (the groups' packages and all they require) is pinned by the lock."""
    for group in lockreq.GROUPS:
        closure = dependency_closure(lockreq.GROUPS[group])
        assert not closure - set(LOCK), f"{group}: not pinned in requirements.lock: {sorted(closure - set(LOCK))}"


def test_lock_mismatches_name_drift_and_strangers():
    installed = {name: version for name, (_, _, version) in LOCK.items()}
    assert lockreq.lock_mismatches(installed, LOCK) == []
    installed.update({"numpy": "1.0.0", "left-pad": "1.3", "pip": "99.0", "wheel": "0.1"})
    problems = lockreq.lock_mismatches(installed, LOCK)
    assert len(problems) == 2
    assert any("numpy 1.0.0" in p and LOCK["numpy"][2] in p for p in problems)
    assert any("left-pad 1.3" in p and "not pinned" in p for p in problems)


def test_read_lock_names_the_bad_line(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\nnumpy==2.4.6\nscipy>=1\n")
    with pytest.raises(ValueError, match=r"requirements\.lock:3: .*scipy>=1"):
        lockreq.read_lock(lock)
    lock.write_text("numpy==2.4.6\nNumPy==2.4.6\n")
    with pytest.raises(ValueError, match="pinned twice"):
        lockreq.read_lock(lock)
    with pytest.raises(KeyError, match="left-pad"):
        lockreq.pinned(["numpy", "left-pad"], lockreq.read_lock(REPO / "requirements.lock"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "lock_requirements.py"), "--lock",
                           str(tmp_path / "absent.lock"), "requirements", "data"], capture_output=True, text=True)
    assert proc.returncode == 2 and "absent.lock" in proc.stderr


# --- each group holds what its rules import --------------------------------------------------------------------

def requires(dist):
    """Names of the distributions `dist` requires on this platform (no extras)."""
    try:
        lines = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    reqs = map(Requirement, lines)
    return [lockreq.normalize(r.name) for r in reqs if not r.marker or r.marker.evaluate({"extra": ""})]


def dependency_closure(names):
    todo, seen = [lockreq.normalize(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(requires(name))
    return seen


def module_path(module):
    base = REPO / "src" / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imported_names(nodes, package):
    """Modules imported by the Import/ImportFrom nodes in `nodes`; relative ones resolved within `package`."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            names.add(base)
            # `from nodulesynth import labels` imports the module nodulesynth.labels
            names |= {f"{base}.{alias.name}" for alias in node.names if module_path(f"{base}.{alias.name}").exists()}
    return names


def third_party_imports(roots):
    """Distributions imported, at any depth and in any function, from the nodulesynth modules `roots`."""
    todo, seen, outside = list(roots), set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages above it run too
        path = module_path(module)
        package = module if path.name == "__init__.py" else ".".join(parts[:-1])
        for name in imported_names(ast.walk(ast.parse(path.read_text())), package):
            if name.split(".")[0] == "nodulesynth":
                todo.append(name if module_path(name).exists() else name.rsplit(".", 1)[0])
            elif name.split(".")[0] not in sys.stdlib_module_names:
                outside.add(name.split(".")[0])
    return outside


def command_imports(command):
    """Modules imported by `nodulesynth COMMAND`: the top level of the entry point and of every command module
    (nodulesynth.cli imports them all), every command's parser (all are built), then its handler and the helpers
    it calls (of its module or of the commands package)."""
    commands = REPO / "src" / "nodulesynth" / "commands"
    handler, names, shared, functions = "cmd_" + command.replace("-", "_"), set(), {}, {}
    for path in [REPO / "src" / "nodulesynth" / "cli.py", *sorted(commands.glob("*.py"))]:
        tree = ast.parse(path.read_text())
        names |= imported_names(tree.body, "nodulesynth.commands")
        module_functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
        for name, function in module_functions.items():  # every command's parser is built, whichever runs
            if name.endswith(("_parser", "_parsers")):
                names |= imported_names(ast.walk(function), "nodulesynth")
        if path.name == "__init__.py":
            shared = module_functions
        elif handler in module_functions:
            functions = module_functions
    assert handler in functions, f"no {handler} in {commands}"
    functions = {**shared, **functions}
    # the command modules are counted by their top level and the functions the handler calls, not as a whole
    names = {n for n in names if n != "nodulesynth.commands" and not n.startswith("nodulesynth.commands.")}
    todo, seen = [handler], set()
    while todo:
        function = todo.pop()
        if function in seen:
            continue
        seen.add(function)
        nodes = list(ast.walk(functions[function]))
        names |= imported_names(nodes, "nodulesynth")
        todo += [n.func.id for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id in functions]
    return names


def test_each_step_group_holds_what_its_rules_import():
    distributions = importlib.metadata.packages_distributions()
    blocks = rule_blocks()
    for group, rules in RULES.items():
        closure = dependency_closure(lockreq.GROUPS[group]) | {"nodulesynth"}
        for rule in rules:
            for command in rule_commands(blocks[rule]):
                names = command_imports(command)
                ours = {n for n in names if n.split(".")[0] == "nodulesynth"}
                theirs = {n.split(".")[0] for n in names - ours} - set(sys.stdlib_module_names)
                needed = theirs | third_party_imports(ours)
                dists = {lockreq.normalize(d) for top in needed for d in distributions.get(top, [top])}
                assert not dists - closure, f"rule {rule} ({group} image) imports {sorted(dists - closure)}"


def rule_commands(block) -> list:
    """The `nodulesynth` commands a rule's shell runs: each value of its wildcard where the command names one."""
    from nodulesynth.commands.downstream import TASK_COMMANDS
    from nodulesynth.downstream.datasets import GENERATORS

    command = re.search(r'nodulesynth ([a-z{}._-]+) ', block).group(1)
    if "{wildcards.generator}" in command:
        return [command.replace("{wildcards.generator}", generator) for generator in GENERATORS]
    if command == "{params.command}":  # downstream_model: params.command is TASK_COMMANDS[task]
        return list(TASK_COMMANDS.values())
    return [command]


# --- Snakemake's apptainer command lines ----------------------------------------------------------------------

def test_profiles_pass_nv_to_apptainer():
    for profile in ("default", "slurm"):
        config = yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())
        assert "--nv" in config["apptainer-args"].split(), profile


def test_make_containers_builds_each_group_from_its_definition():
    proc = subprocess.run(["make", "-n", "-B", "containers"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    builds = re.findall(r"^apptainer build --force (\S+) (\S+)$", proc.stdout, re.M)
    assert builds == [(f"containers/{g}.sif", f"containers/{g}.def") for g in ["data", "generators", "mmlab", "report"]]


def test_an_image_is_rebuilt_when_a_file_it_copies_changes():
    """Each source a definition's %files copies (every file of a folder) is a prerequisite of its image."""
    database = subprocess.run(["make", "-p", "-n", "-q", "containers/data.sif"], cwd=REPO, capture_output=True,
                              text=True).stdout
    prerequisites = set(re.search(r"^containers/%\.sif:(.*)$", database, re.M).group(1).split())
    for definition in sorted((REPO / "containers").glob("*.def")):
        for block in re.findall(r"^%files\n(.*?)(?=^%|\Z)", definition.read_text(), re.M | re.S):
            for line in filter(str.strip, block.splitlines()):
                source = REPO / line.split()[0]
                files = [p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                         and not any(part.endswith(".egg-info") for part in p.parts)] if source.is_dir() else [source]
                missing = [str(p.relative_to(REPO)) for p in files if str(p.relative_to(REPO)) not in prerequisites]
                assert not missing, (definition.name, missing)


def exec_calls(log):
    """(image, options, command) of each recorded `apptainer exec`."""
    calls = []
    for record in map(json.loads, log.read_text().splitlines()):
        argv = [word for word in record["argv"][1:] if word not in ("--quiet", "--silent")]
        if argv[0] != "exec":
            continue
        rest = argv[1:]
        shell = next(i for i, word in enumerate(rest) if word in ("bash", "sh") and rest[i + 1:i + 2] == ["-c"])
        calls.append((rest[shell - 1], rest[:shell - 1], rest[shell:]))
    return calls


def test_use_singularity_runs_each_rule_in_its_groups_image(tmp_path, monkeypatch):
    """The first rules of the demo and one GPU rule (train_generator for the SDM, 2 steps), through
    `--use-singularity`."""
    images = tmp_path / "images"
    images.mkdir()
    for group in ("data", "mmlab", "report"):
        (images / f"{group}.sif").write_text("placeholder: the stand-in only checks it exists\n")
    uri = "docker://registry.example.org/nodulesynth/generators:0.1.0"
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["cohort"]["demo"].update(n_scans=2, image_size=96)
    config["folds"]["k"] = 2
    config["sdm"].update(max_steps=2, checkpoint_every=2, log_every=2)
    config["containers"] = {group: str(images / f"{group}.sif") for group in ("data", "mmlab", "report")}
    config["containers"]["generators"] = uri
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "apptainer.log"
    monkeypatch.setenv("PATH", f"{STANDINS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("APPTAINER_STANDIN_LOG", str(log))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    run_snakemake(tmp_path, "--configfile", str(tmp_path / "config.yaml"), "--use-singularity",
                  "results/generators/sdm/holdout/model.pt")

    records = [json.loads(line)["argv"][1:] for line in log.read_text().splitlines()]
    pulls = [argv for argv in records if argv[0] == "pull"]
    assert len(pulls) == 1 and pulls[0][-1] == uri  # the URI image is pulled once, the local ones never
    pulled = tmp_path / ".snakemake" / "singularity" / pulls[0][2]

    ran = {}
    for image, options, command in exec_calls(log):
        rule = re.search(r"nodulesynth ([a-z-]+) ", command[-1]).group(1).replace("-", "_")
        ran.setdefault(rule, []).append((image, options))
        assert ("--home", str(tmp_path)) in zip(options, options[1:])
    assert {rule: len(calls) for rule, calls in ran.items()} == {
        "cohort": 1, "ingest": 2, "masks": 2, "manifest": 1, "folds": 1, "train_sdm": 1}
    for rule, calls in ran.items():
        for image, options in calls:
            if rule in RULES["data"]:
                assert image == str(images / "data.sif"), rule
            else:
                assert image == str(pulled) and uri in pulled.read_text(), rule
            # Set once in profiles/default (Snakemake has no per-rule apptainer args): every rule gets it.
            assert "--nv" in options, rule
    # The jobs ran (on this host, through the stand-in) and wrote the data contract.
    assert len(list((tmp_path / "results" / "slices").glob("*.npz"))) == 2
    assert (tmp_path / "results" / "generators" / "sdm" / "holdout" / "model.pt").stat().st_size > 0
