"""Which bundles may run code here: this machine's signing key, signed manifests, the decision.

Some artifacts execute code when they are loaded: ``torch.export.load`` unpickles
(``torch.load(weights_only=False)`` on pickled weights and constants), an AOTInductor
package is a shared library that is ``dlopen``-ed (its constructors run), a TensorRT plan
can carry plugin libraries. The sha256 of every file is in ``manifest.json``, the same
file someone handing us a hostile bundle would edit: hashes prove integrity (against a
truncated copy), not authorship. Authorship is an HMAC-SHA256 over the exact bytes of
``manifest.json`` with a key that never leaves this machine, created on the first compile
in the user's config folder and written beside the manifest as ``manifest.sig`` (with a
key id, so that "signed by another key" is told apart from "changed after signing").

A bundle is *trusted* when its signature is this machine's, or when the user names it
with ``compressor bench BUNDLE --trust``. An untrusted bundle still benches its ONNX
artifacts: ONNX Runtime parses them as data.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import CompressorError

log = logging.getLogger(__name__)

KEY_FILE = "signing.key"
SIGNATURE = "manifest.sig"
ALGORITHM = "hmac-sha256"
_DOMAIN = b"compressor bundle manifest v1\0"  # the MAC is over this prefix + manifest.json's bytes
_SIG_MAX_BYTES = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class KeyUnusable(CompressorError):
    """The signing key exists but cannot be used (unreadable, malformed, readable by others)."""


def config_dir() -> Path:
    """``$COMPRESSOR_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/compressor``, else ``~/.config/compressor``."""
    explicit = os.environ.get("COMPRESSOR_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is ignored
        return Path(xdg) / "compressor"
    return Path.home() / ".config" / "compressor"


def key_path() -> Path:
    return config_dir() / KEY_FILE


def key_id(key: bytes) -> str:
    """A short public name for a key (a hash of it: names the key, reveals nothing of it)."""
    return hashlib.sha256(b"compressor key id\0" + key).hexdigest()[:16]


def _read_key(path: Path) -> bytes:
    """The key at ``path``; ``FileNotFoundError`` when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyUnusable(f"{path}: cannot read the signing key ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyUnusable(f"{path}: the signing key is not a regular file; remove it and recompile")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise KeyUnusable(f"{path}: the signing key belongs to another user; remove it and recompile")
        if st.st_mode & 0o077:
            raise KeyUnusable(
                f"{path}: the signing key is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
                f"chmod 600 {path}"
            )
        data = os.read(fd, 256)
    finally:
        os.close(fd)
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise KeyUnusable(
            f"{path}: not a compressor signing key (64 hex digits); remove it to make a new one "
            "(bundles signed with the old key then need recompiling or --trust)"
        )
    return key


def _create_key(path: Path) -> bytes:
    """A new random key at ``path``, or the one another process created first.

    Written whole under a temporary name (``mkstemp``: ``O_EXCL``, mode 0600) and linked into
    place: ``link`` never replaces, so of two first compiles racing one key wins and no reader
    ever sees half a key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = os.urandom(32)
    fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=path.parent)
    try:
        os.write(fd, key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key(path)
        except OSError:  # a file system without hard links: exclusive create, then write
            fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd2, "wb") as f:
                f.write(key.hex().encode("ascii") + b"\n")
                f.flush()
                os.fsync(f.fileno())
    finally:
        os.unlink(tmp)
    log.info("created the bundle signing key %s", path)
    return key


def load_key(create: bool) -> bytes | None:
    """This machine's key: created on first use when ``create``, else None when there is none."""
    path = key_path()
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            return None
    try:
        return _create_key(path)
    except FileExistsError:
        return _read_key(path)


def _mac(key: bytes, manifest_bytes: bytes) -> str:
    return hmac.new(key, _DOMAIN + manifest_bytes, hashlib.sha256).hexdigest()


def sign_bundle(bundle: Path) -> bool:
    """Sign ``bundle/manifest.json`` with this machine's key (made on first use) into
    ``manifest.sig``. Returns False, with a warning logged, where no key can be made or read:
    the bundle is then valid but unsigned (its code-bearing engines need ``--trust``)."""
    from compressor.manifest import MANIFEST

    bundle = Path(bundle)
    try:
        key = load_key(create=True)
        assert key is not None
        data = (bundle / MANIFEST).read_bytes()
        sig = {"algorithm": ALGORITHM, "key_id": key_id(key), "mac": _mac(key, data)}
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(bundle / SIGNATURE, flags, 0o644), "w", encoding="utf-8") as f:
            f.write(json.dumps(sig) + "\n")
    except (KeyUnusable, OSError) as e:
        log.warning(
            "the bundle is not signed: %s (set COMPRESSOR_CONFIG_DIR to a private writable folder); "
            "its code-bearing engines will need --trust",
            e,
        )
        return False
    return True


@dataclass(frozen=True)
class Signature:
    """What ``manifest.sig`` says about the manifest: ``state`` is one of ``valid``,
    ``unsigned``, ``other-key``, ``mismatch``, ``malformed``, ``no-key``, ``key-unusable``
    (and ``own``: a bundle this process is still writing, not signed yet)."""

    state: str
    detail: str  # one line, for people
    key_id: str | None = None

    @property
    def valid(self) -> bool:
        return self.state == "valid"


def check_signature(bundle: Path, manifest_bytes: bytes) -> Signature:
    """Check ``bundle/manifest.sig`` against ``manifest_bytes`` (the bytes that were parsed, so
    that what is checked is what is used) and this machine's key; never creates a key."""
    path = Path(bundle) / SIGNATURE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Signature("unsigned", f"not signed (no {SIGNATURE})")
    except OSError as e:
        return Signature("malformed", f"{SIGNATURE} cannot be read ({e.strerror})")
    if not stat.S_ISREG(st.st_mode) or st.st_size > _SIG_MAX_BYTES:
        return Signature("malformed", f"{SIGNATURE} is not a small regular file")
    try:
        sig = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        sig = None
    if not (
        isinstance(sig, dict)
        and sig.get("algorithm") == ALGORITHM
        and isinstance(sig.get("key_id"), str)
        and _KEY_ID.fullmatch(sig["key_id"])
        and isinstance(sig.get("mac"), str)
        and _HEX64.fullmatch(sig["mac"])
    ):
        return Signature("malformed", f"{SIGNATURE} is not a {ALGORITHM} signature this tool wrote")
    signer = sig["key_id"]
    try:
        key = load_key(create=False)
    except KeyUnusable as e:
        return Signature("key-unusable", str(e), signer)
    if key is None:
        return Signature(
            "no-key", f"signed by key {signer}; this machine has no signing key yet ({key_path()})", signer
        )
    mine = key_id(key)
    if signer != mine:
        return Signature(
            "other-key",
            f"signed by another key ({signer}; this machine's is {mine}): compiled elsewhere, "
            "or before the key was replaced",
            signer,
        )
    if not hmac.compare_digest(_mac(key, manifest_bytes), sig["mac"]):
        return Signature(
            "mismatch", f"manifest.json was changed after it was signed (key {mine}): do not trust it", signer
        )
    return Signature("valid", f"signed by this machine's key ({mine})", signer)


_UNTRUSTED_WHY = {
    "unsigned": "the bundle is not signed by this machine's key",
    "no-key": "the bundle is not signed by this machine's key",
    "other-key": "the bundle is signed by another machine's key",
    "mismatch": "the bundle's manifest was changed after it was signed",
    "malformed": "the bundle's signature is malformed",
    "key-unusable": "this machine's signing key is unusable",
}


@dataclass(frozen=True)
class Trust:
    """Whether the bundle's code-bearing artifacts may be loaded, and why (one phrase)."""

    trusted: bool
    why: str
    signature: Signature

    def refusal(self, what_it_loads: str) -> str:
        """Why an engine that ``what_it_loads`` is not loaded, and what to do."""
        return f"{self.why} ({what_it_loads}); pass --trust if you trust its author"

    def to_dict(self) -> dict[str, object]:
        return {"trusted": self.trusted, "why": self.why, "signature": self.signature.state}


def decide_trust(bundle: Path, manifest_bytes: bytes, explicit: bool = False) -> Trust:
    """Trusted when signed by this machine's key, or when the user named it (``--trust``)."""
    sig = check_signature(bundle, manifest_bytes)
    if sig.valid:
        return Trust(True, "signed by this machine's key", sig)
    if explicit:
        return Trust(True, f"trusted by the user (--trust); {sig.detail}", sig)
    return Trust(False, _UNTRUSTED_WHY[sig.state], sig)
