"""The cluster recipes in ``deploy/`` run as written.

SLURM: ``deploy/slurm/search.sbatch`` is run by bash (which ignores its ``#SBATCH`` lines) as two
concurrent array tasks against a fresh PostgreSQL database. Kubernetes: both manifests are
validated against a Kubernetes schema, and the worker container's command is run here with the
environment its pod would get. Both share exactly their ``--trials`` total, train the baseline
once, and never show the storage password (the URL carries one; trust auth accepts any).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "deploy" / "slurm" / "search.sbatch"
WORKERS = REPO / "deploy" / "kubernetes" / "workers.yaml"
POSTGRES = REPO / "deploy" / "kubernetes" / "postgres.yaml"
PASSWORD = f"pw-{uuid.uuid4().hex[:12]}"  # trust auth accepts it; it must show nowhere
STUDY = "all-digits"  # the default name of --study all --preset digits
RUN_TIMEOUT = 300  # seconds: a hung worker fails the test instead of stalling it


@pytest.fixture
def pw_url(pg_url: str) -> str:
    """A fresh PostgreSQL database whose URL carries :data:`PASSWORD` (trust auth ignores it)."""
    return pg_url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def _clean_env() -> dict[str, str]:
    """This process's environment without the knobs a recipe reads (set by each test) and with
    the repository importable however it is installed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PARETO_", "SLURM_", "JOB_COMPLETION"))
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


def _worker_argv(pid: int) -> list[str]:
    """The process's arguments once it is ``python -m search.run`` (the recipes exec into it),
    else an empty list."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    return argv if argv[1:3] == ["-m", "search.run"] else []


def _run_all(cmds: list[tuple[list[str], dict[str, str]]], cwd: Path) -> list[tuple[int, str, str]]:
    """Start the commands together; return (exit status, output, worker command line) of each:
    the command line is what a process listing shows of the worker."""
    procs, logs = [], []
    for i, (cmd, env) in enumerate(cmds):
        log = cwd / f"task-{i}.log"
        with open(log, "w") as fh:
            procs.append(
                subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            )
        logs.append(log)
    seen: list[list[str]] = [[] for _ in procs]
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() is None and not seen[i]:
                    seen[i] = _worker_argv(p.pid)
            if time.monotonic() > deadline:
                pytest.fail(f"the workers ran longer than {RUN_TIMEOUT} s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [
        (p.returncode, log.read_text(), " ".join(seen[i]))
        for i, (p, log) in enumerate(zip(procs, logs, strict=True))
    ]


def _check_study(url: str, store: Path, total: int) -> None:
    """The study holds exactly ``total`` finished trials, none left running or waiting, and the
    store one baseline."""
    trials = optuna.load_study(study_name=STUDY, storage=url).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == total, [t.state.name for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    baselines = [p for p in (store / "baselines").iterdir() if p.is_dir()]
    assert len(baselines) == 1, baselines
    assert (baselines[0] / "model.safetensors").is_file()


def _check_secret_hidden(results: list[tuple[int, str, str]]) -> None:
    for rc, out, cmdline in results:
        assert rc == 0, out
        assert cmdline, f"the recipe never ran python -m search.run:\n{out}"
        assert PASSWORD not in cmdline and "--storage" not in cmdline, cmdline
        assert PASSWORD not in out, out


# --- SLURM --------------------------------------------------------------------------------------


def _sbatch_options() -> dict[str, str]:
    opts = {}
    for line in SBATCH.read_text().splitlines():
        if m := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            opts[m.group(1)] = m.group(2) or ""
    return opts


def test_sbatch_has_no_creation_step_and_no_url_argument() -> None:
    text = SBATCH.read_text()
    commands = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "--trials 0" not in text
    assert not any("--storage" in ln for ln in commands), "the URL must come from $PARETO_STORAGE"
    opts = _sbatch_options()
    assert int(opts["cpus-per-task"]) >= 1
    assert "requeue" in opts
    # B: signals the batch shell, which the script exec's into the worker.
    assert re.fullmatch(r"B:(TERM|15)@\d+", opts["signal"]), opts["signal"]
    assert re.search(r"^exec python -m search\.run ", text, re.M)


@pytest.mark.slow
def test_sbatch_array_tasks_share_one_study(pw_url: str, tmp_path: Path) -> None:
    store, total = tmp_path / "store", 4
    venv = Path(sys.executable).parents[1]
    cmds = []
    for task in (0, 1):
        env = {
            **_clean_env(),
            "PARETO_STORAGE": pw_url,
            "PARETO_STORE": str(store),
            "PARETO_VENV": str(venv),
            "PARETO_PRESET": "digits",
            "PARETO_TRIALS": str(total),
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_CPUS_PER_TASK": "1",
        }
        cmds.append((["bash", str(SBATCH)], env))
    results = _run_all(cmds, tmp_path)
    _check_secret_hidden(results)
    _check_study(pw_url, store, total)


# --- Kubernetes ---------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _worker_container() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Job's pod spec, its worker container)."""
    pod = _one(_docs(WORKERS), "Job")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod, pod["containers"][0]


def test_manifests_are_valid_kubernetes() -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (test extra)"
    )
    version = kv.latest_version()
    for path in (WORKERS, POSTGRES):
        for doc in _docs(path):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(
                    f"{path.name}: {doc['kind']}/{doc['metadata']['name']} is not valid Kubernetes {version}: {exc}"
                )


def test_worker_job_survives_disruptions_and_reads_the_secret() -> None:
    job = _one(_docs(WORKERS), "Job")["spec"]
    pod, container = _worker_container()
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] >= job["completions"]
    # Preemption/eviction must not use up backoffLimit; podFailurePolicy requires Never.
    assert pod["restartPolicy"] == "Never"
    rules = job["podFailurePolicy"]["rules"]
    assert any(
        r["action"] == "Ignore" and {"type": "DisruptionTarget"} in r.get("onPodConditions", [])
        for r in rules
    )
    assert pod["terminationGracePeriodSeconds"] >= 60  # recording a trial takes seconds
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["cpu"] == requests["cpu"], "the CPU limit is what sizes the worker's threads"
    assert "memory" in limits and limits["nvidia.com/gpu"] == 1
    assert "--storage" not in " ".join(container["command"] + container["args"])
    # PARETO_STORAGE comes from the Secret that postgres.yaml defines, under a key it has.
    secret = _one(_docs(POSTGRES), "Secret")
    ref = next(e for e in container["env"] if e["name"] == "PARETO_STORAGE")["valueFrom"][
        "secretKeyRef"
    ]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    store = next(e for e in container["env"] if e["name"] == "PARETO_STORE")["value"]
    assert any(m["mountPath"] == store for m in container["volumeMounts"])


@pytest.mark.slow
def test_worker_container_command_runs_a_study(pw_url: str, tmp_path: Path) -> None:
    _, container = _worker_container()
    env = _clean_env()
    for entry in container["env"]:
        env[entry["name"]] = entry["value"] if "value" in entry else "from-secret"
    assert env["PARETO_STORAGE"] == "from-secret"
    store, total = tmp_path / "store", 2
    # What the pod gets from Kubernetes and the volume, and a small study instead of the default.
    env.update(
        {
            "PARETO_STORAGE": pw_url,
            "JOB_COMPLETION_INDEX": "0",
            "PARETO_STORE": str(store),
            "PARETO_PRESET": "digits",
            "PARETO_TRIALS": str(total),
            "PARETO_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    results = _run_all([(container["command"] + container["args"], env)], tmp_path)
    _check_secret_hidden(results)
    _check_study(pw_url, store, total)
