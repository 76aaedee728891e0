"""refimpl batch on Dask: a LocalCluster on loopback with two worker processes (--workers 2, and
--scheduler ADDRESS of a cluster started here) gives records identical to the serial run; the
client alone writes OUT, so resumption holds across modes."""
import distributed          # refimpl[cluster]; in the test extra
import pytest

from refimpl import batch
from tests.test_batch import ITEMS, records, strip, write_jsonl


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    d = tmp_path_factory.mktemp("serial")
    prompts = write_jsonl(d / "p.jsonl", ITEMS)
    batch.run_batch(prompts, None, str(d / "out"))
    return prompts, {r["id"]: r for r in records(d / "out")}


def _opens():
    from refimpl import batch
    return len(batch.WORKER_OPENS)


def _same(out, ref):
    got = records(out)
    assert sorted(r["id"] for r in got) == sorted(ref)
    for r in got:
        assert {**strip(r), "key": r["key"], "group": r["group"]} == \
            {**strip(ref[r["id"]]), "key": ref[r["id"]]["key"], "group": ref[r["id"]]["group"]}


def test_workers_2_gives_the_serial_records(serial, tmp_path):
    prompts, ref = serial
    st = batch.run_batch(prompts, None, str(tmp_path / "out"), workers=2, chunk=2)
    assert (st["done"], st["errors"]) == (len(ITEMS), 1)
    _same(tmp_path / "out", ref)


def test_scheduler_address_of_a_running_cluster_and_resumption(serial, tmp_path):
    prompts, ref = serial
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "first.jsonl", ITEMS[:2])
    batch.run_batch(first, None, str(out))                    # two done serially
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        st = batch.run_batch(prompts, None, str(out), scheduler=cluster.scheduler_address)
        with distributed.Client(cluster) as client:
            opens = client.run(_opens)              # {worker address: models it opened}
    assert len(opens) == 2 and all(n <= 1 for n in opens.values()) and sum(opens.values()) >= 1, opens
    assert (st["done"], st["skipped"]) == (len(ITEMS) - 2, 2)
    _same(out, ref)
