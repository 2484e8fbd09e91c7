"""Job kinds: summarize (and later extract, simulate) over the generic row runner."""
