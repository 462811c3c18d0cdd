"""The prime strategy: open our own NAT's hole with a SYN that dies before the peer's NAT,
keep that socket, and let exactly one full SYN cross once both holes are open.

Why (seen in the lab's captures and conntrack): with the plain punch, each side's early
SYN reaches the other NAT before that NAT's host has sent its own SYN. A NAT that answers
an unsolicited SYN with RST (or ICMP) sends it back through our NAT, which destroys (or
wedges) the conntrack entry our SYN had just made, a moment before the peer's SYN comes.
Both sides keep closing each other's holes; only a retry that lands in a ~1 RTT window
wins. Priming removes the cause instead of retrying:

1. each side connect()s to the peer with ``IP_TTL`` small enough that the SYN crosses its
   own NAT(s) (which record the 4-tuple and its mapping) and dies at a router before the
   peer's first middlebox; no privilege is needed;
2. the ICMP time-exceeded that SYN draws would end the socket (Linux tcp_v4_err: any ICMP
   error is fatal in SYN-SENT), so the socket has ``IP_MINTTL`` 2: tcp_v4_err drops an
   ICMP error whose *quoted* header has a TTL below the socket's minimum (RFC 5082's
   check), and a time-exceeded always quotes TTL 1 or 0, while every real segment from
   the peer arrives with a TTL far above 2. The socket stays in SYN-SENT with the very
   sequence number our NAT recorded, and its kernel retransmissions stay TTL-limited;
3. both tell the broker PRIMED (the second gives its primed socket a full TTL first, for
   the SYN+ACK it will send); once both did, both get GO, and the first sends its full
   SYN from a fresh socket (a later ISN re-opens its own NAT's entry, still in SYN_SENT). That SYN
   finds an open hole at the peer's NAT and a socket in SYN-SENT behind it whose
   sequence numbers the NAT knows: a simultaneous open, never an RST or an ICMP.

The TTL comes from ``--ttl``, else from a tracepath-like measure towards the peer: UDP
datagrams with TTL 1..16 and ``IP_RECVERR``; ``choose_ttl`` says how it is chosen.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from .endpoint import Endpoint
from .sockets import FULL_HOPS_V6, TCP_ESTABLISHED, bound_socket, new_socket, tcp_state

PROBE_MAX_TTL = 16  # UDP probes with TTL 1..16 towards the peer
PROBE_WAIT_S = 0.5  # how long the probes' ICMP answers are collected at most
QUIET_MIN_S = 0.003  # once past our NATs, wait this long for more answers
PROBE_PORT = 33434  # traceroute's base port: an unused UDP port, so a host answers at most
IP_MINTTL = 21  # linux/in.h: drop what arrives with a lower TTL (RFC 5082), ICMP included
PRIME_MINTTL = 2  # above a time-exceeded's quoted TTL (1 or 0), below any real segment's
FULL_TTL = 64  # Linux's default
# IPv6: tcp_v6_err compares the *outer* hop limit of an ICMPv6 error with the socket's
# IPV6_MINHOPCOUNT (tcp_v4_err, the quoted TTL), and in SYN-SENT any ICMPv6 error, a
# time-exceeded included, ends the socket. A router sends its ICMPv6 errors with hop
# limit 64 (Linux's default; many routers' too), so they arrive with at most 64; every
# segment of a v6 punch leaves with 255 (sockets.FULL_HOPS_V6) and arrives with more than
# 128 from a peer fewer than 127 hops away. So a minimum of 128 drops the errors and keeps
# the peer's segments. (A router that sends its errors with 255 would defeat it.)
IPV6_MINHOPCOUNT = 73  # linux/in6.h
PRIME_MINHOPS_V6 = 128
TCP_SYN_SENT, TCP_SYN_RECV, TCP_CLOSE = 2, 3, 7  # include/net/tcp_states.h
DEFAULT_TTL = 2  # a home NAT and one router: used when no hop answered the measure
IP_RECVERR = 11  # linux/in.h (the socket module does not name it)
SO_EE_ORIGIN_ICMP = 2
ICMP_TIME_EXCEEDED = 11
ICMP_DEST_UNREACH = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err (linux/errqueue.h)


@dataclass(frozen=True)
class HopAnswer:
    """One ICMP error from the error queue: which probe TTL, who sent it, what it was."""

    ttl: int
    offender: str
    icmp_type: int
    icmp_code: int
    rtt_s: float = 0.0  # from the probe's send to its answer


NO_ANSWER = "no router answered a TTL-limited probe towards the peer"

# Where a NAT's own hops answer from: its inside addresses (RFC 1918, RFC 6598 shared
# space for carrier NATs, link-local).
_INSIDE = [ipaddress.ip_network(n) for n in
           ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")]


def _inside(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in net for net in _INSIDE)


def past_our_nats(answers: list[HopAnswer], peer_ip: str) -> bool:
    """True once the answers reach past our own middleboxes: every TTL from 1 to the first
    outside hop (and at least to 2) answered, or the peer's address itself did."""
    by_ttl = {a.ttl: a for a in answers}
    if any(a.offender == peer_ip for a in answers):
        return True
    ttl = 1
    while ttl in by_ttl:
        if ttl >= 2 and not _inside(by_ttl[ttl].offender):
            return True
        if ttl == 1 and not _inside(by_ttl[1].offender) and 2 in by_ttl:
            return True
        ttl += 1
    return False


def choose_ttl(answers: list[HopAnswer], peer_ip: str) -> tuple[int | None, str]:
    """The priming TTL from the measure's answers (pure), or None with the reason.

    The SYN must leave our last middlebox (conntrack keeps only what it forwards) and die
    before the peer's first. Our NATs answer from inside addresses; the first hop that
    does not is past them. A host with a public address may still sit behind a stateful
    firewall at hop 1: so never less than 2. Counting from our side matters: a TTL one
    short of the peer's address can die *at* the peer's firewall, after its conntrack
    took the SYN as a reply to its own host's, which wedges the entry (SYN_SENT2 with
    sequence numbers no socket uses)."""
    exceeded = sorted((a for a in answers
                       if a.icmp_type == ICMP_TIME_EXCEEDED and a.offender != peer_ip),
                      key=lambda a: a.ttl)
    # Where the peer's own address answered (port-unreachable, or anything from it): the
    # only evidence of how far it is. Silence proves nothing: routers rate-limit ICMP
    # (Linux: about one a second per destination) and NATs drop unsolicited UDP.
    peer_at = min((a.ttl for a in answers if a.offender == peer_ip), default=None)
    if not exceeded and peer_at is None:
        return None, NO_ANSWER
    # The first hop that answers from outside addresses is past our NATs (a silent hop
    # before it, e.g. a home router that sends no time-exceeded, counts as ours).
    outside = next((a.ttl for a in exceeded if not _inside(a.offender)), None)
    inside = max((a.ttl for a in exceeded if _inside(a.offender)
                  and (outside is None or a.ttl < outside)), default=0)
    ttl = max(outside if outside is not None else inside + 1, 2)
    if peer_at is not None and ttl >= peer_at:
        return None, (f"no router between our NAT(s) and the peer to let the SYN die at "
                      f"(the peer's address answered at TTL {peer_at})")
    if outside is None:
        return ttl, (f"{inside} NAT hop(s) with inside addresses, the hops after them silent "
                     f"(ICMP rate limits?): TTL {ttl} assumed past them")
    return ttl, (f"{inside} NAT hop(s) with inside addresses, hop {outside} outside")


def _read_error_queue(sock: socket.socket) -> list[tuple[bytes, HopAnswer | None]]:
    """Every (payload, answer) waiting on sock's error queue (IP_RECVERR)."""
    out: list[tuple[bytes, HopAnswer | None]] = []
    for _ in range(64):
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(512, socket.CMSG_SPACE(512),
                                                          socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        answer = None
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_RECVERR \
                    and len(value) >= _EXTENDED_ERR.size + 8:
                _errno, origin, icmp_type, code, _pad, _info, _data = \
                    _EXTENDED_ERR.unpack_from(value)
                if origin == SO_EE_ORIGIN_ICMP:
                    # SO_EE_OFFENDER: a struct sockaddr_in right after the error.
                    offender = socket.inet_ntoa(value[_EXTENDED_ERR.size + 4:
                                                      _EXTENDED_ERR.size + 8])
                    answer = HopAnswer(0, offender, icmp_type, code)
        out.append((data, answer))
    return out


def measure_hops(peer_ip: str, wait_s: float = PROBE_WAIT_S) -> list[HopAnswer]:
    """Send one UDP datagram with each TTL 1..PROBE_MAX_TTL towards peer_ip, each from a
    socket of its own (a queued error would fail the next send on a shared one), and
    collect the ICMP errors (IP_RECVERR) for up to ``wait_s``, or until no more came for
    a while after the last (a NAT that drops unsolicited UDP answers nothing). No
    privilege needed."""
    probes: dict[int, socket.socket] = {}
    answers: dict[int, HopAnswer] = {}
    started = time.monotonic()
    try:
        for ttl in range(1, PROBE_MAX_TTL + 1):
            probe = new_socket(socket.SOCK_DGRAM)
            probes[probe.fileno()] = probe
            probe.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            probe.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            probe.setblocking(False)
            with contextlib.suppress(OSError):
                probe.sendto(bytes([ttl]), (peer_ip, PROBE_PORT))
        end = started + wait_s
        quiet_end = end
        while time.monotonic() < min(end, quiet_end) and len(answers) < len(probes):
            if not past_our_nats(list(answers.values()), peer_ip):
                quiet_end = end  # the hop past our NATs may be a slow link away: wait
            # A queued error makes a socket readable (POLLERR).
            waiting = [p for p in probes.values() if p.getsockopt(
                socket.IPPROTO_IP, socket.IP_TTL) not in answers]
            ready = select.select(waiting, [], [],
                                  max(0.0, min(end, quiet_end) - time.monotonic()))[0]
            for probe in ready:
                ttl = probe.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
                for _payload, answer in _read_error_queue(probe):
                    if answer is not None:
                        now = time.monotonic()
                        answers[ttl] = HopAnswer(ttl, answer.offender, answer.icmp_type,
                                                 answer.icmp_code, now - started)
                        # Past our NATs, what choose_ttl needs is there: a moment for a
                        # straggler, no more (a slow link must not slow every punch).
                        quiet_end = now + QUIET_MIN_S
                with contextlib.suppress(OSError):
                    probe.recv(16)  # a datagram answer (none expected): clear POLLIN
            if any(a.offender == peer_ip for a in answers.values()):
                break  # the peer's address answered itself: nothing further to learn
    finally:
        for probe in probes.values():
            probe.close()
    return [answers[t] for t in sorted(answers)]


@dataclass
class Primed:
    """The primed socket: in SYN-SENT towards the peer, its SYN dead on the way, its ICMP
    dropped (IP_MINTTL); ready for the peer's SYN (a simultaneous open whose sequence
    numbers match what our NAT recorded)."""

    sock: socket.socket
    ttl: int

    @property
    def state(self) -> int:
        return tcp_state(self.sock)

    @property
    def alive(self) -> bool:
        return self.state == TCP_SYN_SENT

    def describe(self) -> str:
        now = self.state
        state = ("still in SYN-SENT" if now == TCP_SYN_SENT
                 else "connected already (the peer's SYN came before GO)"
                 if now in (TCP_ESTABLISHED, TCP_SYN_RECV)
                 else f"ended (TCP state {now}: an RST or another ICMP error?)")
        return (f"primed with TTL {self.ttl}: the SYN opened our NAT's hole and died on the "
                f"way; the socket is {state}")

    def open_up(self) -> None:
        """A full TTL, for the SYN+ACK it will answer the peer's SYN with."""
        set_ttl(self.sock, None)


def set_ttl(sock: socket.socket, ttl: int | None) -> None:
    """The TTL (IPv6: the hop limit) of what ``sock`` sends; None: the full one."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS,
                        FULL_HOPS_V6 if ttl is None else ttl)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, FULL_TTL if ttl is None else ttl)


def set_min_ttl(sock: socket.socket, on: bool) -> None:
    """Drop the ICMP errors a TTL-limited SYN draws (IP_MINTTL 2; IPv6: a minimum hop
    limit of 128, see PRIME_MINHOPS_V6), or stop dropping (``on`` False)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MINHOPCOUNT, PRIME_MINHOPS_V6 if on else 0)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MINTTL, PRIME_MINTTL if on else 0)


def prime(local_port: int, peer: Endpoint, ttl: int) -> Primed:
    """Send one SYN to ``peer`` from our port with IP_TTL=ttl and IP_MINTTL 2, so that the
    ICMP time-exceeded it draws is dropped instead of ending the socket (module doc)."""
    sock = bound_socket(local_port, family=peer.family)
    try:
        set_ttl(sock, ttl)
        set_min_ttl(sock, True)
        sock.setblocking(False)
        code = sock.connect_ex(peer.sockaddr)
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
    except BaseException:
        sock.close()
        raise
    return Primed(sock, ttl)


def clear_minttl(sock: socket.socket) -> None:
    """Once connected: no minimum TTL any more (a PMTU ICMP may quote a low TTL)."""
    with contextlib.suppress(OSError):
        set_min_ttl(sock, False)
