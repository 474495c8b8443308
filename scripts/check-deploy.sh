#!/usr/bin/env bash
# Offline checks of everything under deploy/: Kubernetes manifests (kustomize render +
# schema/consistency checks), YAML lint, Prometheus rules and their unit tests, the local
# Prometheus config, the Grafana dashboard (structure, metric names, PromQL syntax) and the
# helper scripts. No cluster or network needed.
#
# Usage (from anywhere): scripts/check-deploy.sh
# Needs (Debian 12): kubernetes-client (kubectl), yamllint, prometheus (promtool),
# python3, python3-yaml.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

K8S=deploy/k8s
OVERLAYS=(overlays/cpu overlays/gpu overlays/cpu-model-volume)
ADAPTER=$K8S/prometheus-adapter-rules.yaml
RULES=deploy/prometheus/rules.yml
RULE_TESTS=deploy/prometheus/rules_test.yml
METRICS=deploy/prometheus/metrics.txt
DASHBOARD=deploy/grafana/vtw-serve.json
PROMRULE=$K8S/components/prometheus-rules/prometheusrule.yaml
CHECK=deploy/tools/deploycheck.py

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

step() { printf '\n== %s\n' "$*"; }
die() { printf 'check-deploy: %s\n' "$*" >&2; exit 1; }

# PyYAML: the Debian python3 has it with python3-yaml; a python3 earlier in PATH may not.
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import yaml' 2>/dev/null; then
  if /usr/bin/python3 -c 'import yaml' 2>/dev/null; then PYTHON=/usr/bin/python3
  else die "python3 cannot import yaml: apt-get install python3-yaml"; fi
fi
for tool in kubectl yamllint promtool; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: kubernetes-client, yamllint, prometheus)"
done

step "tools"
echo "  kubectl $(kubectl version --client 2>/dev/null | sed -n 's/^Client Version: //p')," \
  "$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: /kustomize /p')," \
  "$(yamllint --version), $(promtool --version 2>&1 | head -1 | awk '{print "promtool", $3}')," \
  "$("$PYTHON" --version)"

step "yamllint -c deploy/.yamllint deploy/"
yamllint -s -c deploy/.yamllint deploy/
echo "  ok  $(find deploy -name '*.y*ml' -not -path '*/node_modules/*' | wc -l) YAML files"

step "kustomize render + manifest checks (probes, security, resources, Services, HPA, PDB, monitor, drain)"
render() {  # DIR OUTFILE
  kubectl kustomize "$K8S/$1" >"$2" 2>"$TMP/err" || { cat "$TMP/err" >&2; die "kustomize $1 failed"; }
}
render base "$TMP/base.yaml"
"$PYTHON" "$CHECK" manifests --name base --base --adapter-rules "$ADAPTER" <"$TMP/base.yaml"
for o in "${OVERLAYS[@]}"; do
  render "$o" "$TMP/$(basename "$o").yaml"
  "$PYTHON" "$CHECK" manifests --name "$o" --adapter-rules "$ADAPTER" <"$TMP/$(basename "$o").yaml"
done
# Every overlay under deploy/k8s/overlays is covered above.
for d in "$K8S"/overlays/*/; do
  o="overlays/$(basename "$d")"
  [[ " ${OVERLAYS[*]} " == *" $o "* ]] || die "$o is not in OVERLAYS of $0"
done
# The PrometheusRule component renders on top of an overlay.
mkdir -p "$TMP/k/with-rules"
cp -r "$K8S"/. "$TMP/k/"
cat >"$TMP/k/with-rules/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../overlays/cpu]
components: [../components/prometheus-rules]
EOF
kubectl kustomize "$TMP/k/with-rules" >"$TMP/with-rules.yaml"
grep -q '^kind: PrometheusRule$' "$TMP/with-rules.yaml" || die "prometheus-rules component rendered no PrometheusRule"
echo "  ok  components/prometheus-rules renders with overlays/cpu"
# Overlay-specific expectations.
grep -q 'nvidia.com/gpu: 1' "$TMP/gpu.yaml" || die "gpu overlay: no nvidia.com/gpu: 1"
grep -q 'VTW_DEVICE: cuda' "$TMP/gpu.yaml" || die "gpu overlay: no VTW_DEVICE=cuda"
grep -q 'mountPath: /models' "$TMP/cpu-model-volume.yaml" || die "cpu-model-volume: /models not mounted"
echo "  ok  gpu overlay asks for nvidia.com/gpu with VTW_DEVICE=cuda; model-volume mounts /models"

step "promtool check rules $RULES"
promtool check rules "$RULES"

step "promtool test rules $RULE_TESTS"
promtool test rules "$RULE_TESTS"

step "rule coverage and annotations"
"$PYTHON" "$CHECK" rules "$RULES" "$RULE_TESTS" "$METRICS"
"$PYTHON" "$CHECK" prometheusrule "$RULES" "$PROMRULE"

step "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml
grep -q 'job_name: vtw-serve$' deploy/prometheus/prometheus.yml || die "prometheus.yml: job vtw-serve missing"

step "Grafana dashboard $DASHBOARD"
"$PYTHON" "$CHECK" dashboard "$DASHBOARD" "$METRICS" --adapter-rules "$ADAPTER" \
  --promql-out "$TMP/promql.rules.yml"
echo "  PromQL syntax of every panel query and adapter metricsQuery:"
promtool check rules "$TMP/promql.rules.yml" | sed 's/^/  /'

step "scripts/dashboard-queries.py"
"$PYTHON" scripts/dashboard-queries.py >"$TMP/q.txt"
n_dash=$(wc -l <"$TMP/q.txt")
grep -q '\$' "$TMP/q.txt" && die "dashboard-queries.py left a Grafana variable unexpanded"
python3 scripts/dashboard-queries.py --rules >"$TMP/r.txt"
n_rec=$(grep -c 'record:' "$RULES")
[[ $(wc -l <"$TMP/r.txt") -eq $n_rec ]] || die "dashboard-queries.py --rules printed $(wc -l <"$TMP/r.txt") of $n_rec"
# Without PyYAML it parses rules.yml itself; both ways must agree.
for what in --rules --alerts; do
  cmp -s <("$PYTHON" scripts/dashboard-queries.py "$what" --tsv) \
         <("$PYTHON" scripts/dashboard-queries.py "$what" --tsv --no-yaml) \
    || die "dashboard-queries.py $what: subset parser disagrees with PyYAML"
done
[[ $("$PYTHON" scripts/dashboard-queries.py --metrics | wc -l) -eq $(grep -c '^vtw_' "$METRICS") ]] \
  || die "dashboard-queries.py --metrics"
echo "  ok  $n_dash panel queries, $n_rec recording rules, metric list; stdlib and PyYAML parsers agree"

printf '\ncheck-deploy: all checks passed\n'
