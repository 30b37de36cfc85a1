"""A progress line for long runs: redrawn in place on a terminal, one line per update in a log file."""

import sys
import time


class Progress:
    def __init__(self, total, start=0, stream=None):
        self.total = total
        self.start = start
        self.stream = stream or sys.stdout
        self.interactive = getattr(self.stream, "isatty", lambda: False)()
        self._t0 = time.monotonic()

    def update(self, step, **values):
        done = step - self.start
        elapsed = time.monotonic() - self._t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "=" * filled + "." * (width - filled)
        parts = [f"step {step}/{self.total} [{bar}]"]
        parts += [f"{k} {_fmt(v)}" for k, v in values.items()]
        parts.append(f"eta {_duration(eta)}")
        line = " - ".join(parts)
        if self.interactive:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text):
        """Prints a line of its own without garbling an in-place progress line."""
        self.stream.write(("\n" if self.interactive else "") + text + "\n")
        self.stream.flush()

    def close(self):
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds):
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
