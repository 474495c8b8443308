#!/usr/bin/env python3
"""Offline checks of vtw-serve's deployment files, driven by scripts/check-deploy.sh.

No cluster is needed (kubectl's client-side dry run wants one for its OpenAPI schema), so
this asserts what matters for this service on the objects `kubectl kustomize` renders,
with a small schema of known fields to catch typos. Needs python3 and PyYAML
(Debian: python3-yaml).

  deploycheck.py manifests --name NAME [--base] [--adapter-rules FILE] < rendered.yaml
  deploycheck.py rules RULES TESTS METRICS
  deploycheck.py dashboard DASHBOARD METRICS --adapter-rules FILE --promql-out FILE
  deploycheck.py prometheusrule RULES COMPONENT_FILE [--write]

Each command prints one line per failed check to stderr and exits 1 if any failed.
"""

import argparse
import importlib.util
import json
import os
import re
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

GRPC_PORT = 50051
METRICS_PORT = 9090
RUN_AS_USER = 10001
JOB = "vtw-serve"
DEFAULT_DRAIN_TIMEOUT_S = 30
MIN_STARTUP_BUDGET_S = 300  # model loading: at least 5 minutes before the kubelet gives up
# Environment keys the ConfigMap may hold besides VTW_*.
EXTRA_ENV_KEYS = {"OMP_NUM_THREADS"}

errors = []


def fail(msg):
    errors.append(msg)


def check(cond, msg):
    if not cond:
        fail(msg)
    return cond


def finish(what):
    if errors:
        for e in errors:
            print(f"  FAIL {what}: {e}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# A small schema: the fields each object kind may have where we write them by hand. Unknown
# keys are typos that the API server would reject (or silently drop) at apply time.
KNOWN = {
    "object": {"apiVersion", "kind", "metadata", "spec", "data", "binaryData", "immutable",
               "stringData", "type"},
    "metadata": {"name", "namespace", "labels", "annotations", "generateName"},
    "deployment.spec": {"replicas", "selector", "template", "strategy", "minReadySeconds",
                        "revisionHistoryLimit", "progressDeadlineSeconds", "paused"},
    "pod.spec": {"containers", "initContainers", "volumes", "securityContext",
                 "terminationGracePeriodSeconds", "serviceAccountName",
                 "automountServiceAccountToken", "nodeSelector", "tolerations", "affinity",
                 "topologySpreadConstraints", "priorityClassName", "enableServiceLinks",
                 "runtimeClassName", "imagePullSecrets", "dnsPolicy", "dnsConfig",
                 "restartPolicy", "schedulerName", "hostNetwork", "hostPID", "hostIPC",
                 "shareProcessNamespace", "readinessGates", "os", "hostname", "subdomain"},
    "container": {"name", "image", "imagePullPolicy", "command", "args", "workingDir", "ports",
                  "env", "envFrom", "resources", "volumeMounts", "livenessProbe",
                  "readinessProbe", "startupProbe", "lifecycle", "securityContext",
                  "terminationMessagePath", "terminationMessagePolicy", "stdin", "tty",
                  "resizePolicy", "restartPolicy", "volumeDevices"},
    "probe": {"grpc", "httpGet", "tcpSocket", "exec", "initialDelaySeconds", "periodSeconds",
              "timeoutSeconds", "successThreshold", "failureThreshold",
              "terminationGracePeriodSeconds"},
    "grpc": {"port", "service"},
    "container.securityContext": {"runAsNonRoot", "runAsUser", "runAsGroup",
                                  "readOnlyRootFilesystem", "allowPrivilegeEscalation",
                                  "privileged", "capabilities", "seccompProfile",
                                  "seLinuxOptions", "procMount", "appArmorProfile",
                                  "windowsOptions"},
    "pod.securityContext": {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup",
                            "fsGroupChangePolicy", "seccompProfile", "supplementalGroups",
                            "sysctls", "seLinuxOptions", "appArmorProfile", "windowsOptions"},
    "resources": {"requests", "limits", "claims"},
    "service.spec": {"type", "selector", "ports", "clusterIP", "clusterIPs",
                     "publishNotReadyAddresses", "sessionAffinity", "ipFamilyPolicy",
                     "ipFamilies", "internalTrafficPolicy", "externalTrafficPolicy",
                     "trafficDistribution", "loadBalancerClass", "externalName"},
    "service.port": {"name", "port", "targetPort", "protocol", "appProtocol", "nodePort"},
    "hpa.spec": {"scaleTargetRef", "minReplicas", "maxReplicas", "metrics", "behavior"},
    "pdb.spec": {"selector", "minAvailable", "maxUnavailable", "unhealthyPodEvictionPolicy"},
    "servicemonitor.spec": {"jobLabel", "selector", "namespaceSelector", "endpoints",
                            "targetLabels", "podTargetLabels", "sampleLimit"},
}

KINDS = {
    ("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
}

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def known_keys(obj, schema, where):
    if not isinstance(obj, dict):
        fail(f"{where}: expected a mapping, got {type(obj).__name__}")
        return
    extra = sorted(set(obj) - KNOWN[schema])
    check(not extra, f"{where}: unknown field(s) {extra}")


_QUANT = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_MULT = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(v, where):
    m = _QUANT.match(str(v))
    if not m:
        fail(f"{where}: bad quantity {v!r}")
        return None
    return float(m.group(1)) * _MULT[m.group(2)]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_port(value, where):
    m = re.match(r"^.*:(\d+)$", str(value))
    if not check(m, f"{where}: {value!r} is not HOST:PORT"):
        return None
    return int(m.group(1))


def check_probe(c, which, where):
    p = c.get(which)
    if not check(isinstance(p, dict), f"{where}: no {which}"):
        return None
    known_keys(p, "probe", f"{where}.{which}")
    other = [k for k in ("httpGet", "tcpSocket", "exec") if k in p]
    check(not other, f"{where}.{which}: must be a gRPC health probe, has {other}")
    g = p.get("grpc")
    if check(isinstance(g, dict), f"{where}.{which}: no grpc handler"):
        known_keys(g, "grpc", f"{where}.{which}.grpc")
        check(g.get("port") == GRPC_PORT,
              f"{where}.{which}.grpc.port is {g.get('port')!r}, want {GRPC_PORT}")
        check(g.get("service", "") == "",
              f"{where}.{which}.grpc.service must be the overall status (empty)")
    return p


def probe_budget(p):
    return p.get("periodSeconds", 10) * p.get("failureThreshold", 3)


def cmd_manifests(args):
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
    check(docs, "rendered nothing")
    by_kind = {}
    for i, d in enumerate(docs):
        where = f"object #{i}"
        if not check(isinstance(d, dict), f"{where}: not a mapping"):
            continue
        api, kind = d.get("apiVersion"), d.get("kind")
        name = (d.get("metadata") or {}).get("name")
        check(api and kind and name, f"{where}: needs apiVersion, kind and metadata.name")
        where = f"{kind}/{name}"
        check((api, kind) in KINDS, f"{where}: unexpected apiVersion/kind {api}/{kind}")
        known_keys(d, "object", where)
        known_keys(d.get("metadata") or {}, "metadata", f"{where}.metadata")
        check(name and len(name) <= 63 and DNS1123.match(name),
              f"{where}: name is not a valid DNS-1123 label")
        if not args.base and kind != "Namespace":
            check((d.get("metadata") or {}).get("namespace"),
                  f"{where}: no namespace (overlays set one)")
        by_kind.setdefault(kind, []).append(d)

    deps = by_kind.get("Deployment", [])
    if not check(len(deps) == 1, f"want exactly one Deployment, got {len(deps)}"):
        return finish(args.name)
    dep = deps[0]
    dname = dep["metadata"]["name"]
    W = f"Deployment/{dname}"
    spec = dep.get("spec") or {}
    known_keys(spec, "deployment.spec", f"{W}.spec")
    check("replicas" not in spec, f"{W}: spec.replicas is set; the HPA owns the replica count")
    tmpl = spec.get("template") or {}
    pod_labels = (tmpl.get("metadata") or {}).get("labels") or {}
    match = (spec.get("selector") or {}).get("matchLabels") or {}
    check(selects(match, pod_labels), f"{W}: selector {match} does not match pod labels {pod_labels}")
    pod = tmpl.get("spec") or {}
    known_keys(pod, "pod.spec", f"{W}.pod")
    psc = pod.get("securityContext") or {}
    known_keys(psc, "pod.securityContext", f"{W}.pod.securityContext")
    vols = {v.get("name"): v for v in pod.get("volumes") or []}
    containers = pod.get("containers") or []
    check(len(containers) == 1, f"{W}: want one container, got {len(containers)}")
    if not containers:
        return finish(args.name)
    c = containers[0]
    C = f"{W}/{c.get('name')}"
    known_keys(c, "container", C)

    # Image: overlays must pin a tag or digest.
    image = c.get("image") or ""
    check(image, f"{C}: no image")
    if not args.base:
        last = image.rsplit("/", 1)[-1]
        check(":" in last or "@" in image, f"{C}: image {image!r} has no tag or digest")
    check(not c.get("command"), f"{C}: command overrides the image ENTRYPOINT [vtw-server]")

    # Ports.
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    check(ports.get("grpc") == GRPC_PORT, f"{C}: needs port grpc={GRPC_PORT}, has {ports}")
    check(ports.get("metrics") == METRICS_PORT, f"{C}: needs port metrics={METRICS_PORT}")

    # Probes: gRPC health on 50051; startup generous; liveness cannot fire mid-drain.
    startup = check_probe(c, "startupProbe", C)
    check_probe(c, "readinessProbe", C)
    live = check_probe(c, "livenessProbe", C)
    if startup:
        check(probe_budget(startup) >= MIN_STARTUP_BUDGET_S,
              f"{C}: startupProbe allows {probe_budget(startup)} s for model loading, "
              f"want >= {MIN_STARTUP_BUDGET_S}")

    # Resources.
    res = c.get("resources") or {}
    known_keys(res, "resources", f"{C}.resources")
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for r in ("cpu", "memory"):
        check(r in req, f"{C}: resources.requests.{r} missing")
        check(r in lim, f"{C}: resources.limits.{r} missing")
        if r in req and r in lim:
            a, b = quantity(req[r], f"{C} requests.{r}"), quantity(lim[r], f"{C} limits.{r}")
            if a is not None and b is not None:
                check(a <= b, f"{C}: requests.{r} {req[r]} > limits.{r} {lim[r]}")
    for r in set(req) | set(lim):
        if "/" in r:  # extended resources (nvidia.com/gpu): request == limit
            check(req.get(r) == lim.get(r), f"{C}: {r} request {req.get(r)} != limit {lim.get(r)}")

    # Security context (pod-level values count where the container leaves them unset).
    csc = c.get("securityContext") or {}
    known_keys(csc, "container.securityContext", f"{C}.securityContext")

    def eff(key):
        return csc.get(key, psc.get(key))
    check(eff("runAsNonRoot") is True, f"{C}: runAsNonRoot must be true")
    check(eff("runAsUser") == RUN_AS_USER, f"{C}: runAsUser must be {RUN_AS_USER}")
    check(csc.get("readOnlyRootFilesystem") is True, f"{C}: readOnlyRootFilesystem must be true")
    check(csc.get("allowPrivilegeEscalation") is False,
          f"{C}: allowPrivilegeEscalation must be false")
    check(not csc.get("privileged"), f"{C}: must not be privileged")
    check("ALL" in ((csc.get("capabilities") or {}).get("drop") or []),
          f"{C}: capabilities.drop must contain ALL")
    check(not (csc.get("capabilities") or {}).get("add"), f"{C}: must not add capabilities")
    check((eff("seccompProfile") or {}).get("type") == "RuntimeDefault",
          f"{C}: seccompProfile.type must be RuntimeDefault")

    # Volumes: /tmp is a writable emptyDir; every mount has a volume.
    mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
    for path, vname in mounts.items():
        check(vname in vols, f"{C}: volumeMount {path} uses undefined volume {vname!r}")
    check("emptyDir" in (vols.get(mounts.get("/tmp")) or {}),
          f"{C}: /tmp must be mounted from an emptyDir volume")
    pvcs = {p["metadata"]["name"] for p in by_kind.get("PersistentVolumeClaim", [])}
    for v in vols.values():
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim:
            check(claim in pvcs, f"{W}: volume {v.get('name')} claims {claim!r}, not rendered")

    # Configuration: envFrom a rendered ConfigMap of VTW_* keys, consistent with the spec.
    cms = {m["metadata"]["name"]: m for m in by_kind.get("ConfigMap", [])}
    env = {}
    refs = [e["configMapRef"]["name"] for e in c.get("envFrom") or [] if "configMapRef" in e]
    check(refs, f"{C}: no envFrom configMapRef")
    for ref in refs:
        if check(ref in cms, f"{C}: envFrom ConfigMap {ref!r} is not rendered"):
            env.update((cms[ref].get("data") or {}))
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
    for k, v in env.items():
        check(k.startswith("VTW_") or k in EXTRA_ENV_KEYS or k in ("HOME", "TMPDIR"),
              f"{C}: unexpected environment key {k}")
        check(isinstance(v, str), f"{C}: env {k} value must be a string, got {v!r}")
    for k in ("VTW_MODEL", "VTW_LISTEN", "VTW_METRICS_LISTEN", "VTW_DRAIN_TIMEOUT"):
        check(k in env, f"{C}: {k} not set")
    if "VTW_LISTEN" in env:
        check(env_port(env["VTW_LISTEN"], "VTW_LISTEN") == GRPC_PORT,
              f"{C}: VTW_LISTEN {env['VTW_LISTEN']} does not match the probes' port {GRPC_PORT}")
    if "VTW_METRICS_LISTEN" in env:
        check(env_port(env["VTW_METRICS_LISTEN"], "VTW_METRICS_LISTEN") == METRICS_PORT,
              f"{C}: VTW_METRICS_LISTEN {env['VTW_METRICS_LISTEN']} is not port {METRICS_PORT}")
    model = env.get("VTW_MODEL", "")
    if model.startswith("/models"):
        check(mounts.get("/models"), f"{C}: VTW_MODEL={model} but nothing is mounted at /models")
    if "VTW_THREADS" in env and "cpu" in lim:
        cpus = quantity(lim["cpu"], f"{C} limits.cpu")
        check(cpus is not None and int(env["VTW_THREADS"]) <= cpus,
              f"{C}: VTW_THREADS={env['VTW_THREADS']} exceeds the CPU limit {lim['cpu']}")
        check(env.get("OMP_NUM_THREADS", env["VTW_THREADS"]) == env["VTW_THREADS"],
              f"{C}: OMP_NUM_THREADS != VTW_THREADS")
    if "VTW_DEVICE" in env:
        check(env["VTW_DEVICE"] in ("cpu", "cuda"), f"{C}: VTW_DEVICE {env['VTW_DEVICE']!r}")
        if env["VTW_DEVICE"] == "cuda":
            check("nvidia.com/gpu" in lim, f"{C}: VTW_DEVICE=cuda without an nvidia.com/gpu limit")

    # Graceful shutdown: grace > preStop + drain; liveness cannot kill a draining pod.
    drain = int(env.get("VTW_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT_S))
    pre = ((c.get("lifecycle") or {}).get("preStop") or {})
    pre_s = (pre.get("sleep") or {}).get("seconds", 0)
    if "exec" in pre:
        cmd = pre["exec"].get("command") or []
        if len(cmd) == 2 and cmd[0] == "sleep":
            pre_s = int(cmd[1])
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(grace > pre_s + drain,
          f"{W}: terminationGracePeriodSeconds {grace} <= preStop {pre_s} + VTW_DRAIN_TIMEOUT {drain}")
    if live:
        check(probe_budget(live) > grace,
              f"{C}: livenessProbe gives up after {probe_budget(live)} s <= termination grace "
              f"{grace} s: a draining (NOT_SERVING) server could be killed")

    # Services select the pods; the right kinds exist.
    svcs = by_kind.get("Service", [])
    grpc_vip = headless = metrics_svc = None
    for s in svcs:
        S = f"Service/{s['metadata']['name']}"
        ss = s.get("spec") or {}
        known_keys(ss, "service.spec", f"{S}.spec")
        check(selects(ss.get("selector") or {}, pod_labels),
              f"{S}: selector {ss.get('selector')} does not select the Deployment's pods {pod_labels}")
        sports = ss.get("ports") or []
        for p in sports:
            known_keys(p, "service.port", f"{S}.port")
            tp = p.get("targetPort", p.get("port"))
            check(tp in ports or tp in ports.values(),
                  f"{S}: targetPort {tp!r} is not a container port {ports}")
        nums = {p.get("port") for p in sports}
        if GRPC_PORT in nums:
            if ss.get("clusterIP") == "None":
                headless = s
                check(not ss.get("publishNotReadyAddresses"),
                      f"{S}: headless gRPC Service must not publish not-ready pods")
            elif ss.get("type", "ClusterIP") == "ClusterIP":
                grpc_vip = s
        if METRICS_PORT in nums:
            metrics_svc = s
    check(grpc_vip is not None, "no ClusterIP Service on the gRPC port")
    check(headless is not None, "no headless (clusterIP: None) Service on the gRPC port")
    check(metrics_svc is not None, f"no Service on the metrics port {METRICS_PORT}")

    # HPA.
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    if check(len(hpas) == 1, f"want one HorizontalPodAutoscaler, got {len(hpas)}"):
        h = hpas[0]
        H = f"HorizontalPodAutoscaler/{h['metadata']['name']}"
        hs = h.get("spec") or {}
        known_keys(hs, "hpa.spec", f"{H}.spec")
        ref = hs.get("scaleTargetRef") or {}
        check(ref.get("apiVersion") == "apps/v1" and ref.get("kind") == "Deployment"
              and ref.get("name") == dname,
              f"{H}: scaleTargetRef {ref} is not Deployment/{dname}")
        lo, hi = hs.get("minReplicas", 1), hs.get("maxReplicas", 0)
        check(1 <= lo <= hi, f"{H}: minReplicas {lo} / maxReplicas {hi}")
        metrics = hs.get("metrics") or []
        pods_metrics = [m["pods"]["metric"]["name"] for m in metrics if m.get("type") == "Pods"]
        check(pods_metrics, f"{H}: no Pods metric (queue-based scaling)")
        for m in metrics:
            t = m.get("type")
            check(t in ("Pods", "Resource", "Object", "External", "ContainerResource"),
                  f"{H}: metric type {t!r}")
            body = m.get(t[:1].lower() + t[1:], {}) if t else {}
            check(isinstance(body, dict) and "target" in body, f"{H}: {t} metric without target")
            if t == "Resource":
                check(body.get("name") in req,
                      f"{H}: scales on {body.get('name')} utilization but the container has no "
                      "request for it")
        if args.adapter_rules:
            with open(args.adapter_rules, encoding="utf-8") as f:
                ad = yaml.safe_load(f)
            served = {(r.get("name") or {}).get("as") for r in (ad.get("rules") or {}).get("custom") or []}
            for n in pods_metrics:
                check(n in served, f"{H}: Pods metric {n!r} is not served by {args.adapter_rules}")

    # PDB.
    for p in by_kind.get("PodDisruptionBudget", []):
        P = f"PodDisruptionBudget/{p['metadata']['name']}"
        ps = p.get("spec") or {}
        known_keys(ps, "pdb.spec", f"{P}.spec")
        check(selects((ps.get("selector") or {}).get("matchLabels") or {}, pod_labels),
              f"{P}: selector does not select the Deployment's pods")
        check(("minAvailable" in ps) != ("maxUnavailable" in ps),
              f"{P}: set exactly one of minAvailable / maxUnavailable")
    check(by_kind.get("PodDisruptionBudget"), "no PodDisruptionBudget")

    # ServiceMonitor / PodMonitor: scrape the metrics port with job="vtw-serve".
    mons = by_kind.get("ServiceMonitor", []) + by_kind.get("PodMonitor", [])
    check(mons, "no ServiceMonitor or PodMonitor")
    for m in by_kind.get("ServiceMonitor", []):
        M = f"ServiceMonitor/{m['metadata']['name']}"
        ms = m.get("spec") or {}
        known_keys(ms, "servicemonitor.spec", f"{M}.spec")
        sel = (ms.get("selector") or {}).get("matchLabels") or {}
        hit = [s for s in svcs if selects(sel, s["metadata"].get("labels") or {})]
        check(hit == [metrics_svc] if metrics_svc else False,
              f"{M}: selects {[s['metadata']['name'] for s in hit]}, want only the metrics Service")
        if metrics_svc is not None:
            names = {p.get("name") for p in metrics_svc["spec"].get("ports") or []}
            for e in ms.get("endpoints") or []:
                check(e.get("port") in names, f"{M}: endpoint port {e.get('port')!r} not in {names}")
            jl = ms.get("jobLabel")
            job = (metrics_svc["metadata"].get("labels") or {}).get(jl) if jl else None
            check(job == JOB, f"{M}: scraped series get job={job!r}, rules.yml expects {JOB!r} "
                  "(set jobLabel to a Service label whose value is vtw-serve)")
    for m in by_kind.get("PodMonitor", []):
        M = f"PodMonitor/{m['metadata']['name']}"
        sel = ((m.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        check(selects(sel, pod_labels), f"{M}: does not select the Deployment's pods")

    for n in by_kind.get("Namespace", []):
        lab = n["metadata"].get("labels") or {}
        check(lab.get("pod-security.kubernetes.io/enforce") == "restricted",
              f"Namespace/{n['metadata']['name']}: pod-security enforce label is not restricted")

    summary = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
    rc = finish(args.name)
    if rc == 0:
        print(f"  ok  {args.name}: {summary}; grace {grace}s > preStop {pre_s}s + drain {drain}s")
    return rc


# --------------------------------------------------------------------------------------------
def load_metrics(path):
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split("#", 1)[0].split()
            if parts:
                names[parts[0]] = parts[1]
    return names


def series_names(metrics):
    """Every series name a metric family exposes."""
    out = {}
    for n, t in metrics.items():
        out[n] = n
        if t == "histogram":
            for suf in ("_bucket", "_sum", "_count"):
                out[n + suf] = n
    return out


_IDENT = re.compile(r"(?<![\w:])(vtw_[a-z0-9_]+)")


def used_metrics(expr, series, where):
    fams = set()
    for name in _IDENT.findall(expr):
        if check(name in series, f"{where}: unknown metric {name} (not in metrics.txt)"):
            fams.add(series[name])
    return fams


def cmd_rules(args):
    with open(args.rules, encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    with open(args.tests, encoding="utf-8") as f:
        tests = yaml.safe_load(f)
    series = series_names(load_metrics(args.metrics))
    records, alerts = [], []
    for g in rules.get("groups") or []:
        for r in g.get("rules") or []:
            used_metrics(str(r.get("expr", "")), series, r.get("record") or r.get("alert"))
            if "record" in r:
                records.append(r["record"])
                check(r["record"].startswith("vtw:"), f"record {r['record']}: not in vtw: namespace")
            else:
                alerts.append(r["alert"])
                a = r["alert"]
                check((r.get("labels") or {}).get("severity") in ("critical", "warning", "info"),
                      f"alert {a}: no severity label")
                ann = r.get("annotations") or {}
                for k in ("summary", "description", "runbook"):
                    check(ann.get(k), f"alert {a}: no {k} annotation")
                check(r.get("for"), f"alert {a}: no `for` duration")
    tested_exprs = []
    firing, silent = set(), set()
    for t in tests.get("tests") or []:
        for e in t.get("promql_expr_test") or []:
            tested_exprs.append(str(e.get("expr", "")))
            check(e.get("exp_samples"), f"test {t.get('name')}: expr {e.get('expr')} expects no samples")
        for a in t.get("alert_rule_test") or []:
            (firing if a.get("exp_alerts") else silent).add(a.get("alertname"))
    for r in records:
        pat = re.compile(r"(?<![\w:])" + re.escape(r) + r"(?![\w:])")
        check(any(pat.search(e) for e in tested_exprs), f"recording rule {r} has no promql_expr_test")
    for a in alerts:
        check(a in firing, f"alert {a} has no firing test")
        check(a in silent, f"alert {a} has no not-firing test")
    for a in (firing | silent) - set(alerts):
        fail(f"rules_test.yml tests unknown alert {a}")
    rc = finish("rules")
    if rc == 0:
        print(f"  ok  rules: {len(records)} recording rules each tested; {len(alerts)} alerts each "
              "tested firing and not firing; all have severity/summary/description/runbook; "
              "metric names match metrics.txt")
    return rc


# --------------------------------------------------------------------------------------------
def load_dashboard_queries():
    path = os.path.join(REPO, "scripts", "dashboard-queries.py")
    spec = importlib.util.spec_from_file_location("dashboard_queries", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def is_ds(ds):
    if isinstance(ds, dict):
        return ds.get("uid") == "${datasource}" and ds.get("type", "prometheus") == "prometheus"
    return ds == "${datasource}"


def cmd_dashboard(args):
    dq = load_dashboard_queries()
    with open(args.dashboard, encoding="utf-8") as f:
        dash = json.load(f)
    metrics = load_metrics(args.metrics)
    series = series_names(metrics)
    check(30 <= int(dash.get("schemaVersion", 0)) <= 41,
          f"schemaVersion {dash.get('schemaVersion')} (want ~38)")
    check(dash.get("uid"), "dashboard has no uid")
    tvars = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds = tvars.get("datasource") or {}
    check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
          "no `datasource` template variable of type datasource/prometheus")
    for n, v in tvars.items():
        if v.get("type") == "query":
            check(is_ds(v.get("datasource")), f"variable {n}: datasource is not ${{datasource}}")
    ids = set()
    queries = []
    used = set()
    panels = list(dq.walk_panels(dash.get("panels") or []))
    for p in panels:
        P = f"panel {p.get('id')} {p.get('title')!r}"
        check(p.get("id") not in ids, f"{P}: duplicate id")
        ids.add(p.get("id"))
        check(p.get("gridPos"), f"{P}: no gridPos")
        if p.get("type") == "row":
            continue
        check(is_ds(p.get("datasource")), f"{P}: datasource is not ${{datasource}}")
        targets = [t for t in p.get("targets") or [] if (t.get("expr") or "").strip()]
        check(targets, f"{P}: no target with an expr")
        refs = [t.get("refId") for t in p.get("targets") or []]
        check(len(refs) == len(set(refs)), f"{P}: duplicate refIds {refs}")
        for t in p.get("targets") or []:
            if "datasource" in t:
                check(is_ds(t["datasource"]), f"{P} {t.get('refId')}: datasource is not ${{datasource}}")
        for t in targets:
            used |= used_metrics(t["expr"], series, P)
    missing = sorted(set(metrics) - used)
    check(not missing, f"metrics not shown on any panel: {missing}")

    # PromQL syntax: one recording rule per query, for `promtool check rules`.
    for src, expr in dq.dashboard_queries(args.dashboard):
        queries.append((src, dq.substitute(expr, {
            "namespace": ".*", "job": "vtw-serve", "instance": ".+", "__rate_interval": "1m",
            "__range": "1h", "__interval": "15s", "datasource": "x"})))
    with open(args.adapter_rules, encoding="utf-8") as f:
        ad = yaml.safe_load(f)
    for r in (ad.get("rules") or {}).get("custom") or []:
        q = str(r.get("metricsQuery", ""))
        m = re.match(r"^(\w+)", str(r.get("seriesQuery", "")))
        check(m, f"adapter rule {r.get('name')}: seriesQuery has no metric name")
        base = m.group(1) if m else "x"
        used_metrics(base + " " + q, series, f"adapter rule {base}")
        q = (q.replace("<<.Series>>", base).replace("<<.LabelMatchers>>", 'namespace="vtw"')
             .replace("<<.GroupBy>>", "pod"))
        check("<<" not in q, f"adapter rule {base}: unknown template in metricsQuery")
        queries.append((f"adapter {base}", dq.one_line(q)))
        check((r.get("name") or {}).get("as"), f"adapter rule {base}: no name.as")
    out = {"groups": [{"name": "promql-syntax-check", "rules": [
        {"record": f"check:query_{i}", "expr": q, "labels": {"source": src[:60]}}
        for i, (src, q) in enumerate(queries)]}]}
    with open(args.promql_out, "w", encoding="utf-8") as f:
        yaml.safe_dump(out, f, sort_keys=False, width=1000)
    rc = finish("dashboard")
    if rc == 0:
        n = sum(1 for p in panels if p.get("type") != "row")
        print(f"  ok  dashboard: {n} panels, all on ${{datasource}} with queries; "
              f"all {len(metrics)} metrics shown; {len(queries)} queries written for promtool")
    return rc


# --------------------------------------------------------------------------------------------
class _IndentDumper(yaml.SafeDumper):
    """Indents block sequences under their key (yamllint's indent-sequences: true)."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def _str(dumper, s):
    if "\n" in s:
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", s)


_IndentDumper.add_representer(str, _str)

PR_HEADER = """\
# GENERATED from deploy/prometheus/rules.yml -- do not edit; regenerate with
#   python3 deploy/tools/deploycheck.py prometheusrule deploy/prometheus/rules.yml \\
#     deploy/k8s/components/prometheus-rules/prometheusrule.yaml --write
# (scripts/check-deploy.sh fails while the two differ).
"""


def cmd_prometheusrule(args):
    with open(args.rules, encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "vtw-serve", "labels": {
            "app.kubernetes.io/name": "vtw-serve", "app.kubernetes.io/component": "server"}},
        "spec": {"groups": rules["groups"]},
    }
    text = PR_HEADER + yaml.dump(obj, Dumper=_IndentDumper, sort_keys=False, width=100,
                                 allow_unicode=True)
    if args.write:
        with open(args.target, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"  wrote {args.target}")
        return 0
    try:
        with open(args.target, encoding="utf-8") as f:
            current = yaml.safe_load(f)
    except FileNotFoundError:
        current = None
    check(current is not None and current.get("spec") == obj["spec"],
          f"{args.target} is out of date with {args.rules}; regenerate it (see its header)")
    rc = finish("prometheusrule")
    if rc == 0:
        print(f"  ok  {os.path.relpath(args.target, REPO)} matches {os.path.relpath(args.rules, REPO)}")
    return rc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("--name", required=True)
    m.add_argument("--base", action="store_true", help="the base: no namespace/tag required")
    m.add_argument("--adapter-rules")
    r = sub.add_parser("rules")
    r.add_argument("rules")
    r.add_argument("tests")
    r.add_argument("metrics")
    d = sub.add_parser("dashboard")
    d.add_argument("dashboard")
    d.add_argument("metrics")
    d.add_argument("--adapter-rules", required=True)
    d.add_argument("--promql-out", required=True)
    p = sub.add_parser("prometheusrule")
    p.add_argument("rules")
    p.add_argument("target")
    p.add_argument("--write", action="store_true")
    args = ap.parse_args()
    return {"manifests": cmd_manifests, "rules": cmd_rules, "dashboard": cmd_dashboard,
            "prometheusrule": cmd_prometheusrule}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
