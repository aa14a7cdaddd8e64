"""The VPC controller (docs/vpc-api.md): Vpc and VniClaim objects to VNIs,
NetworkAttachmentDefinitions, status and the tenancy bindings.

- `logic`: the decisions, plain functions without I/O;
- `api`: the API server protocol, its `kubernetes` client implementation and
  the reconcile steps written against the protocol;
- `main`: the kopf operator (`vpcnictl controller`), thin;
- `manifests`: the CRDs and RBAC it needs.

`logic` and `api` import neither kopf nor kubernetes (the `controller` extra).
"""
