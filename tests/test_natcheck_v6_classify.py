"""nat-check's IPv6 building blocks as pure functions (no network): the mapping
classifier on NPTv6 and plain-firewall observations, and the crafted IPv6 SYN rebuilt
from bytes. Expected values are written by hand from the lab's IPv6 profiles
(nptv6: side a's LAN 2001:db8:a::/64 -> 2001:db8:1a::/64 by NETMAP, ports kept)."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from simulsyn_core.endpoint import Endpoint
from synprobe.natcheck import craft, mapping
from synprobe.natcheck.report import Behaviour

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
