"""Decode a Kestrel MAVLink 2 capture with pymavlink (PyPI), the reference Python
implementation, and print what it finds as JSON; and write the MAVLink frames a ground station
would send for Kestrel commands.

    python tests/wire/check_mavlink.py decode CAPTURE
    python tests/wire/check_mavlink.py command OUT SEQ_HEX... (one TUNNEL per hex command)

`decode` parses the capture with the common dialect's `parse_buffer`, which checks each frame's
CRC (with the message's CRC_EXTRA), and prints why each run of bad data was bad and, per
message: type, MAVLink
sequence, system and component, and the fields Kestrel uses (HEARTBEAT's type and autopilot,
STATUSTEXT's severity and text, TUNNEL's payload type, target and payload in hex). `command`
packs each command's bytes behind a one-segment Kestrel header (`C`, message number, 0x80) in a
TUNNEL from system 255, component 190 (a ground station) to system 1, component 191. Used by
tests/tests/wire.rs.
"""
import json
import sys

from pymavlink.dialects.v20 import common as mavlink2


def decode(capture):
    with open(capture, "rb") as f:
        data = f.read()
    mav = mavlink2.MAVLink(None)
    mav.robust_parsing = True
    found, bad = [], []
    for i in range(0, len(data), 64):
        for msg in mav.parse_buffer(data[i:i + 64]) or []:
            kind = msg.get_type()
            if kind == "BAD_DATA":
                bad.append(msg.reason)
                continue
            entry = {
                "type": kind,
                "sequence": msg.get_seq(),
                "system": msg.get_srcSystem(),
                "component": msg.get_srcComponent(),
            }
            if kind == "HEARTBEAT":
                entry.update(mavtype=msg.type, autopilot=msg.autopilot,
                             system_status=msg.system_status)
            elif kind == "STATUSTEXT":
                entry.update(severity=msg.severity, text=msg.text)
            elif kind == "TUNNEL":
                payload = bytes(msg.payload[:msg.payload_length])
                entry.update(payload_type=msg.payload_type, target_system=msg.target_system,
                             target_component=msg.target_component, payload=payload.hex())
            found.append(entry)
    print(json.dumps({
        "messages": found,
        "bad_data": bad,
        "version": mavlink2.WIRE_PROTOCOL_VERSION,
    }))


def command(out, commands):
    mav = mavlink2.MAVLink(None, srcSystem=255, srcComponent=190)
    frames = b""
    for number, hex_bytes in enumerate(commands):
        payload = bytes([ord("C"), number, 0x80]) + bytes.fromhex(hex_bytes)
        padded = list(payload) + [0] * (128 - len(payload))
        frames += mav.tunnel_encode(1, 191, 0, len(payload), padded).pack(mav)
    with open(out, "wb") as f:
        f.write(frames)


def main():
    if sys.argv[1] == "decode":
        decode(sys.argv[2])
    else:
        command(sys.argv[2], sys.argv[3:])


if __name__ == "__main__":
    main()
