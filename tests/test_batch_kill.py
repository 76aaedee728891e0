"""kill -9 at any moment, rerun: exactly one record per prompt, each the record of a clean run.

Real SIGKILLs of a `refimpl batch` process at random moments (seeded): before anything is
written, while the manifest or a record is being written, between records. The rerun of the
same command must finish the rest; the union is compared with an uninterrupted run.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from refimpl import batch
from tests.test_batch import ENV, records, strip, write_jsonl

N = 24


def items():
    countries = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Spain", "India", "Ghana", "Iran",
                 "Cuba"]
    out = [{"id": f"c{n}", "prompt": f"The capital of {c} is", "group": "capital"} for n, c in enumerate(countries)]
    cities = ["Lyon", "Osaka", "Cusco", "Mombasa", "Bergen", "Cairo", "Seville", "Mumbai", "Kumasi", "Shiraz",
              "Nairobi", "Kyoto"]
    out += [{"id": f"y{n}", "prompt": f"{y} is located in the country of", "group": "city_in"}
            for n, y in enumerate(cities)]
    return out[:N]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    prompts = write_jsonl(d / "p.jsonl", items())
    batch.run_batch(prompts, None, str(d / "out"))
    return {strip(r)["prompt"]: strip(r) for r in records(d / "out")}


def _wait_for_lines(path, n, proc, limit=120.0):
    t0 = time.time()
    while time.time() - t0 < limit and proc.poll() is None:
        try:
            with open(path, "rb") as f:
                if f.read().count(b"\n") >= n:
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.01)


def test_kill_9_at_random_moments_then_rerun(tmp_path, clean):
    rng = random.Random(20261202)
    prompts = write_jsonl(tmp_path / "p.jsonl", items())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "refimpl", "batch", prompts, "--out", str(out), "--quiet"]
    kills, ended = 0, []
    for round_ in range(6):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if round_ == 0:
            time.sleep(rng.uniform(0.0, 1.5))              # during start-up, before or while the manifest is written
        else:
            have = len(records(out)) if (out / "results.jsonl").exists() else 0
            _wait_for_lines(out / "results.jsonl", have + rng.randint(0, 3), proc)
            time.sleep(rng.uniform(0.0, 0.05))             # anywhere inside the next record (~0.05 s each here)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode != -signal.SIGKILL:             # it ended by itself: only by finishing the batch
            ended.append((round_, proc.returncode, err))
    # a run started after a kill -9 never fails; one that ends by itself has done every prompt
    assert all(rc == 0 for _, rc, _ in ended), ended
    assert not ended or len(records(out)) == N, ended
    assert kills >= 4, (kills, ended)
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with open(out / "results.jsonl", "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    got = [json.loads(line) for line in data.splitlines()]
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(it["id"] for it in items()), "exactly one record per prompt"
    for r in got:
        assert strip(r) == clean[r["prompt"]]
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0 and f"0 prompts analysed (0 errors), {N} already done" in again.stdout
