"""Deployment artifacts under deploy/ (Docker, Kubernetes, Prometheus, Grafana): parsed and cross-checked, no servers.

The metric names in the dashboard and the alert rules must be ones the server exposes: the plugin's `restkv_*`
(checked against the collectors registered in vllm_restkv/) and vLLM 0.32's `vllm:*`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "restkv-dashboard.json"
DEPLOYMENTS = ("deployment-cpu.yaml", "deployment-gpu.yaml")
PORT = 8000

RESTKV_COUNTERS = {"restkv_evicted_tokens_total", "restkv_freed_blocks_total", "restkv_eviction_events_total",
                   "restkv_moderation_results_total", "restkv_moderation_shadow_checks_total"}
RESTKV_HISTOGRAMS = {"restkv_scoring_duration_seconds", "restkv_compaction_duration_seconds", "restkv_kept_token_ratio",
                     "restkv_moderation_shadow_score_diff"}
RESTKV_GAUGES = {"restkv_physical_tokens", "restkv_logical_tokens", "restkv_evicting_requests", "restkv_build_info"}
VLLM_PLAIN = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
              "vllm:request_success_total"}
VLLM_HISTOGRAMS = {"vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:request_time_per_output_token_seconds", "vllm:e2e_request_latency_seconds"}
HISTOGRAMS = RESTKV_HISTOGRAMS | VLLM_HISTOGRAMS
KNOWN_METRICS = RESTKV_COUNTERS | RESTKV_GAUGES | VLLM_PLAIN | HISTOGRAMS
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])(?:restkv_|vllm:)[a-z0-9_:]+")


def _plugins() -> set[str]:
    """Our entry point names (every one must be in VLLM_PLUGINS: vLLM filters all plugin groups by it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {name for group, eps in project["entry-points"].items() if group.startswith("vllm.") for name in eps}
    assert names == {"restkv", "restkv_metrics", "restkv_moderations"}, names
    return names


def _metric_names(expr: str) -> set[str]:
    """Base metric names in a PromQL expression (histogram _bucket/_sum/_count folded into the histogram)."""
    names = set()
    for name in METRIC_RE.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                name = name[: -len(suffix)]
        names.add(name)
    return names


def _balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):  # ignore brackets inside label values
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def _load_yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_yaml() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _container(name: str) -> dict:
    (doc,) = _load_yaml_docs(K8S / name)
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _all_panels(panels: list) -> list:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_all_panels(p.get("panels", [])))
    return out


def _alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


# ---------------------------------------------------------------- the lists above match the code


def test_restkv_metric_list_matches_the_registered_collectors():
    sources = (ROOT / "vllm_restkv" / "metrics.py").read_text() + (ROOT / "vllm_restkv" / "serving" /
                                                                   "moderations.py").read_text()
    registered = {}
    for kind, name in re.findall(r'prom\.(Counter|Histogram|Gauge)\(\s*"([a-z_]+)"', sources):
        registered[name + "_total" if kind == "Counter" else name] = kind
    assert set(registered) == RESTKV_COUNTERS | RESTKV_HISTOGRAMS | RESTKV_GAUGES
    assert {n for n, k in registered.items() if k == "Histogram"} == RESTKV_HISTOGRAMS


# ---------------------------------------------------------------- every file parses


def test_every_yaml_and_json_file_parses():
    files = _all_yaml()
    assert {p.name for p in files} >= {"deployment-cpu.yaml", "deployment-gpu.yaml", "service.yaml",
                                       "servicemonitor.yaml", "secret-example.yaml", "kustomization.yaml",
                                       "prometheus.yml", "alerts.yml"}
    for path in files:
        assert _load_yaml_docs(path), f"{path} is empty"
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())


# ---------------------------------------------------------------- Kubernetes


def test_k8s_objects_have_apiversion_kind_name_and_no_namespace():
    kinds = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _load_yaml_docs(path):
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind"), path
            assert doc.get("metadata", {}).get("name"), path
            assert "namespace" not in doc["metadata"], f"{path}: manifests are namespace-less"
            kinds[path.name] = (doc["apiVersion"], doc["kind"])
    assert kinds == {
        "deployment-cpu.yaml": ("apps/v1", "Deployment"),
        "deployment-gpu.yaml": ("apps/v1", "Deployment"),
        "service.yaml": ("v1", "Service"),
        "servicemonitor.yaml": ("monitoring.coreos.com/v1", "ServiceMonitor"),
        "secret-example.yaml": ("v1", "Secret"),
        "kustomization.yaml": ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    }


def test_kustomization_resources_exist():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["resources"]
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_selector_matches_pod_labels(name):
    (doc,) = _load_yaml_docs(K8S / name)
    selector = doc["spec"]["selector"]["matchLabels"]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_probes_hit_health_on_the_container_port(name):
    c = _container(name)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PORT}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        port = ports.get(get["port"], get["port"])
        assert port == PORT, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load needs a generous startup"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_serve_args_and_env(name):
    c = _container(name)
    assert c["command"] == ["vllm", "serve"]
    args = [str(a) for a in c["args"]]
    opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert not args[0].startswith("--"), "the model directory comes first"
    assert opts["--kv-eviction"] == "restkv"
    assert int(opts["--kv-eviction-budget"]) > 0
    assert opts["--runner"] == "pooling"
    assert opts["--served-model-name"] == "restkv-moderator"
    assert opts["--port"] == str(PORT) and opts["--host"] == "0.0.0.0"
    assert opts["--api-key"] == "$(VLLM_API_KEY)"

    env = {e["name"]: e for e in c["env"]}
    assert set(env["VLLM_PLUGINS"]["value"].split(",")) == _plugins()
    (secret,) = _load_yaml_docs(K8S / "secret-example.yaml")
    ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]

    res = c["resources"]
    assert res["requests"] and res["limits"]
    if name == "deployment-cpu.yaml":
        (doc,) = _load_yaml_docs(K8S / name)
        assert doc["spec"]["replicas"] == 3
        assert float(env["VLLM_CPU_KVCACHE_SPACE"]["value"]) > 0
        assert "nvidia.com/gpu" not in res["limits"]
    else:
        assert not any(n.startswith("VLLM_CPU_") for n in env)
        assert res["limits"]["nvidia.com/gpu"] == 1
        assert "--gpu-memory-utilization" in opts
        assert "--tensor-parallel-size" in (K8S / name).read_text(), "document TP"


def test_service_and_servicemonitor_select_the_pods():
    (svc,) = _load_yaml_docs(K8S / "service.yaml")
    (mon,) = _load_yaml_docs(K8S / "servicemonitor.yaml")
    for name in DEPLOYMENTS:
        (dep,) = _load_yaml_docs(K8S / name)
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items(), name
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == "http"
    assert [e["port"] for e in mon["spec"]["endpoints"]] == [port["name"]]
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"


def _kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run([str(exe), "--strict", "--quiet", *map(str, paths)], capture_output=True, text=True,
                          timeout=120)


def test_manifests_pass_kubernetes_schema_validation(tmp_path):
    """kubernetes-validate (PyPI) checks against the bundled OpenAPI schemas of Kubernetes 1.37, offline;
    --strict rejects unknown fields. The Kustomization and the ServiceMonitor CRD have no bundled schema."""
    core = [K8S / n for n in (*DEPLOYMENTS, "service.yaml", "secret-example.yaml")]
    out = _kubernetes_validate(*core)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = yaml.safe_load((K8S / "deployment-cpu.yaml").read_text())
    bad["spec"]["replicas"] = "three"
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/health"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = _kubernetes_validate(tmp_path / "bad.yaml")
    assert out.returncode != 0 and "replicas" in out.stdout + out.stderr


# ---------------------------------------------------------------- Docker


@pytest.mark.parametrize("kind", ("cpu", "gpu"))
def test_dockerfiles(kind):
    text = (DEPLOY / "docker" / f"Dockerfile.{kind}").read_text()
    assert "VLLM_RESTKV_MODEL_DIR=/models" in text
    assert "vllm-restkv model prepare --name moderator" in text
    assert "deploy/requirements-nodeps.txt" in text
    assert "pip install --no-deps -e ." in text
    (plugins,) = re.findall(r"VLLM_PLUGINS=(\S+)", text)
    assert set(plugins.split(",")) == _plugins()
    assert '"--kv-eviction", "restkv"' in text and '"--port", "8000"' in text
    for path in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M):
        for src in path.split():
            assert (ROOT / src).exists(), f"Dockerfile.{kind} copies a missing {src}"
    if kind == "cpu":
        assert re.search(r"^FROM python:3\.11-slim-bookworm$", text, flags=re.M)
        assert "deploy/requirements-cpu.txt" in text and "vllm-metadata-shim" in text
    else:
        assert "vllm/vllm-openai:v0.32.0" in text and '"vllm==0.32.0"' in text
        assert "pip install --no-deps ./deploy/vllm-metadata-shim" not in text
        assert "VLLM_CPU_" not in text


# ---------------------------------------------------------------- Prometheus


def test_prometheus_config_structure():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for rule_file in cfg["rule_files"]:
        assert (PROM / rule_file).is_file(), rule_file
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["vllm-restkv"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"127.0.0.1:{PORT}"]
    assert "kubernetes_sd_configs" in (PROM / "prometheus.yml").read_text()


def test_alert_rules_structure():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    assert set(rules) == {"groups"}
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert re.fullmatch(r"(\d+[smhdw])+", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"]
            assert _balanced(rule["expr"]), rule["alert"]
    alerts = {r["alert"]: r["expr"] for r in _alert_rules()}
    assert len(alerts) == len(_alert_rules()), "alert names are unique"
    exprs = " ".join(alerts.values())
    assert re.search(r"\bup\b", exprs)
    assert re.search(r"vllm:kv_cache_usage_perc\)?\s*>\s*0\.95", exprs)
    assert "histogram_quantile(0.99" in exprs and "restkv_scoring_duration_seconds_bucket" in exprs
    assert 'outcome="error"' in exprs


def test_alert_rules_use_known_metrics():
    for rule in _alert_rules():
        used = _metric_names(rule["expr"])
        assert used <= KNOWN_METRICS, f"{rule['alert']}: unknown {used - KNOWN_METRICS}"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run ./deploy/install_test_tools.sh (Debian's prometheus package)"
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_our_config_and_rules(tmp_path):
    for args in (["check", "config", str(PROM / "prometheus.yml")], ["check", "rules", str(PROM / "alerts.yml")]):
        out = _promtool(*args)
        assert out.returncode == 0, out.stdout + out.stderr
    # and it is a real check: a broken expression in a copy of our rules is rejected
    broken = yaml.safe_load((PROM / "alerts.yml").read_text())
    broken["groups"][0]["rules"][0]["expr"] = "rate(restkv_evicted_tokens_total[5m]"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(broken))
    assert _promtool("check", "rules", str(tmp_path / "alerts.yml")).returncode != 0


# ---------------------------------------------------------------- Grafana


def test_dashboard_structure():
    d = _dashboard()
    assert d["schemaVersion"] == 39
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    panels = _all_panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(g) and 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"], p["title"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Throughput", "Latency", "Scheduler", "ReST-KV eviction"]


def test_dashboard_panels_do_not_overlap():
    cells = {}
    for p in _all_panels(_dashboard()["panels"]):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_dashboard_uses_known_metrics_and_covers_them():
    d = _dashboard()
    exprs = [t["expr"] for p in _all_panels(d["panels"]) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            exprs.append(v["definition"])
    used = set()
    for expr in exprs:
        assert _balanced(expr), expr
        names = _metric_names(expr)
        assert names <= KNOWN_METRICS, f"unknown metrics {names - KNOWN_METRICS} in {expr}"
        used |= names
    for h in HISTOGRAMS:  # quantiles come from the _bucket series
        assert not any(re.search(re.escape(h) + r"(?![a-z_])", e) for e in exprs), f"{h} used without _bucket"
    missing = KNOWN_METRICS - used
    assert not missing, f"dashboard does not show {missing}"
    assert any("histogram_quantile(0.5" in e and "vllm:time_to_first_token_seconds_bucket" in e for e in exprs)
    assert any("histogram_quantile(0.99" in e and "vllm:request_time_per_output_token_seconds_bucket" in e
               for e in exprs)
    assert any("sum by (policy)" in e and "restkv_evicted_tokens_total" in e for e in exprs)
    assert any("sum by (phase)" in e and "restkv_eviction_events_total" in e for e in exprs)


def test_setup_refuses_to_start_on_a_full_disk(tmp_path):
    """setup_env.sh checks the room before pip runs: a clear message, exit 1, and no half-built environment."""
    venv = tmp_path / "venv"
    env = {"PATH": "/usr/bin:/bin", "VENV": str(venv), "RESTKV_SETUP_NEED_GIB": str(1 << 40)}
    result = subprocess.run(["bash", str(DEPLOY / "setup_env.sh")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "GiB free; the environment needs about" in result.stderr
    assert "point VENV / TMPDIR to a larger disk" in result.stderr
    assert not venv.exists()
