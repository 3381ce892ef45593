"""The trainer's progress on stderr: a tqdm bar of epochs (loss, samples/s) on a
terminal where tqdm is installed, else a plain line every tenth of the run, which
reads well in a log file too."""

import sys


def _tqdm_bar(**kwargs):
    """A tqdm bar, or None when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(**kwargs)


class Progress:
    """Reports each finished epoch; ``enabled=False`` reports nothing."""

    def __init__(self, loss: str, epochs: int, done_epochs: int, enabled: bool = True):
        self.epochs = epochs
        self.enabled = enabled
        self.line_every = max(1, epochs // 10)
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = _tqdm_bar(total=epochs, initial=done_epochs, desc=loss, unit="epoch",
                                 file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def epoch(self, epoch: int, loss: float, samples_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {samples_per_second:,.0f} samples/s",
                                     refresh=False)
            self.bar.update()
        elif self.enabled and (epoch % self.line_every == 0 or epoch == self.epochs):
            print(f"epoch {epoch}/{self.epochs}  loss {loss:.4f}  "
                  f"{samples_per_second:,.0f} samples/s", file=sys.stderr, flush=True)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()
