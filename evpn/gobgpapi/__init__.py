"""gobgpd's gRPC API, generated at build time by `python -m vpcni.evpn.genstubs`.

Never committed: the stubs must match the installed gobgpd's .proto files.
"""
