"""The docs match the code: the configuration page is generated from the dataclasses and
current, the README stays a front door, and the pages it links exist."""
import os
import re
import subprocess
import sys

from pipeline import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configuration_page_is_current():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        page = f.read()
    assert page == config.markdown(), (
        "docs/configuration.md is stale: run python -m pipeline.config --markdown > "
        "docs/configuration.md")


def test_every_config_key_has_a_line_of_documentation():
    rows = [line for line in config.markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(v) for v in config.PipelineConfig().to_dict().values())
    empty = [r.split("|")[1].strip() for r in rows if not r.split("|")[3].strip()]
    assert not empty, f"keys without a line comment in pipeline/config/sections.py: {empty}"


def test_the_page_is_what_the_module_prints():
    out = subprocess.run([sys.executable, "-m", "pipeline.config", "--markdown"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out == config.markdown()


def test_readme_is_a_front_door_and_its_links_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links
    for link in links:
        assert os.path.exists(os.path.join(ROOT, link)), link


def test_no_measurement_logs_in_code_comments():
    pattern = re.compile(r"[0-9]+(\.[0-9]+)? ?(ms|s)\b.*(→|->|against|was)")
    for top in ("pipeline", "jobs"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(folder, name)) as f:
                        for n, line in enumerate(f, 1):
                            assert not pattern.search(line), f"{folder}/{name}:{n}: {line}"
