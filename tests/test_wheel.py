"""The built wheel installs and runs on its own: entry point, package data, no reliance on the source tree."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = dist.glob("tunesmith-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # dependencies come from this environment's site-packages (a plain path entry: its editable-install
    # hook is not loaded), tunesmith itself only from the wheel
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # PYTHONPATH cleared for pip too: a source tree on it (with its egg-info) reads as tunesmith already installed
    env = {**os.environ, "PYTHONPATH": "", "COLUMNS": "200"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300, env=env)
    where = tmp_path / "elsewhere"
    where.mkdir()

    def run(*args):
        return subprocess.run(args, cwd=where, env=env, capture_output=True, text=True, timeout=120)

    probe = run(str(venv / "bin/python"), "-c", "import tunesmith, importlib.resources as r; print(tunesmith.__file__); "
                "print(all(r.files('tunesmith.serve.dashboard').joinpath('static', f).is_file() for f in "
                "('dashboard.html', 'dashboard.css', 'dashboard.js'))); "
                "from tunesmith.models.random_weights import architectures; print(','.join(architectures()))")
    assert probe.returncode == 0, probe.stderr
    module_file, has_dashboard, archs = probe.stdout.split()
    assert module_file.startswith(str(venv)) and has_dashboard == "True", probe.stdout
    assert {"llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "gemma-2-2b"} <= set(archs.split(","))  # package data
    help_ = run(str(venv / "bin/tunesmith"), "--help")
    assert help_.returncode == 0 and "serve" in help_.stdout, help_.stderr
    models = run(str(venv / "bin/tunesmith"), "models", "list")
    assert models.returncode == 0 and "smollm2-135m-instruct" in models.stdout, models.stdout + models.stderr
