"""Static checks: services bind to 127.0.0.1, no shell=True, nothing secret in params."""

from __future__ import annotations

import re
from pathlib import Path

from tasks.runtime.params import load_params

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("boss_core", "tasks", "flows", "bench") for p in (ROOT / d).rglob("*.py")]


def test_sources_are_found():
    assert len(SOURCES) > 40


def test_no_shell_true_anywhere():
    offenders = [str(p) for p in SOURCES if re.search(r"shell\s*=\s*True", p.read_text())]
    assert not offenders


def test_servers_bind_to_localhost_by_default():
    for path in SOURCES:
        assert "0.0.0.0" not in path.read_text(), path
    ui = (ROOT / "tasks/cli/ui.py").read_text()
    assert 'default="127.0.0.1"' in ui
    server = (ROOT / "tasks/runtime/servers.py").read_text()
    assert '"127.0.0.1"' in server and "--host" in server
    makefile = (ROOT / "Makefile").read_text()
    assert "0.0.0.0" not in makefile


def test_params_hold_no_secrets():
    flat = load_params(ROOT / "params.yaml").flat()
    secret = re.compile(r"pass(word)?|token|secret|api_?key|credential", re.IGNORECASE)
    assert not [k for k in flat if secret.search(k)]
