"""What the OpenAI HTTP tests share: the prompt, raw HTTP calls, `/metrics` parsed with
prometheus_client's parser."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.inprocess import InProcessDeployment

PROMPT = "The quick brown fox"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post_raw(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metrics(d: InProcessDeployment) -> dict[str, dict[tuple, float]]:
    """name -> {label values (sorted by label name, `le` and the like included): value}."""
    status, body = _get(d.http_url + "/metrics")
    assert status == 200
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = tuple(v for _, v in sorted(sample.labels.items()))
            out.setdefault(sample.name.removesuffix("_total"), {})[key] = sample.value
    return out
