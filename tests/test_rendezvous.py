"""The broker's bookkeeping, without a network."""

from __future__ import annotations

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.rendezvous import SeedList, SessionTable
from simulsyn_core._internal.wire import parse_line

A = Endpoint("198.51.100.2", 4000)
B = Endpoint("203.0.113.2", 5000)
C = Endpoint("192.0.2.77", 6000)


def test_seed_list_own_entry_last_and_deduplicated() -> None:
    seeds = SeedList()
    assert seeds.visit(A, 0.0) == [A]
    assert seeds.visit(B, 1.0) == [A, B]
    assert seeds.visit(A, 2.0) == [B, A]  # older copy of A dropped, A last


def test_seed_list_ages_out_and_caps_at_255() -> None:
    seeds = SeedList()
    seeds.visit(A, 0.0)
    assert seeds.visit(B, 61.0) == [B]
    for i in range(300):
        seeds.visit(Endpoint("10.0.0.1", 1000 + i), 62.0)
    entries = seeds.visit(C, 62.0)
    assert len(entries) == 255 and entries[-1] == C


def _msgs(replies: list) -> list:
    return [(r.conn, parse_line(r.data.rstrip(b"\n")), r.close) for r in replies]


def test_pairing_tells_both_at_once_and_nothing_else() -> None:
    table = SessionTable()
    ((conn, msg, close),) = _msgs(table.register("a", "s", A, Endpoint("10.1.0.2", 4000), 0.0))
    assert (conn, msg.verb, close) == ("a", "REGISTERED", False)
    assert msg.get("public") == str(A)
    table.register("c", "other", C, None, 0.5)
    out = _msgs(table.register("b", "s", B, None, 1.0))
    assert [(c, m.verb, close) for c, m, close in out] == [("a", "PEER", True),
                                                           ("b", "PEER", True)]
    to_a, to_b = out[0][1], out[1][1]
    assert (to_a.get("public"), to_a.get("peer"), to_a.get("role")) == (str(A), str(B), "first")
    assert to_a.get("peer_local") is None
    assert (to_b.get("public"), to_b.get("peer"), to_b.get("role")) == (str(B), str(A), "second")
    # A's LAN address goes to nobody behind another public IP (it is of no use to them).
    assert to_b.get("peer_local") is None and "10.1.0.2" not in str(out)
    assert str(C) not in str(out)
    assert len(table) == 1  # only "other" still waits


def test_disconnect_forgets_the_waiting_client() -> None:
    table = SessionTable()
    table.register("a", "s", A, None, 0.0)
    table.disconnect("a")
    ((_, msg, _),) = _msgs(table.register("b", "s", B, None, 1.0))
    assert msg.verb == "REGISTERED"


def test_same_endpoint_registering_again_replaces_itself() -> None:
    table = SessionTable()
    table.register("a1", "s", A, None, 0.0)
    out = _msgs(table.register("a2", "s", A, None, 1.0))
    assert [(c, m.verb, m.get("code")) for c, m, _ in out] == [("a1", "ERROR", "replaced"),
                                                                ("a2", "REGISTERED", None)]


def test_bad_session_names_and_limits() -> None:
    table = SessionTable(max_waiting=1)
    ((_, msg, close),) = _msgs(table.register("x", "bad name!", A, None, 0.0))
    assert (msg.verb, msg.get("code"), close) == ("ERROR", "bad-session", True)
    table.register("a", "s1", A, None, 0.0)
    # Full, and the newcomer's network holds as many as any other: nobody to evict.
    ((_, msg, _),) = _msgs(table.register("b", "s2", Endpoint("198.51.100.3", 5000), None, 0.0))
    assert msg.get("code") == "busy"


def test_expire_times_out_lonely_clients() -> None:
    table = SessionTable(wait_max_s=10)
    table.register("a", "s", A, None, 0.0)
    assert table.expire(5.0) == []
    ((conn, msg, close),) = _msgs(table.expire(11.0))
    assert (conn, msg.get("code"), close) == ("a", "timeout", True)
    assert len(table) == 0


def test_one_address_cannot_fill_the_table() -> None:
    table = SessionTable(max_waiting_per_ip=2)
    for i in range(2):
        ((_, msg, _),) = _msgs(table.register(f"a{i}", f"s{i}", Endpoint(A.ip, 1000 + i),
                                              None, 0.0))
        assert msg.verb == "REGISTERED"
    ((_, msg, close),) = _msgs(table.register("a2", "s2", Endpoint(A.ip, 1002), None, 0.0))
    assert (msg.get("code"), close) == ("busy", True)
    ((_, msg, _),) = _msgs(table.register("b", "s3", B, None, 0.0))  # others still served
    assert msg.verb == "REGISTERED"


def test_peer_local_only_between_clients_behind_the_same_public_ip() -> None:
    """Two peers behind one NAT need each other's LAN address (hairpin-free path); a peer
    from anywhere else must never learn it."""
    table = SessionTable()
    a, a2 = Endpoint(A.ip, 4000), Endpoint(A.ip, 4001)  # one NAT, two hosts behind it
    table.register("a", "lan", a, Endpoint("10.1.0.2", 4000), 0.0)
    out = _msgs(table.register("a2", "lan", a2, Endpoint("10.1.0.3", 5000), 1.0))
    assert [m.get("peer_local") for _, m, _ in out] == ["10.1.0.3:5000", "10.1.0.2:4000"]
    table.register("v", "far", A, Endpoint("10.1.0.2", 4000), 2.0)
    out = _msgs(table.register("x", "far", Endpoint("198.51.101.2", 1), Endpoint("10.9.0.9", 9),
                               3.0))
    assert [m.get("peer_local") for _, m, _ in out] == [None, None]
    assert b"10.1.0.2" not in b"".join(r.data for r in table.register("y", "z", B, None, 4.0))


def test_one_network_cannot_fill_the_table() -> None:
    table = SessionTable(max_waiting_per_ip=4, max_waiting_per_prefix=6)
    codes = []
    for i in range(8):  # 4 addresses of 198.51.100.0/24, 2 registrations each
        ((_, msg, _),) = _msgs(table.register(f"c{i}", f"s{i}", Endpoint(f"198.51.100.{i // 2}",
                                                                         1000 + i), None, 0.0))
        codes.append(msg.get("code") or msg.verb)
    assert codes == ["REGISTERED"] * 6 + ["busy"] * 2
    ((_, msg, _),) = _msgs(table.register("b", "sb", B, None, 0.0))  # another /24: served
    assert msg.verb == "REGISTERED"


def test_a_full_table_evicts_the_busiest_networks_oldest_for_a_newcomer() -> None:
    """Attack 2 (measured: 16 registrations from each of 257 addresses filled all 4096
    slots in 1.45 s; 20/20 legit sessions then got busy): in a full table a newcomer from
    a network holding fewer entries takes the slot of the oldest entry of the network
    holding the most; that client gets ERROR code=evicted."""
    table = SessionTable(max_waiting=64, max_waiting_per_ip=16, max_waiting_per_prefix=32)
    t = 0.0
    for net in range(2):  # 2 networks x 2 addresses x 16 = 64: full
        for host in range(2):
            for i in range(16):
                t += 1
                table.register(("hog", net, host, i), f"h{net}.{host}.{i}",
                               Endpoint(f"10.{net}.0.{host}", 1000 + i), None, t)
    assert len(table) == 64
    legit = []
    for n in range(20):  # 20 legit sessions from 20 other networks, each pairs
        out = _msgs(table.register(("w", n), f"legit{n}", Endpoint(f"192.0.{n}.7", 5000), None,
                                   t + n))
        assert [(m.verb, m.get("code")) for _, m, _ in out] == [("ERROR", "evicted"),
                                                                ("REGISTERED", None)]
        legit.append(out)
    # The victims were the oldest of whichever hog network held the most.
    victims = [out[0][0] for out in legit]
    assert victims[:2] in ([("hog", 0, 0, 0), ("hog", 1, 0, 0)],
                           [("hog", 1, 0, 0), ("hog", 0, 0, 0)])
    assert len(table) == 64 and table.evictions == 20
    for n in range(20):
        out = _msgs(table.register(("j", n), f"legit{n}", Endpoint(f"203.0.{n}.9", 6000), None,
                                   t + 30))
        assert [m.verb for _, m, _ in out] == ["PEER", "PEER"]
    # A newcomer of a network that already holds as many as the busiest is refused.
    table2 = SessionTable(max_waiting=2, max_waiting_per_prefix=8)
    table2.register("a", "s1", Endpoint("10.0.0.1", 1), None, 0.0)
    table2.register("b", "s2", Endpoint("10.0.1.1", 1), None, 0.0)
    ((_, msg, _),) = _msgs(table2.register("c", "s3", Endpoint("10.0.0.2", 1), None, 0.0))
    assert msg.get("code") == "busy"


def test_registration_cost_does_not_grow_with_the_table() -> None:
    """No scan over the waiting entries per REGISTER: the 16384th registration costs what
    the first did (the former per-address sum() was O(n): 8.3 s for this loop, 0.2 s now)."""
    import time

    table = SessionTable()
    start = time.process_time()  # CPU time: the other workers on the machine do not count
    n = 0
    for net in range(64):
        for host in range(16):
            for i in range(16):
                table.register(n, f"s{n}", Endpoint(f"10.{net}.{host}.1", i + 1), None, 0.0)
                n += 1
    took = time.process_time() - start
    assert len(table) == 16384
    newcomer = _msgs(table.register("new", "new", B, None, 1.0))
    assert [m.get("code") or m.verb for _, m, _ in newcomer] == ["evicted", "REGISTERED"]
    for conn in range(n):
        table.disconnect(conn)
    assert len(table) == 1 and table._per_prefix.max == 1 and len(table._per_ip) == 1
    print(f"16384 registrations in {took:.3f} s")
    assert took < 1.5, f"{took:.2f} s for 16384 registrations"


def test_seed_list_answer_is_the_encoded_list_and_encoded_once_per_change() -> None:
    from simulsyn_core._internal.wire import encode_seed_list

    seeds = SeedList()
    seeds.answer(A, 0.0)
    seeds.answer(B, 1.0)
    answer = seeds.answer(C, 2.0)
    assert answer == encode_seed_list([A, B, C])
    assert seeds.answer(C, 3.0) is answer  # the same caller again: nothing changed
    assert seeds.answer(A, 4.0) == encode_seed_list([B, C, A])  # A moves last


def test_seed_list_answers_as_the_rule_says_whatever_the_visits() -> None:
    """Against the rule written plainly (the last max_entries endpoints of the last
    max_age_s, no duplicate, the caller last), on random visits; ports such as 256 and
    2570 make an entry's bytes also appear across two neighbours."""
    import random

    from simulsyn_core._internal.wire import encode_seed_list

    rng = random.Random(11)
    for _ in range(20):
        max_entries, max_age_s = rng.choice([1, 3, 10, 255]), rng.choice([0.5, 5.0, 60.0])
        seeds, plain, now = SeedList(max_entries, max_age_s), [], 0.0
        pool = [Endpoint(f"10.0.{rng.randrange(3)}.{rng.randrange(1, 4)}",
                         rng.choice([1, 256, 257, 2570, 65535])) for _ in range(40)]
        for _ in range(300):
            now += rng.choice([0.0, 0.01, 0.3, 2.0])
            ep = rng.choice(pool)
            plain = [(e, t) for e, t in plain if now - t <= max_age_s and e != ep]
            plain = (plain + [(ep, now)])[-max_entries:]
            assert seeds.answer(ep, now) == encode_seed_list([e for e, _ in plain])


def _relaying_table() -> SessionTable:
    table = SessionTable()
    tokens = iter(["a" * 32, "b" * 32])
    table.relay_token = lambda: next(tokens)
    return table


def test_peer_carries_the_relay_token_only_when_both_offer_it() -> None:
    table = _relaying_table()
    table.register("a", "s", A, None, 0.0, frozenset({"relay", "prime"}))
    to_a, to_b = _msgs(table.register("b", "s", B, None, 1.0, frozenset({"relay"})))
    assert to_a[1].get("relay") == to_b[1].get("relay") == "a" * 32
    assert to_a[1].get("strategy") is None  # the plan is unchanged: plain here
    table.register("c", "t", A, None, 0.0, frozenset({"relay", "prime"}))
    to_c, to_d = _msgs(table.register("d", "t", B, None, 1.0, frozenset({"prime"})))
    assert to_c[1].get("relay") is None and to_d[1].get("relay") is None
    # A broker without --relay (no relay_token) adds nothing.
    plain = SessionTable()
    plain.register("a", "s", A, None, 0.0, frozenset({"relay"}))
    out = _msgs(plain.register("b", "s", B, None, 1.0, frozenset({"relay"})))
    assert all(m.get("relay") is None for _, m, _ in out)


def test_untraversable_pairs_get_strategy_relay_with_the_same_reason() -> None:
    for facts in ({"mapping": "varies"}, {"reply_syn": "blocked"}):
        refusing = SessionTable()
        refusing.register("a", "s", A, None, 0.0, frozenset({"relay"}), **facts)
        errors = _msgs(refusing.register("b", "s", B, None, 1.0, frozenset({"relay"}),
                                         **facts))
        table = _relaying_table()
        table.register("a", "s", A, None, 0.0, frozenset({"relay"}), **facts)
        out = _msgs(table.register("b", "s", B, None, 1.0, frozenset({"relay"}), **facts))
        assert [(c, m.verb, close) for c, m, close in out] == [("a", "PEER", True),
                                                               ("b", "PEER", True)]
        for (_, err, _), (_, peer, _), role in zip(errors, out, ("first", "second"),
                                                   strict=True):
            assert err.get("code") == "untraversable"
            assert peer.get("why") == err.get("message") and peer.get("strategy") == "relay"
            assert peer.get("relay") == "a" * 32 and peer.get("role") == role
        assert out[0][1].get("peer") == str(B) and out[1][1].get("peer") == str(A)


def test_one_side_varies_each_side_gets_its_own_reason() -> None:
    table = _relaying_table()
    table.register("a", "s", A, None, 0.0, frozenset({"relay"}), "varies")
    to_a, to_b = _msgs(table.register("b", "s", B, None, 1.0, frozenset({"relay"}), "same"))
    assert (to_a[1].get("why") or "").startswith("your_NAT_maps")
    assert (to_b[1].get("why") or "").startswith("the_peer's_NAT_maps")


def test_longest_birthday_peer_with_a_relay_token_fits_a_line() -> None:
    from simulsyn_core._internal import birthday as bday
    from simulsyn_core._internal.wire import LINE_MAX

    table = _relaying_table()
    top = Endpoint("255.255.255.255", 65535)
    every = frozenset({"prime", "order", "sync", "birthday", "relay"})
    name = "x" * 64
    table.register("a", name, top, Endpoint("255.255.255.254", 65535), 0.0, every,
                   "varies", "reject", "pass", bday.Offer.parse(
                       {"sockets": "9999", "port_range": "10000-65535",
                        "port_hot": "32768-60999"}.get))
    out = table.register("b", name, Endpoint("255.255.255.255", 65534),
                         Endpoint("255.255.255.253", 65535), 0.0, every, "same", "reject",
                         "pass", bday.Offer.parse({"guesses": "9999"}.get))
    assert all(len(r.data) <= LINE_MAX and b" relay=" in r.data for r in out)
