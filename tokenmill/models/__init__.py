"""Model backends: one per runtime, behind the small interface in `base`."""
