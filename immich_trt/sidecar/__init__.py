"""The sidecar: what Immich's ML service forgets, remembered (see ``design.md``)."""
