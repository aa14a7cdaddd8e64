"""The VPC controller (docs/vpc-api.md): Vpc and VniClaim objects to VNIs,
NetworkAttachmentDefinitions, status and the tenancy bindings.

- `logic`: the decisions, plain functions without I/O;
- `api`: the API server protocol, its `kubernetes` client implementation and
  the reconcile steps written against the protocol;
- `main`: the kopf operator (`vpcnictl controller`), thin.

Its CRDs and RBAC are deploy/base/crds and deploy/base/rbac.yaml (one copy;
tests/unit/test_deploy.py checks them against what this code reads and writes).

`logic` and `api` import neither kopf nor kubernetes (the `controller` extra).
"""
