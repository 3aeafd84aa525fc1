"""Screen brightness: the first writable backlight under sysfs, else a saved setting.

Linux exposes backlights as /sys/class/backlight/<device>/{brightness,max_brightness}
(integers). Where a machine has none (desktops with external monitors, servers,
containers), the level is a software setting kept in a small JSON file so that it
survives a restart. Values are fractions in [0, 1]; callers clamp.
"""
import json
import os
import threading
from pathlib import Path

from engines import Unavailable

DEFAULT_LEVEL = 1.0


class Brightness:
    def __init__(self, sysfs_root="/sys/class/backlight", state_file=None):
        self.root = Path(sysfs_root)
        self.state_file = Path(state_file) if state_file else None
        self.lock = threading.Lock()

    def device(self):
        """The first device (sorted by name) whose brightness file we may write."""
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return None
        for name in names:
            dev = self.root / name
            try:
                maximum = int((dev / "max_brightness").read_text().strip())
            except (OSError, ValueError):
                continue
            if maximum > 0 and os.access(dev / "brightness", os.W_OK):
                return dev, maximum
        return None

    def get(self):
        with self.lock:
            found = self.device()
            if found:
                dev, maximum = found
                try:
                    return round(int((dev / "brightness").read_text().strip()) / maximum, 4)
                except (OSError, ValueError):
                    pass
            return self._saved()

    def set(self, level):
        """Apply a level in [0, 1]; return the level actually applied."""
        with self.lock:
            found = self.device()
            if found:
                dev, maximum = found
                raw = round(level * maximum)
                try:
                    (dev / "brightness").write_text("%d\n" % raw)
                except OSError as exc:           # EIO, EINVAL from the driver...: say so, no path
                    raise Unavailable("cannot set the screen brightness: %s" % (exc.strerror or exc))
                return round(raw / maximum, 4)
            try:
                self._save(level)
            except OSError as exc:
                raise Unavailable("cannot save the brightness setting: %s" % (exc.strerror or exc))
            return level

    def _saved(self):
        try:
            value = json.loads(self.state_file.read_text())["brightness"]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
                return value
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return DEFAULT_LEVEL

    def _save(self, level):
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"brightness": level}))
        os.replace(tmp, self.state_file)              # atomic: never a half-written file
