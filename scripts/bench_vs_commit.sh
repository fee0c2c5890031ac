#!/usr/bin/env bash
# The LoRA step against transformers + PEFT, at a base commit and at this tree, alternating, in one
# invocation on one machine: `scripts/bench_vs_commit.sh 61b34dd 3 out.jsonl [peft-bench options]`.
# Each round runs the base's peft-bench, then this tree's; every JSON line gets a "code" field.
set -euo pipefail
base=${1:?base commit}; rounds=${2:-3}; out=${3:-bench-vs-commit.jsonl}; shift 3 || true
opts=("$@"); [ ${#opts[@]} -eq 0 ] && opts=(--device cpu --model minilm --batch-sizes 8 --cases lora_r8)
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)/base
git -C "$here" worktree add --detach "$tree" "$base" >/dev/null
trap 'git -C "$here" worktree remove --force "$tree"' EXIT
mine="$(git -C "$here" rev-parse --short HEAD)$(git -C "$here" diff --quiet HEAD -- peft_lightning || echo +)"
: > "$out"
for round in $(seq "$rounds"); do
  for side in base mine; do
    code=$([ $side = base ] && echo "$tree" || echo "$here"); label=$([ $side = base ] && echo "$base" || echo "$mine")
    tmp=$(mktemp)
    (cd "$code" && PYTHONPATH="$code" HF_HUB_OFFLINE=1 python -m peft_lightning.bench "${opts[@]}" --out "$tmp" >/dev/null)
    python - "$tmp" "$label" "$round" >> "$out" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print(json.dumps({"code": sys.argv[2], "round": int(sys.argv[3]), **row}))
PY
    rm -f "$tmp"
  done
done
python - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| code | round | case | ours ms/step | PEFT ms/step | ratio to PEFT |")
print("|---|---|---|---|---|---|")
peft = {(r["code"], r["round"], r["case"]): r["ms_per_step"] for r in rows if r.get("impl") == "hf_peft"}
for r in rows:
    if r.get("impl") == "ours":
        ref = peft.get((r["code"], r["round"], r["case"]))
        print(f"| {r['code']} | {r['round']} | {r['case']} | {r['ms_per_step']:.0f} | {ref:.0f} | {r['ratio_vs_peft']:.3f} |")
PY
