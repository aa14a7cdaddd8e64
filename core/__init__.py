"""The backend-neutral core: models, errors, backend contract, store, handler."""
