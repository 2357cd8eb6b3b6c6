"""``python -m helix_async launch --ray``: a local Ray instance (2 CPUs, a fake ``gpu_type:CPU``
resource) places the host and 3 workers of the tiny model, their links encrypted with CURVE keys;
the endpoint serves; Ctrl-C stops every process.  A plan whose machine types the Ray cluster does not offer is refused (exit 2).

The Ray instance listens on loopback only and is stopped at the end (``ray stop --force``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from procwait import wait_for_file

pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("aiohttp")

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.placement.flow import max_flow  # noqa: E402
from helix_async.placement.io import load_shipped_layout, write_placement  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# loopback only; Ray's token authentication is for clusters reachable from elsewhere
ENV = dict(os.environ, HELIX_LOG_LEVEL="WARNING", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the ray command is not installed")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    start = subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--resources", json.dumps({"gpu_type:CPU": 3}), "--include-dashboard", "false", "--temp-dir", temp,
         "--disable-usage-stats"], env=ENV, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=ENV, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_launch_serves_the_tiny_model_through_ray_and_ctrl_c_stops_it(ray_address: str, tmp_path: Path) -> None:
    import http.client
    from urllib.parse import urlparse

    pl = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    plan = write_placement(pl, tmp_path / "plan.toml", flow=max_flow(pl))
    url_file = tmp_path / "url"
    # no --keys: launch makes CURVE keys for the run and gives each process its own pair
    p = subprocess.Popen([sys.executable, "-m", "helix_async", "launch", "--ray", ray_address, str(plan), "--http",
                          "127.0.0.1:0", "--url-file", str(url_file)],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(url_file, p, 240)
        u = urlparse(url_file.read_text().strip())
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "hello", "max_tokens": 5, "temperature": 0}),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        body = json.loads(r.read())
        c.close()
        assert r.status == 200 and body["usage"]["completion_tokens"] == 5
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "[launch] 3 workers placed" in out and "[host] all 3 workers ready" in out and "[launch] stopping" in out
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    left = subprocess.run(["pgrep", "-f", "m helix_async .*(host --plan|worker --connect)"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


def test_launch_refuses_a_plan_the_ray_cluster_cannot_place(ray_address: str, tmp_path: Path) -> None:
    plan = write_placement(load_shipped_layout("ilp"), tmp_path / "plan.toml")
    p = subprocess.run([sys.executable, "-m", "helix_async", "launch", "--ray", ray_address, str(plan)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr
    assert "--ray: the plan needs" in p.stderr and "gpu_type:" in p.stderr
