"""deploy/: the compose and Kubernetes files are not run here (no Docker engine, no
cluster), so check what can be checked: they parse, every replica command is accepted by
the real `ssmstream serve` parser with a shared store, and the routing keys agree with the
header the clients send. The nginx config is run for real by tests/runtime/scaleout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ssmstream.runtime.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def serve_args(command: list[str]) -> list[str]:
    assert command[:2] == ["ssmstream", "serve"], command
    return command[2:]


def test_compose_replicas_share_redis_behind_nginx():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = {k: v for k, v in services.items() if k.startswith("replica-")}
    assert len(replicas) == 3
    ids = set()
    for svc in replicas.values():
        config = parse_config(serve_args(svc["entrypoint"]))
        assert config.state_store == "redis://redis:6379/0"
        assert config.host == "0.0.0.0" and config.port == 50051
        assert config.state_dir is None  # the Dockerfile's default --state-dir is replaced
        ids.add(config.replica_id)
    assert ids == set(replicas)  # each names itself as compose does
    nginx = services["nginx"]
    mount = nginx["volumes"][0].split(":")
    assert (DEPLOY / mount[0]).resolve() == DEPLOY / "nginx" / "nginx.conf"
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    for name in replicas:
        assert f"server {name}:50051" in conf
    assert "hash $ssmstream_route consistent;" in conf and "$http_x_session_id" in conf
    # nginx's body limit applies to a call's whole request body, a Stream's every request:
    # any limit would end long streams, so none (the replicas bound each message)
    assert re.findall(r"^\s*client_max_body_size\s+(\S+);", conf, re.M) == ["0"]


def test_kubernetes_example_hashes_the_clients_header():
    text = (DEPLOY / "k8s" / "ssmstream.yaml").read_text()
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d for d in yaml.safe_load_all(text)}
    dep = docs["Deployment/ssmstream"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    config = parse_config(serve_args(container["command"]))
    assert config.state_store.startswith("redis://ssmstream-redis:")
    assert docs["Service/ssmstream-pods"]["spec"]["clusterIP"] == "None"  # Envoy: every pod
    rule = docs["DestinationRule/ssmstream-sticky-sessions"]
    assert rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"] == {
        "httpHeaderName": "x-session-id"
    }
    # Istio hashes only for a ClusterIP Service (a headless one's traffic goes to the pod)
    assert "clusterIP" not in docs["Service/" + rule["spec"]["host"]]["spec"]
    # Redis keeps its append-only file on a volume: a restart must not come back empty
    redis = docs["Deployment/ssmstream-redis"]["spec"]["template"]["spec"]
    (mount,) = redis["containers"][0]["volumeMounts"]
    (volume,) = [v for v in redis["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/data" and "--appendonly" in redis["containers"][0]["args"]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert docs[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Redis has no password (it holds the sessions and the snapshot key): only the replicas'
    # pods may connect to it
    redis_pods = docs["Deployment/ssmstream-redis"]["spec"]["selector"]["matchLabels"]
    (policy,) = [d["spec"] for d in docs.values() if d["kind"] == "NetworkPolicy"
                 and d["spec"]["podSelector"]["matchLabels"] == redis_pods]  # fmt: skip
    assert policy["policyTypes"] == ["Ingress"]
    assert [rule["from"] for rule in policy["ingress"]] == [
        [{"podSelector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}}]
    ]


def test_the_orchestrators_wait_out_the_servers_grace_before_they_kill_it():
    """SIGTERM, then SIGKILL after the orchestrator's grace period: it must outlast the
    server's --grace, or a drain that uses it is killed before the sessions are written."""
    grace = parse_config(["model"]).grace
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        if name.startswith("replica-"):
            stop = svc["stop_grace_period"]
            assert stop.endswith("s") and float(stop[:-1]) > grace, (name, stop)
    text = (DEPLOY / "k8s" / "ssmstream.yaml").read_text()
    (dep,) = [d for d in yaml.safe_load_all(text) if d["metadata"]["name"] == "ssmstream"
              and d["kind"] == "Deployment"]  # fmt: skip
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    docker_stop = re.search(r"docker stop -t (\d+)", (ROOT / "Dockerfile").read_text())
    assert int(docker_stop.group(1)) > grace


def test_the_kubernetes_memory_request_covers_what_the_replicas_flags_let_them_hold():
    """A replica at its bounds holds the state slab, the rewind checkpoints (one state per
    session may pass --rewind-memory-mb) and the prefix cache: a request below that lets the
    scheduler pack pods onto memory they will use, and the kubelet evicts first the pods
    using more than they asked for."""
    from ssmstream.model.checkpoint import read_checkpoint_meta
    from ssmstream.model.network import SSMConfig

    ckpt = ROOT / "examples" / "checkpoints" / "byte-lm"  # what the image serves
    state = 4 * SSMConfig.from_dict(read_checkpoint_meta(ckpt)["model"]).state_size
    text = (DEPLOY / "k8s" / "ssmstream.yaml").read_text()
    (dep,) = [d for d in yaml.safe_load_all(text) if d["metadata"]["name"] == "ssmstream"
              and d["kind"] == "Deployment"]  # fmt: skip
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    config = parse_config(serve_args(container["command"]))
    held = (
        2 * config.max_sessions * state  # the slab, and one checkpoint per session
        + config.rewind_memory_mb * 2**20
        + config.prefix_cache_mb * 2**20
    )
    amount = container["resources"]["requests"]["memory"]
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", amount).groups()
    assert int(number) * {"Mi": 2**20, "Gi": 2**30}[unit] >= held, (amount, held / 2**20)


def test_the_client_sends_the_header_the_proxies_hash():
    from ssmstream.runtime.client import Client

    with Client("127.0.0.1:1") as c:
        assert ("x-session-id", "abc") in c._md("abc")
        assert c._md("") == c.metadata


@pytest.mark.parametrize("bad", [["--state-store", "mysql://x"], ["--persist-every", "0"],
                                 ["--state-store", "redis://r:6379/0", "--state-dir", "/tmp/s"],
                                 ["--lease-ttl", "0"]])  # fmt: skip
def test_serve_refuses_bad_scale_out_flags_naming_them(bad, capsys):
    with pytest.raises(SystemExit):
        parse_config(["model", *bad])
    err = capsys.readouterr().err
    assert any(flag in err for flag in ("--state-store", "--persist-every", "--state-dir",
                                        "--lease-ttl")), err  # fmt: skip


def test_kubernetes_waits_for_a_slow_start_before_its_liveness_probe():
    """The gRPC port opens only once the model is loaded (and sessions restored): a liveness
    probe from the start, with a fixed initial delay, restarts a replica that loads slower
    in a loop. A startup probe holds it off; it gives a minute at least."""
    text = (DEPLOY / "k8s" / "ssmstream.yaml").read_text()
    (dep,) = [d for d in yaml.safe_load_all(text) if d["metadata"]["name"] == "ssmstream"
              and d["kind"] == "Deployment"]  # fmt: skip
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    start = container["startupProbe"]
    assert start["grpc"]["port"] == container["livenessProbe"]["grpc"]["port"] == 50051
    assert start.get("periodSeconds", 10) * start.get("failureThreshold", 3) >= 60


def test_kubernetes_pods_say_where_their_metrics_are():
    text = (DEPLOY / "k8s" / "ssmstream.yaml").read_text()
    (dep,) = [d for d in yaml.safe_load_all(text) if d["metadata"]["name"] == "ssmstream"
              and d["kind"] == "Deployment"]  # fmt: skip
    template = dep["spec"]["template"]
    (container,) = template["spec"]["containers"]
    port = parse_config(serve_args(container["command"])).metrics_port
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
    }
