"""Reading datasets in chunks and writing results atomically."""
