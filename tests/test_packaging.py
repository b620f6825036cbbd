"""setup.cfg states ranges a cluster's container can satisfy, and this venv's exact pins satisfy them."""

import configparser
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def install_requires() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def test_the_stack_a_container_brings_is_a_range_not_a_pin():
    reqs = {r.name: r for r in install_requires()}
    for name in ("torch", "megatron-core"):
        assert not any(spec.operator == "==" for spec in reqs[name].specifier), reqs[name]
    # a container's torch 2.6+ and the supported megatron-core releases are accepted
    assert reqs["torch"].specifier.contains("2.6.0") and reqs["torch"].specifier.contains("2.11.0")
    for version in ("0.16.1", "0.19.2"):
        assert reqs["megatron-core"].specifier.contains(version)
    assert not reqs["megatron-core"].specifier.contains("0.20.0")   # not run anywhere yet


def test_this_environment_satisfies_every_requirement():
    for req in install_requires():
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), (req, installed)


def test_the_constraints_pin_what_setup_cfg_allows():
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    for req in install_requires():
        key = req.name.lower()
        if key in pins:
            assert req.specifier.contains(pins[key], prereleases=True), (req, pins[key])
