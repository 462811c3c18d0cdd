"""nat-check's IPv6 building blocks as pure functions (no network): the mapping
classifier on NPTv6 and plain-firewall observations, and the crafted IPv6 SYN rebuilt
from bytes. Expected values are written by hand from the lab's IPv6 profiles
(nptv6: side a's LAN 2001:db8:a::/64 -> 2001:db8:1a::/64 by NETMAP, ports kept)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6TimeExceeded, IPv6
from scapy.packet import Packet

from simulsyn_core._internal.endpoint import Endpoint
from synprobe.natcheck import craft, hops, mapping, unsolicited
from synprobe.natcheck.report import Behaviour, Findings, Outcome
from synprobe.packets.decode import LINKTYPE_RAW
from synprobe.packets.seen import Seen, parse_frame

HOST_A = "2001:db8:a::2"
BROKER = ("2001:db8:c::10", 3478)
BROKER_ALT = ("2001:db8:c::10", 3479)
BROKER_2 = ("2001:db8:c::11", 3478)


def _obs(local_port: int, server: tuple[str, int], public: Endpoint) -> mapping.Observation:
    return mapping.Observation(Endpoint(HOST_A, local_port), Endpoint(*server), public)


def test_nptv6_is_a_mapping_named_prefix_translation() -> None:
    public = Endpoint("2001:db8:1a::2", 40000)
    control = _obs(40000, BROKER, public)
    result = mapping.classify(control, [_obs(40000, BROKER_ALT, public),
                                        _obs(40000, BROKER_2, public)],
                              [_obs(40001, BROKER, Endpoint("2001:db8:1a::2", 40001)),
                               _obs(40002, BROKER, Endpoint("2001:db8:1a::2", 40002))],
                              [HOST_A, "fe80::1"])
    assert result.behind_nat is True
    assert result.mapping is Behaviour.EI
    assert result.port_preservation is True
    assert ("behind_nat", "prefix translation 2001:db8:a::/64 -> 2001:db8:1a::/64 "
                          "(interface identifier kept), port kept") in result.reasons


def test_plain_v6_firewall_is_not_behind_nat() -> None:
    own = Endpoint(HOST_A, 40000)
    result = mapping.classify(_obs(40000, BROKER, own), [_obs(40000, BROKER_ALT, own)], [],
                              [HOST_A])
    assert result.behind_nat is False
    assert result.mapping is Behaviour.NO_NAT
    assert not [r for r in result.reasons if r[0] == "behind_nat"]


def test_prefix_translation_cases() -> None:
    local = Endpoint(HOST_A, 5000)
    assert mapping.prefix_translation(local, local) is None
    assert mapping.prefix_translation(Endpoint("10.1.0.2", 5000),
                                      Endpoint("198.51.100.2", 5000)) is None
    assert mapping.prefix_translation(local, Endpoint("2001:db8:1a::2", 6000)) == (
        "prefix translation 2001:db8:a::/64 -> 2001:db8:1a::/64 (interface identifier "
        "kept), port 5000 -> 6000")
    assert mapping.prefix_translation(local, Endpoint("2001:db8:1::99", 5000)) == (
        "IPv6 address translation 2001:db8:a::2 -> 2001:db8:1::99, port kept")


def test_syn_crafts_ipv6_by_destination() -> None:
    pkt = IPv6(craft.syn(HOST_A, BROKER[0], 40000, 3478, seq=7, ttl=3))
    assert (pkt.src, pkt.dst, pkt.hlim, pkt.nh) == (HOST_A, BROKER[0], 3, 6)
    tcp = pkt[TCP]
    assert (tcp.sport, tcp.dport, str(tcp.flags), tcp.seq) == (40000, 3478, "S", 7)
    rebuilt = IPv6(bytes(pkt))
    del rebuilt[TCP].chksum
    assert IPv6(bytes(rebuilt))[TCP].chksum == tcp.chksum  # checksum over the v6 pseudo-header
    v4 = IP(craft.syn("10.1.0.2", "203.0.113.10", 40000, 3478, seq=7, ttl=3))
    assert (v4.version, v4.ttl, v4.id) == (4, 3, 7)


# --- captured IPv6 packets, rebuilt from bytes -------------------------------------------

GA_WAN = "2001:db8:1::2"  # gateway ga's WAN address (the lab)
RT = "2001:db8:2::1"  # a router on the way


def _seen(pkt: Packet, t: float, outgoing: bool = False) -> Seen:
    seen = parse_frame(bytes(pkt), LINKTYPE_RAW, t, outgoing)
    assert seen is not None
    return seen


def _unsolicited_probe() -> unsolicited.UnsolicitedProbe:
    return unsolicited.UnsolicitedProbe(BROKER[0], 3478, "2001:db8:1a::2", 45000, 777)


def _probe_syn() -> bytes:
    return craft.syn(BROKER[0], "2001:db8:1a::2", 3478, 45000, 777)


@pytest.mark.parametrize(("code", "expected"), [
    (1, Outcome.ICMP_ADMIN_PROHIBITED),  # reject6-admin: ICMPv6 type 1 code 1
    (4, Outcome.ICMP_PORT_UNREACHABLE),
    (3, "icmp6-1-3"),  # address unreachable: named by type and code
])
def test_unsolicited_icmpv6_answer(code: int, expected: str) -> None:
    error = IPv6(src=GA_WAN, dst=BROKER[0]) / ICMPv6DestUnreach(code=code) / _probe_syn()
    seen = [_seen(IPv6(_probe_syn()), 10.0, outgoing=True), _seen(error, 11.0)]
    assert seen[1].proto == 58 and seen[1].is_unreachable and not seen[1].is_time_exceeded
    assert unsolicited.timed(_unsolicited_probe(), seen) == (expected, 1000)


def test_unsolicited_v6_rst_and_drop() -> None:
    rst = IPv6(src="2001:db8:1a::2", dst=BROKER[0]) / TCP(sport=45000, dport=3478,
                                                          flags="RA", ack=778)
    sent = _seen(IPv6(_probe_syn()), 10.0, outgoing=True)
    assert unsolicited.timed(_unsolicited_probe(), [sent, _seen(rst, 10.25)]) == (
        Outcome.RST, 250)
    assert unsolicited.timed(_unsolicited_probe(), [sent]) == (Outcome.DROP, None)


def test_hops_path_from_icmpv6_time_exceeded() -> None:
    probe = hops.HopsProbe(HOST_A, BROKER[0], 3490, (50001, 50002))
    sent = hops.build(probe)
    assert [IPv6(p).hlim for p in sent] == [1, 2]
    seen = [_seen(IPv6(src="2001:db8:a::1", dst=HOST_A) / ICMPv6TimeExceeded() / sent[0], 1.0),
            _seen(IPv6(src=RT, dst=HOST_A) / ICMPv6TimeExceeded() / sent[1], 1.1)]
    assert seen[0].is_time_exceeded and not seen[0].is_unreachable
    assert hops.path(probe, seen) == ["2001:db8:a::1", RT]


def test_hops_over_ipv6_speak_of_the_hop_limit() -> None:
    probe = hops.HopsProbe(HOST_A, BROKER[0], 3490, (50001, 50002, 50003))
    syn_to = [_seen(IPv6(src=BROKER[0], dst=HOST_A) / TCP(sport=3490, dport=p, flags="S"),
                    2.0) for p in (50002, 50003)]
    assert hops.classify(probe, syn_to) == (
        1, "a SYN with hop limit 1 died before the last NAT, hop limit 2 opened the hole")
    v4 = hops.HopsProbe("10.1.0.2", "192.0.2.10", 3490, (50001, 50002))
    assert "TTL 1" in hops.classify(v4, [])[1]
    assert Findings(public=("[2001:db8:a::2]:1",)).limited == "hop"
    assert Findings(public=("10.1.0.2:1",)).limited == "TTL"


def test_the_servers_port_unreachable_to_an_ipv6_host_is_icmpv6() -> None:
    """REQ-10's error (the broker's, for the host's SYN) over IPv6: type 1 code 4,
    quoting the SYN (it was crafted as IPv4 with IPv6 addresses: never sent)."""
    quoted = craft.syn(HOST_A, BROKER[0], 41000, 3490, 7)
    seen = _seen(IPv6(craft.icmp_port_unreachable(BROKER[0], HOST_A, quoted)), 1.0)
    assert seen.proto == 58 and seen.is_unreachable
    assert (seen.icmp_type, seen.icmp_code) == (1, 4)
    assert (seen.src, seen.dst) == (BROKER[0], HOST_A)
    assert (seen.inner_src, seen.inner_sport, seen.inner_dport) == (HOST_A, 41000, 3490)
    v4 = IP(craft.icmp_port_unreachable("192.0.2.10", "10.1.0.2",
                                        craft.syn("10.1.0.2", "192.0.2.10", 41000, 3490, 7)))
    assert (v4.proto, bytes(v4.payload)[:2]) == (1, b"\x03\x03")
