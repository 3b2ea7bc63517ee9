"""vsphere:// datastore URLs and the settings that come with them.

``vsphere://USER@HOST[:PORT]/DATACENTER/DATASTORE[/PATH]``: PATH is a folder inside the
datastore that serves as the root (default: the datastore's top). USER may hold an "@"
(``administrator@vsphere.local``); the last "@" ends it. Percent escapes are decoded in
every part. A password is never part of the URL: it comes from $IMAGEFS_VSPHERE_PASSWORD,
a password file, or a prompt on a terminal.
"""
import getpass
import os
import sys
from dataclasses import dataclass
from urllib.parse import unquote

from ...errors import InvalidInput, Unavailable

DEFAULT_PORT = 443


@dataclass(frozen=True)
class Location:
    user: str
    host: str
    port: int
    datacenter: str
    datastore: str
    path: str           # folder inside the datastore, "" for its top; no leading/trailing "/"

    @property
    def url(self):
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        tail = f"/{self.path}" if self.path else ""
        return f"vsphere://{self.user}@{self.host}{port}/{self.datacenter}/{self.datastore}{tail}"


def parse_url(spec):
    usage = "use vsphere://USER@HOST[:PORT]/DATACENTER/DATASTORE[/PATH]"
    if not spec.startswith("vsphere://"):
        raise InvalidInput(f"{spec}: not a vsphere:// URL ({usage})")
    netloc, _, rest = spec[len("vsphere://"):].partition("/")
    user, at, hostport = netloc.rpartition("@")
    if not at or not user:
        raise InvalidInput(f"{spec}: no user name ({usage})")
    if ":" in user:
        raise InvalidInput(f"{spec}: a password does not belong in the URL: set IMAGEFS_VSPHERE_PASSWORD "
                           "or use a password file")
    host, port = hostport, DEFAULT_PORT
    if hostport.startswith("["):                       # [ipv6]:port
        host, _, after = hostport[1:].partition("]")
        if after.startswith(":"):
            port = after[1:]
    elif ":" in hostport:
        host, port = hostport.rsplit(":", 1)
    try:
        port = int(port)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"{spec}: invalid port {port!r}") from None
    parts = [unquote(p) for p in rest.split("/") if p]
    if not host or len(parts) < 2:
        raise InvalidInput(f"{spec}: {usage}")
    if any(p in (".", "..") for p in parts[2:]):
        raise InvalidInput(f"{spec}: the path must not hold . or ..")
    return Location(unquote(user), host, port, parts[0], parts[1], "/".join(parts[2:]))


def read_password(location, options):
    """The password: $IMAGEFS_VSPHERE_PASSWORD, else the password file, else a prompt on a
    terminal. Never from the command line, never logged."""
    if options.get("password"):                 # asked already (a mount asks before it forks)
        return options["password"]
    env = os.environ.get("IMAGEFS_VSPHERE_PASSWORD")
    if env:
        return env
    path = options.get("password_file")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as e:
            raise InvalidInput(f"password file {path}: {e.strerror}") from None
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            return getpass.getpass(f"password for {location.user}@{location.host}: ")
        except (EOFError, KeyboardInterrupt):
            pass
    raise Unavailable(f"{location.url}: no password: set IMAGEFS_VSPHERE_PASSWORD, use --password-file "
                      "(-o password_file= for a mount), or run on a terminal")


def tls_settings(options):
    """(CA file or None, insecure) from the options, else the environment."""
    ca_file = options.get("ca_file") or os.environ.get("IMAGEFS_VSPHERE_CA_FILE") or None
    insecure = options.get("insecure")
    if insecure is None:
        insecure = os.environ.get("IMAGEFS_VSPHERE_INSECURE", "") not in ("", "0")
    return ca_file, bool(insecure)
