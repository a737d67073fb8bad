#!/usr/bin/env bash
# Mutation testing of the pure layers against the broker-free unit tests.
#
#   bash tests/mutation.sh                          # every pure module
#   bash tests/mutation.sh sidecar/policy/breaker.py sidecar/attempts.py
#   bash tests/mutation.sh --report                 # only print the scores of the last run
#
# What is mutated and which tests run is configured in pyproject.toml ([tool.mutmut]); the
# mutated copy lives in mutants/ (git-ignored). Every run retests all mutants of the modules
# it names; `rm -rf mutants` also drops mutmut's record of which tests cover which code (do
# that after editing existing tests; new tests are picked up on their own).
#
# First the broker-free tests run once with --no-broker, which fails the run if any of them
# (or a fixture's teardown) connects to RabbitMQ. Then each module is mutated and a score
# printed per module: killed / (mutants - equivalents), where the equivalent mutants are the
# ones listed, each with its reason, in tests/mutation-equivalents.md. The script exits
# non-zero when a module scores below 90%.
#
# Slow (several minutes on two cores, most of it waiting on the tests), so it is not part of
# every CI run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
MUTMUT=.venv/bin/mutmut
THRESHOLD=${MUTATION_THRESHOLD:-90}
# The pure layers; sidecar/core/ is picked up once it exists. Package __init__ files hold no
# logic here (a glob on one would select the whole package).
mapfile -t ALL_MODULES < <(
    find sidecar/policy sidecar/core sidecar/attempts.py sidecar/protocol.py \
        sidecar/store/records.py -name '*.py' ! -name __init__.py 2>/dev/null | sort
)

report_only=0
modules=()
for arg in "$@"; do
    case "$arg" in
        --report) report_only=1 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) modules+=("$arg") ;;
    esac
done
if [ ${#modules[@]} -eq 0 ]; then
    modules=("${ALL_MODULES[@]}")
fi

# The same test selection mutmut uses, read from pyproject.toml so the two cannot drift.
mapfile -t unit_tests < <(
    "$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]))'
)

if [ "$report_only" -eq 0 ]; then
    echo "== broker-free unit tests, with any broker connection failing the run"
    timeout 1800 "$PY" -m pytest -q -rfE -p no:cacheprovider --no-broker -m "not integration" \
        "${unit_tests[@]}"

    globs=()
    for module in "${modules[@]}"; do
        name=${module%.py}
        globs+=("${name//\//.}.*")
    done
    echo "== mutmut run ${globs[*]}"
    # mutmut reports surviving mutants with a zero exit code too; the score below decides.
    mkdir -p mutants
    timeout 14400 "$MUTMUT" run "${globs[@]}" > mutants/run.log 2>&1 || {
        tail -40 mutants/run.log
        echo "mutmut failed (full log: mutants/run.log)"
        exit 1
    }
fi

echo "== mutation score per module (threshold ${THRESHOLD}%)"
"$PY" - "$THRESHOLD" "${modules[@]}" <<'PY'
import json
import re
import sys
from pathlib import Path

threshold = float(sys.argv[1])
modules = sys.argv[2:]
# Lines of tests/mutation-equivalents.md that name a mutant: "- `name`: why".
equivalent = set(
    re.findall(r"^- `([^`]+)`", Path("tests/mutation-equivalents.md").read_text(), re.M)
)
KILLED = {1, 3, 36, 24, -24, 152, 255, 37}  # failed tests, pytest error, timeout, type check
failing = []
seen_equivalent = set()
print(f"{'module':32} {'mutants':>7} {'equiv':>5} {'killed':>6} {'survived':>8} {'score':>7}")
for module in modules:
    meta = Path("mutants") / (module + ".meta")
    if not meta.exists():
        print(f"{module:32} no results (not run yet?)")
        failing.append(module)
        continue
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    if not codes:
        print(f"{module:32} {0:7}   (nothing to mutate)")
        continue
    survived = []
    killed = excluded = 0
    for name, code in codes.items():
        if name in equivalent:
            seen_equivalent.add(name)
            excluded += 1
            if code in KILLED:
                print(f"  note: {name} is listed as equivalent but was killed")
        elif code in KILLED:
            killed += 1
        else:
            survived.append((name, code))
    counted = len(codes) - excluded
    score = 100.0 * killed / counted if counted else 100.0
    print(f"{module:32} {len(codes):7} {excluded:5} {killed:6} {len(survived):8} {score:6.1f}%")
    for name, code in survived:
        status = {0: "survived", 33: "no tests", 5: "no tests", None: "not checked"}.get(
            code, f"exit {code}"
        )
        print(f"    {status}: {name}")
    if score < threshold:
        failing.append(module)
stale = sorted(
    n for n in equivalent - seen_equivalent
    if any(n.startswith(m.removesuffix(".py").replace("/", ".") + ".") for m in modules)
)
for name in stale:
    print(f"  note: {name} is listed as equivalent but no longer exists")
if failing:
    print(f"below {threshold:.0f}%: {', '.join(failing)}")
    sys.exit(1)
print(f"every module at or above {threshold:.0f}%")
PY
