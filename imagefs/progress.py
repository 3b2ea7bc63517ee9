"""Progress of long transfers on stderr, only when stderr is a terminal (never on stdout).

``Progress`` takes ``start(label, total)``, ``update(nbytes)`` (bytes since the last
call), ``done()``, and can be called with an absolute byte count (the layer writer's
callback). With a known total it shows a bar and a percentage, else bytes and rate.
"""
import sys
import time

BAR = 24
REDRAW = 0.2


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class Progress:
    def __init__(self, label="", total=None, *, stream=None, enabled=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start(label, total)

    def start(self, label, total=None):
        self.label, self.total = label, total
        self.done_bytes = 0
        self.started = self.last = time.monotonic()

    def update(self, nbytes):
        self.done_bytes += nbytes
        self._draw()

    def __call__(self, absolute):
        self.done_bytes = absolute
        self._draw()

    def _draw(self, force=False):
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < REDRAW):
            return
        self.last = now
        rate = self.done_bytes / max(now - self.started, 1e-6)
        if self.total:
            frac = min(self.done_bytes / self.total, 1.0)
            fill = int(frac * BAR)
            text = (f"{self.label} [{'#' * fill}{'.' * (BAR - fill)}] {frac * 100:3.0f}% "
                    f"{human(self.done_bytes)} / {human(self.total)} ({human(rate)}/s)")
        else:
            text = f"{self.label}: {human(self.done_bytes)} ({human(rate)}/s)"
        self.stream.write(f"\r\033[K{text}")
        self.stream.flush()

    def done(self):
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


class Quiet(Progress):
    def __init__(self, *args, **kw):
        super().__init__(*args, enabled=False, **kw)
