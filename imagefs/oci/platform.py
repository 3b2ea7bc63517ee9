"""Platforms (``OS/ARCH[/VARIANT]``) of multi-platform images, as the OCI image index names them.

An index lists one manifest per platform (``{"os": "linux", "architecture": "arm64",
"variant": "v8"}``). ``image load`` takes the host's platform unless ``--platform``
names another; a requested variant must match, none matches any variant. arm64's
variant defaults to v8, as containerd treats it.
"""
import platform as _host
import re
from dataclasses import dataclass

from ..errors import InvalidInput

_PART = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386",
             "i386": "386", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_DEFAULT_VARIANT = {"arm64": "v8"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self):
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, desc):
        """Whether an index entry's or a config's ``os``/``architecture``/``variant`` is this platform."""
        if not isinstance(desc, dict) or desc.get("os") != self.os or desc.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        return (desc.get("variant") or _DEFAULT_VARIANT.get(self.architecture)) == self.variant


def parse_platform(text):
    """``OS/ARCH[/VARIANT]`` (``linux/arm64``, ``linux/arm/v7``); InvalidInput if malformed."""
    parts = text.split("/") if isinstance(text, str) else []
    if len(parts) not in (2, 3) or not all(_PART.match(p) for p in parts):
        raise InvalidInput(f"invalid platform {text!r}: use OS/ARCH[/VARIANT], e.g. linux/arm64 or linux/arm/v7")
    return Platform(*parts)


def host_platform():
    """The platform of this machine (``linux/amd64`` on x86-64)."""
    machine = _host.machine()
    return Platform("linux", _MACHINES.get(machine, machine.lower()))


def describe(desc):
    """``os/arch[/variant]`` of an index entry's platform, for messages."""
    plat = desc.get("platform") if isinstance(desc, dict) else None
    if not isinstance(plat, dict):
        return "(no platform)"
    return "/".join(str(plat[k]) for k in ("os", "architecture", "variant") if plat.get(k))
