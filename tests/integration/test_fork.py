"""Fork safety: a pool created (and used) before fork works in the child with a
fresh socket and no inherited connections; the parent's sessions survive."""

import pytest

from helpers import Sampler, Worker, new_tag, tagged

pytestmark = pytest.mark.integration


def test_os_fork_child_gets_fresh_pool_and_parent_sessions_survive(pg, broker_factory):
    broker = broker_factory({"default": 4})
    tag = new_tag()
    result = Worker(dict(mode="fork", dsn=tagged(pg.dsn, tag), broker=broker.url)).result()
    assert result["child_exit"] == 0, result
    assert result["busy_after"] == result["busy_pid"], result
    assert result["pids_after"] == sorted([result["busy_pid"], result["idle_pid"]]), result
    assert broker.wait_leased(0, 2) == 0


@pytest.mark.parametrize("ending", ["close", "terminate"])
def test_multiprocessing_fork_children_share_the_budget(pg, broker_factory, ending):
    broker = broker_factory({"default": 3})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        result = Worker(dict(mode="mp", dsn=tagged(pg.dsn, tag), broker=broker.url,
                             procs=4, tasks=40, terminate=ending == "terminate")).result()
    assert result["after"] == result["parent_pid"], "the parent's session was disturbed"
    assert result["parent_pid"] not in result["child_pids"]
    assert sampler.max[tag] <= 3, sampler.max
    # Children that exit normally end with os._exit, which skips atexit; a
    # multiprocessing finalizer gives their leases back at once. Children killed
    # by Pool.terminate() (SIGTERM) lose theirs when the TTL runs out.
    within = 1.0 if ending == "close" else 5.0
    assert broker.wait_leased(0, within) == 0


def test_subprocess_with_preexec_fn_while_a_pool_keeps_min_size(pg, broker_factory):
    broker = broker_factory({"default": 4})
    result = Worker(dict(mode="preexec", dsn=pg.dsn, broker=broker.url, min_size=2,
                         spawns=10)).result()
    assert result["codes"] == [[0, "child ok", ""]] * 10, result["codes"]
