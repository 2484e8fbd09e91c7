"""Progress bars for long work on stderr: tqdm's bar on a terminal; elsewhere (a log file, a
pipe, CI) a plain line every PLAIN_EVERY_S seconds instead of carriage-return redraws, which
would pile up as one endless line."""

from __future__ import annotations

import sys

from tqdm import tqdm

PLAIN_EVERY_S = 10.0


class _Lines:
    """A stream that turns tqdm's redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*, disable: bool = False, **options) -> tqdm:
    """A tqdm bar on stderr (options as tqdm's); plain periodic lines when stderr is not a terminal."""
    stream = sys.stderr
    if not disable and not stream.isatty():
        return tqdm(file=_Lines(stream), mininterval=PLAIN_EVERY_S, maxinterval=PLAIN_EVERY_S, ascii=True,
                    **{k: v for k, v in options.items() if k not in ("dynamic_ncols", "mininterval")}, ncols=100,
                    disable=False)
    return tqdm(file=stream, disable=disable, **options)
