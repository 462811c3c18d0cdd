"""The lab's NAT profiles and addresses: pure data, no I/O.

Each profile is the ruleset of one gateway (iptables-restore input or an nft ruleset)
plus the few facts the namespace builder needs (NAT or not, a carrier NAT behind it,
sysctls). The public side uses the documentation ranges 198.51.100.0/24 (side A),
203.0.113.0/24 (side B) and 192.0.2.0/24 (broker); NATed hosts sit in 10.1.0.0/24 and
10.2.0.0/24; a carrier's inside is 100.64.0.0/10 (RFC 6598).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulsyn_core._internal.wire import DEFAULT_BROKER_PORT

NODES = ("ha", "ga", "rt", "gb", "hb", "br")
BROKER_IPS = ("192.0.2.10", "192.0.2.11")
BROKER_PORT = DEFAULT_BROKER_PORT

_FILTER_HEAD = """*filter
:INPUT {input} [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
"""
# A home router: the NAT itself answers nothing unsolicited, forwards only outbound
# connections and their replies (conntrack ESTABLISHED includes a reply-direction SYN).
_HOME_FILTER = _FILTER_HEAD.format(input="DROP") + """-A INPUT -i lo -j ACCEPT
-A INPUT -i lan -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
{input_extra}-A FORWARD -o wan -j ACCEPT
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
{forward_extra}COMMIT
"""
_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o wan -j MASQUERADE{masq_extra}
COMMIT
"""


def _home(input_extra: str = "", forward_extra: str = "", masq_extra: str = "",
          nat: bool = True, syn_first: str = "") -> str:
    rules = _HOME_FILTER.format(input_extra=input_extra, forward_extra=forward_extra)
    if syn_first:
        outbound = "-A FORWARD -o wan -j ACCEPT"
        rules = rules.replace(outbound, syn_first + outbound)
    return rules + (_NAT.format(masq_extra=masq_extra) if nat else "")


def _reject(how: str) -> str:
    return _home(input_extra=f"-A INPUT -i wan -p tcp -j REJECT --reject-with {how}\n",
                 forward_extra=f"-A FORWARD -i wan -p tcp -j REJECT --reject-with {how}\n")


def _dmz(hairpin_source: str = "MASQUERADE") -> str:
    """A home router with a "DMZ host": every unsolicited inbound TCP goes to the host, and
    the host reaches its own public address (hairpin NAT). @HOST@, @PUBLIC@ and @LAN@
    are filled in per side when the lab is built. The hairpinned packet's source is the
    router's lan address (MASQUERADE out of lan), or with ``SNAT --to-source @PUBLIC@``
    the public address, the port kept (RFC 5382 REQ-8a)."""
    rules = _home(forward_extra="-A FORWARD -i wan -o lan -d @HOST@ -p tcp -j ACCEPT\n"
                                "-A FORWARD -i lan -o lan -j ACCEPT\n", nat=False)
    return rules + f"""*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d @PUBLIC@ -p tcp -j DNAT --to-destination @HOST@
-A POSTROUTING -o wan -j MASQUERADE
-A POSTROUTING -o lan -s @LAN@ -d @HOST@ -j {hairpin_source}
COMMIT
"""


# RFC 5382 REQ-4: an unsolicited SYN answered with ICMP port-unreachable only after 6 s.
# INPUT queues it to the holdsyn helper, which re-runs the chain on it 6.2 s later with
# the mark that the REJECT rule takes (or drops it if the host opened that connection).
LATE_ICMP_QUEUE, LATE_ICMP_MARK, LATE_ICMP_HOLD_S = 5382, 0x5382, 6.2
_LATE_ICMP_INPUT = (
    f"-A INPUT -i wan -p tcp -m mark --mark {LATE_ICMP_MARK:#x} "
    "-j REJECT --reject-with icmp-port-unreachable\n"
    f"-A INPUT -i wan -p tcp --syn -j NFQUEUE --queue-num {LATE_ICMP_QUEUE}\n")

# RFC 5382 REQ-5: a transitory (not established) connection's idle timeout at least 4 min.
_TRANSITORY_300S = tuple((f"net.netfilter.nf_conntrack_tcp_timeout_{state}", "300")
                         for state in ("syn_sent", "syn_recv", "fin_wait", "close_wait",
                                       "last_ack", "time_wait", "close"))


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    iptables: str = ""  # iptables-restore input for the gateway
    nft: str = ""  # or an nft ruleset
    nat: bool = True  # False: the host has a public address behind a stateful firewall
    carrier: bool = False  # True: a second NAT (a carrier's, node c<side>) behind the first
    sysctls: tuple[tuple[str, str], ...] = ()
    # Another profile this one punches exactly as (its differences touch no punch): it is
    # left out of the punch matrices, which would grow by 4 x (2n + 1) lab runs.
    punches_as: str = ""
    # A helper process in the gateway's namespace (python -m ARGV...), started once the
    # rules are in, ended with the lab.
    helper: tuple[str, ...] = ()


_NFT_HOME = """table inet ssyn_filter {
  chain input { type filter hook input priority 0; policy drop;
    iif "lo" accept; iifname "lan" accept; ct state established,related accept; }
  chain forward { type filter hook forward priority 0; policy drop;
    oifname "wan" accept; ct state established,related accept; }
}
table ip ssyn_nat {
  chain postrouting { type nat hook postrouting priority 100; oifname "wan" masquerade; }
}
"""

PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("home", "home router: MASQUERADE, outbound and replies only, everything "
                    "unsolicited dropped silently", _home()),
    Profile("home-nft", "the home profile written for nftables instead of iptables",
            nft=_NFT_HOME),
    Profile("original", "the original README's rules exactly: nothing on INPUT, so the NAT's "
                        "own kernel answers an unsolicited SYN with RST",
            _FILTER_HEAD.format(input="ACCEPT") + "-A FORWARD -o wan -j ACCEPT\n"
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\nCOMMIT\n"
            + _NAT.format(masq_extra="")),
    Profile("reject-rst", "unsolicited inbound TCP rejected with a TCP reset",
            _reject("tcp-reset")),
    Profile("reject-icmp-port", "unsolicited inbound TCP rejected with ICMP port-unreachable",
            _reject("icmp-port-unreachable")),
    Profile("reject-icmp-admin", "unsolicited inbound TCP rejected with ICMP admin-prohibited",
            _reject("icmp-admin-prohibited")),
    Profile("random", "a random external port for every new connection "
                      "(MASQUERADE --random-fully)", _home(masq_extra=" --random-fully")),
    Profile("syn-drop-all", "every inbound SYN dropped, replies to our own SYNs included",
            _home(syn_first="-A FORWARD -i wan -p tcp --syn -j DROP\n")),
    Profile("syn-sent-5s", "home, with conntrack's SYN_SENT timeout cut to 5 s",
            _home(), sysctls=(("net.netfilter.nf_conntrack_tcp_timeout_syn_sent", "5"),)),
    Profile("firewall", "no NAT: a public address behind a stateful firewall that drops "
                        "unsolicited inbound", _home(nat=False), nat=False),
    Profile("dmz", "home router with a DMZ host: every unsolicited inbound TCP is forwarded "
                   "to the host (endpoint-independent filtering), hairpin NAT on", _dmz()),
    Profile("rfc5382", "meets RFC 5382 where one Linux NAT can: port-keeping MASQUERADE, "
                       "every inbound TCP to the host (DMZ: the NAT answers no SYN itself), "
                       "hairpin NAT from the public address and port, transitory conntrack "
                       "timeouts 300 s", _dmz("SNAT --to-source @PUBLIC@"),
            sysctls=_TRANSITORY_300S, punches_as="dmz"),
    Profile("late-icmp", "home, but an unsolicited SYN is answered with ICMP port-unreachable "
                         f"after {LATE_ICMP_HOLD_S:g} s (NFQUEUE and a helper hold it), or "
                         "dropped if the host has opened that connection meanwhile "
                         "(RFC 5382 REQ-4)", _home(input_extra=_LATE_ICMP_INPUT),
            punches_as="home",
            helper=("synprobe.lab.holdsyn", str(LATE_ICMP_QUEUE), repr(LATE_ICMP_HOLD_S),
                    hex(LATE_ICMP_MARK))),
    Profile("carrier", "home router behind a carrier-grade NAT (two NATs, both as home; the "
                       "home router's wan in 100.64.0.0/10, RFC 6598)", _home(), carrier=True),
]}


# The profiles the punch matrices pair (every profile that punches in its own way).
PUNCH_PROFILES = tuple(name for name, p in PROFILES.items() if not p.punches_as)


@dataclass(frozen=True)
class SideAddresses:
    host: str  # the host's own address
    gateway_lan: str
    gateway_wan: str
    router: str
    lan_prefix: int
    public: str  # what the world sees: the NAT's wan address, or the host itself


def side_addresses(side: str, profile: Profile) -> SideAddresses:
    wan_net = {"a": "198.51.100", "b": "203.0.113"}[side]
    if profile.carrier:  # gateway_wan: the home router's, inside the carrier's network
        lan = {"a": "10.1.0", "b": "10.2.0"}[side]
        inner = {"a": "100.64.1", "b": "100.64.2"}[side]
        return SideAddresses(f"{lan}.2", f"{lan}.1", f"{inner}.2", f"{wan_net}.1", 24,
                             f"{wan_net}.2")
    if profile.nat:
        lan = {"a": "10.1.0", "b": "10.2.0"}[side]
        return SideAddresses(f"{lan}.2", f"{lan}.1", f"{wan_net}.2", f"{wan_net}.1", 24,
                             f"{wan_net}.2")
    return SideAddresses(f"{wan_net}.130", f"{wan_net}.129", f"{wan_net}.2", f"{wan_net}.1", 25,
                         f"{wan_net}.130")


# --- IPv6: beside IPv4 in the same namespaces (2001:db8::/32, the documentation prefix).
# No NAT but NPTv6: the obstacle is the home gateway's stateful firewall (RFC 6092).
#   side A: LAN 2001:db8:a::/64 (host ::2, gateway ::1), WAN 2001:db8:1::/64 (gateway ::2,
#   router ::1); side B: 2001:db8:b::/64 and 2001:db8:2::/64; broker 2001:db8:c::10, ::11.
BROKER_IPS6 = ("2001:db8:c::10", "2001:db8:c::11")

_FILTER6 = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -i lan -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
{input_extra}-A FORWARD -o wan -j ACCEPT
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
{forward_extra}COMMIT
"""


def _gateway6(how: str = "") -> str:
    """RFC 6092's home gateway: outbound and its replies (a reply-direction SYN included);
    unsolicited inbound dropped, or rejected ``how`` (an ip6tables --reject-with)."""
    if not how:
        return _FILTER6.format(input_extra="", forward_extra="")
    return _FILTER6.format(
        input_extra=f"-A INPUT -i wan -p tcp -j REJECT --reject-with {how}\n",
        forward_extra=f"-A FORWARD -i wan -p tcp -j REJECT --reject-with {how}\n")


# NPTv6 (RFC 6296) maps the LAN's /64 to another /64 one to one, both ways; here as a
# prefix map in the nat table (NETMAP out and in: conntrack sees the translation, where
# stateless SNPT/DNPT in mangle would leave it blind to the replies), in front of the
# RFC 6092 firewall. @LAN6@ and @MAPPED6@ are the side's two /64s.
_NPT6 = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i wan -d @MAPPED6@ -j NETMAP --to @LAN6@
-A POSTROUTING -o wan -s @LAN6@ -j NETMAP --to @MAPPED6@
COMMIT
"""


@dataclass(frozen=True)
class Profile6:
    name: str
    description: str
    ip6tables: str
    npt: bool = False  # the host is seen at its mapped prefix (NPTv6)


PROFILES6: dict[str, Profile6] = {p.name: p for p in [
    Profile6("rfc6092", "home gateway per RFC 6092: outbound and replies only, unsolicited "
                        "inbound dropped silently", _gateway6()),
    Profile6("reject6-rst", "unsolicited inbound TCP rejected with a TCP reset",
             _gateway6("tcp-reset")),
    Profile6("reject6-admin", "unsolicited inbound TCP rejected with ICMPv6 "
                              "administratively prohibited (type 1 code 1)",
             _gateway6("icmp6-adm-prohibited")),
    Profile6("nptv6", "NPTv6: the LAN's /64 mapped to another /64, behind the RFC 6092 "
                      "firewall", _gateway6() + _NPT6, npt=True),
    Profile6("open6", "no firewall: every inbound connection reaches the host",
             _FILTER6.replace(":INPUT DROP", ":INPUT ACCEPT")
             .replace(":FORWARD DROP", ":FORWARD ACCEPT")
             .format(input_extra="", forward_extra="")),
]}


@dataclass(frozen=True)
class SideAddresses6:
    host: str
    gateway_lan: str
    gateway_wan: str
    router: str
    lan: str  # the LAN's /64
    public: str  # what the world sees: the host's address, or its NPTv6 mapping
    mapped: str  # the mapped /64 (NPTv6), else ""


def side_addresses6(side: str, profile: Profile6) -> SideAddresses6:
    n = {"a": "1", "b": "2"}[side]
    lan = f"2001:db8:{side}::"
    mapped = f"2001:db8:1{side}::" if profile.npt else ""
    return SideAddresses6(f"{lan}2", f"{lan}1", f"2001:db8:{n}::2", f"2001:db8:{n}::1",
                          f"{lan}/64", f"{mapped or lan}2", f"{mapped}/64" if mapped else "")
