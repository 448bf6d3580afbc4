#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: does `ollamux gpus --json` (NVML through nvidia-ml-py) agree
# with nvidia-smi on each GPU's index, UUID, total memory and used memory?
#
#   scripts/device-check.sh            # uses $OLLAMUX, else `ollamux` on PATH, else python -m proxy
#   OLLAMUX="python3 -m proxy" scripts/device-check.sh
#
# Exit codes: 0 they agree, 1 a mismatch (or ollamux failed), 2 no nvidia-smi here (nothing to
# compare). Index, UUID and total memory must match exactly (total to the MiB, as nvidia-smi rounds
# down); used memory moves between the two readings and nvidia-smi leaves out memory the driver
# reserves, which NVML's classic call counts, so it may differ by max(1 GiB, 3 % of total).
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "device-check: nvidia-smi is not on PATH: this is not a machine with an NVIDIA driver" >&2
    exit 2
fi

if [ -n "${OLLAMUX:-}" ]; then
    read -r -a ollamux <<<"$OLLAMUX"
elif command -v ollamux >/dev/null 2>&1; then
    ollamux=(ollamux)
elif [ -x .venv/bin/python ]; then
    ollamux=(.venv/bin/python -m proxy)
else
    ollamux=(python3 -m proxy)
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== nvidia-smi -L"
nvidia-smi -L
echo "== ${ollamux[*]} gpus"
"${ollamux[@]}" gpus || { echo "device-check: \`${ollamux[*]} gpus\` failed" >&2; exit 1; }

if ! "${ollamux[@]}" gpus --json >"$work/ollamux.json" 2>"$work/ollamux.err"; then
    echo "device-check: \`${ollamux[*]} gpus --json\` failed:" >&2
    cat "$work/ollamux.err" >&2
    exit 1
fi
nvidia-smi --query-gpu=index,uuid,memory.total,memory.used --format=csv >"$work/smi.csv"
echo "== nvidia-smi --query-gpu=index,uuid,memory.total,memory.used --format=csv"
cat "$work/smi.csv"

PYTHON="$(command -v python3 || command -v python)"
"$PYTHON" - "$work/ollamux.json" "$work/smi.csv" <<'EOF'
import csv
import json
import sys

MIB = 1024 * 1024


def mib(cell: str) -> int:
    """'81559 MiB' (nvidia-smi's csv with units) -> 81559."""
    return int(cell.strip().split()[0])


with open(sys.argv[1]) as f:
    ours = {g["index"]: g for g in json.load(f)["gpus"]}
with open(sys.argv[2], newline="") as f:
    rows = list(csv.reader(f, skipinitialspace=True))
header, body = [h.strip() for h in rows[0]], rows[1:]
expected = ["index", "uuid", "memory.total [MiB]", "memory.used [MiB]"]
if header != expected:
    sys.exit(f"device-check: nvidia-smi's csv header is {header}, expected {expected}")
smi = {int(r[0]): {"uuid": r[1].strip(), "total": mib(r[2]), "used": mib(r[3])} for r in body}

problems = []
if sorted(ours) != sorted(smi):
    problems.append(f"GPU indexes differ: ollamux {sorted(ours)}, nvidia-smi {sorted(smi)}")
print(f"{'GPU':>3}  {'UUID':<40}  {'TOTAL MiB ollamux/smi':>22}  {'USED MiB ollamux/smi':>21}  OK")
for index in sorted(set(ours) & set(smi)):
    o, s = ours[index], smi[index]
    total, used = o["memory_total"] // MIB, o["memory_used"] // MIB
    slack = max(1024, s["total"] * 3 // 100)
    checks = {
        "uuid": o["uuid"] == s["uuid"],
        "memory.total": total == s["total"],
        "memory.used": abs(used - s["used"]) <= slack,
    }
    bad = [name for name, ok in checks.items() if not ok]
    totals = f"{total}/{s['total']}"
    useds = f"{used}/{s['used']}"
    verdict = "yes" if not bad else "NO: " + ", ".join(bad)
    print(f"{index:>3}  {o['uuid']:<40}  {totals:>22}  {useds:>21}  {verdict}")
    if bad:
        problems.append(
            f"GPU {index}: {', '.join(bad)} differ (ollamux {o['uuid']} {total}/{used} MiB, "
            f"nvidia-smi {s['uuid']} {s['total']}/{s['used']} MiB; used may differ by {slack} MiB)"
        )
if problems:
    for problem in problems:
        print(f"device-check: MISMATCH: {problem}", file=sys.stderr)
    sys.exit(1)
print(f"device-check: ollamux and nvidia-smi agree on {len(smi)} GPU(s)")
EOF
