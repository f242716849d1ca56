"""JupyterLab smoke test: README's ``jupyter lab notebook.ipynb`` really opens and runs the notebook.

A headless JupyterLab server (random free port, a token, a temporary root holding notebook.ipynb converted from
notebook.py by jupytext, as setup.sh does) is driven the way the Lab front end drives it: the contents API lists
and reads the notebook, the sessions API starts a kernel with the notebook's kernelspec ``openvla-bridge``
(registered into a temporary Jupyter data dir with setup.sh's own ``ipykernel install --user`` command), and the
notebook's first code cells run on that kernel over its websocket channel. Bounded by ``DEADLINE_S``; the server
runs in its own process group, which is shut down through the API and then killed, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jupytext
import nbformat
import pytest
import websocket  # websocket-client (requirements.txt; jupyter_server depends on it too)
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session

REPO = Path(__file__).resolve().parents[1]
KERNEL_NAME = "openvla-bridge"  # setup.sh's KERNEL_NAME
# from the server's start to its shutdown: measured 11-41 s on 2 shared cores (load 1-5); env override
DEADLINE_S = float(os.environ.get("VLA_BRIDGE_JUPYTER_DEADLINE_S", "90"))
N_CODE_CELLS = 3                # the parameters cell, the imports cell, section 1 (hardware + resolved run)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, port: int, token: str):
        self.base = f"http://127.0.0.1:{port}"
        self.ws_base = f"ws://127.0.0.1:{port}"
        self.token = token

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)


def _wait_ready(server: _Server, proc: subprocess.Popen, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode} before serving:\n{log.read_text()[-3000:]}")
        try:
            if server.api("GET", "/api/status", timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"jupyter lab did not answer /api/status in time:\n{log.read_text()[-3000:]}")


def _execute(ws, session: Session, code: str, deadline: float) -> dict:
    """Send one execute_request on the shell channel; collect stdout, errors and the reply (iopub + shell)."""
    msg = session.msg("execute_request", content={"code": code, "silent": False, "store_history": True,
                                                  "user_expressions": {}, "allow_stdin": False,
                                                  "stop_on_error": True})
    msg["channel"] = "shell"
    ws.send(json.dumps(msg, default=json_default))
    msg_id = msg["header"]["msg_id"]
    out = {"stdout": "", "stderr": "", "error": None, "reply": None, "idle": False}
    while not (out["reply"] and out["idle"]):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"cell did not finish before the deadline; so far: {out}")
        ws.settimeout(left)
        m = json.loads(ws.recv())
        if m.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = m["header"]["msg_type"], m["content"]
        if kind == "stream":
            out[content["name"]] += content["text"]
        elif kind == "error":
            out["error"] = f"{content['ename']}: {content['evalue']}"
        elif kind == "status" and content["execution_state"] == "idle":
            out["idle"] = True
        elif kind == "execute_reply" and m.get("channel") == "shell":
            out["reply"] = content
    return out


def test_jupyterlab_runs_the_first_cells_on_the_project_kernel(tmp_path):
    root, jdata = tmp_path / "root", tmp_path / "jupyter-data"
    root.mkdir()
    # what setup.sh produces: notebook.ipynb from notebook.py (jupytext) and the kernelspec, here in temp dirs
    jupytext.write(jupytext.read(REPO / "notebook.py"), root / "notebook.ipynb", fmt="ipynb")
    env = {**os.environ, "JUPYTER_DATA_DIR": str(jdata), "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"), "JUPYTER_PLATFORM_DIRS": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("FORCE_PATH", None)
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", KERNEL_NAME,
                    "--display-name", "Python (openvla-bridge)"], env=env, check=True, capture_output=True,
                   timeout=30)
    spec = json.loads((jdata / "kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable

    port, token = _free_port(), uuid.uuid4().hex
    t0 = time.monotonic()
    deadline = t0 + DEADLINE_S
    log = tmp_path / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}",
             "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root}", "--ServerApp.terminals_enabled=False"]
            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI containers: root
            cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    server = _Server(port, token)
    ws = None
    try:
        _wait_ready(server, proc, deadline, log)
        t_ready = time.monotonic() - t0

        # the token is required: without it the API refuses
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(server.base + "/api/contents", timeout=5)
        assert denied.value.code == 403

        # the contents API lists the notebook and serves it with the project's kernelspec
        _, listing = server.api("GET", "/api/contents")
        assert [c["path"] for c in listing["content"] if c["type"] == "notebook"] == ["notebook.ipynb"]
        _, model = server.api("GET", "/api/contents/notebook.ipynb?content=1&type=notebook")
        nb = nbformat.from_dict(model["content"])
        assert nb.metadata.kernelspec.name == KERNEL_NAME
        _, specs = server.api("GET", "/api/kernelspecs")
        assert KERNEL_NAME in specs["kernelspecs"], sorted(specs["kernelspecs"])

        # a session for the notebook, as Lab opens it: the kernel starts with the notebook's kernelspec in root/
        _, sess = server.api("POST", "/api/sessions", {"path": "notebook.ipynb", "type": "notebook",
                                                       "name": "notebook.ipynb", "kernel": {"name": KERNEL_NAME}},
                             timeout=30)
        kernel_id = sess["kernel"]["id"]
        assert sess["kernel"]["name"] == KERNEL_NAME
        client = Session(key=b"", username="smoke-test")
        ws = websocket.create_connection(f"{server.ws_base}/api/kernels/{kernel_id}/channels"
                                         f"?session_id={client.session}", header=[f"Authorization: token {token}"],
                                         timeout=max(1.0, deadline - time.monotonic()))

        t_kernel = time.monotonic() - t0
        code_cells = [c for c in nb.cells if c.cell_type == "code"][:N_CODE_CELLS]
        assert "parameters" in code_cells[0].metadata.get("tags", [])
        results = []
        for cell in code_cells:
            res = _execute(ws, client, cell.source, deadline)
            assert res["error"] is None and res["reply"]["status"] == "ok", (cell.source[:200], res)
            results.append(res)

        # the kernel is the venv's Python, in the notebook's directory, importing this checkout's vla_bridge
        where = _execute(ws, client, "import sys, os, vla_bridge; print(sys.executable); print(os.getcwd()); "
                                     "print(vla_bridge.__file__); print(POLICY, len(PARAMS))", deadline)
        exe, cwd, pkg, last = where["stdout"].split("\n")[:4]
        assert Path(exe) == Path(sys.executable)
        assert Path(cwd).resolve() == root.resolve()
        assert Path(pkg).resolve().is_relative_to(REPO.resolve())
        assert last.startswith("auto ") and int(last.split()[1]) > 10
        # section 1 printed the hardware and the resolved run: on this machine offline, the tiny path
        hw_out = results[2]["stdout"]
        assert "CUDA available" in hw_out and "CPU cores" in hw_out, hw_out
        assert "tiny" in hw_out, hw_out
        print(f"jupyterlab smoke test: server ready {t_ready:.1f} s, kernel connected {t_kernel:.1f} s, "
              f"{N_CODE_CELLS} cells run {time.monotonic() - t0:.1f} s after the server's start")

        server.api("DELETE", f"/api/sessions/{sess['id']}", timeout=10)
        _, kernels = server.api("GET", "/api/kernels")
        assert kernels == []
    finally:
        if ws is not None:
            ws.close()
        try:
            server.api("POST", "/api/shutdown", timeout=5)
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001  (best effort: the process group is killed below anyway)
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        try:  # kernels the server started live in its process group: nothing may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
