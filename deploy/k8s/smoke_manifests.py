#!/usr/bin/env python3
"""Turns the rendered `local` overlay into what deploy/k8s/smoke.sh plays with `podman kube play`.

usage: smoke_manifests.py RENDERED.yaml RUN_ID IMAGE SECRET PORT_BASE KAFKA_BROKERS OUT_CHECK OUT_PLAY

The changes isolate one run on a shared host: names prefixed with RUN_ID (Podman's pod and
container names are host-wide), ports moved to PORT_BASE+1.. (env, containerPorts and probes
together), KAFKA_BROKERS of this checkout, a topic prefix and consumer groups of the run's own,
the image just built and the run's Podman secret. OUT_CHECK is the result as Kubernetes would
get it (deploy/k8s/check_manifests.py checks it like the overlays); OUT_PLAY is the same
without what Podman 4.3 cannot play: only ConfigMaps and Deployments, and no `ports` on a
hostNetwork pod ("PortMappings can only be used with Bridge or slirp4netns networking").
"""

import copy
import sys

import yaml

OFFSETS = {  # port name -> offset from PORT_BASE, per service
    "order": {"grpc": 1, "http": 4, "metrics": 5},
    "payment": {"grpc": 2, "metrics": 6},
    "inventory": {"grpc": 3, "metrics": 7},
}
ADDR = {"grpc": "GRPC_ADDR", "http": "HTTP_ADDR", "metrics": "METRICS_ADDR"}


def main(rendered, run_id, image, secret, port_base, brokers, out_check, out_play):
    port_base = int(port_base)
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    keep = []
    for d in docs:
        kind = d["kind"]
        if kind == "ConfigMap" and "KAFKA_BROKERS" in (d.get("data") or {}):
            d["data"]["KAFKA_BROKERS"] = brokers
            d["data"]["KAFKA_TOPIC_PREFIX"] = f"{run_id}."
        if kind != "Deployment":
            keep.append(d)
            continue
        svc = d["metadata"]["name"]
        d["metadata"]["name"] = f"{run_id}-{svc}"
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        c["image"] = image
        ports = {name: port_base + off for name, off in OFFSETS[svc].items()}
        for p in c["ports"]:
            p["containerPort"] = ports[p["name"]]
        for e in c["env"]:
            for name, var in ADDR.items():
                if e["name"] == var:
                    e["value"] = f"0.0.0.0:{ports[name]}"
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                ref["name"] = secret
        c["env"].append({"name": "KAFKA_GROUP_ID", "value": f"{run_id}.{svc}"})
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            c[probe]["grpc"]["port"] = ports["grpc"]
        keep.append(d)
    with open(out_check, "w") as f:
        yaml.safe_dump_all(keep, f, sort_keys=False)
    play = []
    for d in copy.deepcopy(keep):
        if d["kind"] == "ConfigMap":
            play.append(d)
        elif d["kind"] == "Deployment":
            spec = d["spec"]["template"]["spec"]
            if spec.get("hostNetwork"):
                for c in spec["containers"]:
                    c.pop("ports", None)
            play.append(d)
    with open(out_play, "w") as f:
        yaml.safe_dump_all(play, f, sort_keys=False)


if __name__ == "__main__":
    if len(sys.argv) != 9:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:])
