"""A route from an IPAM result without `gw` goes via the result's gateway of its family."""

from vpcni.core.ipam import routes_via_gateways
from vpcni.core.models import Result


def routes(raw: dict) -> list[tuple[str, str | None]]:
    res = Result.model_validate(raw)
    return [(str(r.dst), str(r.gw) if r.gw else None)
            for r in routes_via_gateways(res.routes, res.ips)]


def test_missing_gw_takes_the_gateway_of_the_family():
    raw = {"ips": [{"address": "172.16.40.10/24", "gateway": "172.16.40.1"},
                   {"address": "fd00:40::10/64", "gateway": "fd00:40::1"}],
           "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"},
                      {"dst": "172.16.41.0/24", "gw": "172.16.40.254"}]}
    assert routes(raw) == [("0.0.0.0/0", "172.16.40.1"), ("::/0", "fd00:40::1"),
                           ("172.16.41.0/24", "172.16.40.254")]


def test_no_gateway_of_the_family_leaves_the_route_on_link():
    raw = {"ips": [{"address": "172.16.40.10/24"},
                   {"address": "fd00:40::10/64", "gateway": "fd00:40::1"}],
           "routes": [{"dst": "172.16.41.0/24"}]}
    assert routes(raw) == [("172.16.41.0/24", None)]
