"""Benchmarks of vpcni against baselines measured in the same run, on the same machine.

Everything is built through the lab code (`vpcni.lab`: Sandbox, Cluster, Lab)
inside network namespaces and removed at the end, also after a failure. Run
`python -m benchmarks.run` (or `--quick`); docs/benchmarks.md has the method
and the results. Timings are benchmarks' business: the tests assert no times.
"""
