#!/usr/bin/env python3
"""Keeps each DaemonSet's ``checksum/config`` annotation equal to the sha256 of its ConfigMap.

The annotation sits on the pod template, so a changed espline.yaml changes the template and
``kubectl apply`` rolls the pods; without it, a new ConfigMap would reach the running pods'
files but not the daemon, which reads its configuration once. Run it after editing a
ConfigMap, then apply:

    python3 k8s/render.py            # rewrite stale annotations in place
    python3 k8s/render.py --check    # exit 1 while one is stale (tests/test_k8s.py asserts it)

The checksum covers the ConfigMap's ``data`` and ``binaryData`` as canonical JSON, so that
reformatting or commenting the manifest rolls nothing and any change of content rolls the
pods. Needs only PyYAML (an espline dependency).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
# Each variant is a folder with a configmap.yaml and the daemonset.yaml that mounts it.
VARIANTS = (".", "multus")
ANNOTATION = "checksum/config"
_ANNOTATION_LINE = re.compile(
    r'^(?P<lead>[ \t]*checksum/config:[ \t]*)(?P<value>"[^"\n]*"|[^\s#]*)', re.MULTILINE
)


class RenderError(Exception):
    """A manifest that render.py cannot keep in step: the message names the file."""


def config_checksum(configmap: Mapping[str, Any]) -> str:
    """The sha256 (hex) of a ConfigMap's content: ``data`` and ``binaryData``."""
    content = {
        "data": configmap.get("data") or {},
        "binaryData": configmap.get("binaryData") or {},
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _load_one(path: Path, kind: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == kind]
    if len(found) != 1:
        raise RenderError(f"{path}: expected one {kind}, found {len(found)}")
    return found[0]


def _mounted_configmaps(daemonset: Mapping[str, Any]) -> set[str]:
    names = set()
    for volume in daemonset["spec"]["template"]["spec"].get("volumes", []):
        if "configMap" in volume:
            names.add(volume["configMap"]["name"])
        for source in volume.get("projected", {}).get("sources", []):
            if "configMap" in source:
                names.add(source["configMap"]["name"])
    return names


def expected_checksum(variant: Path) -> str:
    """The checksum that ``variant``'s daemonset.yaml should carry; checks the pairing."""
    configmap = _load_one(variant / "configmap.yaml", "ConfigMap")
    daemonset = _load_one(variant / "daemonset.yaml", "DaemonSet")
    name = configmap["metadata"]["name"]
    if _mounted_configmaps(daemonset) != {name}:
        raise RenderError(
            f"{variant / 'daemonset.yaml'}: mounts ConfigMaps "
            f"{sorted(_mounted_configmaps(daemonset))}, not just {name!r} of configmap.yaml"
        )
    return config_checksum(configmap)


def current_checksum(text: str, path: Path) -> str:
    """The annotation's value in a daemonset.yaml's text; exactly one must be there."""
    matches = list(_ANNOTATION_LINE.finditer(text))
    if len(matches) != 1:
        raise RenderError(f"{path}: expected one {ANNOTATION} annotation, found {len(matches)}")
    return matches[0]["value"].strip('"')


def render(k8s_dir: Path = K8S_DIR, *, write: bool) -> list[Path]:
    """The daemonset.yaml files whose annotation was stale (rewritten when ``write``)."""
    stale = []
    for name in VARIANTS:
        variant = k8s_dir / name
        path = variant / "daemonset.yaml"
        text = path.read_text(encoding="utf-8")
        want = expected_checksum(variant)
        if current_checksum(text, path) == want:
            continue
        stale.append(path)
        if write:
            text = _ANNOTATION_LINE.sub(rf'\g<lead>"{want}"', text)
            path.write_text(text, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Refresh the checksum/config annotations of k8s/'s DaemonSets.")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if an annotation is stale")
    parser.add_argument("--dir", type=Path, default=K8S_DIR, help="the k8s folder")
    args = parser.parse_args(argv)
    try:
        stale = render(args.dir, write=not args.check)
    except (RenderError, OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    for path in stale:
        verb = "stale" if args.check else "updated"
        print(f"{path}: {ANNOTATION} {verb}", file=sys.stderr if args.check else sys.stdout)
    if args.check and stale:
        print("run: python3 k8s/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
