"""Throwaway TLS material for one bench run, as PEM files (HAProxy reads files too)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from .children import HOST


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server_cert: Path  # the proxy's (ingress, HAProxy, bare splice), for 127.0.0.1
    server_key: Path
    server_combined: Path  # chain + key in one file, as HAProxy's ``crt`` wants it
    fleet_cert: Path
    fleet_key: Path

    @classmethod
    def at(cls, directory: Path) -> TLSFiles:
        names = ("ca.pem", "srv.pem", "srv.key", "srv-combined.pem", "fl.pem", "fl.key")
        return cls(*(directory / n for n in names))

    @classmethod
    def write(cls, directory: Path) -> TLSFiles:
        """A throwaway CA (ECDSA, trustme's default) and two leaf certificates."""
        ca = trustme.CA()
        files = cls.at(directory)
        ca.cert_pem.write_to_path(files.ca)
        for leaf, cert, key in (
            (ca.issue_cert(HOST, "localhost"), files.server_cert, files.server_key),
            (ca.issue_cert(HOST, "localhost"), files.fleet_cert, files.fleet_key),
        ):
            for blob in leaf.cert_chain_pems:
                blob.write_to_path(cert, append=True)
            leaf.private_key_pem.write_to_path(key)
        files.server_combined.write_bytes(
            files.server_cert.read_bytes() + files.server_key.read_bytes()
        )
        return files

    def carrier_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def fleet_server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.fleet_cert, self.fleet_key)
        return ctx
