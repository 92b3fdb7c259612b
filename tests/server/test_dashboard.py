"""The dashboard in a real browser: Debian's chromium, headless, driven by selenium, during a real run.

One federation serves the whole module: a ``titanic-server run`` process, two data owners and a
helper (``titanic-client run`` processes) train a tiny Llama for a few rounds while the page is
open. The page's text is compared with the admin API's JSON, and it must change as the run goes
on without the page being loaded again.

The test keeps a full-page screenshot taken mid-run; ``TITANIC_DASHBOARD_SCREENSHOT=PATH`` copies it
there. The README's ``docs/dashboard.png`` was taken the same way (``save_page``) during a longer
run: full fine-tuning, two helpers, four rounds of 16 steps.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .support import ADMIN_TOKEN, admin, client_args, processes, spawn, start_server, wait_until

pytestmark = pytest.mark.slow

ROUNDS = 3
STEPS = 10
OWNERS = ("alice", "bob")
HELPER = "helper0"
HELPER_FLAGS = ["--device", "cpu", "--capacity", "2", "--declare-flops-per-s", "5e10",
                "--declare-upload-bytes-per-s", "1e8", "--declare-download-bytes-per-s", "1e8", "--declare-rtt-s", "0.001"]  # fmt: skip
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


@dataclass
class Federation:
    """The running server (its admin URL) and the run to start (the run file's sections)."""

    admin_url: str
    spec: dict[str, Any]

    def start_run(self) -> str:
        """Start the run as ``titanic-server runs start`` does (POST /v1/runs); returns its id."""
        request = urllib.request.Request(
            self.admin_url + "/v1/runs",
            data=json.dumps({"spec": self.spec}).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            run_id: str = json.load(answer)["run_id"]
        return run_id


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A server, two owners and a helper with a connected plan, and a LoRA run of ``ROUNDS`` rounds of ``STEPS`` steps to start."""
    import torch
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import gpt2_tokenizer, save_pretrained_dir, tiny_config
    from testbed.demo_data import write_owner_splits

    root = tmp_path_factory.mktemp("federation")
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    save_pretrained_dir(AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))), tokenizer, root / "model")
    splits = write_owner_splits(root / "data", len(OWNERS), max_chars_per_owner=10_000)
    spec = {  # a run file's sections, as `titanic-server runs start` sends them
        "rounds": ROUNDS, "seed": 3, "tokenizer": str(root / "model"), "participation": {"mode": "parallel"},
        "local_work": {"steps": STEPS}, "training": {"batch_size": 2, "seq_len": 32, "lr": 1e-2},
        "finetune": {"mode": "lora", "r": 4}, "evaluation": {"val_fraction": 0.2},
    }  # fmt: skip
    with processes() as started:
        server, control, admin_url = start_server(
            root / "state", "--model", str(root / "model"), "--stages", "3",
            "--heartbeat-interval", "0.4", "--heartbeat-timeout", "5", "--settle", "0.5",
        )  # fmt: skip
        started.append(server)
        for owner, split in zip(OWNERS, splits, strict=True):
            started.append(spawn(owner, "client.cli", *client_args(control, owner, root / owner, "--data", str(split.path))))
        started.append(spawn(HELPER, "client.cli", *client_args(control, HELPER, root / HELPER, *HELPER_FLAGS)))
        wait_until(lambda: admin(admin_url, "/v1/plan")["state"] == "connected", 120, "a connected plan")
        yield Federation(admin_url=admin_url, spec=spec)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium under selenium, with the system's chromedriver (nothing is downloaded)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (apt-get install; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1800"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield session
    finally:
        session.quit()


def log_in(browser: Any, url: str, token: str) -> None:
    """Fill the login form at ``url`` with ``token`` and submit it."""
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(url + "/")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()


def page_waits_for(browser: Any, script: str, what: str, timeout_s: float = 90) -> Any:
    """Poll ``script`` (JavaScript returning a value) in the page until it is truthy; returns it."""
    return wait_until(lambda: browser.execute_script(script), timeout_s, what, interval_s=0.2)


def read(browser: Any, css: str, attribute: str = "") -> str:
    """The text (or ``attribute``) of the element ``css`` selects, read in one script: the page redraws between calls."""
    value = browser.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e === null ? null : arguments[1] ? e.getAttribute(arguments[1]) : e.innerText;",
        css, attribute,
    )  # fmt: skip
    assert isinstance(value, str), f"nothing on the page matches {css} (or it has no {attribute or 'text'})"
    return value


def shown(browser: Any, css: str) -> bool:
    """Whether the element ``css`` selects is on the page and not hidden."""
    return bool(browser.execute_script("const e = document.querySelector(arguments[0]); return e && !e.closest('[hidden]');", css))


def in_bytes(text: str) -> float:
    """``"73.6 MiB"`` -> bytes (as the page rounds them)."""
    number, unit = text.split()
    return float(number) * UNITS[unit]


def save_page(browser: Any, path: Path) -> None:
    """A PNG of the whole page, below the window's fold too (chromium's DevTools protocol)."""
    width, height = browser.execute_script(
        "const d = document.documentElement; return [d.scrollWidth, d.scrollHeight]"
    )
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(shot["data"]))


def progress(browser: Any) -> tuple[int, ...]:
    """The run's round and each owner's round and steps done, as the page shows them now."""
    values = browser.execute_script(
        "return [Number(document.getElementById('round-text').dataset.round || 0),"
        " ...[...document.querySelectorAll('#owners-progress .owner')].flatMap("
        "   (e) => [Number(e.dataset.round), Number(e.dataset.done)])]"
    )
    return tuple(int(v) for v in values)


def test_the_dashboard_shows_the_run_live_and_its_numbers_match_the_api(
    federation: Federation, browser: Any, tmp_path: Path
) -> None:
    """Every panel shows the admin API's numbers, and step progress moves while the page stays loaded."""
    from selenium.webdriver.common.by import By

    url = federation.admin_url
    log_in(browser, url, ADMIN_TOKEN)
    page_waits_for(browser, "return window.dashboardUpdates > 0", "the first snapshot")
    load_id = browser.execute_script("return window.dashboardLoadId")
    assert shown(browser, "#no-run") and not shown(browser, "#run-body")

    # Live: the run appears, then its step progress (or round) moves, all with no navigation.
    run_id = federation.start_run()
    page_waits_for(browser, "return document.querySelectorAll('#owners-progress .owner').length", "step progress")
    assert browser.execute_script("return document.getElementById('run-select').value") == run_id
    before, updates = progress(browser), browser.execute_script("return window.dashboardUpdates")
    wait_until(lambda: progress(browser) != before, 60, f"the page's progress to move from {before}", interval_s=0.2)
    assert browser.execute_script("return window.dashboardUpdates") > updates
    assert browser.execute_script("return window.dashboardLoadId") == load_id
    assert browser.execute_script("return performance.getEntriesByType('navigation').length") == 1

    # Clients: names, status (live) and the helper's declared fields, as /v1/clients has them.
    clients = admin(url, "/v1/clients")
    assert {c["client_id"] for c in clients} == {*OWNERS, HELPER}
    for c in clients:
        row = f'#clients tr[data-client="{c["client_id"]}"]'
        assert read(browser, f"{row} td.name") == c["client_id"]
        assert read(browser, f"{row} td.status") == f"live {c['status']}"
        assert set(read(browser, f"{row} td.profile-kind", "title").split(", ")) - {""} == set(c["profile"]["declared"])
    assert read(browser, f'#clients tr[data-client="{HELPER}"] td.profile-kind').startswith("declared: compute")

    # The plan: who holds each stage of each pipeline.
    plan = admin(url, "/v1/plan")
    assert len(plan["rows"]) == 3 * len(OWNERS)
    for row in plan["rows"]:
        box = f'#pipelines .stage[data-pipeline="{row["pipeline"]}"][data-partition="{row["partition"]}"]'
        assert read(browser, f"{box} .holder") == row["client_id"] == read(browser, box, "data-client")

    # A screenshot of the whole page once the first round is merged.
    wait_until(lambda: progress(browser)[0] >= 2, 90, "round 2 on the page", interval_s=0.2)
    save_page(browser, tmp_path / "dashboard.png")
    if target := os.environ.get("TITANIC_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(tmp_path / "dashboard.png", target)

    # When the run is done, the page's numbers are the API's.
    run = wait_until(lambda: (r := admin(url, f"/v1/runs/{run_id}"))["state"] == "done" and r, 120, "the run's end", interval_s=0.5)
    page_waits_for(browser, "return document.getElementById('run-state').textContent === 'done'", "the page to say done")
    assert browser.execute_script("return window.dashboardLoadId") == load_id
    assert read(browser, "#round-text").startswith(f"round {ROUNDS} / {ROUNDS}")
    for entry in run["per_round"]:
        for owner, value in entry["owners"].items():
            text = read(browser, f'#ppl-table td.ppl[data-owner="{owner}"][data-round="{entry["round"]}"]')
            assert float(text) == pytest.approx(value, abs=0.0051), (owner, entry["round"])
        weighted = read(browser, f'#ppl-table td.ppl[data-owner=""][data-round="{entry["round"]}"]')
        assert float(weighted) == pytest.approx(entry["ppl"], abs=0.0051)
    assert {t["client"] for t in run["traffic"]} == {*OWNERS, HELPER}
    for t in run["traffic"]:
        traffic = f'#traffic-table td.traffic[data-client="{t["client"]}"][data-round="{t["round"]}"]'
        up, down = (line.split(" ", 1)[1] for line in read(browser, traffic).splitlines())
        assert int(read(browser, traffic, "data-uploaded")) == t["uploaded"]
        assert in_bytes(up) == pytest.approx(t["uploaded"], rel=0.01, abs=0.51)
        assert in_bytes(down) == pytest.approx(t["downloaded"], rel=0.01, abs=0.51)
    # The loss curves are the owners' losses step by step, every round in a row.
    plot = browser.execute_script("const p = charts['loss-chart'].plot; return [p.series.map((s) => s.label), p.data]")
    labels, data = plot
    for owner in OWNERS:
        want = [x for h in sorted(run["history"], key=lambda h: h["round"]) if h["owner"] == owner for x in h["losses"]]
        assert len(want) == ROUNDS * STEPS and data[labels.index(owner)] == pytest.approx(want)
    # Measured stage times are the latest round's, per pipeline.
    latest = {h["bridge_run"]: h for h in run["history"] if h["round"] == ROUNDS}
    for row in plan["rows"]:
        measured = f'#pipelines .stage[data-pipeline="{row["pipeline"]}"][data-partition="{row["partition"]}"] .measured'
        want = latest[row["run_id"]]["stage_seconds"][row["partition"]]
        assert float(read(browser, measured, "data-seconds")) == pytest.approx(want)
        assert read(browser, measured).startswith("measured ")
    # Idle ratios: one row per device of the plan, one cell per round, as the history entries carry them.
    ratios = {(d, h["round"]): v for h in run["history"] for d, v in h["idle_ratio"].items()}
    assert {d for d, _ in ratios} == {*OWNERS, HELPER}
    for (device, round_), ratio in ratios.items():
        cell = f'#idle-table tr[data-device="{device}"] td[data-round="{round_}"]'
        assert read(browser, cell) == f"{100 * ratio:.1f} %"

    # Logging out ends the session: the login form, and no cookie left.
    browser.find_element(By.ID, "logout").click()
    wait_until(lambda: 'name="token"' in browser.page_source, 10, "the login form")
    assert not browser.get_cookies()


def test_a_wrong_token_sees_nothing(federation: Federation, browser: Any) -> None:
    """A wrong token gets the login form again with no data in the page, and the API refuses a forged cookie."""
    url = federation.admin_url
    log_in(browser, url, "not-the-token")

    def refused() -> str | None:
        source: str = browser.page_source
        return source if "not the admin token" in source else None

    source = wait_until(refused, 10, "the login form's refusal")
    assert 'name="token"' in source
    assert not any(name in source for name in (*OWNERS, HELPER)) and "clients-panel" not in source
    assert not browser.get_cookies()
    request = urllib.request.Request(url + "/v1/clients", headers={"Cookie": "titanic_session=forged"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


def test_a_time_budget_run_reports_idle_per_device_in_history_api_and_runs_show(federation: Federation) -> None:
    """Local work "time" on the same federation: each owner trains about the budget, copies weigh by their samples,
    and every device (owners and the helper) has busy, bubble and waiting ratios in the history, per round and in
    ``titanic-server runs show``."""
    import subprocess
    import sys

    from .support import REPO_ROOT

    url = federation.admin_url
    wait_until(lambda: not any(r["state"] in ("waiting", "preparing", "loading", "training", "uploading", "merging")
                               for r in admin(url, "/v1/runs")), 300, "the earlier run to end")  # fmt: skip
    budget = 3.0
    spec = {**federation.spec, "rounds": 2, "local_work": {"mode": "time", "steps": 4, "seconds": budget}}
    run_id = Federation(admin_url=url, spec=spec).start_run()
    run = wait_until(lambda: (r := admin(url, f"/v1/runs/{run_id}"))["state"] in ("done", "failed", "stopped") and r,
                     300, "the time-budget run")  # fmt: skip
    assert run["state"] == "done", run["error"]
    for h in run["history"]:
        assert h["weight"] == h["samples"] == len(h["losses"]) * 2  # batch_size 2
        assert budget / 2 < h["seconds"] < 2 * budget  # the owner's round, evaluation included, about the budget
        assert set(h["idle"]) == {h["owner"], HELPER}
        for figures in h["idle"].values():
            assert figures["busy"] + figures["bubble"] + figures["wait"] == pytest.approx(1.0)
            assert 0.0 <= figures["idle"] <= 1.0 and figures["wall_s"] >= h["seconds"] - 0.5
        assert h["idle"][HELPER]["role"] == "helper" and h["idle"][h["owner"]]["bubble"] > 0  # it waits on the helper's stage
    assert [sorted(r["idle"]) for r in run["per_round"]] == [sorted([*OWNERS, HELPER])] * 2
    shown = subprocess.run([sys.executable, "-m", "server.cli", "runs", "show", run_id, "--admin", url, "--token", ADMIN_TOKEN],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "bubble" in shown.stdout and "waiting" in shown.stdout and HELPER in shown.stdout
