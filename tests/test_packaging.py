"""The configs live in the top-level conf/ folder; an installed wheel must carry them, so the
installed command composes the same config from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_carries_the_configs_and_the_installed_command_finds_them(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("dialect_circuits-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_yaml = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert {f"pipeline/conf/{n}" for n in repo_yaml} <= names
    assert "pipeline/data/pairs.csv" in names
    assert {"pipeline/data/lexicon/verbs.tsv", "pipeline/data/lexicon/adjectives.tsv", "pipeline/data/generate.py"} <= names
    # Every module and data file of the source package ships (a subpackage missing from
    # pyproject's explicit package list would otherwise only fail on a user's machine).
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "pipeline").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert shipped <= names, sorted(shipped - names)
    assert {f"pipeline/data/tasks/{t}/{k}.txt" for t in ("traits", "conviction", "death_penalty", "occupations")
            for k in ("templates", "attributes")} <= names
    templates = {p.relative_to(REPO).as_posix() for p in (REPO / "pipeline" / "templates").rglob("*") if p.is_file()}
    assert templates and templates <= names, templates - names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", "import pipeline.config as c; print(c.CONF_DIR)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(site / "pipeline" / "conf")
    job = subprocess.run([sys.executable, "-m", "pipeline", "--cfg", "job", "direction=sae_clean"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    assert "name: sae_clean" in job.stdout
    page = subprocess.run([sys.executable, "-c", "from pathlib import Path; from pipeline.stages.report import build_report; "
                           "print(build_report(Path('.')))"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert page.returncode == 0 and "How to read this run" in page.stdout, page.stderr


def test_users_own_presets_come_in_with_config_dir(tmp_path):
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "my_preset.yaml").write_text("# @package _global_\ndataset:\n  max_prompts: 7\n")
    job = subprocess.run([sys.executable, "-m", "pipeline", "--config-dir", str(tmp_path / "my_conf"),
                          "+experiment=my_preset", "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    assert "max_prompts: 7" in job.stdout
