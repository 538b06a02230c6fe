"""Decode a Kestrel CCSDS capture with the Python `spacepackets` package (PyPI), an
implementation separate from the Rust crate Kestrel uses, and print what it finds as JSON.

    python tests/wire/check_ccsds.py CAPTURE APID [APID ...]

For each packet `parse_space_packets` finds (it scans for the given TM packet ids and skips
anything else): APID, sequence count and flags, packet type, length, whether the ECSS CRC
(CRC-16/CCITT-FALSE, `check_pus_crc`) holds, and the user data in hex. Used by
tests/tests/wire.rs.
"""
import json
import sys

from spacepackets.ccsds.spacepacket import (PacketId, PacketType, SpacePacketHeader,
                                            parse_space_packets)
from spacepackets.ecss import check_pus_crc


def main():
    capture, apids = sys.argv[1], [int(a, 0) for a in sys.argv[2:]]
    with open(capture, "rb") as f:
        data = f.read()
    ids = [PacketId(PacketType.TM, False, apid) for apid in apids]
    result = parse_space_packets(data, ids)
    packets = []
    for raw in result.tm_list:
        header = SpacePacketHeader.unpack(raw)
        packets.append({
            "apid": header.apid,
            "sequence": header.seq_count,
            "seq_flags": int(header.seq_flags),
            "tm": header.packet_type == PacketType.TM,
            "length": header.packet_len,
            "crc_ok": check_pus_crc(raw[:header.packet_len]),
            "data": raw[6:header.packet_len - 2].hex(),
        })
    print(json.dumps({"packets": packets,
                      "skipped": [[r.start, r.stop] for r in result.skipped_ranges]}))


if __name__ == "__main__":
    main()
