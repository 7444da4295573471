"""Fork safety: a pool created (and used) before fork works in the child with a
fresh socket and no inherited connections; the parent's sessions survive."""

import pytest

from helpers import Sampler, Worker, count_backends, new_tag, tagged

pytestmark = pytest.mark.integration


def test_os_fork_child_gets_fresh_pool_and_parent_sessions_survive(pg, broker_factory):
    broker = broker_factory({"default": 4})
    tag = new_tag()
    result = Worker(dict(mode="fork", dsn=tagged(pg.dsn, tag), broker=broker.url)).result()
    assert result["child_exit"] == 0, result
    assert result["busy_after"] == result["busy_pid"], result
    assert result["pids_after"] == sorted([result["busy_pid"], result["idle_pid"]]), result
    assert broker.wait_leased(0, 2) == 0


@pytest.mark.parametrize("start", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("ending", ["close", "terminate"])
def test_multiprocessing_children_share_the_budget(pg, broker_factory, start, ending):
    """With each start method, the pool reaches the children (inherited with fork,
    pickled as its configuration with spawn and forkserver, through the initializer
    and with every task), they stay within the budget, and their leases come back
    at once however the pool ends: close() (children exit normally) or terminate()
    (SIGTERM, what `with multiprocessing.Pool()` does), not after the TTL (10 s)."""
    broker = broker_factory({"default": 3}, ttl=10.0)
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler:
        result = Worker(dict(mode="mp", dsn=tagged(pg.dsn, tag), broker=broker.url,
                             procs=4, tasks=40, start=start,
                             terminate=ending == "terminate")).result()
        # the worker prints its result once the children are gone
        assert broker.wait_leased(1, 1.0) <= 1, broker.status()  # the parent's own
    assert result["after"] == result["parent_pid"], "the parent's session was disturbed"
    assert result["parent_pid"] not in result["child_pids"]
    assert result["pools_per_child"] and set(result["pools_per_child"]) == {1}, result
    assert result["task_pool_is_initializer_pool"], result
    # every task saw the client's threads (the lease I/O one at least), none of
    # which may take the SIGTERM that terminate() sends to the child
    seen = result["client_threads_sigterm"]
    assert all(seen) and all(blocks for task in seen for _, blocks in task), seen
    assert sampler.max[tag] <= 3, sampler.max
    assert broker.wait_leased(0, 5.0) == 0, broker.log_text()[-2000:]


def test_a_sigterm_the_main_thread_missed_still_ends_the_child(pg, broker_factory):
    """Python runs signal handlers in the main thread when it next runs Python
    code. A SIGTERM taken by another thread while the main thread sleeps in a
    multiprocessing lock (as one arriving just before that wait is) is noted but
    not handled: the child lived on, and Pool.terminate() waited forever (seen in
    CI). The client re-sends it to the main thread until its handler has run:
    the child gives its lease back and dies of SIGTERM."""
    broker = broker_factory({"default": 2}, ttl=30.0)
    tag = new_tag()
    result = Worker(dict(mode="lost_sigterm", dsn=tagged(pg.dsn, tag),
                         broker=broker.url)).result()
    assert result["exitcode"] == -15, result
    assert broker.wait_leased(0, 5.0) == 0, broker.status()  # not after the TTL (30 s)
    assert count_backends(pg.dsn, tag) == 0


def test_subprocess_with_preexec_fn_while_a_pool_keeps_min_size(pg, broker_factory):
    broker = broker_factory({"default": 4})
    result = Worker(dict(mode="preexec", dsn=pg.dsn, broker=broker.url, min_size=2,
                         spawns=10)).result()
    assert result["codes"] == [[0, "child ok", ""]] * 10, result["codes"]
