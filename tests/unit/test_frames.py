"""The lab's frame builders produce what the kernel accepts (checksums, lengths, VNI)."""

import struct

from vpcni.lab.frames import checksum, arp_frame, vxlan_frame


def test_vxlan_frame_layout_and_ip_checksum():
    inner = b"\x00" * 42
    f = vxlan_frame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:01", "172.16.32.1", "198.51.100.1",
                    301, inner)
    assert f[12:14] == b"\x08\x00"
    ip = f[14:34]
    assert checksum(ip) == 0                      # a valid header sums to 0xffff
    assert struct.unpack("!H", ip[2:4])[0] == len(f) - 14
    udp = f[34:42]
    assert struct.unpack("!HH", udp[:4])[1] == 4789
    vx = f[42:50]
    assert vx[0] == 0x08 and struct.unpack("!I", vx[4:8])[0] >> 8 == 301
    assert f[50:] == inner


def test_gratuitous_arp():
    f = arp_frame("02:00:00:00:00:01", "02:00:00:00:00:01", "10.0.0.1", "10.0.0.1")
    assert f[12:14] == b"\x08\x06" and len(f) == 42
    assert f[28:32] == f[38:42] == bytes([10, 0, 0, 1])
