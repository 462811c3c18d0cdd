"""The one writer of capture files: classic pcap (nat-check's ``--pcap``, written at the
end) and pcapng with a comment per packet (``punch --pcap``, flushed after each packet).
tshark, tcpdump and ``reader.py`` read both."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from simulsyn_core import __version__

from .decode import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL
from .reader import PCAPNG_BOM, PCAPNG_SHB

PCAP_MAGIC = 0xA1B2C3D4  # microsecond time stamps, written in this host's byte order (<)
PCAP_SNAPLEN = 262144
SNAPLEN = 65535  # what a punch capture reads of a packet
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")

# pcapng block types and option codes (draft-ietf-opsawg-pcapng)
PCAPNG_IDB, PCAPNG_EPB = 1, 6
OPT_COMMENT, SHB_USERAPPL, IF_NAME, IF_TSRESOL = 1, 4, 2, 9


def pcap_header(linktype: int = LINKTYPE_ETHERNET) -> bytes:
    return _PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, PCAP_SNAPLEN, linktype)


def pcap_record(t: float, frame: bytes) -> bytes:
    sec = int(t)
    usec = min(999999, int(round((t - sec) * 1e6)))
    return _PCAP_RECORD.pack(sec, usec, len(frame), len(frame)) + frame


def write_pcap(path: str, frames: Iterable[tuple[float, bytes]],
               linktype: int = LINKTYPE_ETHERNET) -> int:
    """Write (time, frame) pairs to a classic pcap file; the count written."""
    count = 0
    with open(path, "wb") as out:
        out.write(pcap_header(linktype))
        for t, frame in frames:
            out.write(pcap_record(t, frame))
            count += 1
    return count


def cooked_header(pkttype: int, hatype: int, address: bytes, protocol: int) -> bytes:
    """The Linux cooked-capture (SLL) header libpcap writes for `tcpdump -i any`."""
    return struct.pack("!HHH8sH", pkttype, hatype, len(address), address[:8].ljust(8, b"\0"),
                       protocol)


class PcapNgWriter:
    """A minimal pcapng writer (one section; an interface block per interface as it first
    appears; enhanced packet blocks with opt_comment), flushed after every packet."""

    def __init__(self, out: BinaryIO, linktype: int = LINKTYPE_LINUX_SLL,
                 application: str = f"synprobe {__version__}") -> None:
        self.out = out
        self.linktype = linktype
        self.interfaces: dict[str, int] = {}
        self.packets = 0
        shb = struct.pack("<IHHq", PCAPNG_BOM, 1, 0, -1) + self._options(
            [(SHB_USERAPPL, application)])
        self._block(PCAPNG_SHB, shb)

    @staticmethod
    def _options(options: Sequence[tuple[int, str | bytes]]) -> bytes:
        out = b""
        for code, value in options:
            data = value.encode() if isinstance(value, str) else value
            out += struct.pack("<HH", code, len(data)) + data + b"\0" * (-len(data) % 4)
        return out + struct.pack("<HH", 0, 0) if out else b""

    def _block(self, block_type: int, body: bytes) -> None:
        length = 12 + len(body)
        self.out.write(struct.pack("<II", block_type, length) + body
                       + struct.pack("<I", length))

    def write(self, interface: str, when: float, frame: bytes, comment: str = "") -> None:
        if interface not in self.interfaces:
            self.interfaces[interface] = len(self.interfaces)
            # if_tsresol 9: time stamps in nanoseconds
            self._block(PCAPNG_IDB, struct.pack("<HHI", self.linktype, 0, SNAPLEN)
                        + self._options([(IF_NAME, interface), (IF_TSRESOL, b"\x09")]))
        stamp = int(round(when * 1e9))
        body = struct.pack("<IIIII", self.interfaces[interface], stamp >> 32,
                           stamp & 0xFFFFFFFF, len(frame), len(frame))
        body += frame + b"\0" * (-len(frame) % 4)
        body += self._options([(OPT_COMMENT, comment)] if comment else [])
        self._block(PCAPNG_EPB, body)
        self.out.flush()
        self.packets += 1
