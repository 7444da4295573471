"""Reading fencing tags: strict, whatever a database user puts in its name."""

from poolbroker.fencing import lease_of


def test_only_ascii_digits_make_a_lease_id():
    prefix = "/pbabc123:"
    assert lease_of("app/pbabc123:42", prefix) == 42
    assert lease_of("app/pbabc123:9223372036854775807", prefix) == 2**63 - 1
    for hostile in ("x/pbabc123:²", "x/pbabc123:٣", "x/pbabc123:4 2", "x/pbabc123:",
                    "x/pbabc123:-1", "x/pbabc123:" + "9" * 40, "x/pbother:42", "plain"):
        assert lease_of(hostile, prefix) is None, hostile
