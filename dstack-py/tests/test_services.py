"""A service from Python: `Run.service_url` and `Run.service_model` point at the server's
proxy, and a request with the client's token reaches the replica through it."""

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from dstack.api import Client, RunStatus, Service, ServiceModel

APP = Path(__file__).resolve().parents[2] / "dstack-cli" / "tests" / "apps" / "service_app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_service_has_a_url_and_a_model_behind_the_token(client: Client, python: str) -> None:
    port = free_port()
    service = Service(
        name="py-svc", port=port, model="py-model", commands=[f"{python} {APP} {port}"]
    )
    run = client.runs.apply_configuration(service)
    try:
        url = run.service_url
        assert url is not None and url.endswith("/proxy/services/main/py-svc/"), url
        model = run.service_model
        assert isinstance(model, ServiceModel)
        assert (model.name, model.url) == ("py-model", url.rstrip("/") + "/v1")
        config = Path(client.home, "config.yml").read_text()
        token = re.search(r'token: "([^"]+)"', config).group(1)  # type: ignore[union-attr]
        request = urllib.request.Request(url + "hi", headers={"Authorization": f"Bearer {token}"})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    about = json.loads(answer.read())
                break
            except urllib.error.HTTPError as e:
                # 503 until the model's probe (a chat completion) has passed.
                assert e.code == 503 and time.monotonic() < deadline, e
                time.sleep(0.2)
        assert about["path"] == "/hi"
        try:
            urllib.request.urlopen(url + "hi", timeout=10)
            raise AssertionError("a request without the token was let through")
        except urllib.error.HTTPError as e:
            assert e.code == 401
        assert run.refresh().status == RunStatus.RUNNING
        # Applied again with a change: updated in place (dstack's in-place update), not refused.
        service.env = {"CHANGED": "1"}
        updated = client.runs.apply_configuration(service)
        assert updated.name == "py-svc" and updated.id == run.id
        assert updated._snapshot["run"]["deployment_num"] == 1
    finally:
        run.stop()
    assert client.runs.get("py-svc").wait(timeout=60).status == RunStatus.TERMINATED  # type: ignore[union-attr]
    assert client.runs.get("py-svc").service_url == url  # type: ignore[union-attr]
